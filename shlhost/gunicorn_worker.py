"""gunicorn's gthread worker, with keep-alive connections spread over the workers.

gthread workers race for ``accept()``, and a keep-alive connection stays with the worker
that won it. When a burst of connections arrives (a load balancer opening its upstream
pool, a client opening several), the worker that wakes first takes most of them, and that
one process, bound to one core by its GIL, serves all of their requests while the other
workers idle. Measured on a 2-core machine: 16 keep-alive connections all on one of four
workers served ``/healthz`` at 1,500 requests/s; spread over three or four workers, 4,500
to 4,900.

``FairThreadWorker`` stops accepting for a moment once it holds as many connections as it
has threads, so that the other workers take the next ones. It never refuses work: when
every worker is full, each accepts again ``ACCEPT_PAUSE`` seconds after its last accept
(gunicorn's own ``worker_connections`` cap, by contrast, stops a full worker accepting
until one of its connections closes).

Written against gunicorn 27's gthread (its run loop reads ``worker_connections`` on every
turn); tests/live/test_fair_worker.py checks the spread in a real server, so an upgrade
that changes that loop shows there.
"""

from __future__ import annotations

import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

# How long a worker that holds a connection per thread leaves new ones to the others.
ACCEPT_PAUSE = 0.05


class FairThreadWorker(ThreadWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cap = 0
        self._last_accept = 0.0
        super().__init__(*args, **kwargs)

    # gunicorn's run loop accepts while ``nr_conns < worker_connections``; that limit is
    # computed here, on every turn of the loop.
    @property
    def worker_connections(self) -> int:
        if self.nr_conns < self.cfg.threads:
            return self._cap
        if time.monotonic() - self._last_accept >= ACCEPT_PAUSE:
            return self._cap  # every worker may be as full: take the next one anyway
        return self.nr_conns  # full for now: leave the next connection to another worker

    @worker_connections.setter
    def worker_connections(self, value: int) -> None:
        self._cap = value

    def accept(self, *args: Any) -> None:  # (listener), or (server, listener) before 27
        self._last_accept = time.monotonic()
        super().accept(*args)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # While paused, wake in time to accept again when the pause ends.
        if not getattr(self, "_accepting", True) and self.nr_conns < self._cap:
            timeout = min(timeout, ACCEPT_PAUSE)
        super().wait_for_and_dispatch_events(timeout)
