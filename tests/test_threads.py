"""The thread pools' runners."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.python.failure import Failure

from pulumid.errors import Unavailable
from pulumid.threads import PoolRunner


def test_work_for_a_stopped_pool_fails_at_once() -> None:
    # A stopped ThreadPool drops new work silently: whoever awaited it (a timer's tick, and
    # the shutdown waiting on that tick) would wait forever.
    runner = PoolRunner(reactor, "stopped", 1)  # type: ignore[arg-type]
    runner.startService()
    runner.stopService()
    failures: list[Failure] = []
    runner.run(lambda: 1).addErrback(failures.append)
    assert len(failures) == 1 and isinstance(failures[0].value, Unavailable)
    assert "shutting down" in failures[0].value.message
