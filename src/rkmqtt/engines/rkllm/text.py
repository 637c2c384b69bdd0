"""How one batch slot's text pieces from the runtime become whole characters.

Threads: `SlotText` belongs to one slot of one batch and is used only on the runtime's callback
thread (and, after `rkllm_run` has returned, on the batch's worker thread); the functions are pure.

The runtime hands text per token. A token may end inside a UTF-8 character; the step is then
reported as `RKLLM_RUN_WAITING`. What the text of the following step holds is not documented
(docs/rkllm-runtime.md, "LLMCallState"). Every Rockchip consumer prints text only in `NORMAL`
and ignores it in `WAITING`, which implies that the `NORMAL` after a `WAITING` carries the whole
character again. So, per slot:

* text that ends inside a character is held, not emitted (at `n_batch` 1 that is exactly the text
  of a `WAITING` step; in a batch the state is shared by every slot, and a slot's own bytes tell
  whether it is the one waiting);
* the next piece is resolved against the held bytes (`resolve`):
  - it starts with a UTF-8 continuation byte: the runtime split the character (the header's
    literal reading): held bytes and piece are joined;
  - it begins a character: the runtime repeats what it gave while waiting (the consumers'
    reading). When the piece starts with all the held bytes, they are dropped (a runtime that
    repeats everything since the slot's last complete character); otherwise the shortest end of
    them that covers the partial character and that the piece starts with (a runtime that repeats
    only the character); if the piece repeats none of it, the guard still drops the partial
    character: it is never emitted as U+FFFD;
* what is complete is emitted; when the slot ends, whatever is still held is emitted (a partial
  character as U+FFFD).

The held bytes are always the slot's bytes since its last complete character, so the match never
reaches into text already emitted, and they are exactly what a runtime of the first kind repeats:
that reading and the split one come out exact whatever the cut (tests/test_rkllm_text.py). What
this cannot tell apart: a runtime that repeats only the character, when the piece happens to start
with all the held bytes anyway (the same characters again, e.g. "ééé" cut inside each one): one
copy is lost. `rkmqtt probe` records which reading a board's runtime follows (docs/benchmarks.md).
"""

from __future__ import annotations


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _sequence_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence that `lead` starts (1 for ASCII and for invalid bytes)."""
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 1


def incomplete_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that start a UTF-8 character without finishing it (or b"")."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if _is_continuation(byte):
            continue
        return data[-back:] if _sequence_length(byte) > back else b""
    return b""


def resolve(held: bytes, piece: bytes) -> bytes:
    """The bytes that `held` (a slot's bytes since its last complete character, ending inside one)
    and the next `piece` of its text stand for."""
    if not held or not piece or _is_continuation(piece[0]):
        return held + piece  # nothing held, or the character was split across the pieces
    if piece.startswith(held):
        return piece  # the runtime repeated all it gave since the last complete character
    tail = incomplete_tail(held)
    for k in range(max(1, len(tail)), len(held)):
        if piece.startswith(held[len(held) - k :]):
            return held[: len(held) - k] + piece  # the runtime repeated the last k bytes
    return held[: len(held) - len(tail)] + piece  # repeats nothing: drop the partial character


class SlotText:
    """One slot's text assembly: `take` each piece, `flush` when the slot ends."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = b""  # bytes since the last complete character; they end inside one

    def take(self, piece: bytes) -> str:
        """The whole characters that `piece` completes ("" while the slot is waiting)."""
        data = resolve(self.held, piece)
        if incomplete_tail(data):
            self.held = data  # a runtime that repeats will give all of it again
            return ""
        self.held = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """The slot ended: whatever is still held (a partial character becomes U+FFFD)."""
        data, self.held = self.held, b""
        return data.decode("utf-8", errors="replace")
