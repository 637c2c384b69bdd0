"""The HTTP server: aiohttp on an asyncio event loop in a thread of its own, "rkmqtt-http". Handlers
never wait on the engine, and a client that disconnects cancels its handler and its request. The
main thread calls `start`, `stop_accepting` and `stop`, which run coroutines on the loop and wait."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

from rkmqtt.errors import ConfigError
from rkmqtt.loopthread import run_loop
from rkmqtt.protocol import Info
from rkmqtt.sched.admission import Admission
from rkmqtt.sched.finals import Finals
from rkmqtt.sched.loop import Scheduler
from rkmqtt.settings import Settings

from . import ollama, openai
from .auth import Auth, is_local
from .common import ModelCard
from .exchange import ApiError, Gateway
from .listen import close_all, open_listeners

_LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        admission: Admission,
        finals: Finals,
        info: Info,
        tools: bool,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        address = settings.http_address
        if address is None:
            raise ConfigError("http_listen is not set")
        self.settings = settings
        self.host, self.port = address
        self.card = ModelCard.from_info(info, tools)
        self.auth = Auth(settings.http_token_names(), settings.http_client)
        self.gateway = Gateway(settings, scheduler, admission, finals, self.auth)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=run_loop, args=(self._loop,), name="rkmqtt-http", daemon=True)
        self._sockets = sockets  # bound already (`open_listeners`), else bound at `start`
        self._runner: web.AppRunner | None = None
        self._sites: list[web.SockSite] = []

    # -- the main thread's side -------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Serve on `http_listen`; raise ConfigError with one line when that is not possible."""
        if self._sockets is None:
            self._sockets = open_listeners(str(self.settings.http_listen), self.host, self.port)
        self._thread.start()
        try:
            self._call(self._open(self._sockets), timeout)
        except OSError as e:
            self.stop()
            close_all(self._sockets)
            raise ConfigError(
                f"setting http_listen={self.settings.http_listen!r}: cannot listen there ({e.strerror or e}); "
                "choose a free port or an address of this machine"
            ) from e
        where = f"http://{self.host if ':' not in self.host else f'[{self.host}]'}:{self.port}"
        _LOGGER.info("HTTP API (Ollama /api, OpenAI /v1) on %s, model %s", where, self.card.name)
        if not self.auth.required and not is_local(self.host):
            _LOGGER.warning(
                "the HTTP API listens on %s without authentication: anyone who can reach that port can use the "
                "model; set http_tokens (name:token,...) or listen on 127.0.0.1",
                where,
            )

    def stop_accepting(self, timeout: float = 5.0) -> None:
        """Close the listening socket and answer new requests on open connections `shutting_down`."""
        self.gateway.accepting = False
        if self._thread.is_alive():
            for site in self._sites:
                self._call(site.stop(), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the responses under way (their requests have been answered by then), close every
        connection and end the thread."""
        self.gateway.accepting = False
        if self._thread.is_alive():
            if self._runner is not None:
                try:
                    self._call(self._runner.cleanup(), timeout)
                except Exception:
                    _LOGGER.exception("HTTP server: clean-up failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def _call(self, coro: Awaitable[_T], timeout: float) -> _T:
        fut: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    # -- the event loop's thread ------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_payload_bytes,
            middlewares=[self._errors, self._auth],
        )
        app.router.add_get("/", self._root)
        app.router.add_routes(ollama.OllamaApi(self.gateway, self.card).routes())
        app.router.add_routes(openai.OpenAiApi(self.gateway, self.card).routes())
        return app

    async def _open(self, sockets: list[socket.socket]) -> None:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        for sock in sockets:
            site = web.SockSite(self._runner, sock)
            await site.start()
            self._sites.append(site)

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running (rkmqtt)")  # what clients probe for

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path != "/" and self.auth.client(request.headers.get("Authorization", "")) is None:
            raise ApiError(401, "a bearer token is required: Authorization: Bearer <token> (setting http_tokens)")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Every error as the API's own error body: Ollama's under /api, OpenAI's under /v1."""
        try:
            return await handler(request)
        except ApiError as e:
            return self._error_response(request, e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return self._error_response(request, ApiError(e.status, e.reason))

    def _error_response(self, request: web.Request, e: ApiError) -> web.Response:
        body: dict[str, Any] = openai.error_body(e) if request.path.startswith("/v1/") else ollama.error_body(e)
        headers: dict[str, str] = {}
        if e.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="rkmqtt"'
        if e.retry_after is not None:
            headers["Retry-After"] = str(e.retry_after)
        if e.code is not None and e.status >= 400:
            _LOGGER.info("HTTP %s %s: %d %s: %s", request.method, request.path, e.status, e.code.value, e.message)
        return web.json_response(body, status=e.status, headers=headers)
