"""Admission, the one way in for both doors (called on their threads: paho's, the HTTP event loop).

The limits (prompt length, `max_new_tokens`, tools, the client's rate), sampling over the settings'
defaults, the engine's view of a request (`Generation`) and the `Request`. Each refusal made here
has one wording per code, and every refusal a door answers is counted through `refused`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams
from rkmqtt.protocol import ErrorCode
from rkmqtt.sched.request import Request, RequestKey, Route
from rkmqtt.settings import Settings


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

    def prompt_chars(self) -> int:
        """Characters the model reads: the messages (an assistant turn's tool calls included), and the
        tool definitions the template renders."""
        n = sum(len(m.content) + (len(json.dumps(m.tool_calls)) if m.tool_calls else 0) for m in self.messages)
        return n + (len(json.dumps(self.tools)) if self.tools else 0)


@dataclass(frozen=True)
class Refused:
    """Why a request is not taken: the code and its message (the door answers it)."""

    code: ErrorCode
    message: str


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


class Admission:
    """Shared by the doors: one rate budget per client over MQTT and HTTP together."""

    def __init__(
        self, settings: Settings, count: Callable[[ErrorCode], None], model_name: str = "", tools: bool = False
    ) -> None:
        self.settings = settings
        self._count = count  # the scheduler's `refused`: the stats add up over both doors
        self.model_name = model_name
        self.tools = tools  # the engine takes tool definitions
        self.rate = RateLimiter(settings.rate_limit, settings.rate_burst)

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
        problem = self._over_limits(key.client, ask, now, rate_limit)
        if problem is not None:
            return problem
        s = self.settings
        sampling = SamplingParams(
            temperature=s.temperature if ask.temperature is None else ask.temperature,
            top_k=s.top_k if ask.top_k is None else ask.top_k,
            top_p=s.top_p if ask.top_p is None else ask.top_p,
            repeat_penalty=s.repeat_penalty if ask.repeat_penalty is None else ask.repeat_penalty,
            seed=ask.seed,
        )
        # Set by the request itself: equal requests get equal sampling and batch keys over both doors.
        requested = any(v is not None for v in (ask.temperature, ask.top_k, ask.top_p, ask.repeat_penalty, ask.seed))
        gen = Generation(
            key=key,
            messages=ask.messages,
            max_new_tokens=ask.max_new_tokens or s.default_new_tokens,
            sampling=sampling,
            sampling_requested=requested,
            tools=ask.tools,
        )
        deadline = None if expires_in is None else now + expires_in
        return Request(key=key, route=route, gen=gen, arrival=now, deadline=deadline)

    def refused(self, code: ErrorCode) -> None:
        """Count a refusal the door answered (thread-safe: a command on the scheduler's inbox)."""
        self._count(code)

    @staticmethod
    def shutting_down() -> Refused:
        """The door is closing: the bridge takes nothing new."""
        return Refused(ErrorCode.SHUTTING_DOWN, "the bridge is shutting down; try again later")

    def _over_limits(self, client: str, ask: Ask, now: float, rate_limit: bool) -> Refused | None:
        s = self.settings
        chars = ask.prompt_chars()
        if chars > s.max_prompt_chars:
            return Refused(ErrorCode.TOO_LONG, f"prompt is {chars} characters; the limit is {s.max_prompt_chars}")
        if ask.max_new_tokens is not None and ask.max_new_tokens > s.max_new_tokens:
            return Refused(
                ErrorCode.TOO_MANY_TOKENS, f"max_new_tokens is {ask.max_new_tokens}; the limit is {s.max_new_tokens}"
            )
        if ask.tools and not self.tools:
            return Refused(
                ErrorCode.INVALID_REQUEST,
                f"{self.model_name} takes no tools: its chat template has no place for them (or the engine does "
                "not pass them); send the request without tools, or serve a model whose template takes them "
                "(e.g. Qwen2.5-Instruct) with the numpy engine, or use engine openai",
            )
        if rate_limit and not self.rate.allow(client, now):
            return Refused(
                ErrorCode.RATE_LIMITED,
                f"more than {s.rate_burst} requests at once or {s.rate_limit:g} a minute from {client!r}",
            )
        return None
