"""Timed services whose loop survives a failing tick."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pulumid.errors import PulumidError, ShuttingDown


class SafeTimer(TimerService):
    """A TimerService that logs a failing tick instead of stopping the loop for good."""

    log = Logger()

    def __init__(
        self,
        name: str,
        step: float,
        tick: Callable[[], Awaitable[Any]],
        clock: IReactorTime | None = None,
        *,
        now: bool = True,
        wait_on_stop: bool = True,
    ) -> None:
        super().__init__(step, self._tick)
        self.setName(name)
        self._callable = tick
        self._now = now
        self._wait_on_stop = wait_on_stop
        self.failures = 0
        if clock is not None:
            self.clock = clock

    def startService(self) -> None:
        if self._now:
            super().startService()
            return
        # TimerService always ticks at start; this one waits one step first.
        Service.startService(self)
        self._loop = LoopingCall(self.call[0])
        self._loop.clock = self.clock  # type: ignore[assignment]
        self._loopFinished = self._loop.start(self.step, now=False)
        self._loopFinished.addErrback(self._failed)

    def stopService(self) -> Deferred[None] | None:
        stopping = super().stopService()
        # A tick that waits on the outside world (an ACME order polling its CA for up to
        # 90 s) must not hold up the daemon's exit: it is abandoned, to be redone at start.
        return stopping if self._wait_on_stop else None

    def _tick(self) -> Deferred[None]:
        d: Deferred[Any] = Deferred.fromCoroutine(self._run())
        return d

    async def _run(self) -> None:
        try:
            await self._callable()
        except ShuttingDown:
            self.log.info("timer {name} stopped by the shutdown", name=self.name)
        except PulumidError as e:
            # Expected failures (storage unavailable): a line, not a traceback.
            self.failures += 1
            self.log.error("timer {name} failed: {error}", name=self.name, error=e.message)
        except Exception:
            self.failures += 1
            self.log.failure("timer {name} failed", name=self.name)
