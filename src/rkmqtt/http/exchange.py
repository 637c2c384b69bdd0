"""One HTTP request's trip through the scheduler (the HTTP event-loop thread, "rkmqtt-http"): admitted
like an MQTT one (`Admission`), waiting up to `http_wait_s` where a rate budget or a full queue is in
the way; its replies through its own `ReplySink`, which only `call_soon_threadsafe`s them onto the
exchange's queue. One HTTP status per error code; a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from rkmqtt.protocol import ErrorCode, ErrorReply, FinalReply, OkReply, new_request_id
from rkmqtt.sched.admission import Admission, Ask, Refused
from rkmqtt.sched.finals import Finals
from rkmqtt.sched.loop import Scheduler
from rkmqtt.sched.request import Chunk, Outcome, Request, RequestKey
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
class Call(Ask):
    """What a client asks of the model, whichever API it spoke: admission's `Ask`, and what the
    handler itself does with the text."""

    stop: tuple[str, ...] = ()  # cut the text at the first of these
    stream: bool = False


_Item = str | FinalReply


class _QueueSink:
    """One exchange's `ReplySink`: the scheduler thread's replies onto the exchange's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, finals: Finals) -> None:
        self._loop = loop
        self._finals = finals
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()

    def chunk(self, chunk: Chunk) -> None:
        self._put(chunk.text)

    def final(self, outcome: Outcome) -> None:
        self._put(self._finals.reply(outcome))

    def repeat(self, outcome: Outcome, retry: Request) -> None:
        self._put(self._finals.reply(outcome))

    def ignored(self, retry: Request) -> None:
        pass  # every exchange has an id and a route of its own: no retry of it can come

    def _put(self, item: _Item) -> None:
        # RuntimeError: the loop is closed (the HTTP server stopped) and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True, eq=False)
class HttpRoute:
    """An HTTP request's route: its exchange's sink. Each is a reply target of its own (compared by identity)."""

    sink: _QueueSink
    stream: bool


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
    """Admits an HTTP request (`Admission`, as MQTT's intake does) and submits it to the scheduler."""

    def __init__(
        self, settings: Settings, scheduler: Scheduler, admission: Admission, finals: Finals, auth: Auth
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.admission = admission
        self.finals = finals
        self.auth = auth
        self.accepting = True

    def refuse(self, code: ErrorCode, message: str, status: int | None = None) -> ApiError:
        """An error response for a request refused here, counted like MQTT's refusals."""
        self.admission.refused(code)
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

    async def open(self, client: str, call: Call) -> Exchange:
        """Admit `call` as `client`, submit it and wait for its first text or its end; raise `ApiError`
        when it is refused or fails before it starts. A refusal that time cures (the client's rate
        budget, a full queue) is waited out while `http_wait_s` allows: the HTTP client holds its
        connection open, as a device that retries would."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.http_wait_s
        charged = False  # the rate budget is spent once per request, not per try
        while True:
            if not self.accepting or self.scheduler.stopped:
                closed = Admission.shutting_down()
                raise self.refuse(closed.code, closed.message)
            sink = _QueueSink(loop, self.finals)
            # Text chunks only when someone reads them: a streaming client, or stop sequences to watch.
            route = HttpRoute(sink, stream=call.stream or bool(call.stop))
            key = RequestKey(client, new_request_id())
            admitted = self.admission.admit(key, call, route, rate_limit=not charged)
            if isinstance(admitted, Refused):
                if await self._waited(admitted, client, deadline):
                    continue
                raise self.refuse(admitted.code, admitted.message)
            charged = True
            full = Refused(ErrorCode.BUSY, "the queue is full")
            if self.scheduler.queue_depth >= self.settings.max_queue and await self._waited(full, client, deadline):
                continue  # a hint (the core decides): wait for a place rather than be refused by it
            self.scheduler.submit(admitted)
            ex = Exchange(self, admitted.key, call, sink)
            try:
                await ex.start()
            except ApiError as e:
                if e.code == ErrorCode.BUSY and await self._waited(Refused(e.code, e.message), client, deadline):
                    continue
                raise
            except BaseException:
                ex.close()  # the client went away while it waited
                raise
            return ex

    async def _waited(self, refused: Refused, client: str, deadline: float) -> bool:
        """Wait as admission says, when the deadline allows; False when the refusal stands."""
        wait = self.admission.retry_in(refused, client)
        if wait is None or asyncio.get_running_loop().time() + wait > deadline:
            return False
        await asyncio.sleep(wait)
        return True
