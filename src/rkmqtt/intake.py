"""Turning an incoming MQTT request into a `Job` or a refusal (paho network thread; pure logic).

Checks, in order: payload size, client name, UTF-8 and JSON and the request's fields, the reply
topic's confinement, prompt length, `max_new_tokens`, the client's rate. Each failure has its
own error code. Nothing here waits on anything.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from rkmqtt.engines.base import ChatMessage, GenerationRequest, SamplingParams
from rkmqtt.protocol import (
    ErrorCode,
    Request,
    describe_validation_error,
    extract_routing,
    new_request_id,
    parse_request_payload,
)
from rkmqtt.request import Job, job_key
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics, is_valid_client


@dataclass(frozen=True)
class Refusal:
    """A request refused before it reached the scheduler; answered on `reply_topic`."""

    id: str
    reply_topic: str
    code: ErrorCode
    message: str
    correlation: bytes | None


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


class Intake:
    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.rate = RateLimiter(settings.rate_limit, settings.rate_burst)

    def _defaults(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repeat_penalty=s.repeat_penalty)

    def accept(
        self,
        client: str,
        payload: bytes,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: float | None = None,
        now: float | None = None,
    ) -> Job | Refusal:
        """Validate one request published on `P/request/<client>`.

        `response_topic`, `correlation` and `expiry_s` are the MQTT 5 properties, when present;
        they win over the payload's `reply_to` and `expires_in`. Never raises: whatever cannot be
        read is refused with `invalid_request`.
        """
        now = time.monotonic() if now is None else now
        try:
            return self._accept(client, payload, response_topic, correlation, expiry_s, now)
        except Exception as e:  # e.g. RecursionError on absurd nesting: refuse, never drop
            rid = new_request_id()
            return Refusal(
                rid,
                self.topics.reply(client, rid),
                ErrorCode.INVALID_REQUEST,
                f"the request could not be read ({type(e).__name__})",
                correlation,
            )

    def _accept(
        self,
        client: str,
        payload: bytes,
        response_topic: str | None,
        correlation: bytes | None,
        expiry_s: float | None,
        now: float,
    ) -> Job | Refusal:
        s = self.settings

        def unread(code: ErrorCode, message: str) -> Refusal:
            # Not a valid request: its id and reply_to are read on a best-effort basis, only here,
            # so that a good request's JSON is parsed once. The reply goes to the requested topic
            # if that is allowed, else to the default one.
            rid, reply_to = extract_routing(payload) if len(payload) <= s.max_payload_bytes else (None, None)
            rid = rid or new_request_id()
            wanted = response_topic or reply_to
            ok = wanted is not None and self.topics.is_allowed_reply_topic(wanted, client)
            topic = wanted if ok and wanted else self.topics.reply(client, rid)
            return Refusal(rid, topic, code, message, correlation)

        if len(payload) > s.max_payload_bytes:
            return unread(
                ErrorCode.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {s.max_payload_bytes}"
            )
        if not is_valid_client(client):
            return unread(
                ErrorCode.INVALID_CLIENT, "the client name in the topic must be 1-64 characters of A-Z a-z 0-9 _ -"
            )
        try:
            req = parse_request_payload(payload)
        except UnicodeDecodeError:
            return unread(ErrorCode.INVALID_REQUEST, "payload is not valid UTF-8")
        except ValidationError as e:
            return unread(ErrorCode.INVALID_REQUEST, describe_validation_error(e))
        rid = req.id or new_request_id()
        wanted = response_topic or req.reply_to
        ok_topic = wanted if wanted and self.topics.is_allowed_reply_topic(wanted, client) else None
        default_topic = self.topics.reply(client, rid)

        def refuse(code: ErrorCode, message: str, topic: str | None = None) -> Refusal:
            return Refusal(rid, topic or default_topic, code, message, correlation)

        if wanted is not None and ok_topic is None:
            return refuse(
                ErrorCode.INVALID_REPLY_TO,
                f"reply topic {wanted!r} must lie under {self.topics.reply_root()}{client}/ without + or #",
            )
        reply_topic = ok_topic or default_topic
        if req.prompt_chars() > s.max_prompt_chars:
            return refuse(
                ErrorCode.TOO_LONG,
                f"prompt is {req.prompt_chars()} characters; the limit is {s.max_prompt_chars}",
                reply_topic,
            )
        if req.max_new_tokens is not None and req.max_new_tokens > s.max_new_tokens:
            return refuse(
                ErrorCode.TOO_MANY_TOKENS,
                f"max_new_tokens is {req.max_new_tokens}; the limit is {s.max_new_tokens}",
                reply_topic,
            )
        if not self.rate.allow(client, now):
            return refuse(
                ErrorCode.RATE_LIMITED,
                f"more than {s.rate_burst} requests at once or {s.rate_limit:g} a minute from {client!r}",
                reply_topic,
            )
        return self._job(client, rid, req, reply_topic, correlation, expiry_s, now)

    def _job(
        self,
        client: str,
        rid: str,
        req: Request,
        reply_topic: str,
        correlation: bytes | None,
        expiry_s: float | None,
        now: float,
    ) -> Job:
        d = self._defaults()
        sampling = SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_k=d.top_k if req.top_k is None else req.top_k,
            top_p=d.top_p if req.top_p is None else req.top_p,
            repeat_penalty=d.repeat_penalty if req.repeat_penalty is None else req.repeat_penalty,
            seed=req.seed,
        )
        requested = any(v is not None for v in (req.temperature, req.top_k, req.top_p, req.repeat_penalty, req.seed))
        messages: list[ChatMessage] = []
        if req.system:
            messages.append(ChatMessage("system", req.system))
        if req.prompt is not None:
            messages.append(ChatMessage("user", req.prompt))
        else:
            messages.extend(ChatMessage(m.role, m.content) for m in req.messages or ())
        expiries = [e for e in (expiry_s, req.expires_in) if e is not None]
        # The MQTT 5 property wins where both exist.
        expires = expiry_s if expiry_s is not None else (min(expiries) if expiries else None)
        gen = GenerationRequest(
            key=job_key(client, rid),
            messages=tuple(messages),
            max_new_tokens=req.max_new_tokens or self.settings.default_new_tokens,
            sampling=sampling,
            sampling_requested=requested,
        )
        return Job(
            client=client,
            id=rid,
            reply_topic=reply_topic,
            stream=req.stream,
            correlation=correlation,
            gen=gen,
            arrival=now,
            deadline=None if expires is None else now + expires,
        )
