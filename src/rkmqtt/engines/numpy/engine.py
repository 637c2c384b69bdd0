"""`NumpyEngine`: continuous batching over a numpy transformer (scheduler thread only; it starts no
threads). One `poll()` is one step: a decode for every generating slot, prefill chunks for joining
ones (prompts that arrive together go in together); a slot's held prompt prefix is reused; the context
rule refuses `too_long` at `prepare`; the KV cache is float32 or bfloat16 (docs/architecture.md, "Engines")."""

from __future__ import annotations

import codecs
import ctypes
import gc
import importlib
import logging
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from rkmqtt.engines.base import (
    Capabilities,
    Engine,
    EngineEvent,
    ErrorEvent,
    FinishEvent,
    Generation,
    Prepared,
    TokenEvent,
)
from rkmqtt.engines.numpy.chat import ChatTemplate
from rkmqtt.engines.numpy.gguf_file import GGUFFile, ModelConfig, resolve_model_path
from rkmqtt.engines.numpy.model import KVDtype, Segment, StepPlan, Transformer
from rkmqtt.engines.numpy.sampling import REPEAT_WINDOW, Sampler
from rkmqtt.engines.numpy.sampling_defaults import model_sampling
from rkmqtt.engines.numpy.tokenizer import GGUFTokenizer
from rkmqtt.engines.numpy.weights import load_weights
from rkmqtt.errors import EngineError, RequestRejected
from rkmqtt.protocol import ErrorCode

if TYPE_CHECKING:
    from rkmqtt.settings import Settings

_LOGGER = logging.getLogger(__name__)

PREFILL_CHUNK = 32
IDLE_PREFILL_CHUNK = 256
KV_FLOAT32_BUDGET = 512 * 2**20


@dataclass
class _Running:
    key: Hashable
    slot: int
    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int = -1  # the last sampled token, fed at the next step
    reused: int = 0  # prompt tokens whose KV the slot already held
    held: int = 0  # tokens whose bytes are not yet whole characters
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


class NumpyEngine(Engine):
    def __init__(
        self,
        model: str | None = None,
        n_batch: int = 4,
        max_context: int = 2048,
        prefill_chunk: int = PREFILL_CHUNK,
        idle_prefill_chunk: int = IDLE_PREFILL_CHUNK,
        kv_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        threads: int = 0,
        reuse_prefix: bool = True,
    ) -> None:
        if n_batch < 1 or max_context < 8 or prefill_chunk < 1 or idle_prefill_chunk < 1:
            raise EngineError("numpy engine: n_batch, max_context and the prefill chunks must be positive")
        self._model_setting = model
        self._n_batch = n_batch
        self._max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.idle_prefill_chunk = idle_prefill_chunk
        self._kv_dtype_setting = kv_dtype
        self._threads = threads
        self.reuse_prefix = reuse_prefix
        self._kv_tokens: list[list[int]] = [[] for _ in range(n_batch)]  # what each slot's KV cache holds
        self.reused_prompt_tokens = 0
        self._path: Path | None = None
        self._cfg: ModelConfig | None = None
        self._tok: GGUFTokenizer | None = None
        self._chat: ChatTemplate | None = None
        self._model: Transformer | None = None
        self._facts: dict[str, Any] = {}
        self._running: dict[Hashable, _Running] = {}
        self._slots: list[Hashable | None] = [None] * n_batch
        self._join_order: list[Hashable] = []
        self.steps = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> NumpyEngine:
        return cls(
            model=settings.model,
            n_batch=settings.n_batch,
            max_context=settings.max_context,
            threads=settings.numpy_threads,
        )

    # -- facts --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            name="numpy",
            continuous=True,
            max_batch=self._n_batch,
            per_request_sampling=True,
            tools=self._chat is not None and self._chat.takes_tools,
        )

    @property
    def model_name(self) -> str:
        if self._path is not None:
            return self._path.stem
        return Path(self._model_setting).stem if self._model_setting else "SmolLM2-135M-Instruct.Q4_1"

    @property
    def recommended_sampling(self) -> dict[str, float]:
        return model_sampling(self.model_name).as_settings()

    @property
    def tokenizer(self) -> GGUFTokenizer:
        if self._tok is None:
            raise EngineError("numpy engine: load() has not been called")
        return self._tok

    @property
    def transformer(self) -> Transformer:
        if self._model is None:
            raise EngineError("numpy engine: load() has not been called")
        return self._model

    @property
    def max_context(self) -> int:
        return self._max_context

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "engine": "numpy",
            "model": self.model_name,
            "n_batch": self._n_batch,
            "max_context": self._max_context,
            "numpy": np.__version__,
        }
        out.update(self._facts)
        if self._model is not None:
            out["kv_cache_bytes"] = self._model.kv_cache_bytes
            out["kv_cache_mb"] = round(self._model.kv_cache_bytes / 2**20, 1)
        out["reused_prompt_tokens"] = self.reused_prompt_tokens
        try:
            psutil = importlib.import_module("psutil")  # untyped: imported by name for strict mypy
            out["rss_bytes"] = int(psutil.Process(os.getpid()).memory_info().rss)
            out["rss_mb"] = round(out["rss_bytes"] / 2**20, 1)
        except Exception:  # psutil missing or the platform refuses: leave the figure out
            pass
        return out

    # -- load ---------------------------------------------------------------------------------
    def load(self) -> None:
        t0 = time.perf_counter()
        if self._threads > 0:  # 0: leave BLAS as the process found it
            threadpool_limits(limits=self._threads, user_api="blas")
        path = resolve_model_path(self._model_setting)
        gguf = GGUFFile(path)
        try:
            cfg = gguf.config()
            tok = GGUFTokenizer(gguf.metadata, str(path))
            if tok.vocab_size != cfg.vocab_size:
                raise EngineError(
                    f"model {path}: the tokenizer has {tok.vocab_size} tokens but the model {cfg.vocab_size}"
                )
            bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
            eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
            chat = ChatTemplate(gguf.get("tokenizer.chat_template"), bos, eos)
            weights = load_weights(gguf, cfg)
            n_params = gguf.n_parameters()
            types = sorted(set(gguf.tensor_types.values()))
        finally:
            gguf.close()
        if self._max_context > cfg.context_length:
            _LOGGER.warning(
                "max_context %d is more than %s was trained for (%d); using %d",
                self._max_context,
                path.name,
                cfg.context_length,
                cfg.context_length,
            )
            self._max_context = cfg.context_length
        kv_dtype: KVDtype
        if self._kv_dtype_setting == "auto":
            f32_bytes = 2 * cfg.n_layers * self._n_batch * self._max_context * cfg.kv_dim * 4
            kv_dtype = "float32" if f32_bytes <= KV_FLOAT32_BUDGET else "bfloat16"
        else:
            kv_dtype = self._kv_dtype_setting
        self._model = Transformer(cfg, weights, self._n_batch, self._max_context, kv_dtype)
        self._forget_cached_prompts()  # a new cache holds nothing yet
        _release_freed_memory()
        self._path, self._cfg, self._tok, self._chat = path, cfg, tok, chat
        self._facts = {
            "model_path": str(path),
            "model_title": cfg.name,
            "architecture": cfg.architecture,
            "parameters": n_params,
            "file_type": cfg.file_type,
            "tensor_types": types,
            "layers": cfg.n_layers,
            "embedding_length": cfg.dim,
            "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size,
            "weights_bytes": weights.nbytes,
            "kv_cache_dtype": kv_dtype,
            "chat_template": "builtin ChatML" if chat.builtin else "from the model file",
            "blas": _blas_description(),
            "load_seconds": round(time.perf_counter() - t0, 2),
        }
        _LOGGER.info(
            "numpy engine: %s (%s, %d parameters) loaded in %.1f s; %d slots of %d tokens",
            path.name,
            cfg.architecture,
            n_params,
            time.perf_counter() - t0,
            self._n_batch,
            self._max_context,
        )

    # -- requests -----------------------------------------------------------------------------
    def encode_chat(self, req: Generation) -> list[int]:
        """The prompt tokens of a request: its messages through the chat template."""
        tok = self.tokenizer
        if self._chat is None:
            raise EngineError("numpy engine: load() has not been called")
        if req.tools and not self._chat.takes_tools:
            raise RequestRejected(
                ErrorCode.INVALID_REQUEST,
                f"the chat template of {self.model_name} takes no tools: use a model whose template does "
                "(e.g. Qwen2.5-Instruct) or send no tools",
            )
        try:
            text = self._chat.render(req.messages, add_generation_prompt=True, tools=req.tools)
        except ValueError as e:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, str(e)) from e
        ids = tok.encode(text)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    def answer_room(self, max_new_tokens: int) -> int:
        return max(1, min(max_new_tokens, self._max_context // 4))

    def prepare(self, gen: Generation) -> Prepared:
        ids = self.encode_chat(gen)
        room = self.answer_room(gen.max_new_tokens)
        if len(ids) + room > self._max_context:
            raise RequestRejected(
                ErrorCode.TOO_LONG,
                f"the prompt is {len(ids)} tokens; with room for {room} answer tokens it needs "
                f"{len(ids) + room}, more than the context of {self._max_context}",
            )
        return Prepared(gen, len(ids), data=ids)

    def decoding(self) -> int:
        """Requests past their prompt (each makes one token a step)."""
        return sum(1 for r in self._running.values() if not r.prefilling)

    def free_slots(self) -> int:
        return sum(1 for s in self._slots if s is None)

    def submit(self, batch: Sequence[Prepared]) -> None:
        if len(batch) > self.free_slots():
            raise EngineError(f"numpy engine: {len(batch)} requests submitted but {self.free_slots()} slots free")
        for prepared in batch:
            gen, ids = prepared.gen, prepared.data
            if gen.key in self._running:
                raise EngineError(f"numpy engine: request {gen.key!r} is already running")
            if not isinstance(ids, list):
                raise EngineError(f"numpy engine: request {gen.key!r} was not prepared by this engine")
            slot, reuse = self._pick_slot(ids)
            self._slots[slot] = gen.key
            del self._kv_tokens[slot][reuse:]
            self.reused_prompt_tokens += reuse
            self._running[gen.key] = _Running(
                key=gen.key,
                slot=slot,
                prompt=ids,
                max_new_tokens=gen.max_new_tokens,
                sampler=Sampler(gen.sampling),
                prefilled=reuse,
                reused=reuse,
            )
            self._join_order.append(gen.key)

    def _pick_slot(self, ids: list[int]) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with `ids` (the lowest on a
        tie), and how many prompt tokens that prefix saves (never the last one: its logits are needed)."""
        best, best_len = -1, -1
        for slot, key in enumerate(self._slots):
            if key is not None:
                continue
            n = _common_prefix(self._kv_tokens[slot], ids) if self.reuse_prefix else 0
            if n > best_len:
                best, best_len = slot, n
        return best, max(0, min(best_len, len(ids) - 1))

    def _forget_cached_prompts(self) -> None:
        self._kv_tokens = [[] for _ in range(self._n_batch)]

    def cancel(self, key: Hashable) -> None:
        self._release(key)

    def close(self) -> None:
        for key in list(self._running):
            self._release(key)
        self._forget_cached_prompts()
        self._model = None

    def _release(self, key: Hashable) -> None:
        run = self._running.pop(key, None)
        if run is not None:
            self._slots[run.slot] = None
            self._join_order.remove(key)

    # -- the step -------------------------------------------------------------------------------
    def poll(self, timeout: float) -> list[EngineEvent]:
        if not self._running:
            return []
        events: list[EngineEvent] = []
        try:
            self._step(events)
            return events
        except Exception as e:  # a failed step fails the requests in it, not the bridge
            _LOGGER.exception("numpy engine: step failed")
            self._forget_cached_prompts()  # a half-written cache is nobody's prefix
            # `events` keeps what the step produced before it failed: a request that finished
            # (and left its slot) in it still gets its FinishEvent
            for key in list(self._running):
                events.append(ErrorEvent(key, ErrorCode.ENGINE_ERROR, f"numpy engine step failed: {e}"))
                self._release(key)
            return events

    def _plan(self) -> tuple[list[int], StepPlan, list[_Running]]:
        decoding = sorted((r for r in self._running.values() if not r.prefilling), key=lambda r: r.slot)
        tokens = [r.pending for r in decoding]
        owners: list[_Running] = list(decoding)
        logit_rows = list(range(len(decoding)))
        # A decoder at its first token (it came with the joiners, or one step before them) waits one
        # full pass for its second; one that has decoded is kept to the small chunk's stall.
        settled = any(len(r.generated) > 1 for r in decoding)
        budget = self.prefill_chunk if settled else self.idle_prefill_chunk
        segments: list[Segment] = []
        row = len(decoding)
        for key in self._join_order:
            run = self._running[key]
            if not run.prefilling or budget <= 0:
                continue
            take = min(budget, len(run.prompt) - run.prefilled)
            segments.append(Segment(run.slot, run.prefilled, take))
            tokens.extend(run.prompt[run.prefilled : run.prefilled + take])
            budget -= take
            row += take
            if run.prefilled + take == len(run.prompt):
                logit_rows.append(row - 1)
                owners.append(run)
        plan = StepPlan(
            decode_slots=[r.slot for r in decoding],
            decode_positions=[len(r.prompt) + len(r.generated) - 1 for r in decoding],
            segments=segments,
            logit_rows=logit_rows,
        )
        return tokens, plan, owners

    def _step(self, events: list[EngineEvent]) -> None:
        tokens, plan, owners = self._plan()
        logits = self.transformer.step(np.asarray(tokens, dtype=np.int64), plan)
        self.steps += 1
        for slot, token in zip(plan.decode_slots, tokens, strict=False):
            self._kv_tokens[slot].append(token)
        for seg in plan.segments:
            run = self._running[self._slots[seg.slot]]
            self._kv_tokens[seg.slot].extend(run.prompt[seg.start : seg.start + seg.length])
            run.prefilled += seg.length
        now = time.perf_counter()
        for i, run in enumerate(owners):
            history = (run.prompt[-REPEAT_WINDOW:] + run.generated[-REPEAT_WINDOW:])[-REPEAT_WINDOW:]
            token = run.sampler.sample(logits[i], history)
            if not run.generated:
                run.t_first = now
            events.extend(self._accept(run, token, now))

    def _accept(self, run: _Running, token: int, now: float) -> list[EngineEvent]:
        tok = self.tokenizer
        events: list[EngineEvent] = []
        if token in tok.stop_ids:
            return self._finish(run, "stop", now)
        run.generated.append(token)
        run.held += 1
        text = run.decoder.decode(tok.token_bytes(token))
        if text:
            events.append(TokenEvent(run.key, text, run.held))
            run.held = 0
        if len(run.generated) >= run.max_new_tokens or len(run.prompt) + len(run.generated) >= self._max_context:
            events.extend(self._finish(run, "length", now))
        else:
            run.pending = token
        return events

    def _finish(self, run: _Running, reason: str, now: float) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        tail = run.decoder.decode(b"", final=True)
        if tail:
            events.append(TokenEvent(run.key, tail, run.held))
        n = len(run.generated)
        decode_s = max(now - run.t_first, 1e-9)
        perf = {
            "prefill_ms": round((run.t_first - run.t_start) * 1000.0, 2),
            "decode_ms": round(decode_s * 1000.0, 2),
            "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 else 0.0,
            "reused_prompt_tokens": run.reused,
        }
        events.append(
            FinishEvent(
                key=run.key,
                reason="stop" if reason == "stop" else "length",
                prompt_tokens=len(run.prompt),
                completion_tokens=n,
                slot=run.slot,
                perf=perf,
            )
        )
        self._release(run.key)
        return events


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _blas_description() -> str:
    """What does numpy's linear algebra, and with how many threads: "openblas 0.3.31 (1 thread)"."""
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not libs:
        return "unknown"
    return ", ".join(
        f"{i.get('internal_api', '?')} {i.get('version') or ''} ({i.get('num_threads')} thread"
        f"{'' if i.get('num_threads') == 1 else 's'})".replace("  ", " ")
        for i in libs
    )


def _release_freed_memory() -> None:
    """Give the heap pages freed after loading (dequantization temporaries) back to the system,
    so that they do not count in the RSS for the process's whole life (glibc only)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
