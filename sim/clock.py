"""Virtual time for the simulator: an event queue that advances only on `sleep`.

`VirtualClock` implements `lazycluster.clock.Clock`. Nothing here reads real
time, so a simulated 30-second timeout passes in microseconds and every run
with the same inputs fires the same events in the same order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from lazycluster.clock import Clock

T = TypeVar("T")
R = TypeVar("R")

# Wall-clock time at virtual time 0: 2026-01-01 00:00:00 UTC. Fixed so that
# timestamps in simulated logs are the same in every run.
DEFAULT_EPOCH = 1_767_225_600.0


@dataclass(order=True)
class ScheduledEvent:
    """A callback due at virtual time `due`; `sequence` keeps equal times in scheduling order."""

    due: float
    sequence: int
    callback: Callable[[], object] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock(Clock):
    """Virtual time with an event queue; `map` and `submit` run calls one after another."""

    def __init__(self, start: float = 0.0, epoch: float = DEFAULT_EPOCH) -> None:
        self._now = float(start)
        self._epoch = epoch
        self._queue: list[ScheduledEvent] = []
        self._sequence = 0
        self._advance_hooks: list[Callable[[], object]] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    def sleep(self, seconds: float) -> None:
        """Advance virtual time by `seconds`, firing every event due until then in order."""
        if seconds != seconds or seconds < 0:  # NaN or negative
            raise ValueError(f"Invalid sleep duration {seconds!r}: expected a number >= 0.")
        self.advance_to(self._now + seconds)

    def add_advance_hook(self, hook: Callable[[], object]) -> None:
        """Call `hook()` before every advance of the time, e.g. to end a pause of the simulation."""
        self._advance_hooks.append(hook)

    def advance_to(self, target: float) -> None:
        """Fire every event due at or before `target`, then set the time to `target`."""
        for hook in self._advance_hooks:
            hook()
        while self._queue and self._queue[0].due <= target:
            event = heapq.heappop(self._queue)
            if event.cancelled:
                continue
            self._now = max(self._now, event.due)
            event.callback()
        self._now = max(self._now, target)

    def schedule(self, delay: float, callback: Callable[[], object]) -> ScheduledEvent:
        """Run `callback` when virtual time reaches now + `delay`; return a cancellable event."""
        return self.schedule_at(self._now + max(0.0, delay), callback)

    def schedule_at(self, due: float, callback: Callable[[], object]) -> ScheduledEvent:
        """Run `callback` at virtual time `due` (at once on the next advance if `due` has passed)."""
        self._sequence += 1
        event = ScheduledEvent(max(due, self._now), self._sequence, callback)
        heapq.heappush(self._queue, event)
        return event

    def next_event_time(self) -> float | None:
        """Return when the next pending event fires, or None when the queue is empty."""
        while self._queue and self._queue[0].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0].due if self._queue else None

    def run_until_idle(self, limit: float = float("inf")) -> None:
        """Jump from event to event until none is left or the next one is after `limit`."""
        while True:
            due = self.next_event_time()
            if due is None or due > limit:
                return
            self.advance_to(due)

    @property
    def pending_events(self) -> int:
        return sum(1 for event in self._queue if not event.cancelled)

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        # Same error contract as SystemClock.map: every call runs, then the first error is raised.
        results: list[R] = []
        first_error: BaseException | None = None
        for item in items:
            try:
                results.append(function(item))
            except Exception as error:
                if first_error is None:
                    first_error = error
        if first_error is not None:
            raise first_error
        return results

    def submit(self, function: Callable[[], R], name: str = "") -> Future[R]:
        future: Future[R] = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(function())
        except Exception as error:  # handed to the caller through the future
            future.set_exception(error)
        return future

    def __repr__(self) -> str:
        return f"<VirtualClock t={self._now:g} pending={self.pending_events}>"
