"""The results of one bench run: figures, ratios between them, notes; rendered as Markdown."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.stats import Sample

MEGABYTE = 1_000_000


@dataclass(frozen=True)
class Figure:
    """One measured figure. `size` turns seconds into a rate (bytes per run) when set."""

    key: str
    label: str
    sample: Sample
    size: int | None = None

    @property
    def value(self) -> float:
        """The median as the table shows it: seconds, or bytes per second for a rate."""
        if self.size is None:
            return self.sample.median
        return self.size / self.sample.median

    def cells(self) -> list[str]:
        if self.size is None:
            median, low, high = self.sample.median, self.sample.minimum, self.sample.maximum
            return [format_seconds(median), format_seconds(low), format_seconds(high)]
        # For a rate, the slowest run gives the minimum.
        return [
            format_rate(self.size / self.sample.median),
            format_rate(self.size / self.sample.maximum),
            format_rate(self.size / self.sample.minimum),
        ]


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator of two figures' table values, with an optional target."""

    label: str
    numerator: str
    denominator: str
    target: str = ""
    passes: Callable[[float], bool] | None = None


def at_most(limit: float) -> tuple[str, Callable[[float], bool]]:
    return f"≤ {limit:g}", lambda value: operator.le(value, limit)


def at_least(limit: float) -> tuple[str, Callable[[float], bool]]:
    return f"≥ {limit:g}", lambda value: operator.ge(value, limit)


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def format_rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MEGABYTE:.0f} MB/s"


@dataclass(frozen=True)
class Goal:
    """An absolute goal for one figure's median, in seconds."""

    label: str
    key: str
    limit: float


@dataclass
class Section:
    """The figures of one measurement module, its ratios and what limits them."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, key: str, label: str, sample: Sample, size: int | None = None) -> Figure:
        figure = Figure(key, label, sample, size)
        self.figures.append(figure)
        return figure

    def ratio(self, label: str, numerator: str, denominator: str, target: tuple[str, Callable[[float], bool]] | None = None) -> None:
        text, passes = target if target else ("", None)
        self.ratios.append(Ratio(label, numerator, denominator, text, passes))

    def goal(self, label: str, key: str, limit: float) -> None:
        self.goals.append(Goal(label, key, limit))

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class Report:
    """Every section of a run, plus the machine and the command that reproduces it."""

    sections: list[Section] = field(default_factory=list)

    def figure(self, key: str) -> Figure | None:
        for section in self.sections:
            for figure in section.figures:
                if figure.key == key:
                    return figure
        return None

    def ratio_value(self, ratio: Ratio) -> float | None:
        numerator, denominator = self.figure(ratio.numerator), self.figure(ratio.denominator)
        if numerator is None or denominator is None or denominator.value == 0:
            return None
        return numerator.value / denominator.value

    def figure_table(self) -> list[str]:
        lines = ["| Measurement | Median | Min | Max | Runs |", "|---|---:|---:|---:|---:|"]
        for section in self.sections:
            for figure in section.figures:
                lines.append(f"| {figure.label} | " + " | ".join(figure.cells()) + f" | {figure.sample.runs} |")
        return lines

    def ratio_table(self) -> list[str]:
        lines = ["| Ratio (medians, same run) | Value | Target | Met |", "|---|---:|---:|:---:|"]
        for section in self.sections:
            for ratio in section.ratios:
                value = self.ratio_value(ratio)
                shown = "n/a" if value is None else f"{value:.3g}"
                met = ""
                if value is not None and ratio.passes is not None:
                    met = "yes" if ratio.passes(value) else "**no**"
                lines.append(f"| {ratio.label} | {shown} | {ratio.target} | {met} |")
        return lines

    def goal_table(self) -> list[str]:
        lines = ["| Goal | Median | Limit | Met |", "|---|---:|---:|:---:|"]
        for section in self.sections:
            for goal in section.goals:
                figure = self.figure(goal.key)
                if figure is None:
                    lines.append(f"| {goal.label} | n/a | < {format_seconds(goal.limit)} | |")
                    continue
                met = "yes" if figure.value < goal.limit else "**no**"
                lines.append(f"| {goal.label} | {format_seconds(figure.value)} | < {format_seconds(goal.limit)} | {met} |")
        return lines

    def errors(self) -> list[str]:
        return [f"- {section.title}: {section.error}" for section in self.sections if section.error]
