"""What Hugging Face transformers computes for the numpy engine's tests: logits and token ids.

The tests compare the numpy engine with these. By default they come from `transformers.json`
beside this file, committed, so the test suite needs neither PyTorch nor transformers. The file
is made by (after `./dev crosscheck` has installed transformers and PyTorch's CPU build):

    .venv/bin/python -m tests.reference.make_reference --write

`./dev crosscheck` runs the same tests against transformers itself (RKMQTT_REFERENCE=live) and
then checks that the committed file still agrees with it (`make_reference --check`).

Logits are kept small: for every position, the `TOP_K` largest (token ids and values, largest
first), and the largest magnitude over all of them (the tolerance scales with it). A comparison
(`assert_close`) checks the engine's values at those ids, its argmax, and that no other token
comes above the k-th by more than the tolerance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tests.numpy_fixtures import TinySpec

REFERENCE_FILE = Path(__file__).with_name("transformers.json")
TOP_K = 8

# -- the cases -------------------------------------------------------------------------------------

QUANT_MIX = (
    ("token_embd.weight", "Q8_0"),
    ("attn_q.weight", "Q4_K"),
    ("attn_k.weight", "Q6_K"),
    ("attn_v.weight", "Q4_0"),
    ("attn_output.weight", "Q4_1"),
    ("ffn_gate.weight", "F16"),
    ("ffn_up.weight", "Q8_0"),
    ("ffn_down.weight", "Q6_K"),
    ("output.weight", "Q4_K"),
)

#: Llama 3's rope scaling, with an original context short enough for 48 positions to matter.
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

MIXED_TEXT = (
    "Héllo wörld! Ça coûte 1234,56 € — naïve café, Zürich 2024-05-17 at 09:30. 日本語のテキスト.\n"
    "Emoji: 😀🎉👍🏽 and ❤️.\n\n"
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 3.14159\n"
    "\tif x >= 10 and y != 0x1F: print(f'{x!r:>8}')\n"
)


def random_ids(seed: int, *sizes: int) -> list[list[int]]:
    """Token ids of the tiny models' byte-level vocabulary, drawn one list after another."""
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.integers(3, 259, size=n)] for n in sizes]


def llama3_rope_freqs(head_dim: int, base: float, rope: dict[str, Any]) -> tuple[float, ...]:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3's rope scaling: the
    divisor of each inverse frequency (1 for short wavelengths, `factor` for long ones, a smooth
    blend between)."""
    import math

    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    orig = rope["original_max_position_embeddings"]
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


@dataclass(frozen=True)
class LogitCase:
    """A model ("smollm2", the packaged file, or a tiny model's spec) and its input: a text that the
    engine's tokenizer turns into ids, or the ids themselves."""

    model: str | TinySpec
    text: str | None = None
    ids: tuple[int, ...] = ()
    rope: dict[str, Any] | None = None  # rope parameters to give transformers' config


MIXED_STEP_SPEC = TinySpec(arch="qwen2", tied=True, types=QUANT_MIX, seed=5)
MIXED_STEP_IDS = random_ids(0, 12, 20, 9)
LLAMA3_SPEC = TinySpec(
    arch="llama", n_heads=8, n_kv_heads=2, seed=7, rope_freqs=llama3_rope_freqs(32, 10000.0, LLAMA3_ROPE)
)

LOGIT_CASES: dict[str, LogitCase] = {
    "smollm2-capital": LogitCase(
        "smollm2", text="<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "smollm2-rivers": LogitCase(
        "smollm2", text="<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\nThe Nile, the"
    ),
    "llama-quantized-untied": LogitCase(
        TinySpec(arch="llama", tied=False, types=QUANT_MIX, seed=1), ids=tuple(random_ids(1, 40)[0])
    ),
    "llama-mha-tied": LogitCase(
        TinySpec(arch="llama", n_heads=4, n_kv_heads=4, tied=True, seed=2), ids=tuple(random_ids(2, 40)[0])
    ),
    "qwen2-quantized-tied": LogitCase(
        TinySpec(arch="qwen2", tied=True, types=QUANT_MIX, seed=3), ids=tuple(random_ids(3, 40)[0])
    ),
    "qwen2-gqa4-untied": LogitCase(
        TinySpec(arch="qwen2", n_heads=8, n_kv_heads=2, dim=256, tied=False, seed=4), ids=tuple(random_ids(4, 40)[0])
    ),
    "mixed-step-a": LogitCase(MIXED_STEP_SPEC, ids=tuple(MIXED_STEP_IDS[0])),
    "mixed-step-b": LogitCase(MIXED_STEP_SPEC, ids=tuple(MIXED_STEP_IDS[1])),
    "mixed-step-c": LogitCase(MIXED_STEP_SPEC, ids=tuple(MIXED_STEP_IDS[2])),
    "llama-rotary": LogitCase(TinySpec(arch="llama", seed=6), ids=tuple(random_ids(1, 30)[0])),
    "llama3-rope-freqs": LogitCase(
        LLAMA3_SPEC, ids=tuple(random_ids(7, 48)[0]), rope={"rope_type": "llama3", "rope_theta": 10000.0, **LLAMA3_ROPE}
    ),
}


@dataclass(frozen=True)
class TokenCase:
    model: str | TinySpec
    text: str
    digits_first: bool = False  # transformers' tokenizer given SmolLM2's own pre-tokenizer (digits split first)


TOKEN_CASES: dict[str, TokenCase] = {
    "smollm2-mixed": TokenCase("smollm2", MIXED_TEXT),
    "smollm2-chat": TokenCase("smollm2", "<|im_start|>user\nhi<|im_end|>\n"),
    "smollm2-digits": TokenCase("smollm2", MIXED_TEXT + "line\n 99 bottles\n\n  42", digits_first=True),
    "tiny-llama": TokenCase(TinySpec(arch="llama", seed=12), "the other one in there: 123 café 😀"),
    "tiny-qwen2": TokenCase(TinySpec(arch="qwen2", seed=12), "the other one in there: 123 café 😀"),
    "spm-cat": TokenCase(TinySpec(tokenizer="llama", seed=13), "the cat in the hat"),
    "spm-mixed": TokenCase(TinySpec(tokenizer="llama", seed=13), "The cat, café 😀 123!  two  spaces\n"),
    "spm-specials": TokenCase(TinySpec(tokenizer="llama", seed=13), "<s>the</s> hat"),
}

# -- the reference's values ------------------------------------------------------------------------


@dataclass(frozen=True)
class Logits:
    """Each position's TOP_K largest logits (ids and values, largest first) and the largest
    magnitude of all logits."""

    ids: tuple[int, ...]
    top_ids: np.ndarray  # (positions, TOP_K) int64
    top_values: np.ndarray  # (positions, TOP_K) float64
    absmax: float

    @classmethod
    def from_full(cls, ids: list[int] | tuple[int, ...], logits: np.ndarray) -> Logits:
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]
        return cls(tuple(ids), top, np.take_along_axis(logits, top, -1).astype(np.float64), float(np.abs(logits).max()))

    def to_json(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids),
            "absmax": float(f"{self.absmax:.6g}"),
            "top_ids": self.top_ids.tolist(),
            "top_values": [[float(f"{v:.6g}") for v in row] for row in self.top_values],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Logits:
        return cls(
            tuple(data["ids"]),
            np.asarray(data["top_ids"], dtype=np.int64),
            np.asarray(data["top_values"], dtype=np.float64),
            float(data["absmax"]),
        )

    def error(self, ours: np.ndarray) -> float:
        """The largest |ours - reference| over the reference's top logits."""
        return float(np.abs(np.take_along_axis(ours.astype(np.float64), self.top_ids, -1) - self.top_values).max())


def assert_close(ours: np.ndarray, ref: Logits, rel: float) -> None:
    """|ours - reference| <= rel * (1 + max |reference|) at the reference's top logits of every
    position, the same argmax, and no other token above the reference's k-th by more than that."""
    assert ours.shape[0] == ref.top_ids.shape[0], (ours.shape, ref.top_ids.shape)
    tol = rel * (1.0 + ref.absmax)
    err = ref.error(ours)
    assert err <= tol, f"max |diff| {err:.3g} > tolerance {tol:.3g}"
    assert np.array_equal(ours.argmax(-1), ref.top_ids[:, 0])
    others = ours.astype(np.float64).copy()
    np.put_along_axis(others, ref.top_ids, -np.inf, -1)
    assert (others.max(-1) <= ref.top_values[:, -1] + tol).all(), "a token outside the reference's top logits"


def live() -> bool:
    """RKMQTT_REFERENCE=live (set by ./dev crosscheck): ask transformers instead of the file."""
    return os.environ.get("RKMQTT_REFERENCE") == "live"


@cache
def _committed() -> dict[str, Any]:
    data = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    assert data["top_k"] == TOP_K, f"{REFERENCE_FILE} was made with top_k {data['top_k']}: regenerate it"
    return data  # type: ignore[no-any-return]


def logits(name: str, path: Path, ids: list[int]) -> Logits:
    """transformers' logits for case `name`, whose model file is `path` and input `ids`."""
    case = LOGIT_CASES[name]
    if live():
        from tests.reference.hf import hf_logits, hf_model

        return Logits.from_full(ids, hf_logits(hf_model(path, case.rope), ids))
    ref = Logits.from_json(_committed()["logits"][name])
    assert list(ref.ids) == list(ids), f"{name}: the input differs from the reference's: regenerate {REFERENCE_FILE}"
    return ref


def tokens(name: str, path: Path) -> list[int]:
    """transformers' token ids for case `name` (its text), whose model file is `path`."""
    case = TOKEN_CASES[name]
    if live():
        from tests.reference.hf import hf_token_ids

        return hf_token_ids(path, case.text, case.digits_first)
    data = _committed()["tokens"][name]
    assert data["text"] == case.text, f"{name}: the text differs from the reference's: regenerate {REFERENCE_FILE}"
    return list(data["ids"])
