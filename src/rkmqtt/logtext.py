"""Client-controlled text (topics, client names, ids, messages) cut to a bounded length before it
goes into a log line or an error message (any thread; pure).

A device chooses its topic levels and its Response Topic, up to 64 KiB each: logged whole, one
request could write megabytes of log. Every such string passes through `clip` first.
"""

from __future__ import annotations

CLIP_CHARS = 80


def clip(text: str | bytes, limit: int = CLIP_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut, with unprintable characters
    escaped (a log line stays one line)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    head = text[:limit]
    shown = head if head.isprintable() else repr(head)[1:-1]
    return shown if len(text) <= limit else f"{shown}…(+{len(text) - limit} chars)"
