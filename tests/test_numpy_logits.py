"""The numpy forward pass against Hugging Face transformers reading the same GGUF file.

Tolerance: |ours - theirs| <= 1e-4 * (1 + max |theirs|) over every logit of every position.
Both sides compute in float32 from the same dequantized weights, but sum in different orders
(fused QKV and gate/up products, BLAS blocking, a different softmax), so they differ by float32
rounding that grows through the layers: about 1e-5 relative here (SmolLM2, 30 layers: ~8e-5 on
logits up to ~25). The bound leaves ~30x margin for that and is still four orders of magnitude
below the error of a real mistake (rotary layout, permutation, missing bias: O(1) differences),
which `test_tolerance_catches_a_wrong_rotary_layout` shows (and, for Llama 3's rope_freqs,
`test_llama3_rope_freqs_match_transformers`).

With the bfloat16 KV cache (chosen for large n_batch x max_context) K and V keep 8 bits of
mantissa; the bound there is 1e-2 * (1 + max |theirs|) (measured: ~0.1 on logits up to ~36).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rkmqtt.engines.numpy.gguf_file import GGUFFile
from rkmqtt.engines.numpy.model import Segment, StepPlan, Transformer
from rkmqtt.engines.numpy.tokenizer import GGUFTokenizer
from rkmqtt.engines.numpy.weights import load_weights
from tests.numpy_fixtures import TinySpec, hf_logits, hf_model, permute_for_gguf, smollm_path, write_tiny_gguf

REL_TOL = 1e-4
REL_TOL_BF16_KV = 1e-2

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


def load_transformer(path: Path, n_slots: int = 3, max_context: int = 128) -> tuple[Transformer, GGUFFile]:
    f = GGUFFile(path)
    cfg = f.config()
    w = load_weights(f, cfg)
    f.close()
    return Transformer(cfg, w, n_slots, max_context), f


def prefill_logits(m: Transformer, ids: list[int], slot: int = 0) -> np.ndarray:
    n = len(ids)
    plan = StepPlan([], [], [Segment(slot, 0, n)], list(range(n)))
    return m.step(np.asarray(ids, dtype=np.int64), plan)


def decode_logits(m: Transformer, ids: list[int], slot: int, prefix: int) -> np.ndarray:
    """Prefill `prefix` tokens, then feed the rest one at a time through the decode path."""
    out = [prefill_logits(m, ids[:prefix], slot)]
    for pos in range(prefix, len(ids)):
        out.append(m.step(np.asarray([ids[pos]]), StepPlan([slot], [pos], [], [0])))
    return np.concatenate(out)


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = REL_TOL) -> None:
    assert ours.shape == ref.shape
    tol = rel * (1.0 + float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"max |diff| {err:.3g} > tolerance {tol:.3g}"
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def smollm() -> tuple[Transformer, Any, GGUFTokenizer]:
    path = smollm_path()
    m, f = load_transformer(path, n_slots=3, max_context=128)
    return m, hf_model(path), GGUFTokenizer(f.metadata, str(path))


def test_smollm2_logits_match_transformers(smollm: tuple[Transformer, Any, GGUFTokenizer]) -> None:
    m, ref_model, tok = smollm
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ref = hf_logits(ref_model, ids)
    assert_close(prefill_logits(m, ids), ref)
    # the decode path (one token a step, batched attention over the cache) agrees too
    assert_close(decode_logits(m, ids, slot=2, prefix=5), ref)


def test_smollm2_bfloat16_kv_cache_logits(smollm: tuple[Transformer, Any, GGUFTokenizer]) -> None:
    m, ref_model, tok = smollm
    bf = Transformer(m.cfg, m.w, 2, 128, kv_dtype="bfloat16")
    assert bf.kv_cache_bytes == m.kv_cache_bytes * 2 // 3 // 2  # 2 slots instead of 3, 2 bytes instead of 4
    ids = tok.encode("<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\nThe Nile, the")
    ref = hf_logits(ref_model, ids)
    assert_close(prefill_logits(bf, ids), ref, REL_TOL_BF16_KV)
    assert_close(decode_logits(bf, ids, slot=1, prefix=6), ref, REL_TOL_BF16_KV)


@pytest.mark.parametrize(
    "spec",
    [
        TinySpec(arch="llama", tied=False, types=QUANT_MIX, seed=1),
        TinySpec(arch="llama", n_heads=4, n_kv_heads=4, tied=True, seed=2),
        TinySpec(arch="qwen2", tied=True, types=QUANT_MIX, seed=3),
        TinySpec(arch="qwen2", n_heads=8, n_kv_heads=2, dim=256, tied=False, seed=4),
    ],
    ids=["llama-quantized-untied", "llama-mha-tied", "qwen2-quantized-tied", "qwen2-gqa4-untied"],
)
def test_random_models_match_transformers(tmp_path: Path, spec: TinySpec) -> None:
    path = write_tiny_gguf(tmp_path / f"{spec.arch}.gguf", spec)
    m, _ = load_transformer(path)
    ids = [int(i) for i in np.random.default_rng(spec.seed).integers(3, 259, size=40)]
    ref = hf_logits(hf_model(path), ids)
    assert_close(prefill_logits(m, ids), ref)
    assert_close(decode_logits(m, ids, slot=1, prefix=7), ref)


def test_mixed_step_matches_separate_runs(tmp_path: Path) -> None:
    """Decode rows of two slots and a prefill chunk of a third in one step give the logits
    each would get alone."""
    path = write_tiny_gguf(tmp_path / "q.gguf", TinySpec(arch="qwen2", tied=True, types=QUANT_MIX, seed=5))
    m, _ = load_transformer(path)
    rng = np.random.default_rng(0)
    a, b, c = ([int(i) for i in rng.integers(3, 259, size=n)] for n in (12, 20, 9))
    ref = hf_model(path)
    prefill_logits(m, a[:-1], slot=0)
    prefill_logits(m, b[:-1], slot=2)
    m.step(np.asarray(c[:4]), StepPlan([], [], [Segment(1, 0, 4)], []))
    tokens = np.asarray([a[-1], b[-1], *c[4:]])
    plan = StepPlan([0, 2], [len(a) - 1, len(b) - 1], [Segment(1, 4, len(c) - 4)], [0, 1, 2 + len(c) - 5])
    out = m.step(tokens, plan)
    for row, ids in zip(out, (a, b, c), strict=True):
        assert_close(row[None], hf_logits(ref, ids)[-1:])


def test_tolerance_catches_a_wrong_rotary_layout(tmp_path: Path) -> None:
    """Leaving llama.cpp's Q/K row order in place (the HF rotate-half on raw GGUF rows) is a
    real mistake; the comparison must fail by far more than the tolerance."""
    spec = TinySpec(arch="llama", seed=6)
    path = write_tiny_gguf(tmp_path / "l.gguf", spec)
    m, _ = load_transformer(path)
    cfg = m.cfg
    for lw in m.w.layers:
        q = lw.wqkv[:, : cfg.q_dim].T
        k = lw.wqkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim].T
        lw.wqkv[:, : cfg.q_dim] = permute_for_gguf(q, cfg.n_heads).T
        lw.wqkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim] = permute_for_gguf(k, cfg.n_kv_heads).T
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 259, size=30)]
    ref = hf_logits(hf_model(path), ids)
    err = float(np.abs(prefill_logits(m, ids) - ref).max())
    assert err > 100 * REL_TOL * (1.0 + float(np.abs(ref).max()))


def llama3_rope_freqs(head_dim: int, base: float, rope: dict[str, Any]) -> tuple[float, ...]:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3's rope scaling: the
    divisor of each inverse frequency (1 for short wavelengths, `factor` for long ones, a smooth
    blend between)."""
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


def test_llama3_rope_freqs_match_transformers(tmp_path: Path) -> None:
    """A Llama 3 file's rope_freqs.weight against transformers' own "llama3" rope scaling. With a
    head dimension of 32 and an original context of 64, 14 of the 16 frequencies are scaled and
    48 positions turn them far enough that ignoring the tensor fails by far more than the bound."""
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    freqs = llama3_rope_freqs(32, 10000.0, rope)
    assert sum(f != 1.0 for f in freqs) == 14
    spec = TinySpec(arch="llama", n_heads=8, n_kv_heads=2, seed=7, rope_freqs=freqs)
    path = write_tiny_gguf(tmp_path / "llama3.gguf", spec)
    m, _ = load_transformer(path)
    assert m.cfg.head_dim == 32 and m.cfg.rope_freq_factors == pytest.approx(freqs)
    ids = [int(i) for i in np.random.default_rng(spec.seed).integers(3, 259, size=48)]
    ref = hf_logits(hf_model(path, {"rope_type": "llama3", "rope_theta": 10000.0, **rope}), ids)
    assert_close(prefill_logits(m, ids), ref)
    assert_close(decode_logits(m, ids, slot=1, prefix=9), ref)
    plain = Transformer(dataclasses.replace(m.cfg, rope_freq_factors=None), m.w, 1, 128)
    err = float(np.abs(prefill_logits(plain, ids) - ref).max())
    assert err > 100 * REL_TOL * (1.0 + float(np.abs(ref).max()))
