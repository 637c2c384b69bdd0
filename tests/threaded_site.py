"""An aiohttp application on 127.0.0.1 at a free port, served from an event loop on a thread of its
own (that thread runs the handlers; start and close are called from the test's): the tests' servers."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from aiohttp import web

from rkmqtt.mqtt.broker import free_port


class ThreadedSite:
    # aiohttp's handler_cancellation: a handler is cancelled when its client leaves.
    handler_cancellation = False

    def __init__(self, name: str) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """The routes of the site."""
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _open(self) -> None:
        self._runner = web.AppRunner(self.app(), handler_cancellation=self.handler_cancellation)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
