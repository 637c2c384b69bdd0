"""Admission, the one way in for both doors (called on their threads: paho's, the HTTP event loop).

The limits (a message's length, `max_new_tokens`, tools, the client's rate) and how long a door whose
client can wait should wait for them; sampling over the settings' defaults; the engine's view of a
request (`Generation`) and the `Request`. Each refusal has one wording; doors count theirs (`refused`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams
from rkmqtt.protocol import ErrorCode, parse_duration
from rkmqtt.sched.request import KeepAlive, Request, RequestKey, Route
from rkmqtt.settings import Settings, model_defaults

_LOGGER = logging.getLogger(__name__)

# How often a waiting HTTP request looks again for a place in a full queue.
QUEUE_RETRY_S = 0.25


@dataclass(frozen=True)
class Ask:
    """What a client asks of the model, whichever door it came through (unset: the settings decide)."""

    messages: tuple[ChatMessage, ...]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    tools: tuple[dict[str, Any], ...] = ()
    num_ctx: int | None = None  # the context the client asked for (Ollama's option), tokens
    model: str | None = None  # a name the bridge serves; None: the default
    keep_alive: float | str | None = None  # seconds or a duration (Ollama's); checked by the door

    def longest_message_chars(self) -> int:
        """Characters of the longest single message (an assistant turn's tool calls included): a
        conversation as a whole is trimmed to the context, never refused for its length."""
        return max(
            (len(m.content) + (len(json.dumps(m.tool_calls)) if m.tool_calls else 0) for m in self.messages),
            default=0,
        )


@dataclass(frozen=True)
class Refused:
    """Why a request is not taken: the code and its message (the door answers it)."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Chosen:
    """A served model as admission needs it: its name, its own sampling defaults (`Engine.
    recommended_sampling`, for the settings no layer set), and whether it takes tools (None: not
    known until it is loaded; the loop checks then)."""

    name: str
    sampling: Mapping[str, float] = field(default_factory=dict)
    tools: bool | None = None


class ModelNames(Protocol):
    """The models a bridge serves, by the names requests give (`rkmqtt.models.catalog`)."""

    def choose(self, name: str | None) -> Chosen:
        """The model a request names (None: the default); LookupError with the refusal's message."""


@dataclass(frozen=True)
class OneModel:
    """A bridge with one model, which takes every name it is given as its own."""

    chosen: Chosen

    def choose(self, name: str | None) -> Chosen:
        return self.chosen


def no_tools_message(model: str) -> str:
    """The one wording of a refusal of tools to a model that takes none (strict_tools)."""
    return (
        f"{model} takes no tools: its chat template has no place for them (or the engine does "
        "not pass them); send the request without tools, or serve a model whose template takes them "
        "(e.g. Qwen2.5-Instruct, setting chat_template), or use engine openai"
    )


def warn_tools_left_out(client: str, model: str) -> None:
    """The one wording of the warning for tools answered without (said once per client or model)."""
    _LOGGER.warning(
        "%s's requests carry tools, but the chat template of %s has no place for them: they are answered "
        "without the tools (said once; set strict_tools to refuse them, or serve a model whose "
        "template takes tools, e.g. Qwen2.5-Instruct, with chat_template)",
        client,
        model,
    )


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

    def wait_time(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` has a request's worth of budget again (0: it has now)."""
        if self._rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate


class Admission:
    """Shared by the doors: one rate budget per client over MQTT and HTTP together."""

    def __init__(
        self,
        settings: Settings,
        count: Callable[[ErrorCode], None],
        model_name: str = "",
        tools: bool = False,
        models: ModelNames | None = None,
    ) -> None:
        self.settings = settings
        self._count = count  # the scheduler's `refused`: the stats add up over both doors
        self.models: ModelNames = models or OneModel(Chosen(model_name, {}, tools))
        self.rate = RateLimiter(settings.rate_limit, settings.rate_burst)
        self._warned_tools: set[str] = set()  # clients told once that their tools are left out
        self._warn_lock = threading.Lock()

    def admit(
        self,
        key: RequestKey,
        ask: Ask,
        route: Route,
        now: float | None = None,
        expires_in: float | None = None,
        rate_limit: bool = True,
    ) -> Request | Refused:
        """The request, or why not. `rate_limit=False` for one a door takes up again after a restart:
        it was counted when it came. Not counted here: the door counts what it answers (`refused`)."""
        now = time.monotonic() if now is None else now
        try:
            chosen = self.models.choose(ask.model)
        except LookupError as e:
            return Refused(ErrorCode.INVALID_REQUEST, str(e.args[0]) if e.args else str(e))
        problem = self._over_limits(key.client, ask, now, rate_limit, chosen)
        if problem is not None:
            return problem
        s = self.settings
        own = model_defaults(s, chosen.sampling)  # the model's own, where no setting is set
        keep: KeepAlive | None = None
        if ask.keep_alive is not None:
            try:
                keep = KeepAlive(parse_duration(ask.keep_alive))
            except ValueError as e:
                return Refused(ErrorCode.INVALID_REQUEST, f"keep_alive {ask.keep_alive!r} {e}")
        sampling = SamplingParams(
            temperature=own.get("temperature", s.temperature) if ask.temperature is None else ask.temperature,
            top_k=s.top_k if ask.top_k is None else ask.top_k,
            top_p=s.top_p if ask.top_p is None else ask.top_p,
            repeat_penalty=(
                own.get("repeat_penalty", s.repeat_penalty) if ask.repeat_penalty is None else ask.repeat_penalty
            ),
            seed=ask.seed,
        )
        # Set by the request itself: equal requests get equal sampling and batch keys over both doors.
        requested = any(v is not None for v in (ask.temperature, ask.top_k, ask.top_p, ask.repeat_penalty, ask.seed))
        tools = ask.tools
        if tools and chosen.tools is False:
            tools = ()  # not strict_tools (else refused above): answered without them
            self._warn_tools(key.client, chosen.name)
        gen = Generation(
            key=key,
            messages=ask.messages,
            max_new_tokens=ask.max_new_tokens or s.default_new_tokens,
            sampling=sampling,
            sampling_requested=requested,
            tools=tools,
            context=ask.num_ctx,
        )
        deadline = None if expires_in is None else now + expires_in
        return Request(
            key=key, route=route, gen=gen, arrival=now, deadline=deadline, model=chosen.name, keep_alive=keep
        )

    def refused(self, code: ErrorCode) -> None:
        """Count a refusal the door answered (thread-safe: a command on the scheduler's inbox)."""
        self._count(code)

    def retry_in(self, refused: Refused, client: str, now: float | None = None) -> float | None:
        """For a door whose client waits (HTTP: it holds its connection open): seconds to wait before
        asking again for a refusal that time cures (the client's rate budget, a full queue), or None
        for one it does not. The door gives up at its own deadline (`http_wait_s`)."""
        if refused.code == ErrorCode.RATE_LIMITED:
            return max(self.rate.wait_time(client, now), 0.01)
        if refused.code == ErrorCode.BUSY:
            return QUEUE_RETRY_S
        return None

    def _warn_tools(self, client: str, model: str) -> None:
        with self._warn_lock:
            if client in self._warned_tools or len(self._warned_tools) >= 10_000:
                return
            self._warned_tools.add(client)
        warn_tools_left_out(client, model)

    @staticmethod
    def shutting_down() -> Refused:
        """The door is closing: the bridge takes nothing new."""
        return Refused(ErrorCode.SHUTTING_DOWN, "the bridge is shutting down; try again later")

    def _over_limits(self, client: str, ask: Ask, now: float, rate_limit: bool, chosen: Chosen) -> Refused | None:
        s = self.settings
        chars = ask.longest_message_chars()
        if chars > s.max_prompt_chars:
            return Refused(
                ErrorCode.TOO_LONG,
                f"a message is {chars} characters; the limit is {s.max_prompt_chars} (max_prompt_chars)",
            )
        if ask.max_new_tokens is not None and ask.max_new_tokens > s.max_new_tokens:
            return Refused(
                ErrorCode.TOO_MANY_TOKENS, f"max_new_tokens is {ask.max_new_tokens}; the limit is {s.max_new_tokens}"
            )
        if ask.tools and chosen.tools is False and s.strict_tools:
            return Refused(ErrorCode.INVALID_REQUEST, no_tools_message(chosen.name))
        if rate_limit and not self.rate.allow(client, now):
            return Refused(
                ErrorCode.RATE_LIMITED,
                f"more than {s.rate_burst} requests at once or {s.rate_limit:g} a minute from {client!r}",
            )
        return None
