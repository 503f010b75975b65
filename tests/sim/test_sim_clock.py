"""VirtualClock: virtual time, the event queue, map and submit."""

from __future__ import annotations

import time

import pytest

from sim import VirtualClock
from sim.clock import DEFAULT_EPOCH


def test_sleep_advances_virtual_time_only():
    clock = VirtualClock()
    started = time.monotonic()
    clock.sleep(3600)
    assert clock.monotonic() == 3600
    assert clock.time() == DEFAULT_EPOCH + 3600
    assert time.monotonic() - started < 1


def test_sleep_rejects_negative_and_nan():
    clock = VirtualClock()
    with pytest.raises(ValueError, match="sleep duration"):
        clock.sleep(-1)
    with pytest.raises(ValueError, match="sleep duration"):
        clock.sleep(float("nan"))


def test_events_fire_in_time_then_schedule_order():
    clock = VirtualClock()
    fired: list[tuple[str, float]] = []
    clock.schedule(2.0, lambda: fired.append(("late", clock.monotonic())))
    clock.schedule(1.0, lambda: fired.append(("first", clock.monotonic())))
    clock.schedule(1.0, lambda: fired.append(("second", clock.monotonic())))

    clock.sleep(1.5)
    assert fired == [("first", 1.0), ("second", 1.0)]
    assert clock.monotonic() == 1.5

    clock.sleep(1.0)
    assert fired[-1] == ("late", 2.0)


def test_event_scheduled_by_event_fires_in_same_sleep():
    clock = VirtualClock()
    fired: list[float] = []
    clock.schedule(1.0, lambda: clock.schedule(0.5, lambda: fired.append(clock.monotonic())))
    clock.sleep(2.0)
    assert fired == [1.5]


def test_cancelled_event_does_not_fire():
    clock = VirtualClock()
    fired: list[int] = []
    event = clock.schedule(1.0, lambda: fired.append(1))
    event.cancel()
    clock.sleep(5)
    assert fired == []
    assert clock.pending_events == 0


def test_run_until_idle_jumps_to_last_event():
    clock = VirtualClock()
    clock.schedule(10.0, lambda: None)
    clock.schedule(25.0, lambda: None)
    assert clock.next_event_time() == 10.0
    clock.run_until_idle()
    assert clock.monotonic() == 25.0
    assert clock.next_event_time() is None


def test_run_until_idle_stops_at_limit():
    clock = VirtualClock()
    clock.schedule(10.0, lambda: None)
    clock.schedule(25.0, lambda: None)
    clock.run_until_idle(limit=20.0)
    assert clock.monotonic() == 10.0
    assert clock.pending_events == 1


def test_wait_until_times_out_in_virtual_time():
    clock = VirtualClock()
    assert clock.wait_until(lambda: False, timeout=30.0) is False
    assert clock.monotonic() == pytest.approx(30.0)


def test_wait_until_sees_event_effect():
    clock = VirtualClock()
    state = {"ready": False}
    clock.schedule(2.0, lambda: state.update(ready=True))
    assert clock.wait_until(lambda: state["ready"], timeout=30.0)
    assert 2.0 <= clock.monotonic() < 3.0


def test_map_keeps_order_and_runs_every_call():
    clock = VirtualClock()
    calls: list[int] = []

    def work(item: int) -> int:
        calls.append(item)
        if item == 2:
            raise KeyError(item)
        return item * 10

    assert clock.map(lambda item: item * 10, [3, 1, 2]) == [30, 10, 20]
    with pytest.raises(KeyError):
        clock.map(work, [1, 2, 3])
    assert calls == [1, 2, 3]


def test_submit_returns_completed_future():
    clock = VirtualClock()
    done = clock.submit(lambda: 42, name="answer")
    failed = clock.submit(lambda: 1 / 0)
    assert done.done()
    assert done.result() == 42
    assert isinstance(failed.exception(), ZeroDivisionError)


def test_clock_never_reads_real_time(monkeypatch):
    def forbidden(*args: object) -> float:
        raise AssertionError("VirtualClock read real time")

    for name in ("time", "monotonic", "sleep", "perf_counter"):
        monkeypatch.setattr(time, name, forbidden)
    clock = VirtualClock()
    clock.schedule(1.0, lambda: None)
    clock.sleep(2.0)
    clock.wait_until(lambda: False, timeout=1.0)
    assert clock.time() > clock.monotonic()
