"""The numpy forward pass against Hugging Face transformers reading the same GGUF file.

transformers' logits come from tests/reference/transformers.json (committed, so these tests need
neither transformers nor PyTorch); `./dev crosscheck` runs them against transformers itself.

Tolerance: |ours - theirs| <= 1e-4 * (1 + max |theirs|) at each position's top logits of the
reference, with the same argmax and no other token above them (`tests.reference.assert_close`).
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

import ast
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from rkmqtt.engines.numpy.gguf_file import GGUFFile
from rkmqtt.engines.numpy.model import Segment, StepPlan, Transformer, linear
from rkmqtt.engines.numpy.tokenizer import GGUFTokenizer
from rkmqtt.engines.numpy.weights import load_weights
from tests import reference
from tests.numpy_fixtures import TinySpec, permute_for_gguf, smollm_path, write_tiny_gguf
from tests.reference import LLAMA3_ROPE, LOGIT_CASES, assert_close, llama3_rope_freqs

REL_TOL = 1e-4
REL_TOL_BF16_KV = 1e-2


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


@pytest.fixture(scope="module")
def smollm() -> tuple[Transformer, GGUFTokenizer]:
    path = smollm_path()
    m, f = load_transformer(path, n_slots=3, max_context=128)
    return m, GGUFTokenizer(f.metadata, str(path))


def case_ids(name: str, tok: GGUFTokenizer | None = None) -> list[int]:
    case = LOGIT_CASES[name]
    return tok.encode(case.text) if case.text is not None and tok is not None else list(case.ids)


def tiny_model(tmp_path: Path, name: str, n_slots: int = 3) -> tuple[Transformer, Path]:
    spec = LOGIT_CASES[name].model
    assert isinstance(spec, TinySpec)
    path = write_tiny_gguf(tmp_path / f"{name}.gguf", spec)
    return load_transformer(path, n_slots=n_slots)[0], path


def test_smollm2_logits_match_transformers(smollm: tuple[Transformer, GGUFTokenizer]) -> None:
    m, tok = smollm
    ids = case_ids("smollm2-capital", tok)
    ref = reference.logits("smollm2-capital", smollm_path(), ids)
    assert_close(prefill_logits(m, ids), ref, REL_TOL)
    # the decode path (one token a step, batched attention over the cache) agrees too
    assert_close(decode_logits(m, ids, slot=2, prefix=5), ref, REL_TOL)


def test_smollm2_bfloat16_kv_cache_logits(smollm: tuple[Transformer, GGUFTokenizer]) -> None:
    m, tok = smollm
    bf = Transformer(m.cfg, m.w, 2, 128, kv_dtype="bfloat16")
    assert bf.kv_cache_bytes == m.kv_cache_bytes * 2 // 3 // 2  # 2 slots instead of 3, 2 bytes instead of 4
    ids = case_ids("smollm2-rivers", tok)
    ref = reference.logits("smollm2-rivers", smollm_path(), ids)
    assert_close(prefill_logits(bf, ids), ref, REL_TOL_BF16_KV)
    assert_close(decode_logits(bf, ids, slot=1, prefix=6), ref, REL_TOL_BF16_KV)


@pytest.mark.parametrize(
    "name", ["llama-quantized-untied", "llama-mha-tied", "qwen2-quantized-tied", "qwen2-gqa4-untied"]
)
def test_random_models_match_transformers(tmp_path: Path, name: str) -> None:
    m, path = tiny_model(tmp_path, name)
    ids = case_ids(name)
    ref = reference.logits(name, path, ids)
    assert_close(prefill_logits(m, ids), ref, REL_TOL)
    assert_close(decode_logits(m, ids, slot=1, prefix=7), ref, REL_TOL)


def test_mixed_step_matches_separate_runs(tmp_path: Path) -> None:
    """Decode rows of two slots and a prefill chunk of a third in one step give the logits
    each would get alone."""
    m, path = tiny_model(tmp_path, "mixed-step-a")
    a, b, c = (case_ids(f"mixed-step-{x}") for x in "abc")
    prefill_logits(m, a[:-1], slot=0)
    prefill_logits(m, b[:-1], slot=2)
    m.step(np.asarray(c[:4]), StepPlan([], [], [Segment(1, 0, 4)], []))
    tokens = np.asarray([a[-1], b[-1], *c[4:]])
    plan = StepPlan([0, 2], [len(a) - 1, len(b) - 1], [Segment(1, 4, len(c) - 4)], [0, 1, 2 + len(c) - 5])
    out = m.step(tokens, plan)
    for row, x, ids in zip(out, "abc", (a, b, c), strict=True):
        ref = reference.logits(f"mixed-step-{x}", path, ids)
        last = dataclasses.replace(ref, top_ids=ref.top_ids[-1:], top_values=ref.top_values[-1:])
        assert_close(row[None], last, REL_TOL)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 13])
def test_linear_gives_each_row_its_own_product_whatever_the_row_count(rows: int) -> None:
    """Row counts that are not a multiple of GEMM_ROW_BLOCK are padded for BLAS; the padding
    never shows (shape, values)."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 64), dtype=np.float32)
    w = rng.standard_normal((64, 96), dtype=np.float32)
    out = linear(x, w)
    assert out.shape == (rows, 96) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.stack([row @ w for row in x]), rtol=1e-5, atol=1e-4)


def test_tolerance_catches_a_wrong_rotary_layout(tmp_path: Path) -> None:
    """Leaving llama.cpp's Q/K row order in place (the HF rotate-half on raw GGUF rows) is a
    real mistake; the comparison must fail by far more than the tolerance."""
    m, path = tiny_model(tmp_path, "llama-rotary")
    ids = case_ids("llama-rotary")
    ref = reference.logits("llama-rotary", path, ids)
    assert_close(prefill_logits(m, ids), ref, REL_TOL)  # right as loaded
    cfg = m.cfg
    for lw in m.w.layers:
        q = lw.wqkv[:, : cfg.q_dim].T
        k = lw.wqkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim].T
        lw.wqkv[:, : cfg.q_dim] = permute_for_gguf(q, cfg.n_heads).T
        lw.wqkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim] = permute_for_gguf(k, cfg.n_kv_heads).T
    assert ref.error(prefill_logits(m, ids)) > 100 * REL_TOL * (1.0 + ref.absmax)


def test_llama3_rope_freqs_match_transformers(tmp_path: Path) -> None:
    """A Llama 3 file's rope_freqs.weight against transformers' own "llama3" rope scaling. With a
    head dimension of 32 and an original context of 64, 14 of the 16 frequencies are scaled and
    48 positions turn them far enough that ignoring the tensor fails by far more than the bound."""
    freqs = llama3_rope_freqs(32, 10000.0, LLAMA3_ROPE)
    assert sum(f != 1.0 for f in freqs) == 14
    m, path = tiny_model(tmp_path, "llama3-rope-freqs")
    assert m.cfg.head_dim == 32 and m.cfg.rope_freq_factors == pytest.approx(freqs)
    ids = case_ids("llama3-rope-freqs")
    ref = reference.logits("llama3-rope-freqs", path, ids)
    assert_close(prefill_logits(m, ids), ref, REL_TOL)
    assert_close(decode_logits(m, ids, slot=1, prefix=9), ref, REL_TOL)
    plain = Transformer(dataclasses.replace(m.cfg, rope_freq_factors=None), m.w, 1, 128)
    assert ref.error(prefill_logits(plain, ids)) > 100 * REL_TOL * (1.0 + ref.absmax)


def test_the_committed_reference_is_small_and_says_how_it_was_made() -> None:
    text = reference.REFERENCE_FILE.read_text()
    assert len(text) < 64_000
    assert '"made_by": ".venv/bin/python -m tests.reference.make_reference --write"' in text
    assert set(LOGIT_CASES) == set(json.loads(text)["logits"])


def test_the_suite_needs_neither_pytorch_nor_transformers() -> None:
    """`./dev test` installs the `test` and `bench` extras only (no multi-GB PyTorch), and no test
    imports transformers or torch: only tests/reference/hf.py does, for `./dev crosscheck`."""
    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    for name in ("test", "bench"):
        extra = re.search(rf"(?ms)^{name} = \[(.*?)\]", pyproject)
        assert extra and "pytest" in pyproject, name
        assert not re.search(r"\b(torch|transformers)\b", extra[1]), name
    dev = (root / "dev").read_text()
    assert re.search(r'(?m)^\s+test\) pip install -e "\.\[test,bench\]" ;;$', dev)
    heavy = {"torch", "transformers"}
    for path in root.joinpath("tests").rglob("*.py"):
        if path.name in ("hf.py", "make_reference.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & heavy, f"{path.relative_to(root)} imports {names}"
