"""One HTTP request's trip through the scheduler: the seam between the HTTP API and the bridge.

Threads: `Gateway` and `Exchange` run on the HTTP server's event-loop thread ("rkmqtt-http").
`_QueueSink.chunk` and `.final` are called on the scheduler thread and only schedule a put onto
the exchange's asyncio queue (`call_soon_threadsafe`). Nothing here waits on the engine:
`Scheduler.submit`, `.cancel` and `.refused` put a command on the scheduler's inbox and return.

An HTTP request becomes the same `Request` an MQTT one does, keyed `RequestKey(client, id)` with
the client named by its token (or `http_client`), so it shares the fair queues, the limits and the
batches. The checks made here are intake's, with its error codes: prompt length (`too_long`),
`max_new_tokens` (`too_many_tokens`), tools the model cannot take (`invalid_request`), the
client's rate (`rate_limited`); the scheduler then answers `busy`, `too_long` (the context),
`engine_error` or `shutting_down` like it does for MQTT. Each code has one HTTP status
(`HTTP_STATUS`). A refusal made here is counted with `Scheduler.refused`, so that `P/stats` adds
up over both APIs. A client that goes away cancels its request (`Exchange.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from rkmqtt.engines.base import ChatMessage, Generation
from rkmqtt.mqtt.intake import RateLimiter, resolve_sampling
from rkmqtt.protocol import ErrorCode, ErrorReply, FinalReply, OkReply, new_request_id
from rkmqtt.sched.loop import Scheduler
from rkmqtt.sched.request import Request, RequestKey, Route
from rkmqtt.settings import Settings

from .auth import Auth
from .textscan import StopScanner, cut_at_stop

_LOGGER = logging.getLogger(__name__)

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_CLIENT: 400,
    ErrorCode.INVALID_REPLY_TO: 400,
    ErrorCode.DUPLICATE_ID: 400,
    ErrorCode.TOO_LONG: 400,
    ErrorCode.TOO_MANY_TOKENS: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BUSY: 503,
    ErrorCode.EXPIRED: 503,
    ErrorCode.CANCELLED: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.ENGINE_ERROR: 500,
}


class ApiError(Exception):
    """An HTTP error response: status, message, and the bridge's error code when there is one."""

    def __init__(self, status: int, message: str, code: ErrorCode | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class Call:
    """What a client asks of the model, whichever API it spoke."""

    messages: tuple[ChatMessage, ...]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    stream: bool = False

    def prompt_chars(self) -> int:
        """Characters the model reads: the messages, and the tool definitions the template renders."""
        n = sum(len(m.content) for m in self.messages)
        return n + (len(json.dumps(self.tools)) if self.tools else 0)


_Item = str | FinalReply


class _QueueSink:
    """The route's `ReplySink`: the scheduler thread's replies onto the exchange's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()

    def chunk(self, seq: int, text: str) -> None:
        self._put(text)

    def final(self, reply: FinalReply) -> None:
        self._put(reply)

    def _put(self, item: _Item) -> None:
        # RuntimeError: the loop is closed (the HTTP server stopped) and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class Result:
    """A request that ran: its text (cut at a stop sequence) and the bridge's final reply."""

    text: str
    reply: OkReply
    stopped: bool  # a stop sequence ended it

    @property
    def done_reason(self) -> Literal["stop", "length"]:
        return "length" if self.reply.finish_reason == "length" and not self.stopped else "stop"


class Exchange:
    """One submitted request, seen from its HTTP handler."""

    def __init__(self, gateway: Gateway, key: RequestKey, call: Call, sink: _QueueSink) -> None:
        self.gateway = gateway
        self.key = key
        self.call = call
        self._sink = sink
        self._stops = StopScanner(call.stop)
        self._head: _Item | None = None
        self.final: FinalReply | None = None
        self.created = time.time()
        self._cancelled = False

    async def _get(self) -> _Item:
        if self._head is not None:
            item, self._head = self._head, None
            return item
        return await self._sink.queue.get()

    async def start(self) -> None:
        """Wait for the first text or the end; raise `ApiError` when it ended in an error first
        (queue full, prompt too long for the context...), before a response has begun."""
        item = await self._sink.queue.get()
        if isinstance(item, ErrorReply):
            self.final = item
            raise self.gateway.error_of(item)
        self._head = item

    async def texts(self) -> AsyncIterator[str]:
        """The text as it comes, cut at a stop sequence; ends with the final reply (`self.final`)."""
        while self.final is None:
            item = await self._get()
            if not isinstance(item, str):
                self.final = item
                break
            shown = self._stops.feed(item)
            if self._stops.hit and not self._cancelled:
                self._cancel()  # the rest is not wanted: free the slot
            if shown:
                yield shown
        rest = self._stops.flush()
        if rest and isinstance(self.final, OkReply):
            yield rest

    def ending(self) -> Result | ApiError:
        """How it ended, once `texts()` is exhausted."""
        final = self.final
        assert final is not None, "ending() before the final reply"
        if isinstance(final, ErrorReply):
            return self.gateway.error_of(final)
        text, stopped = cut_at_stop(final.text, self.call.stop)
        return Result(text, final, stopped or self._stops.hit)

    async def result(self) -> Result:
        """Wait for the end (not streaming); raise `ApiError` when it failed."""
        async for _ in self.texts():
            pass
        end = self.ending()
        if isinstance(end, ApiError):
            raise end
        return end

    def close(self) -> None:
        """The handler is done (or the client went away): cancel the request if it has not ended."""
        if self.final is None and not self._cancelled:
            _LOGGER.info("request %s: the HTTP client went away; cancelling it", self.key)
            self._cancel()

    def _cancel(self) -> None:
        self._cancelled = True
        self.gateway.scheduler.cancel(self.key)


class Gateway:
    """Checks an HTTP request like intake does and submits it to the scheduler."""

    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        rate: RateLimiter,
        auth: Auth,
        model_name: str,
        tools: bool,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.rate = rate
        self.auth = auth
        self.model_name = model_name
        self.tools = tools  # the engine takes tool definitions
        self.accepting = True

    def refuse(self, code: ErrorCode, message: str, status: int | None = None) -> ApiError:
        """An error response for a request refused here, counted like MQTT's refusals."""
        self.scheduler.refused(code)
        return self._error(code, message, status)

    def error_of(self, reply: ErrorReply) -> ApiError:
        """The error response of a request the scheduler answered with an error (already counted)."""
        return self._error(reply.error.code, reply.error.message)

    def _error(self, code: ErrorCode, message: str, status: int | None = None) -> ApiError:
        retry: int | None = None
        if code == ErrorCode.RATE_LIMITED and self.settings.rate_limit > 0:
            retry = max(1, math.ceil(60.0 / self.settings.rate_limit))
        elif code == ErrorCode.BUSY:
            retry = 1
        return ApiError(status or HTTP_STATUS.get(code, 500), message, code, retry)

    def client(self, authorization: str) -> str:
        """The client name of a request the server's authentication let in."""
        name = self.auth.client(authorization)
        if name is None:
            raise ApiError(401, "a bearer token is required: Authorization: Bearer <token> (setting http_tokens)")
        return name

    def open(self, client: str, call: Call) -> Exchange:
        """Check `call` and submit it as `client`; raise `ApiError` when it is refused."""
        s = self.settings
        if not self.accepting or self.scheduler.stopped:
            raise self.refuse(ErrorCode.SHUTTING_DOWN, "the bridge is shutting down; try again later")
        chars = call.prompt_chars()
        if chars > s.max_prompt_chars:
            raise self.refuse(ErrorCode.TOO_LONG, f"prompt is {chars} characters; the limit is {s.max_prompt_chars}")
        if call.max_new_tokens is not None and call.max_new_tokens > s.max_new_tokens:
            raise self.refuse(
                ErrorCode.TOO_MANY_TOKENS,
                f"the answer may have up to {call.max_new_tokens} tokens; the limit is {s.max_new_tokens}",
            )
        if call.tools and not self.tools:
            raise self.refuse(
                ErrorCode.INVALID_REQUEST,
                f"{self.model_name} takes no tools: its chat template has no place for them (or the engine does "
                "not pass them); send the request without tools, or serve a model whose template takes them "
                "(e.g. Qwen2.5-Instruct) with the numpy engine",
            )
        if not self.rate.allow(client):
            raise self.refuse(
                ErrorCode.RATE_LIMITED,
                f"more than {s.rate_burst} requests at once or {s.rate_limit:g} a minute from {client!r}",
            )
        sampling, requested = resolve_sampling(
            s, call.temperature, call.top_k, call.top_p, call.repeat_penalty, call.seed
        )
        key = RequestKey(client, new_request_id())
        gen = Generation(
            key=key,
            messages=call.messages,
            max_new_tokens=call.max_new_tokens or s.default_new_tokens,
            sampling=sampling,
            sampling_requested=requested,
            tools=call.tools,
        )
        sink = _QueueSink(asyncio.get_running_loop())
        # Text chunks only when someone reads them: a streaming client, or stop sequences to watch.
        route = Route(f"http/{key}", stream=call.stream or bool(call.stop), sink=sink)
        self.scheduler.submit(Request(key=key, route=route, gen=gen, arrival=time.monotonic()))
        return Exchange(self, key, call, sink)
