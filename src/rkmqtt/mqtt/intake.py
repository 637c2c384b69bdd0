"""An incoming MQTT request read into a `Request` or a `Refusal` (paho network thread; pure logic).

Wire parsing and routing only, each failure with its code: payload size, client name, UTF-8, JSON
and fields, the reply topic's length and confinement, the Correlation Data's size (capped: it is
echoed on every chunk). Then `Admission` checks the limits and builds the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import ValidationError

from rkmqtt.engines.base import ChatMessage
from rkmqtt.logtext import clip
from rkmqtt.mqtt.replies import MqttRoute, Refusal
from rkmqtt.protocol import (
    ErrorCode,
    RequestPayload,
    describe_validation_error,
    extract_routing,
    new_request_id,
    parse_request_payload,
)
from rkmqtt.sched.admission import Admission, Ask, Refused
from rkmqtt.sched.request import ReplySink, Request, RequestKey
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics, is_valid_client

#: The longest error message a refusal carries (a validation error may name every unknown field).
MAX_MESSAGE_CHARS = 500


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
    def __init__(self, settings: Settings, topics: Topics, admission: Admission, sink: ReplySink) -> None:
        self.settings = settings
        self.topics = topics
        self.admission = admission
        self.sink = sink  # where the replies of what it accepts go

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
            # The MQTT 5 property wins where both exist.
            expires = msg.expiry_s if msg.expiry_s is not None else payload.expires_in
            key = RequestKey(msg.client, rid)
            admitted = self.admission.admit(key, _ask(payload), route, now, expires, rate_limit)
            if isinstance(admitted, Refused):
                return Refusal(rid, route, admitted.code, admitted.message)
            return admitted
        except Exception as e:  # e.g. RecursionError on absurd nesting: refuse, never drop
            rid = new_request_id()
            default = self._to(self.topics.reply(msg.client, rid), self._correlation(msg))
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
            return self._unreadable(msg, ErrorCode.INVALID_REQUEST, describe_validation_error(e, RequestPayload))

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

    def _to(self, topic: str, correlation: bytes | None, stream: bool = True) -> MqttRoute:
        return MqttRoute(topic, self.sink, correlation, stream)

    def _route(self, msg: Incoming, rid: str, reply_to: str | None, stream: bool) -> MqttRoute | Refusal:
        """Where the replies go: the Response Topic, else `reply_to`, else `P/reply/<client>/<id>`.
        A refusal goes to the requested topic when that one is fine, else to the default one."""
        s = self.settings
        corr = self._correlation(msg)
        default = self._to(self.topics.reply(msg.client, rid), corr, stream)
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
        route = default if wanted is None else self._to(wanted, corr, stream)
        if corr is None and msg.correlation is not None:
            return Refusal(
                rid,
                route,
                ErrorCode.CORRELATION_TOO_LARGE,
                f"correlation data is {len(msg.correlation)} bytes; the limit is {s.max_correlation_bytes}",
            )
        return route


def _ask(req: RequestPayload) -> Ask:
    messages: list[ChatMessage] = []
    if req.system:
        messages.append(ChatMessage("system", req.system))
    if req.prompt is not None:
        messages.append(ChatMessage("user", req.prompt))
    else:
        messages.extend(
            ChatMessage(
                m.role, m.content, tuple(c.model_dump(exclude_none=True) for c in m.tool_calls or ()), m.tool_call_id
            )
            for m in req.messages or ()
        )
    return Ask(
        tuple(messages),
        max_new_tokens=req.max_new_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repeat_penalty=req.repeat_penalty,
        seed=req.seed,
        tools=tuple(t.model_dump(exclude_none=True) for t in req.tools or ()),
    )
