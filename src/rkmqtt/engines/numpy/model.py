"""The forward pass of a Llama-family transformer over a mixed batch of decode rows and prefill
chunks (rows padded to a multiple of 4 for BLAS), with a KV cache per slot in float32 or bfloat16
(scheduler thread; docs/architecture.md, "Engines")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from rkmqtt.engines.numpy.gguf_file import ModelConfig
from rkmqtt.engines.numpy.weights import ModelWeights

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]
KVDtype = Literal["float32", "bfloat16"]

# Up to this many rows a linear layer is computed as one matrix-vector product per row:
# OpenBLAS's matrix-matrix path is slower than that for very small batches.
GEMV_ROWS = 2
# Above that, rows are padded to a multiple of this: OpenBLAS's sgemm kernels take the rows four at a
# time (x86-64 and ARMv8) and run a remainder through slower edge kernels (7 rows cost more than 8:
# docs/benchmarks.md, "A single round").
GEMM_ROW_BLOCK = 4


@dataclass(frozen=True)
class Segment:
    """A chunk of a prompt: `length` tokens of slot `slot` at positions start .. start+length-1."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class StepPlan:
    """What one step computes. Rows are the decode rows (one per `decode_slots` entry, at
    `decode_positions`) followed by the prefill segments in order. `logit_rows` are the row
    indices whose logits are returned, in that order."""

    decode_slots: Sequence[int]
    decode_positions: Sequence[int]
    segments: Sequence[Segment]
    logit_rows: Sequence[int]


def linear(x: F32, w: F32) -> F32:
    n = x.shape[0]
    if n <= GEMV_ROWS:
        out = np.empty((n, w.shape[1]), dtype=np.float32)
        for i in range(n):
            np.dot(x[i], w, out=out[i])
        return out
    pad = -n % GEMM_ROW_BLOCK
    if pad:
        padded = np.zeros((n + pad, x.shape[1]), dtype=np.float32)
        padded[:n] = x
        result: F32 = (padded @ w)[:n]
        return result
    return x @ w


def rms_norm(x: F32, weight: F32, eps: float) -> F32:
    ms = np.einsum("ij,ij->i", x, x) / np.float32(x.shape[1])
    scale = (1.0 / np.sqrt(ms + np.float32(eps))).astype(np.float32)
    out: F32 = x * scale[:, None]
    out *= weight
    return out


class Transformer:
    def __init__(
        self, cfg: ModelConfig, weights: ModelWeights, n_slots: int, max_context: int, kv_dtype: KVDtype = "float32"
    ) -> None:
        self.cfg = cfg
        self.w = weights
        self.n_slots = n_slots
        self.max_context = max_context
        self.kv_dtype: KVDtype = kv_dtype
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, max_context, cfg.head_dim)
        self.k_cache: F32 | U16
        self.v_cache: F32 | U16
        if kv_dtype == "float32":
            self.k_cache, self.v_cache = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
        else:
            self.k_cache, self.v_cache = np.zeros(shape, dtype=np.uint16), np.zeros(shape, dtype=np.uint16)
        half = cfg.head_dim // 2
        inv = 1.0 / (cfg.rope_base ** (np.arange(half, dtype=np.float64) * 2.0 / cfg.head_dim))
        if cfg.rope_freq_factors is not None:
            # Llama 3 files: llama.cpp divides each frequency by its factor from rope_freqs.weight
            inv = inv / np.asarray(cfg.rope_freq_factors, dtype=np.float64)
        pos = np.arange(max_context, dtype=np.float64) / cfg.rope_linear_scale
        ang = np.outer(pos, inv)
        self.cos: F32 = np.cos(ang).astype(np.float32)
        self.sin: F32 = np.sin(ang).astype(np.float32)

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.k_cache.nbytes + self.v_cache.nbytes)

    def step(self, tokens: I64, plan: StepPlan) -> F32:
        """Run the rows of `plan` (token ids in row order); return logits for `plan.logit_rows`."""
        cfg = self.cfg
        n = int(tokens.shape[0])
        positions = np.empty(n, dtype=np.int64)
        nd = len(plan.decode_slots)
        positions[:nd] = plan.decode_positions
        r = nd
        for seg in plan.segments:
            positions[r : r + seg.length] = np.arange(seg.start, seg.start + seg.length)
            r += seg.length
        if r != n:
            raise ValueError(f"step: {n} tokens for {r} planned rows")
        if n and int(positions.max()) >= self.max_context:
            raise ValueError("step: a position is past the end of the context")
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        dec = _DecodeBatch(plan.decode_slots, plan.decode_positions) if nd else None
        qd, kvd, hd = cfg.q_dim, cfg.kv_dim, cfg.head_dim
        eps = cfg.rms_eps
        x = self.w.embed_rows(tokens)
        for li, lw in enumerate(self.w.layers):
            h = rms_norm(x, lw.attn_norm, eps)
            qkv = linear(h, lw.wqkv)
            if lw.bqkv is not None:
                qkv += lw.bqkv
            qk = qkv[:, : qd + kvd].reshape(n, cfg.n_heads + cfg.n_kv_heads, hd)
            _rope(qk, cos, sin)
            q = qk[:, : cfg.n_heads]
            k = qk[:, cfg.n_heads :]
            v = qkv[:, qd + kvd :].reshape(n, cfg.n_kv_heads, hd)
            attn = np.empty((n, cfg.n_heads, hd), dtype=np.float32)
            if dec is not None:
                attn[:nd] = self._decode_attention(li, dec, q[:nd], k[:nd], v[:nd])
            r = nd
            for seg in plan.segments:
                e = r + seg.length
                attn[r:e] = self._prefill_attention(li, seg, q[r:e], k[r:e], v[r:e])
                r = e
            x += linear(attn.reshape(n, qd), lw.wo)
            h = rms_norm(x, lw.ffn_norm, eps)
            gu = linear(h, lw.w_gate_up)
            f = cfg.ffn_dim
            gate = gu[:, :f]
            act = np.exp(-gate)
            act += 1.0
            np.divide(gate, act, out=act)
            act *= gu[:, f:]
            x += linear(act, lw.w_down)
        rows = np.asarray(plan.logit_rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty((0, cfg.vocab_size), dtype=np.float32)
        hx = rms_norm(np.ascontiguousarray(x[rows]), self.w.final_norm, eps)
        return linear(hx, self.w.head)

    # -- attention ---------------------------------------------------------------------------
    def _decode_attention(self, li: int, dec: _DecodeBatch, q: F32, k: F32, v: F32) -> F32:
        cfg = self.cfg
        kc, vc = self.k_cache[li], self.v_cache[li]
        kc[dec.slots, :, dec.positions] = self._store(k)
        vc[dec.slots, :, dec.positions] = self._store(v)
        group = cfg.n_heads // cfg.n_kv_heads
        lo, hi, span = dec.lo, dec.hi, dec.span
        nb = hi - lo
        # queries of the slots in lo..hi (slots in that range that are not decoding get zeros)
        qs = np.zeros((nb, cfg.n_kv_heads, group, cfg.head_dim), dtype=np.float32)
        qs[dec.slots - lo] = q.reshape(-1, cfg.n_kv_heads, group, cfg.head_dim)
        keys = self._load(kc[lo:hi, :, :span])  # (nb, kv, span, hd)
        vals = self._load(vc[lo:hi, :, :span])
        scores: F32 = qs @ keys.transpose(0, 1, 3, 2)  # (nb, kv, group, span)
        scores *= np.float32(1.0 / np.sqrt(cfg.head_dim))
        scores += dec.mask
        _softmax_inplace(scores)
        out: F32 = scores @ vals  # (nb, kv, group, hd)
        picked: F32 = out[dec.slots - lo].reshape(-1, cfg.n_heads, cfg.head_dim)
        return picked

    def _prefill_attention(self, li: int, seg: Segment, q: F32, k: F32, v: F32) -> F32:
        cfg = self.cfg
        t = seg.length
        end = seg.start + t
        kc = self.k_cache[li, seg.slot]  # (kv, ctx, hd)
        vc = self.v_cache[li, seg.slot]
        kc[:, seg.start : end] = self._store(k.transpose(1, 0, 2))
        vc[:, seg.start : end] = self._store(v.transpose(1, 0, 2))
        group = cfg.n_heads // cfg.n_kv_heads
        # (t, kv, group, hd) -> (kv, group * t, hd): rows ordered by head in group, then token
        qs = (
            q.reshape(t, cfg.n_kv_heads, group, cfg.head_dim)
            .transpose(1, 2, 0, 3)
            .reshape(cfg.n_kv_heads, group * t, cfg.head_dim)
        )
        scores: F32 = qs @ self._load(kc[:, :end]).transpose(0, 2, 1)  # (kv, group * t, end)
        scores *= np.float32(1.0 / np.sqrt(cfg.head_dim))
        key_pos = np.arange(end)
        query_pos = np.arange(seg.start, end)
        mask = np.where(key_pos[None, :] <= query_pos[:, None], np.float32(0.0), np.float32(-np.inf))
        scores += np.tile(mask, (group, 1)).astype(np.float32)
        _softmax_inplace(scores)
        out: F32 = scores @ self._load(vc[:, :end])  # (kv, group * t, hd)
        heads: F32 = out.reshape(cfg.n_kv_heads, group, t, cfg.head_dim).transpose(2, 0, 1, 3)
        return heads.reshape(t, cfg.n_heads, cfg.head_dim)

    def _store(self, x: F32) -> F32 | U16:
        if self.kv_dtype == "float32":
            return x
        return to_bfloat16(x)

    def _load(self, x: F32 | U16) -> F32:
        if x.dtype == np.float32:
            return x  # type: ignore[return-value]
        return from_bfloat16(x)  # type: ignore[arg-type]


def to_bfloat16(x: F32) -> U16:
    """float32 -> bfloat16 bits (round to nearest even)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bfloat16(b: U16) -> F32:
    out = np.left_shift(b, 16, dtype=np.uint32)
    return out.view(np.float32)


class _DecodeBatch:
    """Index arrays and the padding mask of the decode rows, built once per step."""

    def __init__(self, slots: Sequence[int], positions: Sequence[int]) -> None:
        self.slots = np.asarray(slots, dtype=np.int64)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.lo = int(self.slots.min())
        self.hi = int(self.slots.max()) + 1
        lengths = np.ones(self.hi - self.lo, dtype=np.int64)
        lengths[self.slots - self.lo] = self.positions + 1
        self.span = int(lengths.max())
        allowed = np.arange(self.span)[None, :] < lengths[:, None]
        self.mask: F32 = np.where(allowed, np.float32(0.0), np.float32(-np.inf))[:, None, None, :].astype(np.float32)


def _rope(x: F32, cos: F32, sin: F32) -> None:
    """Rotate-half rotary embedding, in place; x is (rows, heads, head_dim)."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    x1[...] = r1
    x2[...] = r2


def _softmax_inplace(s: F32) -> None:
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
