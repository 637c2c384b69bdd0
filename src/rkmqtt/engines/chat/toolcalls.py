"""The model's tool calls taken out of its text (scheduler thread, in an engine's `poll`; pure):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen/Hermes style), or a whole answer
that is one call's JSON (Llama 3 style), held back while streaming and returned as
`FinishEvent.tool_calls`, for the requests that gave tools."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from rkmqtt.engines.base import EngineEvent, ErrorEvent, FinishEvent, TokenEvent

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def partial_suffix(text: str, marks: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning (not the whole) of a mark."""
    best = 0
    for mark in marks:
        for k in range(min(len(mark) - 1, len(text)), best, -1):
            if text.endswith(mark[:k]):
                best = k
                break
    return best


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None  # the engine's id for it, when it gave one

    def as_dict(self) -> dict[str, Any]:
        """The bridge's one shape of a call (`ChatMessage.tool_calls`, `FinishEvent.tool_calls`)."""
        out: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.id is not None:
            out["id"] = self.id
        return out


def parse_call(body: str) -> ToolCall | None:
    """The call in a `<tool_call>` block's JSON, or None when it is not one."""
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args)


class ToolCallScanner:
    """Streamed text in, the text outside `<tool_call>` blocks out; the blocks' calls in `calls`. With
    `bare_json`, an answer that starts with `{` is held back whole and is a call if it is one's JSON."""

    def __init__(self, bare_json: bool = False) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._inside = False
        self._bare = bare_json  # still deciding whether the answer is a bare JSON call
        self._held = ""

    def feed(self, text: str) -> str:
        if self._bare:
            self._held += text
            start = self._held.lstrip()
            if not start or start.startswith("{"):
                return ""  # could still be a call: wait for the end
            self._bare, text, self._held = False, self._held, ""
        return self._tags(text)

    def _tags(self, text: str) -> str:
        self._buf += text
        out: list[str] = []
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = partial_suffix(self._buf, (OPEN,))
                    out.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                out.append(self._buf[:at])
                self._buf = self._buf[at + len(OPEN) :]
                self._inside = True
            else:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                body = self._buf[:end]
                self._buf = self._buf[end + len(CLOSE) :]
                self._inside = False
                call = parse_call(body)
                if call is None:
                    out.append(OPEN + body + CLOSE)  # not a call after all: it stays text
                else:
                    self.calls.append(call)
        return "".join(out)

    def finish(self) -> str:
        """The rest of the text, once it is complete. An unclosed block counts when its JSON is whole
        (models often stop at the end of the JSON instead of writing the closing tag)."""
        if self._bare:
            held, self._held, self._bare = self._held, "", False
            call = parse_call(held) if held.strip() else None
            if call is not None:
                self.calls.append(call)
                return ""
            return self._tags(held) + self.finish()
        rest, self._buf = self._buf, ""
        if not self._inside:
            return rest
        self._inside = False
        call = parse_call(rest)
        if call is None:
            return OPEN + rest
        self.calls.append(call)
        return ""


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole text as (the text outside tool-call blocks, the calls)."""
    scanner = ToolCallScanner()
    content = scanner.feed(text) + scanner.finish()
    return content, scanner.calls


class CallFilter:
    """An engine's requests that gave tools, by key: their text events without the call blocks, and
    the calls on their `FinishEvent` (after those the engine returned structured, if any)."""

    def __init__(self) -> None:
        self._scanners: dict[Hashable, ToolCallScanner] = {}

    def watch(self, key: Hashable, bare_json: bool = False) -> None:
        self._scanners[key] = ToolCallScanner(bare_json)

    def forget(self, key: Hashable) -> None:
        self._scanners.pop(key, None)

    def events(self, events: list[EngineEvent]) -> list[EngineEvent]:
        if not self._scanners:
            return events
        out: list[EngineEvent] = []
        for ev in events:
            scanner = self._scanners.get(ev.key)
            if scanner is None:
                out.append(ev)
            elif isinstance(ev, TokenEvent):
                out.append(dataclasses.replace(ev, text=scanner.feed(ev.text)))  # "" still counts its tokens
            elif isinstance(ev, FinishEvent):
                del self._scanners[ev.key]
                rest = scanner.finish()
                if rest:
                    out.append(TokenEvent(ev.key, rest, 0))
                calls = tuple(c.as_dict() for c in scanner.calls)
                out.append(dataclasses.replace(ev, tool_calls=calls + ev.tool_calls) if calls else ev)
            else:
                assert isinstance(ev, ErrorEvent)
                del self._scanners[ev.key]
                out.append(ev)
        return out
