"""Timed services whose loop survives a failing tick."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class SafeTimer(TimerService):
    """A TimerService that logs a failing tick instead of stopping the loop for good."""

    log = Logger()

    def __init__(
        self,
        name: str,
        step: float,
        tick: Callable[[], Awaitable[Any]],
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(step, self._tick)
        self.setName(name)
        self._callable = tick
        self.failures = 0
        if clock is not None:
            self.clock = clock

    def _tick(self) -> Deferred[None]:
        d: Deferred[Any] = Deferred.fromCoroutine(self._run())
        return d

    async def _run(self) -> None:
        try:
            await self._callable()
        except Exception:
            self.failures += 1
            self.log.failure("timer {name} failed", name=self.name)


class FlushOnStop(SafeTimer):
    """The event flusher: one last flush when the daemon stops."""

    def stopService(self) -> Deferred[None] | None:
        stopped: Deferred[None] | None = super().stopService()
        final: Deferred[None] = Deferred.fromCoroutine(self._run())
        if stopped is None:
            return final
        return stopped.addCallback(lambda _: final)
