"""Processes started in a test host's container with docker exec, outside SSH.

They give the floor of a measurement: the same program on the same host with
no SSH and no library around it. Each one prints its PID first, so it is
stopped by that PID and nothing else.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)


class ExecProcess:
    """A process in a container whose merged output is read line by line."""

    def __init__(self, host: Any, argv: Sequence[str]) -> None:
        self.host = host
        script = f"echo $$; exec {shlex.join(argv)} 2>&1"
        result = host.container.exec_run(["sh", "-c", script], stream=True)
        self._chunks: Iterator[bytes] = result.output
        self._buffer = b""
        self.pid = int(self._next_line())
        self._drain: threading.Thread | None = None
        log.info("host %s: started pid %d by docker exec: %s", host.alias, self.pid, shlex.join(argv))

    def _next_line(self) -> str:
        while b"\n" not in self._buffer:
            self._buffer += next(self._chunks)
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def wait_for(self, text: str, timeout: float) -> float:
        """Read output until a line contains `text`; return the time it was seen."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        # NOTE: the deadline is checked between lines only; a silent process blocks here.
        while time.monotonic() < deadline:
            try:
                line = self._next_line()
            except StopIteration:
                break
            lines.append(line)
            if text in line:
                seen = time.perf_counter()
                self._start_drain()
                return seen
        raise RuntimeError(f"host {self.host.alias}: no line with {text!r} within {timeout:g} s:\n" + "\n".join(lines[-20:]))

    def _start_drain(self) -> None:
        # Reading on keeps a full pipe from blocking the process.
        def drain() -> None:
            for _chunk in self._chunks:
                pass

        self._drain = threading.Thread(target=drain, name=f"drain-{self.host.alias}-{self.pid}", daemon=True)
        self._drain.start()

    def stop(self) -> None:
        """Send SIGTERM to the process, SIGKILL after 5 s."""
        script = f"kill {self.pid} 2>/dev/null; for i in $(seq 50); do kill -0 {self.pid} 2>/dev/null || exit 0; sleep 0.1; done; kill -9 {self.pid}"
        self.host.exec(["sh", "-c", script])
        if self._drain is not None:
            self._drain.join(timeout=5)
        log.info("host %s: stopped pid %d", self.host.alias, self.pid)
