"""What the HTTP API does to the model's text before a client sees it (the HTTP thread; pure): cut
at stop sequences (held back while it could be the start of one); the final reply's tool calls
(`reply_calls`), which the engines took out of the text (engines/chat/toolcalls.py)."""

from __future__ import annotations

from collections.abc import Sequence

from rkmqtt.engines.chat.toolcalls import ToolCall, partial_suffix
from rkmqtt.protocol import OkReply

__all__ = ["StopScanner", "ToolCall", "cut_at_stop", "reply_calls"]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` before the earliest stop sequence, and whether there was one."""
    at = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


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
        pending = len(buf) - partial_suffix(buf, self.stops)
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


def reply_calls(reply: OkReply) -> list[ToolCall]:
    """The calls in the final reply: those the engine took out of the model's text (`<tool_call>`
    blocks, engines/chat/toolcalls.py) and those it returned structured (engine openai)."""
    return [ToolCall(c.function.name, c.function.arguments, c.id) for c in reply.tool_calls]
