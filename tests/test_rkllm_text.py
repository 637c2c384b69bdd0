"""A slot's text assembly (rkmqtt.engines.rkllm.text) against the ways a runtime may hand out text
around a character split across tokens (docs/rkllm-runtime.md, "LLMCallState"): whatever the cut,
every character comes out once and whole."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkmqtt.engines.rkllm.text import SlotText, incomplete_tail, resolve

Runtime = Callable[[list[bytes]], list[bytes]]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` cut into tokens of the given sizes (cycled), the last one whatever is left."""
    tokens, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        tokens.append(data[i : i + n])
        i += n
        k += 1
    return tokens


def repeat_all(tokens: list[bytes]) -> list[bytes]:
    """What Rockchip's consumers imply: while a slot's bytes end inside a character, each text is all
    its bytes since its last complete character; the text that completes it repeats them too."""
    out, pending = [], b""
    for tok in tokens:
        pending += tok
        out.append(pending)
        if not incomplete_tail(pending):
            pending = b""
    return out


def split(tokens: list[bytes]) -> list[bytes]:
    """The header's literal reading: each text is its token's bytes."""
    return list(tokens)


def repeat_character(tokens: list[bytes]) -> list[bytes]:
    """A third reading: the text after a waiting one repeats only the partial character."""
    out, tail = [], b""
    for tok in tokens:
        out.append(tail + tok)
        tail = incomplete_tail(tail + tok)
    return out


def assemble(pieces: list[bytes]) -> str:
    slot = SlotText()
    return "".join(slot.take(p) for p in pieces) + slot.flush()


text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",), min_codepoint=1), min_size=0, max_size=60)


@settings(max_examples=400, deadline=None)
@given(text=text_strategy, sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6))
def test_both_readings_give_the_text_once(text: str, sizes: list[int]) -> None:
    """The consumers' reading and the header's, whatever the text and the cut."""
    tokens = cut(text.encode(), sizes)
    for runtime in (repeat_all, split):
        assert assemble(runtime(tokens)) == text, runtime.__name__


@pytest.mark.parametrize("text", ["é€😀ж€é😀 中文", "0\u0080\u0080\u0080", "ab中文字cd😀x", "中文 and ascii 😀🌊"])
@pytest.mark.parametrize("sizes", [[1], [2], [3], [2, 5], [4, 1, 3]])
def test_a_runtime_that_repeats_only_the_character(text: str, sizes: list[int]) -> None:
    """A third reading, for the guard: what follows a waiting text repeats the partial character only."""
    assert assemble(repeat_character(cut(text.encode(), sizes))) == text


def test_what_the_third_reading_cannot_tell_apart() -> None:
    """The same character again, cut inside each: held "é" + partial é, and the piece repeats the
    partial é then completes it and starts another: it starts with all of the held bytes, as a
    repeat-all runtime's would. One é is lost (text.py's docstring)."""
    pieces = repeat_character(cut("ééé".encode(), [3]))
    assert assemble(pieces) == "éé"


@settings(max_examples=200, deadline=None)
@given(text=text_strategy, sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6))
def test_nothing_is_emitted_before_its_character_is_complete(text: str, sizes: list[int]) -> None:
    """Each piece emits whole characters only: the concatenation never contains U+FFFD."""
    slot = SlotText()
    for piece in repeat_all(cut(text.encode(), sizes)):
        assert "\ufffd" not in slot.take(piece)


def test_a_partial_character_that_never_completes_is_dropped_not_replaced() -> None:
    """The guard: the runtime abandons a character (the next text begins a new one)."""
    slot = SlotText()
    assert slot.take(b"ab\xe4\xb8") == ""
    assert slot.take(b"cd") == "abcd"


def test_a_cut_inside_a_character_ends_as_one_replacement_character() -> None:
    slot = SlotText()
    assert slot.take(b"ok \xf0\x9f") == ""
    assert slot.flush() == "ok \ufffd"


def test_resolve_cases() -> None:
    assert resolve(b"", b"abc") == b"abc"
    assert resolve(b"ab\xe4", b"\xb8\xad!") == b"ab\xe4\xb8\xad!"  # split: joined
    assert resolve(b"ab\xe4", b"ab\xe4\xb8\xad!") == b"ab\xe4\xb8\xad!"  # all repeated
    assert resolve(b"ab\xe4", b"\xe4\xb8\xad!") == b"ab\xe4\xb8\xad!"  # the character repeated
    assert resolve(b"ab\xe4", b"cd") == b"abcd"  # abandoned: dropped
    # A pending run that starts with the same lead byte as its partial end: all of it is repeated.
    held = "€😀ж".encode() + b"\xe2"
    assert resolve(held, "€😀ж€".encode()) == "€😀ж€".encode()


def test_incomplete_tail() -> None:
    assert incomplete_tail(b"abc") == b""
    assert incomplete_tail("é".encode()) == b""
    assert incomplete_tail(b"a\xe4\xb8") == b"\xe4\xb8"
    assert incomplete_tail(b"a\xf0") == b"\xf0"
    assert incomplete_tail(b"\x80\x80\x80\x80") == b""  # stray continuation bytes: nothing to wait for
