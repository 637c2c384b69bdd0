"""Choosing the next token from a slot's logits (scheduler thread).

Each slot has its own `numpy.random.Generator`, seeded from the request's seed, so the same seed
and request give the same text whatever else shares the batch. Order of the steps, as in
llama.cpp: repeat penalty (over the last `REPEAT_WINDOW` tokens of prompt and answer), then
greedy when the temperature is 0; else top-k, temperature, softmax, top-p, draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from rkmqtt.engines.base import SamplingParams

REPEAT_WINDOW = 64


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: npt.NDArray[np.float32], history: Sequence[int]) -> int:
        p = self.params
        x = logits.astype(np.float64)
        if p.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-REPEAT_WINDOW:], dtype=np.int64))
            vals = x[recent]
            x[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(x))
        top_k = p.top_k if 0 < p.top_k < x.shape[0] else x.shape[0]
        idx = np.argpartition(-x, top_k - 1)[:top_k] if top_k < x.shape[0] else np.arange(x.shape[0])
        z = x[idx] / p.temperature
        order = np.argsort(-z, kind="stable")
        idx, z = idx[order], z[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            idx, probs = idx[:keep], probs[:keep]
            probs /= probs.sum()
        u = self.rng.random()
        pick = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(idx[min(pick, idx.shape[0] - 1)])
