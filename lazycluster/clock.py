"""Time and concurrency, injectable so that a simulation can replace both.

The library never calls `time.sleep`, `time.time`, `time.monotonic` or starts
threads for host work itself: it calls the `Clock` of the transport it works
with. `SystemClock` uses real time and a thread pool. A simulator's clock
advances virtual time on `sleep` and runs `map` calls one after another, so a
simulated run is deterministic.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Upper bound on threads for one parallel map; SSH operations wait on the
# network, not the CPU, so this is well above the core count on purpose.
MAX_PARALLEL_CALLS = 64


class Clock(ABC):
    """Source of time, sleeping and parallel execution for the library."""

    @abstractmethod
    def monotonic(self) -> float:
        """Return seconds from an arbitrary start, never going backwards."""

    @abstractmethod
    def time(self) -> float:
        """Return wall-clock seconds since the epoch."""

    @abstractmethod
    def sleep(self, seconds: float) -> None:
        """Block the caller for `seconds`."""

    @abstractmethod
    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Call `function` on every item concurrently and return the results in order.

        The first exception raised by a call is re-raised after all calls have
        finished, so no call is left running in the background.
        """

    @abstractmethod
    def submit(self, function: Callable[[], R], name: str = "") -> Future[R]:
        """Start `function` in the background and return a future of its result.

        Used for asynchronous task execution. A virtual clock may run the
        function before returning, with an already completed future.
        """

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float, interval: float = 0.05
    ) -> bool:
        """Poll `predicate` until it returns True or `timeout` seconds pass.

        Returns the last value of the predicate. The interval grows up to
        10 times its start value so long waits do not poll needlessly often.
        """
        deadline = self.monotonic() + timeout
        delay = interval
        while True:
            if predicate():
                return True
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                return False
            self.sleep(min(delay, remaining))
            delay = min(delay * 1.5, interval * 10)


class SystemClock(Clock):
    """Real time and a thread pool."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        item_list = list(items)
        if len(item_list) <= 1:
            return [function(item) for item in item_list]

        futures: list[Future[R]] = []
        try:
            with ThreadPoolExecutor(
                max_workers=min(len(item_list), MAX_PARALLEL_CALLS),
                thread_name_prefix="lazycluster",
            ) as pool:
                for item in item_list:
                    futures.append(pool.submit(function, item))
        except RuntimeError:
            # Once interpreter shutdown has begun (in atexit handlers, where
            # cleanup runs) no executor accepts work, so run the calls in turn.
            if futures:
                raise
            return [function(item) for item in item_list]

        # Leaving the with-block waited for every call, so result() no longer blocks.
        errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error
        return [future.result() for future in futures]

    def submit(self, function: Callable[[], R], name: str = "") -> Future[R]:
        future: Future[R] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)

        # A daemon thread so that a hanging remote step never blocks interpreter exit.
        threading.Thread(target=run, name=f"lazycluster-{name}" if name else None, daemon=True).start()
        return future


SYSTEM_CLOCK = SystemClock()
