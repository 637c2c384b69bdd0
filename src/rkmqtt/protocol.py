"""Wire contract, version 1: every payload rkmqtt reads or writes (any thread; pure data).

The topic scheme lives beside these models in `rkmqtt.topics`. The README's topic and
payload reference is checked against these models by `tests/test_docs.py`, so a change here
that is not mirrored there fails the tests.
"""

from __future__ import annotations

import json
import re
import uuid
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CLIENT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

# Sampling values both engines handle (the RKLLM runtime takes them as float32, where a top_p of
# 1e-320 is 0, which it refuses; a tiny temperature overflows a softmax): a temperature below
# MIN_TEMPERATURE is greedy, a top_p below MIN_TOP_P is MIN_TOP_P (both mean "the top token").
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6


class ErrorCode(str, Enum):
    """Machine-readable error codes of a final error reply."""

    INVALID_REQUEST = "invalid_request"  # not UTF-8, bad JSON, unknown field, wrong type, out of range
    INVALID_CLIENT = "invalid_client"  # the <client> level of the request topic is not allowed
    INVALID_REPLY_TO = "invalid_reply_to"  # reply topic outside P/reply/ or with wildcards
    REPLY_TO_TOO_LONG = "reply_to_too_long"  # limit: max_reply_topic_chars
    CORRELATION_TOO_LARGE = "correlation_too_large"  # limit: max_correlation_bytes
    DUPLICATE_ID = "duplicate_id"  # the id is in flight with replies going elsewhere
    PAYLOAD_TOO_LARGE = "payload_too_large"  # limit: max_payload_bytes
    TOO_LONG = "too_long"  # limit: max_prompt_chars, or the prompt does not fit the context
    TOO_MANY_TOKENS = "too_many_tokens"  # limit: max_new_tokens
    BUSY = "busy"  # limit: max_queue
    RATE_LIMITED = "rate_limited"  # limit: rate_limit / rate_burst
    EXPIRED = "expired"  # not started before its expiry
    CANCELLED = "cancelled"  # cancelled before it started
    ENGINE_ERROR = "engine_error"  # the engine failed while running it
    SHUTTING_DOWN = "shutting_down"  # the bridge stopped before running it


FinishReason = Literal["stop", "length", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=1_000_000)]


class RequestPayload(_Strict):
    """A request published on `P/request/<client>` as JSON (plain text is `{"prompt": text}`)."""

    id: Annotated[str | None, Field(pattern=ID_PATTERN, description="echoed on every reply; made when absent")] = None
    prompt: Annotated[str | None, Field(min_length=1, description="the user's prompt")] = None
    messages: Annotated[
        list[Message] | None, Field(min_length=1, max_length=256, description="a multi-turn chat instead of prompt")
    ] = None
    system: Annotated[str | None, Field(description="a system prompt")] = None
    max_new_tokens: Annotated[int | None, Field(ge=1, le=1_000_000, description="cap on generated tokens")] = None
    temperature: Annotated[
        float | None, Field(ge=0.0, le=5.0, description=f"0 is greedy, and so is anything below {MIN_TEMPERATURE:g}")
    ] = None
    top_k: Annotated[int | None, Field(ge=0, le=100_000, description="0 turns top-k off")] = None
    top_p: Annotated[
        float | None, Field(gt=0.0, le=1.0, description=f"below {MIN_TOP_P:g} counts as {MIN_TOP_P:g}")
    ] = None
    repeat_penalty: Annotated[float | None, Field(ge=0.1, le=10.0)] = None
    seed: Annotated[int | None, Field(ge=0, le=2**32 - 1, description="same seed, same text")] = None
    stream: Annotated[bool, Field(description="publish token chunks on .../stream")] = True
    reply_to: Annotated[
        str | None,
        Field(
            min_length=1,
            description="a topic under P/reply/<client>/, at most `max_reply_topic_chars` long "
            "(MQTT 3.1.1, Home Assistant)",
        ),
    ] = None
    expires_in: Annotated[
        float | None, Field(gt=0, le=86_400, description="seconds; answered `expired` if not started by then")
    ] = None

    @model_validator(mode="after")
    def _one_of_prompt_messages(self) -> RequestPayload:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def prompt_chars(self) -> int:
        """Characters of text the model reads: prompt or messages, and system."""
        n = len(self.system or "")
        if self.prompt is not None:
            n += len(self.prompt)
        for m in self.messages or ():
            n += len(m.content)
        return n


class CancelRequest(_Strict):
    """A cancel on `P/cancel/<client>`: `{"id": ...}` (a plain id is also accepted)."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]


class Usage(_Strict):
    prompt_tokens: int | None = Field(description="tokens of the rendered prompt; null where the engine cannot tell")
    completion_tokens: int


class Timing(_Strict):
    queued_ms: float = Field(description="from arrival to the start of its batch")
    ttft_ms: float | None = Field(description="from arrival to the first token; null when none came")
    total_ms: float = Field(description="from arrival to this reply")
    tokens_per_s: float = Field(description="completion tokens per second of generation (prefill excluded)")
    prefill_ms: float | None = Field(
        default=None, description="the engine's own prefill time (RKLLM: of the whole batch); null when not measured"
    )
    decode_ms: float | None = Field(
        default=None, description="the engine's own decode time (RKLLM: of the whole batch); null when not measured"
    )


class BatchInfo(_Strict):
    size: int = Field(description="the most requests that shared the engine with it while it ran")
    slot: int | None = Field(description="its slot in the engine; null when it was cancelled before it ended")


class ErrorBody(_Strict):
    code: ErrorCode
    message: str


class OkReply(_Strict):
    """The final reply of a request that ran: on `P/reply/<client>/<id>`, QoS 1."""

    v: Literal[1] = 1
    id: str
    status: Literal["ok"] = "ok"
    text: str
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    batch: BatchInfo
    model: str
    warnings: list[str] = Field(default_factory=list, description="e.g. sampling fields the engine could not honour")
    node: str | None = Field(default=None, description="the bridge (node) that answered")


class ErrorReply(_Strict):
    """The final reply of a request that did not run to the end: on `P/reply/<client>/<id>`, QoS 1."""

    v: Literal[1] = 1
    id: str
    status: Literal["error"] = "error"
    error: ErrorBody
    node: str | None = Field(default=None, description="the bridge (node) that answered")


FinalReply = OkReply | ErrorReply


class StreamChunk(_Strict):
    """A piece of the completion on `P/reply/<client>/<id>/stream`, QoS 0; `seq` counts from 0."""

    id: str
    seq: int
    text: str


class Limits(_Strict):
    max_payload_bytes: int
    max_correlation_bytes: int
    max_reply_topic_chars: int
    max_prompt_chars: int
    max_new_tokens: int
    max_queue: int
    rate_limit: float
    rate_burst: int


class Info(BaseModel):
    """Retained on `P/info`: what this bridge is and what it accepts."""

    model_config = ConfigDict(extra="allow", frozen=True)

    v: Literal[1] = 1
    version: str
    node: str = Field(default="", description="the bridge's node name")
    host: str = Field(default="", description="the machine it runs on")
    started: float = Field(default=0.0, description="when this run of the bridge started, Unix seconds")
    instance: str = Field(default="", description="this run's random id: two runs of one node tell each other apart")
    engine: str
    model: str
    n_batch: int
    batching: Literal["static", "continuous"]
    runtime_version: str | None = None
    driver_version: str | None = None
    limits: Limits
    engine_info: dict[str, Any] = Field(default_factory=dict, description="engine specifics: memory, KV cache…")


class Stats(_Strict):
    """Published on `P/stats` every `stats_interval` seconds, QoS 0."""

    v: Literal[1] = 1
    uptime_s: float
    queue_depth: int
    active: int
    n_batch: int
    tokens_per_s: float = Field(description="completion tokens per second over the last interval")
    requests_total: int = Field(description="requests received; once none is in flight, completed + errors")
    completed: int = Field(description="final replies with status ok")
    errors: int = Field(description="final replies with status error, refusals included")
    errors_by_code: dict[str, int]
    repeated: int = Field(default=0, description="final replies sent again to a retried id")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def parse_request_payload(payload: bytes) -> RequestPayload:
    """Parse a request payload. Raises `ValueError` (not UTF-8) or `ValidationError`.

    JSON is meant when the payload starts with `{` after white space; anything else is the prompt.
    """
    text = payload.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if text.lstrip().startswith("{"):
        return RequestPayload.model_validate_json(text)
    return RequestPayload(prompt=text)


def parse_cancel_payload(payload: bytes) -> CancelRequest:
    text = payload.decode("utf-8").strip()
    if text.startswith("{"):
        return CancelRequest.model_validate_json(text)
    return CancelRequest(id=text)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, for the error reply's message."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def extract_routing(payload: bytes) -> tuple[str | None, str | None]:
    """Best effort: the `id` and `reply_to` of a request that failed validation, so that its
    error reply goes where the device listens. Values that are themselves invalid are dropped."""
    if not payload.lstrip().startswith(b"{"):
        return None, None  # plain text: no fields to route by
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None, None
    if not isinstance(obj, dict):
        return None, None
    rid = obj.get("id")
    reply_to = obj.get("reply_to")
    return (
        rid if isinstance(rid, str) and _ID_RE.fullmatch(rid) else None,
        reply_to if isinstance(reply_to, str) else None,
    )


_ID_RE = re.compile(ID_PATTERN[1:-1])
