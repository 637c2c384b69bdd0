"""A conversation cut to the context the way Ollama cuts it (scheduler thread, in an engine's
`prepare`; pure): every system message and the newest turns that fit, with room for the answer; only
a last turn that cannot fit with the system messages is refused (docs/architecture.md, "Chat")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rkmqtt.engines.base import ChatMessage

# What an engine makes of a candidate conversation: its prompt's tokens (counted, or a bound) and the
# engine's own rendering of it (text, token ids), which the fitted conversation keeps.
Measure = Callable[[tuple[ChatMessage, ...]], tuple[int, Any]]


@dataclass(frozen=True)
class Fitted:
    messages: tuple[ChatMessage, ...]
    tokens: int
    rendered: Any
    dropped: int  # messages left out (the oldest turns)


class DoesNotFit(Exception):
    """Even the system messages and the last turn are more than the budget: `tokens` of them."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


def fit(messages: Sequence[ChatMessage], budget: int, measure: Measure) -> Fitted:
    """The longest newest part of the conversation whose prompt is at most `budget` tokens. A kept part
    starts at a user turn (never at an answer or a tool result whose call was cut off); the last user
    turn and everything after it are always kept. A shorter conversation never renders longer, so the
    start is found by bisection: a few renderings, whatever the length."""
    whole = tuple(messages)
    tokens, rendered = measure(whole)
    if tokens <= budget:
        return Fitted(whole, tokens, rendered, 0)
    starts = [i for i, m in enumerate(whole) if m.role == "user"]
    if not starts:
        raise DoesNotFit(tokens)

    def keep(start: int) -> tuple[ChatMessage, ...]:
        return tuple(m for i, m in enumerate(whole) if m.role == "system" or i >= start)

    best: Fitted | None = None
    lo, hi = 1 if starts[0] == 0 else 0, len(starts) - 1  # starts[0] == 0 is the whole, measured above
    last_tokens = tokens
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = keep(starts[mid])
        n, out = measure(kept)
        if n <= budget:
            best = Fitted(kept, n, out, len(whole) - len(kept))
            hi = mid - 1
        else:
            last_tokens = n
            lo = mid + 1
    if best is None:
        raise DoesNotFit(last_tokens)
    return best
