"""A small deterministic engine for scheduler and bridge tests, in both batching styles.

Text: the words of the last user message, each followed by a space, then it stops ("stop");
`max_new_tokens` cuts it ("length"). Prompt directives:
  `tokens:N`  produce N tokens "t0 t1 ..." instead of echoing
  `toolong`   prepare() refuses with too_long
  `explode`   the engine fails this request (engine_error) at its second step
  `call:NAME` when NAME is one of the request's tools, a Qwen/Hermes tool call in several tokens:
              `Checking. <tool_call>{"name": "NAME", "arguments": {"city": "Paris"}}</tool_call>`
              (without such a tool: `no tool NAME`); `tools=False` makes the engine take no tools
Each step costs `step_s` seconds (time.sleep), the same for any number of active slots, so a
batch of n is n times the throughput of one — the ideal the tests check fairness against.
"""

from __future__ import annotations

import re
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rkmqtt.engines.base import (
    Capabilities,
    Engine,
    EngineEvent,
    ErrorEvent,
    FinishEvent,
    Generation,
    Prepared,
    TokenEvent,
)
from rkmqtt.errors import RequestRejected
from rkmqtt.protocol import ErrorCode


@dataclass
class _Slot:
    req: Generation
    slot: int
    words: list[str]
    pos: int = 0
    explode: bool = False


@dataclass
class FakeEngine(Engine):
    n_batch: int = 4
    continuous: bool = True
    step_s: float = 0.01
    name: str = "fake"
    batches: list[list[str]] = field(default_factory=list)  # keys admitted together, per submit
    cancelled: list[str] = field(default_factory=list)
    loaded: bool = False
    tools: bool = True  # Capabilities.tools: tool definitions reach it
    prepared: list[Generation] = field(default_factory=list)  # every request it was asked to prepare
    advice: dict[str, float] = field(default_factory=dict)  # its `recommended_sampling`

    def __post_init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._batch_running = False

    @property
    def recommended_sampling(self) -> dict[str, float]:
        return dict(self.advice)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            self.name, self.continuous, self.n_batch, per_request_sampling=self.continuous, tools=self.tools
        )

    @property
    def model_name(self) -> str:
        return "fake-echo"

    def load(self) -> None:
        self.loaded = True

    def info(self) -> dict[str, Any]:
        return {"kv_cache_bytes": 0, "runtime_version": None}

    def _last_user(self, req: Generation) -> str:
        return next((m.content for m in reversed(req.messages) if m.role == "user"), "")

    def prepare(self, gen: Generation) -> Prepared:
        self.prepared.append(gen)
        text = self._last_user(gen)
        if "toolong" in text:
            raise RequestRejected(ErrorCode.TOO_LONG, "prompt does not fit the context")
        return Prepared(gen, sum(len(m.content.split()) for m in gen.messages), self.batch_key(gen))

    def batch_key(self, req: Generation) -> Hashable:
        return (req.sampling.temperature, req.sampling.top_k) if not self.continuous else None

    def free_slots(self) -> int:
        if self.continuous:
            return self.n_batch - len(self._slots)
        return 0 if self._batch_running else self.n_batch

    def active(self) -> int:
        return len(self._slots)

    def submit(self, batch: Sequence[Prepared]) -> None:
        assert len(batch) <= self.free_slots(), "scheduler over-filled the engine"
        reqs = [p.gen for p in batch]
        used = {s.slot for s in self._slots.values()}
        free = [i for i in range(self.n_batch) if i not in used]
        for req, slot in zip(reqs, free, strict=False):
            text = self._last_user(req)
            m = re.search(r"tokens:(\d+)", text)
            words = [f"t{i} " for i in range(int(m.group(1)))] if m else [w + " " for w in text.split()]
            call = re.search(r"call:(\w+)", text)
            if call:
                words = _tool_call_tokens(req, call.group(1))
            self._slots[req.key] = _Slot(req, slot, words, explode="explode" in text)
        self.batches.append([str(r.key) for r in reqs])
        if not self.continuous:
            self._batch_running = True

    def poll(self, timeout: float) -> list[EngineEvent]:
        if not self._slots:
            self._batch_running = False
            return []
        time.sleep(self.step_s)
        events: list[EngineEvent] = []
        for key, s in list(self._slots.items()):
            if s.explode and s.pos >= 1:
                events.append(ErrorEvent(key, ErrorCode.ENGINE_ERROR, "injected failure"))
                del self._slots[key]
                continue
            limit = s.req.max_new_tokens
            if s.pos < len(s.words) and s.pos < limit:
                events.append(TokenEvent(key, s.words[s.pos]))
                s.pos += 1
            if s.pos >= len(s.words) or s.pos >= limit:
                reason = "stop" if s.pos >= len(s.words) else "length"
                events.append(FinishEvent(key, reason, prompt_tokens=None, completion_tokens=s.pos, slot=s.slot))
                del self._slots[key]
        if not self._slots:
            self._batch_running = False
        return events

    def cancel(self, key: Hashable) -> None:
        if self._slots.pop(key, None) is not None:
            self.cancelled.append(str(key))
        if not self._slots:
            self._batch_running = False


def _tool_call_tokens(req: Generation, name: str) -> list[str]:
    """A tool call as a Qwen/Hermes model writes it, cut into 7-character tokens (so that the tags
    are split across stream chunks), when `name` is one of the request's tools."""
    if not any(t.get("function", {}).get("name") == name for t in req.tools):
        return ["no ", "tool ", name]
    text = 'Checking. <tool_call>{"name": "' + name + '", "arguments": {"city": "Paris"}}</tool_call>'
    return [text[i : i + 7] for i in range(0, len(text), 7)]
