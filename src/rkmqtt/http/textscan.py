"""What the HTTP API does to the model's text before a client sees it (the HTTP thread; pure): cut
at stop sequences (held back while it could be the start of one), and `<tool_call>` blocks taken
out as structured calls (`reply_calls`: those an engine returned structured, engine openai)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rkmqtt.protocol import OkReply

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` before the earliest stop sequence, and whether there was one."""
    at = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _partial_suffix(text: str, marks: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning (not the whole) of a mark."""
    best = 0
    for mark in marks:
        for k in range(min(len(mark) - 1, len(text)), best, -1):
            if text.endswith(mark[:k]):
                best = k
                break
    return best


class StopScanner:
    """Streamed text in, text that may be shown out; `hit` once a stop sequence came."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut, found = cut_at_stop(buf, self.stops)
        # Text from `pending` on could still become a stop sequence that starts before the one found
        # (or, with none found, one at all): hold it back until the next piece decides.
        pending = len(buf) - _partial_suffix(buf, self.stops)
        if found and len(cut) <= pending:
            self.hit, self._held = True, ""
            return cut
        self._held = buf[pending:]
        return buf[:pending]

    def flush(self) -> str:
        """The held-back end, once the text is complete (it may hold a stop that waited for a longer one)."""
        if self.hit:
            return ""
        rest, self.hit = cut_at_stop(self._held, self.stops)
        self._held = ""
        return rest


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None  # the engine's id for it, when it gave one


def reply_calls(reply: OkReply) -> list[ToolCall]:
    """The calls an engine returned structured, in the final reply."""
    return [ToolCall(c.function.name, c.function.arguments, c.id) for c in reply.tool_calls]


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
    """Streamed text in, the text outside `<tool_call>` blocks out; the blocks' calls in `calls`."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._inside = False

    def feed(self, text: str) -> str:
        self._buf += text
        out: list[str] = []
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buf, (OPEN,))
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
        """The rest of the text, once it is complete."""
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
