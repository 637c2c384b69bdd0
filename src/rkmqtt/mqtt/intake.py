"""Turning an incoming MQTT request into a `Request` or a `Refusal` (paho network thread; pure logic).

Checks, in order: payload size, client name, UTF-8 and JSON and the request's fields, the reply
topic's length and confinement, the Correlation Data's size, prompt length, `max_new_tokens`,
the client's rate. Each failure has its own error code. Nothing here waits on anything.

What one request can cost is bounded here: its reply topic and its Correlation Data (echoed on
every stream chunk) are capped, an oversized Correlation Data is never echoed, and the text of a
refusal (which may quote the request) is cut to `MAX_MESSAGE_CHARS`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams
from rkmqtt.logtext import clip
from rkmqtt.mqtt.replies import Refusal
from rkmqtt.protocol import (
    ErrorCode,
    RequestPayload,
    describe_validation_error,
    extract_routing,
    new_request_id,
    parse_request_payload,
)
from rkmqtt.sched.request import Request, RequestKey, Route
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics, is_valid_client

#: The longest error message a refusal carries (a validation error may name every unknown field).
MAX_MESSAGE_CHARS = 500


class RateLimiter:
    """Token bucket per client: `burst` at once, `per_minute` sustained. Thread-safe."""

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, client: str, now: float | None = None) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self._burst, now))
            tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
            ok = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > self._max:  # forget the longest-idle clients
                self._buckets.popitem(last=False)
            return ok


def resolve_sampling(
    s: Settings,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repeat_penalty: float | None,
    seed: int | None,
) -> tuple[SamplingParams, bool]:
    """A request's sampling fields over the settings' defaults, and whether it set any itself
    (shared with the HTTP API, so that equal requests get equal sampling and batch keys)."""
    sampling = SamplingParams(
        temperature=s.temperature if temperature is None else temperature,
        top_k=s.top_k if top_k is None else top_k,
        top_p=s.top_p if top_p is None else top_p,
        repeat_penalty=s.repeat_penalty if repeat_penalty is None else repeat_penalty,
        seed=seed,
    )
    return sampling, any(v is not None for v in (temperature, top_k, top_p, repeat_penalty, seed))


@dataclass(frozen=True)
class Incoming:
    """One message on `P/request/<client>`: the payload and its MQTT 5 properties, if any
    (they win over the payload's `reply_to` and `expires_in`)."""

    client: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: float | None = None


class Intake:
    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.rate = RateLimiter(settings.rate_limit, settings.rate_burst)

    def accept(self, msg: Incoming, now: float | None = None, rate_limit: bool = True) -> Request | Refusal:
        """Validate one request. Never raises: what cannot be read is refused with a code.
        `rate_limit=False` for a request taken up from the journal: it was counted when it came."""
        now = time.monotonic() if now is None else now
        try:
            payload = self._read(msg)
            if isinstance(payload, Refusal):
                return payload
            rid = payload.id or new_request_id()
            route = self._route(msg, rid, payload.reply_to, payload.stream)
            if isinstance(route, Refusal):
                return route
            problem = self._over_limits(msg.client, payload, now, rate_limit)
            if problem is not None:
                return Refusal(rid, route, *problem)
            return self._request(msg, RequestKey(msg.client, rid), payload, route, now)
        except Exception as e:  # e.g. RecursionError on absurd nesting: refuse, never drop
            rid = new_request_id()
            default = Route(self.topics.reply(msg.client, rid), self._correlation(msg))
            return Refusal(
                rid, default, ErrorCode.INVALID_REQUEST, f"the request could not be read ({type(e).__name__})"
            )

    def _read(self, msg: Incoming) -> RequestPayload | Refusal:
        """The payload as a request, or its refusal (routed on a best-effort reading of it)."""
        s = self.settings
        if len(msg.payload) > s.max_payload_bytes:
            return self._unreadable(
                msg,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"payload is {len(msg.payload)} bytes; the limit is {s.max_payload_bytes}",
                parse=False,
            )
        if not is_valid_client(msg.client):
            return self._unreadable(
                msg, ErrorCode.INVALID_CLIENT, "the client name in the topic must be 1-64 characters of A-Z a-z 0-9 _ -"
            )
        try:
            return parse_request_payload(msg.payload)
        except UnicodeDecodeError:
            return self._unreadable(msg, ErrorCode.INVALID_REQUEST, "payload is not valid UTF-8")
        except ValidationError as e:
            return self._unreadable(msg, ErrorCode.INVALID_REQUEST, describe_validation_error(e))

    def _unreadable(self, msg: Incoming, code: ErrorCode, message: str, parse: bool = True) -> Refusal:
        # Not a valid request: its id and reply_to are read on a best-effort basis, only here, so
        # that a good request's JSON is parsed once. The reply goes to the requested topic if that
        # is allowed, else to the default one.
        rid, reply_to = extract_routing(msg.payload) if parse else (None, None)
        rid = rid or new_request_id()
        route = self._route(msg, rid, reply_to, stream=False)
        if isinstance(route, Refusal):
            route = route.route
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        return Refusal(rid, route, code, message)

    def _correlation(self, msg: Incoming) -> bytes | None:
        """The Correlation Data to echo: none when it is over the cap (it would be copied onto
        every chunk: 64 KB of it made one request cost 1000 times its size)."""
        corr = msg.correlation
        return corr if corr is None or len(corr) <= self.settings.max_correlation_bytes else None

    def _route(self, msg: Incoming, rid: str, reply_to: str | None, stream: bool) -> Route | Refusal:
        """Where the replies go: the Response Topic, else `reply_to`, else `P/reply/<client>/<id>`.
        A refusal goes to the requested topic when that one is fine, else to the default one."""
        s = self.settings
        corr = self._correlation(msg)
        default = Route(self.topics.reply(msg.client, rid), corr, stream)
        wanted = msg.response_topic or reply_to
        if wanted is not None and len(wanted) > s.max_reply_topic_chars:
            return Refusal(
                rid,
                default,
                ErrorCode.REPLY_TO_TOO_LONG,
                f"reply topic is {len(wanted)} characters; the limit is {s.max_reply_topic_chars}",
            )
        if wanted is not None and not self.topics.is_allowed_reply_topic(wanted, msg.client):
            return Refusal(
                rid,
                default,
                ErrorCode.INVALID_REPLY_TO,
                f"reply topic '{clip(wanted)}' must lie under {self.topics.reply_root()}{msg.client[:64]}/ "
                "without + or #",
            )
        route = default if wanted is None else Route(wanted, corr, stream)
        if corr is None and msg.correlation is not None:
            return Refusal(
                rid,
                route,
                ErrorCode.CORRELATION_TOO_LARGE,
                f"correlation data is {len(msg.correlation)} bytes; the limit is {s.max_correlation_bytes}",
            )
        return route

    def _over_limits(
        self, client: str, req: RequestPayload, now: float, rate_limit: bool
    ) -> tuple[ErrorCode, str] | None:
        s = self.settings
        if req.prompt_chars() > s.max_prompt_chars:
            return ErrorCode.TOO_LONG, f"prompt is {req.prompt_chars()} characters; the limit is {s.max_prompt_chars}"
        if req.max_new_tokens is not None and req.max_new_tokens > s.max_new_tokens:
            return (
                ErrorCode.TOO_MANY_TOKENS,
                f"max_new_tokens is {req.max_new_tokens}; the limit is {s.max_new_tokens}",
            )
        if rate_limit and not self.rate.allow(client, now):
            return (
                ErrorCode.RATE_LIMITED,
                f"more than {s.rate_burst} requests at once or {s.rate_limit:g} a minute from {client!r}",
            )
        return None

    def _request(self, msg: Incoming, key: RequestKey, req: RequestPayload, route: Route, now: float) -> Request:
        s = self.settings
        sampling, requested = resolve_sampling(s, req.temperature, req.top_k, req.top_p, req.repeat_penalty, req.seed)
        messages: list[ChatMessage] = []
        if req.system:
            messages.append(ChatMessage("system", req.system))
        if req.prompt is not None:
            messages.append(ChatMessage("user", req.prompt))
        else:
            messages.extend(ChatMessage(m.role, m.content) for m in req.messages or ())
        # The MQTT 5 property wins where both exist.
        expires = msg.expiry_s if msg.expiry_s is not None else req.expires_in
        gen = Generation(
            key=key,
            messages=tuple(messages),
            max_new_tokens=req.max_new_tokens or s.default_new_tokens,
            sampling=sampling,
            sampling_requested=requested,
        )
        return Request(
            key=key,
            route=route,
            gen=gen,
            arrival=now,
            deadline=None if expires is None else now + expires,
        )
