"""Wire contract, version 1: every payload rkmqtt reads or writes (any thread; pure data).

The topic scheme lives beside these models in `rkmqtt.topics`. The README's topic and
payload reference is checked against these models by `tests/test_docs.py`, so a change here
that is not mirrored there fails the tests.
"""

from __future__ import annotations

import json
import re
import typing
import uuid
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rkmqtt.suggest import did_you_mean

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
    TOO_LONG = "too_long"  # limit: max_prompt_chars (one message), or the last turn does not fit the context
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


class ToolFunction(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=256, description="the tool's name")]
    arguments: dict[str, Any] = Field(default_factory=dict, description="its arguments, a JSON object")


class ToolCall(_Strict):
    """A tool the model asked to call: in a final reply's `tool_calls`, and in an assistant message."""

    id: Annotated[
        str | None,
        Field(
            max_length=256,
            description="the call's id, when the engine gives one; a tool message "
            "answering it names it in `tool_call_id`",
        ),
    ] = None
    type: Literal["function"] = Field("function", description="always function")
    function: ToolFunction = Field(description="the call")


class ToolSpecFunction(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=256, description="the tool's name")]
    description: str | None = Field(None, description="what it does, for the model")
    parameters: dict[str, Any] | None = Field(None, description="its arguments as a JSON Schema")


class ToolSpec(_Strict):
    """A tool the model may call, as the OpenAI and Ollama APIs define them."""

    type: Literal["function"] = Field("function", description="always function")
    function: ToolSpecFunction = Field(description="the tool")


class Message(_Strict):
    role: Annotated[
        Literal["system", "user", "assistant", "tool"], Field(description="who says it (tool: a tool's result)")
    ]
    content: Annotated[str, Field(max_length=1_000_000, description="what is said")]
    tool_calls: Annotated[
        list[ToolCall] | None, Field(max_length=64, description="an assistant turn's calls, as its reply gave them")
    ] = None
    tool_call_id: Annotated[
        str | None, Field(max_length=256, description="a tool turn: the `id` of the call it answers")
    ] = None


class RequestPayload(_Strict):
    """A request published on `P/request/<client>` as JSON (plain text is `{"prompt": text}`)."""

    id: Annotated[str | None, Field(pattern=ID_PATTERN, description="echoed on every reply; made when absent")] = None
    prompt: Annotated[str | None, Field(min_length=1, description="the user's prompt")] = None
    messages: Annotated[
        list[Message] | None, Field(min_length=1, max_length=256, description="a multi-turn chat instead of prompt")
    ] = None
    system: Annotated[str | None, Field(description="a system prompt")] = None
    tools: Annotated[
        list[ToolSpec] | None,
        Field(
            max_length=128,
            description="tools the model may call, where its chat template takes them (else they are left out, "
            "or `invalid_request` with `strict_tools`); its calls come in the reply's `tool_calls`",
        ),
    ] = None
    model: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=256,
            description="which of the bridge's models answers (its `info` lists them); absent: the default",
        ),
    ] = None
    keep_alive: Annotated[
        float | str | None,
        Field(
            description="how long the model stays loaded after this request: seconds or 5m, 1h; -1 for ever, 0 "
            "unloads it once idle (absent: the keep_alive setting)"
        ),
    ] = None
    max_new_tokens: Annotated[int | None, Field(ge=1, le=1_000_000, description="cap on generated tokens")] = None
    temperature: Annotated[
        float | None, Field(ge=0.0, le=5.0, description=f"0 is greedy, and so is anything below {MIN_TEMPERATURE:g}")
    ] = None
    top_k: Annotated[int | None, Field(ge=0, le=100_000, description="0 turns top-k off")] = None
    top_p: Annotated[
        float | None,
        Field(
            gt=0.0,
            le=1.0,
            description=f"sample from the likeliest tokens up to this probability; below {MIN_TOP_P:g} counts as "
            f"{MIN_TOP_P:g}",
        ),
    ] = None
    repeat_penalty: Annotated[
        float | None, Field(ge=0.1, le=10.0, description="1 is off; above 1 discourages repeating recent tokens")
    ] = None
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
        if self.keep_alive is not None:
            parse_duration(self.keep_alive)
        return self


class CancelRequest(_Strict):
    """A cancel on `P/cancel/<client>`: `{"id": ...}` (a plain id is also accepted)."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]


class Usage(_Strict):
    prompt_tokens: int | None = Field(description="tokens of the rendered prompt; null where the engine cannot tell")
    completion_tokens: int = Field(description="tokens generated")


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
    code: ErrorCode = Field(description="what went wrong, for programs: see the table of codes")
    message: str = Field(description="what went wrong and what to change, in words")


class OkReply(_Strict):
    """The final reply of a request that ran: on `P/reply/<client>/<id>`, QoS 1."""

    v: Literal[1] = Field(1, description="protocol version")
    id: str = Field(description="the request's id (made by the bridge when the request had none)")
    status: Literal["ok"] = Field("ok", description="the request ran")
    text: str = Field(description="the whole answer, also what lost stream chunks left out")
    finish_reason: FinishReason = Field(description="why it ended (below)")
    usage: Usage = Field(description="token counts")
    timing: Timing = Field(description="where the time went")
    batch: BatchInfo = Field(description="the batch it ran in")
    model: str = Field(description="the model that answered")
    warnings: list[str] = Field(default_factory=list, description="e.g. sampling fields the engine could not honour")
    node: str | None = Field(default=None, description="the bridge (node) that answered")
    tool_calls: list[ToolCall] = Field(
        default_factory=list,
        description="tools the model asked to call (a request with `tools`: its `<tool_call>` blocks, taken out "
        "of `text`, or the calls an upstream server returned); `text` is then often empty",
    )


class ErrorReply(_Strict):
    """The final reply of a request that did not run to the end: on `P/reply/<client>/<id>`, QoS 1."""

    v: Literal[1] = Field(1, description="protocol version")
    id: str = Field(description="the request's id, when it could be read (else one the bridge made)")
    status: Literal["error"] = Field("error", description="the request did not run, or did not run to the end")
    error: ErrorBody = Field(description="`code` and `message`")
    node: str | None = Field(default=None, description="the bridge (node) that answered")


FinalReply = OkReply | ErrorReply


class StreamChunk(_Strict):
    """A piece of the completion on `P/reply/<client>/<id>/stream`, QoS 0; `seq` counts from 0."""

    id: str = Field(description="the request's id")
    seq: int = Field(description="0, 1, 2, …: a gap is a lost chunk (QoS 0); the final reply has the whole text")
    text: str = Field(description="the next piece of the answer")


class Limits(_Strict):
    max_payload_bytes: int = Field(description="the setting of that name")
    max_correlation_bytes: int = Field(description="the setting of that name")
    max_reply_topic_chars: int = Field(description="the setting of that name")
    max_prompt_chars: int = Field(description="the setting of that name")
    max_new_tokens: int = Field(description="the setting of that name")
    max_queue: int = Field(description="the setting of that name")
    rate_limit: float = Field(description="the setting of that name")
    rate_burst: int = Field(description="the setting of that name")


class Info(BaseModel):
    """Retained on `P/node/<node>/info`: what this bridge is and what it accepts."""

    model_config = ConfigDict(extra="allow", frozen=True)

    v: Literal[1] = Field(1, description="protocol version")
    version: str = Field(description="rkmqtt's version")
    node: str = Field(default="", description="the bridge's node name")
    host: str = Field(default="", description="the machine it runs on")
    started: float = Field(default=0.0, description="when this run of the bridge started, Unix seconds")
    instance: str = Field(default="", description="this run's random id: two runs of one node tell each other apart")
    client_id: str = Field(
        default="", description="its MQTT session's client id: another node takes over what is queued there"
    )
    share: str = Field(
        default="", description="how it takes requests: alone, joining, shared (with other nodes), off or left"
    )
    engine: str = Field(description="numpy, rkllm, or a custom engine's name")
    model: str = Field(description="the model it serves")
    n_batch: int = Field(description="requests that run at once")
    batching: Literal["static", "continuous"] = Field(
        description="static: a batch starts together; continuous: a request joins at the next step"
    )
    runtime_version: str | None = Field(None, description="the RKLLM runtime's version")
    driver_version: str | None = Field(None, description="the NPU driver's version")
    limits: Limits = Field(description="what a request may ask for: the settings of the same names")
    models: list[str] = Field(
        default_factory=list, description="the models a request's `model` may name (the first is the default)"
    )
    engine_info: dict[str, Any] = Field(default_factory=dict, description="engine specifics: memory, KV cache…")


class Stats(_Strict):
    """Published on `P/node/<node>/stats` every `stats_interval` seconds, QoS 0."""

    v: Literal[1] = Field(1, description="protocol version")
    uptime_s: float = Field(description="seconds since the bridge started")
    queue_depth: int = Field(description="requests waiting for a slot")
    active: int = Field(description="requests running")
    n_batch: int = Field(description="requests that run at once")
    tokens_per_s: float = Field(description="completion tokens per second over the last interval")
    requests_total: int = Field(description="requests received; once none is in flight, completed + errors")
    completed: int = Field(description="final replies with status ok")
    errors: int = Field(description="final replies with status error, refusals included")
    errors_by_code: dict[str, int] = Field(description="errors counted by code")
    repeated: int = Field(default=0, description="final replies sent again to a retried id")
    engine_ready: bool = Field(
        default=True,
        description="false while the engine cannot take requests (engine openai: its server is "
        "unreachable or refuses); requests wait meanwhile",
    )
    engine_problem: str | None = Field(default=None, description="why not, in words; null when ready")
    loaded: list[str] = Field(
        default_factory=list, description="the models loaded now (a bridge that loads them by name; else empty)"
    )


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float | None:
    """A keep_alive as Ollama reads it, in seconds: a number of seconds or a duration such as "5m",
    "1h30m", "-1.0s" (Home Assistant's); negative means for ever (None). ValueError says what is allowed."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m, 1h, a number of seconds, or -1 for ever")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    "must be a duration such as 30s, 5m, 1h, a number of seconds, or -1 for ever"
                ) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("must be a finite duration")
    return None if seconds < 0 else seconds


class PullStatus(_Strict):
    """Retained on `P/node/<node>/pull` while the bridge downloads a model, and after: how far it got."""

    v: Literal[1] = Field(1, description="protocol version")
    reference: str = Field(description="what is pulled: hf://owner/repo[/file]")
    status: Literal["resolving", "downloading", "verifying", "done", "failed"] = Field(description="where it stands")
    file: str = Field(default="", description="the file being fetched")
    completed: int = Field(default=0, description="bytes done")
    total: int | None = Field(default=None, description="bytes in all, when known")
    percent: float | None = Field(default=None, description="completed of total, 0-100")
    message: str = Field(default="", description="a failure's one line")


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


def describe_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming each bad field, for the error reply's message; an unknown field of `model`
    (or of a model inside it) names the field it is most like."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            inner = _model_at(model, err["loc"][:-1])
            if inner is not None and err["loc"]:
                msg += did_you_mean(str(err["loc"][-1]), inner.model_fields)
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _model_at(model: type[BaseModel] | None, path: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the field at `path` inside `model` (list indexes skipped), if any."""
    for part in path:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = None if field is None else _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: itself, or inside `X | None`, `list[X]`, `Annotated[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in typing.get_args(annotation) if (m := _model_in(a)) is not None), None)


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
