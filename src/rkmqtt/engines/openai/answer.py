"""One streamed answer read into engine events: text deltas, tool calls joined by index, the usage
and llama.cpp's timings (the engine's event-loop thread; pure)."""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from rkmqtt.engines.base import FinishEvent, TokenEvent
from rkmqtt.protocol import ToolCall, ToolFunction


@dataclass
class _PartCall:
    id: str | None = None
    name: str = ""
    arguments: str = ""
    parsed: dict[str, Any] | None = None  # a server that sends the arguments as an object


class Answer:
    """Chunks of one answer in (`feed`), its events out."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.pieces = 0  # deltas with text or a tool call
        self.reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.perf: dict[str, float] = {}
        self._calls: dict[int, _PartCall] = {}

    def feed(self, chunk: Any) -> TokenEvent | None:
        """One `ChatCompletionChunk`; the text event it makes, if any."""
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.prompt_tokens = getattr(usage, "prompt_tokens", None)
            self.completion_tokens = getattr(usage, "completion_tokens", None)
        extra = getattr(chunk, "model_extra", None) or {}
        timings = extra.get("timings")
        if isinstance(timings, dict):
            for ours, theirs in (("prefill_ms", "prompt_ms"), ("decode_ms", "predicted_ms")):
                if isinstance(timings.get(theirs), (int, float)):
                    self.perf[ours] = float(timings[theirs])
        text, called = "", False
        for choice in getattr(chunk, "choices", None) or ():
            if getattr(choice, "index", 0) != 0:
                continue  # n > 1 is never asked for
            if choice.finish_reason:
                self.reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            text += delta.content or ""
            for tc in delta.tool_calls or ():
                self._add_call(tc)
                called = True
        if not text and not called:
            return None
        self.pieces += 1
        return TokenEvent(self.key, text, 1)

    def _add_call(self, tc: Any) -> None:
        index = tc.index if isinstance(tc.index, int) else None
        if index is None:  # a server without indexes: a new id is a new call
            index = len(self._calls) if (tc.id and all(p.id != tc.id for p in self._calls.values())) else 0
            index = max(0, min(index, len(self._calls)))
        part = self._calls.setdefault(index, _PartCall())
        if tc.id:
            part.id = tc.id
        fn = tc.function
        if fn is None:
            return
        if fn.name and fn.name != part.name:
            part.name += fn.name  # whole in one delta (the API), or in pieces (some servers)
        if isinstance(fn.arguments, str):
            part.arguments += fn.arguments
        elif isinstance(fn.arguments, dict):
            part.parsed = fn.arguments

    def finish(self) -> FinishEvent:
        calls, warnings = self._whole_calls()
        if self.reason == "content_filter":
            warnings.append("the upstream server's content filter ended the answer")
        completion = self.completion_tokens if self.completion_tokens is not None else self.pieces
        return FinishEvent(
            self.key,
            "length" if self.reason == "length" else "stop",
            self.prompt_tokens,
            completion,
            perf=self.perf,
            warnings=tuple(warnings),
            tool_calls=tuple(calls),
        )

    def _whole_calls(self) -> tuple[list[dict[str, Any]], list[str]]:
        calls: list[dict[str, Any]] = []
        warnings: list[str] = []
        for index in sorted(self._calls):
            part = self._calls[index]
            args: Any = part.parsed
            if args is None:
                try:
                    args = json.loads(part.arguments) if part.arguments.strip() else {}
                except ValueError:
                    args = None
            try:
                if not isinstance(args, dict):
                    raise ValueError("arguments")
                call = ToolCall(id=part.id, function=ToolFunction(name=part.name, arguments=args))
            except (ValueError, ValidationError):
                name = part.name or "no name"
                warnings.append(f"left out a tool call of the model ({name!r}): its arguments are not a JSON object")
                continue
            calls.append(call.model_dump(exclude_none=True))
        return calls, warnings
