"""The engine interface: what the scheduler needs from a model runtime (scheduler thread only).

`prepare -> Prepared`, `submit`, `poll`, `cancel`, and `Capabilities` (continuous or static batching).
An engine's own threads only copy data and push events that `poll()` drains; no engine does network
I/O. The life of a request in an engine: docs/architecture.md, "Engines"."""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rkmqtt.protocol import MIN_TEMPERATURE, MIN_TOP_P, ErrorCode


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling parameters (request fields over settings defaults), always values that
    every engine accepts: a temperature below `MIN_TEMPERATURE` becomes 0 (greedy) and a top_p
    below `MIN_TOP_P` becomes `MIN_TOP_P` — the same choice of tokens, where the raw value would
    overflow a softmax or round to 0 in the RKLLM runtime's float32 and fail its whole batch."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= MIN_TEMPERATURE:  # also NaN
            object.__setattr__(self, "temperature", 0.0)
        if not self.top_p >= MIN_TOP_P:
            object.__setattr__(self, "top_p", MIN_TOP_P)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]  # "tool": a tool's result (the HTTP API)
    content: str
    # An assistant turn's tool calls, as chat templates take them. The one shape of a tool call
    # inside the bridge (here and in `FinishEvent.tool_calls`; the wire's `ToolCall` is the same):
    # {"id": str (optional), "type": "function", "function": {"name": str, "arguments": {...}}}.
    tool_calls: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    # A tool turn: the id of the call it answers, when the client gave one (OpenAI's `tool_call_id`).
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Generation:
    """What an engine sees of a request. `messages` is already normalised: the `system`
    field (if any) first, then the conversation, or the single user prompt."""

    key: Hashable  # unique inside the bridge while the request lives; opaque to the engine
    messages: tuple[ChatMessage, ...]
    max_new_tokens: int
    sampling: SamplingParams
    # True when the device set any sampling field itself; an engine that cannot honour
    # per-request sampling says so in FinishEvent.warnings only then.
    sampling_requested: bool = False
    # Tool definitions for the chat template, {"type": "function", "function": {"name", "description",
    # "parameters"}} each (the HTTP API). Only engines with `Capabilities.tools` get any.
    tools: tuple[dict[str, Any], ...] = field(default=(), hash=False)


@dataclass(frozen=True)
class Prepared:
    """What `Engine.prepare` made of a request. The request carries it until `submit`; the engine
    keeps no state for a prepared request, so one that never runs leaves nothing behind."""

    gen: Generation
    prompt_tokens: int | None  # tokens of the rendered prompt, when the engine can tell
    batch_key: Hashable = None  # requests with equal keys may share a static batch
    data: Any = None  # the engine's own, e.g. the numpy engine's prompt token ids

    @property
    def key(self) -> Hashable:
        return self.gen.key


@dataclass(frozen=True)
class Capabilities:
    name: str  # engine name as in the `engine` setting: "numpy", "rkllm", ...
    continuous: bool  # True: continuous batching; False: static micro-batches
    max_batch: int  # number of slots (n_batch)
    per_request_sampling: bool  # False: every request in a batch shares the init-time sampling
    tools: bool = False  # `Generation.tools` reach the model (its chat template takes them)


@dataclass(frozen=True)
class TokenEvent:
    """New text for one request. `text` is always whole UTF-8 characters (an engine holds back
    a partial character until it is complete); `tokens` counts the tokens the text came from."""

    key: Hashable
    text: str
    tokens: int = 1


@dataclass(frozen=True)
class FinishEvent:
    """The request ended normally. Exactly one FinishEvent or ErrorEvent per submitted key
    (none is needed after `cancel`)."""

    key: Hashable
    reason: Literal["stop", "length"]
    prompt_tokens: int | None
    completion_tokens: int
    slot: int = 0
    # What the engine measured. `prefill_ms` and `decode_ms` go into the final reply's timing;
    # other keys are the engine's own (logged at DEBUG). RKLLM's figures are for the whole batch.
    perf: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    # Tools the model asked to call (shaped as `ChatMessage.tool_calls`), from an engine that returns
    # them structured (an upstream server); they reach the final reply's `tool_calls`.
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed inside the engine; it is answered with `code` and `message`."""

    key: Hashable
    code: ErrorCode
    message: str


EngineEvent = TokenEvent | FinishEvent | ErrorEvent


class Engine(abc.ABC):
    """A loaded model serving many requests. Subclasses document their own threads."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """A short name of the loaded model for replies and `info` (e.g. the file's stem)."""

    @property
    def recommended_sampling(self) -> dict[str, float]:
        """Sampling defaults the loaded model answers best at (setting name -> value, names from
        `settings.MODEL_DEFAULTED`); the service uses them for the settings that no layer sets."""
        return {}

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load the model (slow). Called once, on the scheduler thread, before any other call.
        Raises EngineError or ConfigError with a one-line, actionable message."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Engine facts for the retained `info` message: runtime/driver versions, memory, KV cache size."""

    def prepare(self, gen: Generation) -> Prepared:
        """Check a request before it takes a slot and return the handle `submit` takes. Raise
        `RequestRejected(ErrorCode.TOO_LONG, ...)` when it cannot fit the context."""
        return Prepared(gen, None, self.batch_key(gen))

    def batch_key(self, req: Generation) -> Hashable:
        """Requests with equal keys may share a static batch. Continuous engines need not care."""
        return None

    @abc.abstractmethod
    def free_slots(self) -> int:
        """Slots a new request could take now (static engines: max_batch when idle, else 0)."""

    @abc.abstractmethod
    def submit(self, batch: Sequence[Prepared]) -> None:
        """Start the prepared requests (len(batch) <= free_slots())."""

    @abc.abstractmethod
    def poll(self, timeout: float) -> list[EngineEvent]:
        """Advance and return what happened. Continuous engines run one step (and may return
        at once); static engines wait up to `timeout` for their worker's events."""

    @abc.abstractmethod
    def cancel(self, key: Hashable) -> None:
        """End one request now and drop the rest of its tokens; its slot-mates go on."""

    def active(self) -> int:
        """Requests currently holding a slot."""
        return self.capabilities.max_batch - self.free_slots()

    def set_wake(self, wake: Callable[[], None]) -> bool:
        """Offer the engine a `wake()` it may call from any thread once events wait for `poll()`
        (or once slots free up). An engine that does returns True: the scheduler then sleeps on its
        inbox between events instead of polling in a loop (an engine whose work happens on threads
        of its own, such as a client of an upstream server). The default declines."""
        return False

    def problem(self) -> str | None:
        """Why the engine cannot take requests now (its upstream server is unreachable, ...), in
        words, or None when it can. While it has one, `free_slots()` is 0 and requests wait."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop everything that runs and release the model. Called once, at shutdown."""
