"""The float32 weights of a Llama-family model, laid out once for the forward pass: transposed, Q/K/V
and gate/up fused, llama.cpp's rotary row order undone, tied embeddings shared (scheduler thread,
during `NumpyEngine.load`; docs/architecture.md, "Engines")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rkmqtt.engines.numpy.gguf_file import GGUFFile, ModelConfig

F32 = npt.NDArray[np.float32]


@dataclass
class LayerWeights:
    attn_norm: F32  # (dim,)
    wqkv: F32  # (dim, q_dim + 2 * kv_dim)
    bqkv: F32 | None  # (q_dim + 2 * kv_dim,) or None
    wo: F32  # (q_dim, dim)
    ffn_norm: F32  # (dim,)
    w_gate_up: F32  # (dim, 2 * ffn_dim)
    w_down: F32  # (ffn_dim, dim)


@dataclass
class ModelWeights:
    layers: list[LayerWeights]
    final_norm: F32  # (dim,)
    head: F32  # (dim, vocab): logits = x @ head
    embed: F32 | None  # (vocab, dim) when the head is not tied, else None (columns of head)

    def embed_rows(self, ids: npt.NDArray[np.int64]) -> F32:
        if self.embed is not None:
            return self.embed[ids]
        return np.ascontiguousarray(self.head[:, ids].T)

    @property
    def nbytes(self) -> int:
        total = self.final_norm.nbytes + self.head.nbytes + (self.embed.nbytes if self.embed is not None else 0)
        for lw in self.layers:
            total += lw.attn_norm.nbytes + lw.wqkv.nbytes + lw.wo.nbytes + lw.ffn_norm.nbytes
            total += lw.w_gate_up.nbytes + lw.w_down.nbytes + (lw.bqkv.nbytes if lw.bqkv is not None else 0)
        return total


def unpermute_rows(w: F32, n_heads: int) -> F32:
    """Undo llama.cpp's per-head row order (pairs interleaved) back to Hugging Face's
    (first halves, then second halves). Works on weights (rows, in) and biases (rows,)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def load_weights(file: GGUFFile, cfg: ModelConfig) -> ModelWeights:
    reorder = cfg.architecture == "llama"
    layers: list[LayerWeights] = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        wq, wk, wv = (file.tensor(p + f"attn_{n}.weight") for n in "qkv")
        if reorder:
            wq, wk = unpermute_rows(wq, cfg.n_heads), unpermute_rows(wk, cfg.n_kv_heads)
        wqkv = np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0).T)
        del wq, wk, wv
        bqkv: F32 | None = None
        if file.has(p + "attn_q.bias"):
            bq, bk, bv = (file.tensor(p + f"attn_{n}.bias") for n in "qkv")
            if reorder:
                bq, bk = unpermute_rows(bq, cfg.n_heads), unpermute_rows(bk, cfg.n_kv_heads)
            bqkv = np.concatenate([bq, bk, bv]).astype(np.float32)
        gate, up = file.tensor(p + "ffn_gate.weight"), file.tensor(p + "ffn_up.weight")
        w_gate_up = np.ascontiguousarray(np.concatenate([gate, up], axis=0).T)
        del gate, up
        layers.append(
            LayerWeights(
                attn_norm=file.tensor(p + "attn_norm.weight"),
                wqkv=wqkv,
                bqkv=bqkv,
                wo=np.ascontiguousarray(file.tensor(p + "attn_output.weight").T),
                ffn_norm=file.tensor(p + "ffn_norm.weight"),
                w_gate_up=w_gate_up,
                w_down=np.ascontiguousarray(file.tensor(p + "ffn_down.weight").T),
            )
        )
    embed_vd = file.tensor("token_embd.weight")  # (vocab, dim)
    if file.has("output.weight"):
        head = np.ascontiguousarray(file.tensor("output.weight").T)
        embed: F32 | None = embed_vd
    else:
        head = np.ascontiguousarray(embed_vd.T)
        embed = None
    del embed_vd
    return ModelWeights(layers=layers, final_norm=file.tensor("output_norm.weight"), head=head, embed=embed)
