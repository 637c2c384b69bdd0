"""One batch slot's text pieces from the runtime as whole characters, across `WAITING` steps (a
`SlotText` is used on the runtime's callback thread, then on the batch's worker thread; the
functions are pure). The two readings it resolves: docs/rkllm-runtime.md, "Inside rkmqtt's binding"."""

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
