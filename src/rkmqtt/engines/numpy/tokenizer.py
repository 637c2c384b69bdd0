"""The tokenizer of a GGUF file: byte-level BPE built with the `tokenizers` library from the file's
vocabulary and merges, with each token's raw bytes for streaming (scheduler thread)."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from rkmqtt.errors import EngineError

_LOGGER = logging.getLogger(__name__)

TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Split expressions of the pre-tokenizers, as the models' own tokenizer.json files give them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split expression, split every digit first)
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": (_GPT2_SPLIT, False),
    "gpt2": (_GPT2_SPLIT, False),
    "gpt-2": (_GPT2_SPLIT, False),
    "smollm": (_GPT2_SPLIT, True),
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-v3": (_LLAMA3_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
}


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of each byte, reversed: character -> byte."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    codes = visible[:]
    n = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(visible, codes, strict=True)}


class GGUFTokenizer:
    """Encode text to ids and ids to bytes, as the GGUF's tokenizer does."""

    def __init__(self, metadata: dict[str, Any], source: str) -> None:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise EngineError(f"model {source}: the GGUF holds no tokenizer (tokenizer.ggml.tokens)")
        if kind not in ("gpt2", "llama"):
            raise EngineError(
                f"model {source}: tokenizer type {kind!r} is not supported by the numpy engine "
                "(supported: gpt2, the byte-level BPE of SmolLM2, Qwen2.5 and Llama 3; llama, the "
                "SentencePiece BPE of TinyLlama and Llama 2)"
            )
        self.kind = str(kind)
        self.tokens = list(tokens)
        types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        self.token_types = [int(t) for t in types]
        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        self.bos_id = _opt_int(metadata.get("tokenizer.ggml.bos_token_id"))
        self.eos_id = _opt_int(metadata.get("tokenizer.ggml.eos_token_id"))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        stops = {i for i in (self.eos_id, _opt_int(metadata.get("tokenizer.ggml.eot_token_id"))) if i is not None}
        self.stop_ids = frozenset(stops)
        self.pre = str(metadata.get("tokenizer.ggml.pre", "default"))
        if kind == "llama":
            self._tok = _sentencepiece_bpe(metadata, self.tokens, self.token_types, vocab)
            self._bytes = [_spm_token_bytes(t, ty) for t, ty in zip(self.tokens, self.token_types, strict=False)]
            return
        merges_raw: list[str] = metadata.get("tokenizer.ggml.merges") or []
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        pre = self.pre
        if pre not in PRE_TOKENIZERS:
            _LOGGER.warning("model %s: pre-tokenizer %r is not known; using GPT-2's", source, pre)
        split, digits = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
        bpe = models.BPE(
            vocab=vocab,
            merges=[(a, b) for a, b in merges],
            fuse_unk=False,
            ignore_merges=split is _LLAMA3_SPLIT,
        )
        tok = Tokenizer(bpe)
        steps: list[Any] = []
        if digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        spelled = set(byte_decoder())
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(self.tokens, self.token_types, strict=False)
            if ty == TOKEN_CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(self.tokens, self.token_types, strict=False)
            if ty == TOKEN_USER_DEFINED
        ]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        self._tok = tok
        # raw bytes of every token: control tokens produce no text
        bd = byte_decoder()
        table: list[bytes] = []
        for t, ty in zip(self.tokens, self.token_types, strict=False):
            if ty in (TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_UNKNOWN):
                table.append(b"")
            elif ty == TOKEN_USER_DEFINED or not set(t) <= spelled:
                table.append(t.encode("utf-8"))
            else:
                table.append(bytes(bd[c] for c in t))
        self._bytes = table

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._bytes):
            return self._bytes[token_id]
        return b""

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int]) -> Any:
    """SentencePiece BPE (Llama 2, TinyLlama): spaces become '▁', a '▁' is put in front of the
    text, unknown bytes fall back to the <0xNN> tokens. The file has no merges, only a score
    per token; a token that splits into two vocabulary tokens is a merge of them, ranked by the
    token's score (higher first)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok_id, (piece, ty) in enumerate(zip(tokens, types, strict=False)):
        if ty != TOKEN_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[tok_id]), vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_UNKNOWN), None)
    bpe = models.BPE(
        vocab=vocab,
        merges=[(left, right) for _, _, _, left, right in ranked],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    # '▁' for spaces, and one in front of the text (not after each special token)
    prefix = "first" if metadata.get("tokenizer.ggml.add_space_prefix", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == TOKEN_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _spm_token_bytes(piece: str, token_type: int) -> bytes:
    if token_type in (TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_UNKNOWN):
        return b""
    if token_type == TOKEN_BYTE and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode("utf-8")
