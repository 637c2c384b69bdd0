"""Helpers for the numpy engine's tests: the packaged SmolLM2 file, small GGUF models written
with the `gguf` package, and a loop that drives an engine the way the scheduler does. (The
Hugging Face reference is tests/reference/.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rkmqtt.engines.base import (
    ChatMessage,
    Engine,
    ErrorEvent,
    FinishEvent,
    Generation,
    SamplingParams,
    TokenEvent,
)
from rkmqtt.engines.numpy.gguf_file import default_model_path
from rkmqtt.engines.numpy.tokenizer import byte_decoder

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("r", "e")]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm_path() -> Path:
    return default_model_path()


def req(key: str, prompt: str, max_new_tokens: int = 16, system: str | None = None, **sampling: Any) -> Generation:
    msgs = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", prompt),)
    return Generation(key, msgs, max_new_tokens, SamplingParams(**sampling), bool(sampling))


@dataclass
class Result:
    text: str = ""
    chunks: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None
    error: ErrorEvent | None = None


def drive(
    engine: Engine,
    reqs: Sequence[Generation],
    one_per_step: bool = False,
    on_step: Callable[[int, dict[str, Result]], None] | None = None,
    max_steps: int = 10_000,
) -> dict[str, Result]:
    """Feed `reqs` into free slots (all that fit, or one per step to make them join mid-run) and
    poll until every request has ended; return what each one produced."""
    results = {r.key: Result() for r in reqs}
    waiting = list(reqs)
    for step in range(max_steps):
        while waiting and engine.free_slots() > 0:
            r = waiting.pop(0)
            engine.submit([engine.prepare(r)])
            if one_per_step:
                break
        if not waiting and engine.active() == 0:
            return results
        for ev in engine.poll(0.0):
            res = results[ev.key]
            if isinstance(ev, TokenEvent):
                assert res.finish is None, "token after finish"
                res.chunks.append(ev)
                res.text += ev.text
            elif isinstance(ev, FinishEvent):
                assert res.finish is None, "two finishes"
                res.finish = ev
            else:
                res.error = ev
        if on_step is not None:
            on_step(step, results)
    raise AssertionError("requests did not finish")


# -- small GGUF models -------------------------------------------------------------------------------


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A tiny byte-level BPE vocabulary: three control tokens, the 256 byte tokens, a few merges."""
    tokens = list(SPECIAL)
    types = [3, 3, 3]
    chars = sorted(byte_decoder(), key=lambda c: byte_decoder()[c])
    tokens += chars
    types += [1] * len(chars)
    for a, b in MERGES:
        tokens.append(a + b)
        types.append(1)
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


SPM_CHARS = list("▁abcdefghijklmnopqrstuvwxyzTH.,!?'0123456789")
SPM_PIECES = ["▁t", "he", "▁the", "▁a", "at", "▁c", "▁cat", "in", "▁in", "on", "er", "▁h", "▁hat", "▁th", "re"]


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """A tiny SentencePiece vocabulary as llama.cpp writes it: <unk>, <s>, </s>, 256 byte
    tokens, characters, then merged pieces with falling scores (no merges list)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_CHARS + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_CHARS) + len(SPM_PIECES))
    scores = [0.0] * (3 + 256) + [-1000.0 - i for i in range(len(SPM_CHARS))]
    scores += [-1.0 - i for i in range(len(SPM_PIECES))]
    return tokens, types, scores


def byte_token(b: int) -> int:
    """The id of the token for byte `b` in `byte_level_vocab`."""
    return len(SPECIAL) + b


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    n_layers: int = 2
    dim: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 512
    context: int = 256
    tied: bool = False
    # tensor name suffix -> GGML type name
    types: tuple[tuple[str, str], ...] = ()
    chain: tuple[int, ...] = ()  # token ids: greedy decoding walks this cycle
    seed: int = 0
    drop: tuple[str, ...] = ()  # tensors to leave out (a broken file)
    tokenizer: str = "gpt2"  # or "llama" (SentencePiece)
    rope_freqs: tuple[float, ...] = ()  # the tensor rope_freqs.weight (Llama 3 rope scaling), if any
    chat_template: str = CHATML


def _quantize(data: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    qtype = T[type_name]
    if type_name == "F32":
        return data.astype(np.float32), qtype
    if type_name == "F16":
        return data.astype(np.float16), qtype
    if type_name in ("Q4_K", "Q6_K"):
        # gguf-py cannot quantize K-quants: write random blocks with small, sane scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = data.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        d = np.full((rows, cols // block), 2e-4, dtype=np.float16).view(np.uint8).reshape(rows, cols // block, 2)
        if type_name == "Q4_K":
            raw[:, :, 0:2] = d
            raw[:, :, 2:4] = d  # dmin
        else:
            raw[:, :, size - 2 : size] = d
        return raw.reshape(rows, -1), qtype
    return quants.quantize(data.astype(np.float32), qtype), qtype


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows of a llama model (pairs interleaved per head)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, spec: TinySpec) -> Path:
    """Write a small random model of `spec.arch` with a byte-level tokenizer and `spec.chat_template`."""
    import gguf

    rng = np.random.default_rng(spec.seed)
    tokens, types, merges = byte_level_vocab()
    scores: list[float] = []
    if spec.tokenizer == "llama":
        tokens, types, scores = sentencepiece_vocab()
        merges = []
    vocab = len(tokens)
    hd = spec.dim // spec.n_heads
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(spec.tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spec.tokenizer == "llama":
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    else:
        w.add_tokenizer_pre("qwen2" if spec.arch == "qwen2" else "default")
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(spec.chat_template)
    type_of = dict(spec.types)

    def add(name: str, data: np.ndarray) -> None:
        if name in spec.drop:
            return
        suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
        tname = type_of.get(suffix, "F32") if data.ndim == 2 else "F32"
        arr, qtype = _quantize(data, tname, rng)
        w.add_tensor(name, arr, raw_dtype=qtype)

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    q_dim, kv_dim = spec.n_heads * hd, spec.n_kv_heads * hd
    embed = rand(vocab, spec.dim, scale=0.5)
    head = rand(vocab, spec.dim, scale=0.1)
    zero_layers = bool(spec.chain)
    if spec.chain:
        # greedy walks the chain: the final hidden state of token t is a one-hot at slot i,
        # and the head's row for the next token reads that slot
        embed[:] = rand(vocab, spec.dim, scale=0.01)
        head[:] = 0.0
        for i, t in enumerate(spec.chain):
            nxt = spec.chain[(i + 1) % len(spec.chain)]
            embed[t] = 0.0
            embed[t, i] = 1.0
            head[nxt, i] = 10.0
    add("token_embd.weight", embed)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        wq, wk = rand(q_dim, spec.dim), rand(kv_dim, spec.dim)
        if spec.arch == "llama":
            wq, wk = permute_for_gguf(wq, spec.n_heads), permute_for_gguf(wk, spec.n_kv_heads)
        add(p + "attn_norm.weight", 1.0 + rand(spec.dim, scale=0.1))
        add(p + "attn_q.weight", wq)
        add(p + "attn_k.weight", wk)
        add(p + "attn_v.weight", rand(kv_dim, spec.dim))
        if spec.arch == "qwen2":
            add(p + "attn_q.bias", rand(q_dim, scale=0.2))
            add(p + "attn_k.bias", rand(kv_dim, scale=0.2))
            add(p + "attn_v.bias", rand(kv_dim, scale=0.2))
        add(p + "attn_output.weight", rand(spec.dim, q_dim) * (0.0 if zero_layers else 1.0))
        add(p + "ffn_norm.weight", 1.0 + rand(spec.dim, scale=0.1))
        add(p + "ffn_gate.weight", rand(spec.ffn, spec.dim))
        add(p + "ffn_up.weight", rand(spec.ffn, spec.dim))
        add(p + "ffn_down.weight", rand(spec.dim, spec.ffn) * (0.0 if zero_layers else 1.0))
    add("output_norm.weight", np.ones(spec.dim, dtype=np.float32))
    if spec.rope_freqs:
        add("rope_freqs.weight", np.asarray(spec.rope_freqs, dtype=np.float32))
    if not spec.tied:
        add("output.weight", head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
