"""FairThreadWorker's accept rule (shlhost/gunicorn_worker.py), without a server: gunicorn's
run loop accepts while ``nr_conns < worker_connections``. The worker in a real server:
tests/live/test_fair_worker.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shlhost import gunicorn_worker
from shlhost.gunicorn_worker import ACCEPT_PAUSE, FairThreadWorker


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(gunicorn_worker.time, "monotonic", lambda: now[0])
    return now


def worker(threads: int = 4, cap: int = 1000) -> FairThreadWorker:
    w = FairThreadWorker.__new__(FairThreadWorker)  # no gunicorn arbiter needed for the rule
    w.cfg = SimpleNamespace(threads=threads)
    w.worker_connections = cap  # what gunicorn's __init__ sets from its config
    w.nr_conns = 0
    w._last_accept = 0.0
    return w


def accepts(w: FairThreadWorker) -> bool:
    return bool(w.nr_conns < w.worker_connections)


def test_accepts_freely_while_a_thread_is_free(clock: list[float]) -> None:
    w = worker(threads=4)
    for held in range(4):
        w.nr_conns = held
        w._last_accept = clock[0]  # it has just accepted one
        assert accepts(w)


def test_a_full_worker_leaves_the_next_connection_to_others_for_a_moment(
    clock: list[float],
) -> None:
    w = worker(threads=4)
    w.nr_conns = 4
    start = w._last_accept = clock[0]
    assert not accepts(w)
    clock[0] = start + ACCEPT_PAUSE / 2
    assert not accepts(w)
    clock[0] = start + ACCEPT_PAUSE * 1.01  # just past the pause
    assert accepts(w)  # never refuses work: every worker may be as full


def test_gunicorns_own_cap_still_holds(clock: list[float]) -> None:
    w = worker(threads=4, cap=6)
    w.nr_conns = 6
    clock[0] += 10 * ACCEPT_PAUSE
    assert not accepts(w)
    w.nr_conns = 5
    assert accepts(w)
