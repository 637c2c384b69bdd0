"""The openai engine's own thread, "rkmqtt-openai": an asyncio event loop where every request
streams from the upstream server (AsyncOpenAI, over httpx) and the `Link` watches it. Other threads
only schedule work here (`start`, `cancel`, never waiting); `call` (main thread only) waits."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, TypeVar

import openai

from rkmqtt.engines.base import EngineEvent, ErrorEvent
from rkmqtt.loopthread import run_loop
from rkmqtt.protocol import ErrorCode

from .answer import Answer
from .config import CONNECT_TIMEOUT_S, PROBE_TIMEOUT_S, UpstreamConfig, quiet_http_logs
from .errors import connection_cause, status_error, stream_error
from .link import Link, UpstreamDown

_LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")

Emit = Callable[[int, EngineEvent], None]


def make_client(config: UpstreamConfig) -> openai.AsyncOpenAI:
    """The client: no retries of its own (the engine decides), a bound on silence in an answer."""
    quiet_http_logs()
    return openai.AsyncOpenAI(
        base_url=config.url,
        api_key=config.api_key or "none",  # servers without keys ignore it; the client needs one
        max_retries=0,
        timeout=openai.Timeout(config.timeout_s, connect=CONNECT_TIMEOUT_S),
    )


class Worker:
    def __init__(self, config: UpstreamConfig, emit: Emit, on_change: Callable[[], None]) -> None:
        self.config = config
        self._emit = emit
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=run_loop, args=(self._loop,), name="rkmqtt-openai", daemon=True)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._client: openai.AsyncOpenAI | None = None
        self.link = Link(config.shown_url, self.probe, on_change, lambda: bool(self._tasks))

    # -- any thread ---------------------------------------------------------------------------
    def start_thread(self) -> None:
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """Run `coro` on the loop and wait for it (the main thread only: never the scheduler's)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, ticket: int, key: Hashable, body: dict[str, Any]) -> None:
        self._loop.call_soon_threadsafe(self._begin, ticket, key, body)

    def cancel(self, ticket: int) -> None:
        self._loop.call_soon_threadsafe(self._end, ticket)

    def watch(self) -> None:
        """Start watching the server (after load)."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.link.watch(), name="upstream-link"))

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self._shutdown(), timeout)
        except Exception:
            _LOGGER.exception("openai engine: clean-up failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # -- the loop's thread -------------------------------------------------------------------
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:  # made on the loop: its connections belong to this loop
            self._client = make_client(self.config)
        return self._client

    async def _shutdown(self) -> None:
        for task in list(asyncio.all_tasks()):
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.sleep(0)
        if self._client is not None:
            await self._client.close()

    async def probe(self) -> list[str]:
        """The model ids the server lists. Raises UpstreamDown when it cannot be used."""
        try:
            page = await self.client().models.list(timeout=PROBE_TIMEOUT_S)
        except openai.APITimeoutError:
            raise UpstreamDown(f"no answer within {PROBE_TIMEOUT_S:.0f} s") from None
        except openai.APIConnectionError as e:
            raise UpstreamDown(f"cannot connect ({connection_cause(e)})") from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise UpstreamDown(f"it refuses this bridge ({e.status_code}): check upstream_api_key") from None
            if e.status_code >= 500:
                raise UpstreamDown(f"it answers {e.status_code}") from None
            return []  # it answers, without a list of models (a model set in upstream_model is used)
        return [m.id for m in page.data]

    def _begin(self, ticket: int, key: Hashable, body: dict[str, Any]) -> None:
        self._tasks[ticket] = self._loop.create_task(self._answer(ticket, key, body))

    def _end(self, ticket: int) -> None:
        task = self._tasks.pop(ticket, None)
        if task is not None:
            task.cancel()

    async def _answer(self, ticket: int, key: Hashable, body: dict[str, Any]) -> None:
        answer = Answer(key)
        try:
            stream = await self.client().chat.completions.create(**body)
            try:
                async for chunk in stream:
                    event = answer.feed(chunk)
                    if event is not None:
                        self._emit(ticket, event)
            finally:
                await stream.close()  # cancelled too: the server sees the connection close
            self._emit(ticket, answer.finish())
        except asyncio.CancelledError:
            raise
        except openai.APIConnectionError as e:  # and APITimeoutError
            self._broken(ticket, key, answer, e)
        except openai.APIStatusError as e:
            self._fail(ticket, key, *status_error(e.status_code, e.body, e.message))
        except openai.APIError as e:  # an error event inside the stream
            self._fail(ticket, key, *stream_error(e.body, e.message))
        except Exception as e:  # a bug here must not leave the request without an answer
            _LOGGER.exception("request %s: reading the upstream's answer failed", key)
            self._fail(ticket, key, ErrorCode.ENGINE_ERROR, f"reading the upstream's answer failed: {e}")
        finally:
            self._tasks.pop(ticket, None)

    def _broken(self, ticket: int, key: Hashable, answer: Answer, e: openai.APIConnectionError) -> None:
        """No connection (the server is down: the link says so, once), a connection that broke (is
        the server gone? the link looks), or silence past upstream_timeout."""
        timed_out = isinstance(e, openai.APITimeoutError)
        if not _connected(e):
            cause = f"no connection within {CONNECT_TIMEOUT_S:g} s" if timed_out else connection_cause(e)
            self.link.down(f"cannot connect ({cause})")
            message = f"the upstream server {self.config.shown_url} cannot be reached ({cause})"
        elif timed_out:
            where = "before its first token" if answer.pieces == 0 else f"after {answer.pieces} tokens"
            message = (
                f"the upstream server sent nothing for {self.config.timeout_s:g} s {where} (setting upstream_timeout)"
            )
        else:
            self.link.look()
            cause = connection_cause(e)
            message = f"the connection to the upstream server broke after {answer.pieces} tokens ({cause})"
        self._fail(ticket, key, ErrorCode.ENGINE_ERROR, message)

    def _fail(self, ticket: int, key: Hashable, code: ErrorCode, message: str) -> None:
        self._emit(ticket, ErrorEvent(key, code, message))


def _connected(e: BaseException) -> bool:
    """Whether the connection to the server was made (False: the request never reached it), by
    the names of the HTTP library's exceptions (httpx and its successor httpx2 name them alike)."""
    cur: BaseException | None = e
    for _ in range(20):
        if cur is None:
            return True
        if type(cur).__name__ in ("ConnectError", "ConnectTimeout"):
            return False
        cur = cur.__cause__ or cur.__context__
    return True
