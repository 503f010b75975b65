"""Shell text shared by the transports: env checks, exit codes, output lines."""

from __future__ import annotations

import codecs
import re
import shlex
from collections.abc import Callable, Mapping

from lazycluster.transport.base import Command, command_to_shell

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Exit codes of POSIX shells for a command that cannot run.
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def validate_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """Return `env` as a dict of str, or raise ValueError naming an invalid variable name."""
    if not env:
        return {}
    checked = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(
                f"Invalid environment variable name {name!r}: use letters, digits and "
                "underscores, not starting with a digit."
            )
        checked[name] = str(value)
    return checked


def exit_code_of(returncode: int) -> int:
    """Map a `subprocess` return code to the code a shell reports (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def quote_path(path: str) -> str:
    """Quote `path` for a POSIX shell, keeping a leading `~` or `~/` as the home folder."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:]) if path[2:] else '"$HOME"/'
    return shlex.quote(path)


def build_script(command: Command, env: Mapping[str, str], cwd: str | None) -> str:
    """Return a POSIX sh script that exports `env`, enters `cwd` and runs `command`.

    A failed `cd` ends the script with the exit code of `cd`, before the command runs.
    """
    lines = [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    if cwd is not None:
        lines.append(f"cd -- {quote_path(cwd)} || exit")
    lines.append(command_to_shell(command))
    return "\n".join(lines)


def tail_lines(text: str, max_lines: int | None) -> str:
    """Return the last `max_lines` lines of `text`, or all of it for None."""
    if max_lines is None:
        return text
    if max_lines <= 0:
        return ""
    lines = text.splitlines(keepends=True)
    return "".join(lines[-max_lines:])


class LineSplitter:
    """Decodes a byte stream as UTF-8 and calls `on_line` with each complete line."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> None:
        text = self._pending + self._decoder.decode(data)
        *lines, self._pending = text.split("\n")
        for line in lines:
            self._on_line(line)

    def flush(self) -> None:
        """Pass on a last line that has no newline."""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        if text:
            self._on_line(text)
