"""Whether the upstream server answers: one log line per change, tenacity's retries while it is down,
a probe when idle (the engine's event-loop thread; `problem` is read by any)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

_LOGGER = logging.getLogger(__name__)

IDLE_PROBE_S = 30.0
MAX_RETRY_WAIT_S = 10.0


class UpstreamDown(Exception):
    """The server cannot be used now; the message says why, in words."""


class Link:
    def __init__(
        self,
        url: str,
        probe: Callable[[], Awaitable[list[str]]],
        on_change: Callable[[], None],
        busy: Callable[[], bool],
    ) -> None:
        self.url = url
        self._probe = probe  # the model ids the server lists; raises UpstreamDown
        self._on_change = on_change  # any thread may be told: it must not block
        self._busy = busy  # requests stream now (they show the server answers)
        self.problem: str | None = None
        self._since = 0.0
        self._trouble: asyncio.Event | None = None

    def down(self, cause: str) -> None:
        """The server cannot be used (a request or a probe found out): one line, then retries."""
        if self.problem is not None:
            return
        self.problem = f"the upstream server {self.url} is unavailable: {cause}"
        self._since = time.monotonic()
        _LOGGER.warning("%s; requests wait in the queue while rkmqtt retries", self.problem)
        self._on_change()
        self.look()

    def look(self) -> None:
        """Probe the server soon (a request's connection broke: is the server gone?)."""
        if self._trouble is not None:
            self._trouble.set()

    async def watch(self) -> None:
        """Runs for the engine's life: probes when idle or told to, retries while down."""
        self._trouble = asyncio.Event()
        while True:
            if self.problem is not None:
                await self._recover()
                continue
            try:
                await asyncio.wait_for(self._trouble.wait(), IDLE_PROBE_S)
                told = True
            except asyncio.TimeoutError:
                told = False
            self._trouble.clear()
            if self.problem is not None or (not told and self._busy()):
                continue
            try:
                await self._probe()
            except UpstreamDown as e:
                self.down(str(e))

    async def _recover(self) -> None:
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.5, min=0.5, max=MAX_RETRY_WAIT_S),
            retry=retry_if_exception_type(UpstreamDown),
            before_sleep=lambda state: _LOGGER.debug(
                "upstream %s: still unavailable (try %d): %s",
                self.url,
                state.attempt_number,
                state.outcome.exception() if state.outcome else "",
            ),
        )
        async for attempt in retrying:
            with attempt:
                await self._probe()
        _LOGGER.info("the upstream server %s answers again (after %.0f s)", self.url, time.monotonic() - self._since)
        self.problem = None
        self._on_change()
