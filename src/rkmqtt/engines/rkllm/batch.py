"""One `rkllm_run`: its C inputs, its slots, and the callback side that demultiplexes results.

Threads:
* `Batch(...)` is built on the scheduler thread (RkllmEngine.submit);
* `on_result` runs on the runtime's callback thread while rkllm_run runs. It only copies bytes
  out of the results, updates this batch's slot state and puts events on the engine's
  `queue.Queue` (unbounded: `put` never waits). It never raises, never blocks, never logs and
  never does I/O;
* `run_returned` runs on the batch's worker thread once rkllm_run has returned;
* `cancel` and `live_count` run on the scheduler thread. The only state shared with the
  callback thread is `cancelled` (a set the scheduler adds to) and the slots' `done` flags (the
  callback sets them); both are single reads/writes under the GIL, and every race between them
  is harmless: a cancelled key's events are dropped by `RkllmEngine.poll` anyway, and the
  abort decision is made on both sides.

Every object C can reach — the `RKLLMInput[n_batch]` array, the prompt bytes, the infer and
sampling structs — is referenced from `self.keep` until the worker drops the batch, after
rkllm_run has returned.

How results map to replies (facts: docs/rkllm-runtime.md, "Batched inference"):
* `result[i]` is slot i; a negative `token_id` ends slot i; `text` may be NULL.
* Each slot has its own incremental UTF-8 decoder, so bytes of a character split across tokens
  (a `WAITING` step) are joined with the next piece; `TokenEvent.text` is always whole characters.
* A slot is cut at its own `max_new_tokens` (the run uses the batch's largest) and gets
  `FinishEvent(reason="length")` at once; its later tokens are dropped.
* A slot that ends while batch-mates still run is answered at once (no perf: the runtime fills
  perf only at FINISH). The slot(s) ending last are held for the `FINISH` callback, which comes
  right after, and carry its perf: `prompt_tokens` = that slot's `perf.prefill_tokens` (what the
  runtime reports per slot in a batch is undocumented; the stand-in reports the slot's own).
* When no real slot is left (all ended or cancelled) but the runtime is still generating
  (padding slots, or 1.2.x's init-time `max_new_tokens` above every request's own), the engine is
  asked to `rkllm_abort` (an `AbortWanted` marker on the queue; the callback itself never calls
  into the runtime).
* An `ERROR` state, `rkllm_run` != 0, or an exception in the callback answers every slot still
  running with `engine_error`.
"""

from __future__ import annotations

import codecs
import ctypes
import queue
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from rkmqtt.engines.base import EngineEvent, ErrorEvent, FinishEvent, GenerationRequest, TokenEvent
from rkmqtt.engines.rkllm.abi import Abi, LLMCallState, RKLLMInferMode, RKLLMInputType
from rkmqtt.engines.rkllm.prompt import DUMMY_PROMPT, render_prompt
from rkmqtt.protocol import ErrorCode


@dataclass(frozen=True)
class AbortWanted:
    """Internal marker: every real slot of batch `batch_id` is over; stop the runtime."""

    batch_id: int


@dataclass(frozen=True)
class BatchEnded:
    """Internal marker: batch `batch_id`'s worker is done (the engine is idle again)."""

    batch_id: int
    keys: tuple[Hashable, ...]


QueueItem = EngineEvent | AbortWanted | BatchEnded

_PERF_FIELDS = ("prefill_time_ms", "prefill_tokens", "generate_time_ms", "generate_tokens", "memory_usage_mb")


class _Slot:
    __slots__ = ("decoder", "done", "index", "key", "limit", "reason", "tokens", "unreported", "warnings")

    def __init__(self, index: int, req: GenerationRequest, warnings: tuple[str, ...]) -> None:
        self.index = index
        self.key = req.key
        self.limit = req.max_new_tokens
        self.warnings = warnings
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.tokens = 0
        self.unreported = 0  # tokens counted but not yet carried by a TokenEvent
        self.done = False
        self.reason = "stop"


class Batch:
    """The requests of one rkllm_run and the C objects it reads."""

    def __init__(
        self,
        batch_id: int,
        reqs: Sequence[GenerationRequest],
        *,
        abi: Abi,
        n_batch: int,
        pad: bool,
        runtime_limit: int,
        sampling: tuple[int, float, float, float] | None,
        warnings: dict[Hashable, tuple[str, ...]],
        out: queue.Queue[QueueItem],
    ) -> None:
        if not 1 <= len(reqs) <= n_batch:
            raise ValueError(f"a batch takes 1 to {n_batch} requests, not {len(reqs)}")
        self.id = batch_id
        self.n_batch = n_batch
        self.runtime_limit = runtime_limit
        self._out = out
        self.slots = [_Slot(i, r, warnings.get(r.key, ())) for i, r in enumerate(reqs)]
        self.by_key = {s.key: s for s in self.slots}
        self.cancelled: set[int] = set()
        self.prompts = [render_prompt(r.messages) for r in reqs]
        self.runtime_tokens = [0] * n_batch  # tokens the runtime produced per slot (padding too)
        self.held: list[_Slot] = []
        self.abort_wanted = False
        self.aborted = False
        self.returned = False
        self.got_finish = False
        self.failure: str | None = None
        self.callback_error: str | None = None

        # ---- the C side: everything here stays referenced by self.keep until the batch is dropped
        pad_text = DUMMY_PROMPT if pad else ""
        prompt_bytes = [p.encode("utf-8") for p in self.prompts]
        prompt_bytes += [pad_text.encode()] * (n_batch - len(reqs))
        role = b"user"
        inputs: Any = (abi.Input * n_batch)()
        for i, data in enumerate(prompt_bytes):
            inputs[i].role = role
            inputs[i].enable_thinking = False
            inputs[i].input_type = RKLLMInputType.PROMPT
            inputs[i].prompt_input = data
        infer: Any = abi.InferParam()
        infer.mode = RKLLMInferMode.GENERATE
        infer.keep_history = 0  # requests are independent
        sampling_struct: Any = None
        if abi.SamplingParam is not None:
            infer.max_new_tokens = runtime_limit
            if sampling is not None:
                top_k, top_p, temperature, repeat_penalty = sampling
                sampling_struct = abi.SamplingParam(
                    top_k=top_k,
                    top_p=top_p,
                    temperature=temperature,
                    repeat_penalty=repeat_penalty,
                    frequency_penalty=0.0,
                    presence_penalty=0.0,
                    mirostat=0,
                    mirostat_tau=5.0,
                    mirostat_eta=0.1,
                )
                infer.sampling_params = ctypes.pointer(sampling_struct)
        self.inputs = inputs
        self.infer = infer
        self.keep: tuple[Any, ...] = (inputs, infer, sampling_struct, prompt_bytes, role)

    # ---- scheduler thread ----------------------------------------------------------------------

    def live_count(self) -> int:
        """Real requests still running (not ended, not cancelled)."""
        return sum(1 for s in self.slots if not s.done and s.index not in self.cancelled)

    def cancel(self, key: Hashable) -> bool:
        """Mark `key` cancelled; True when no real slot is left to run and the run is still on."""
        slot = self.by_key.get(key)
        if slot is None:
            return False
        self.cancelled.add(slot.index)
        return self.live_count() == 0 and not self.returned and not self.got_finish

    # ---- callback thread ----------------------------------------------------------------------

    def on_result(self, results: Any, state: int) -> int:
        """The result callback's body for this batch. Always returns 0 (continue)."""
        try:
            self._on_result(results, state)
        except BaseException as e:  # nothing may escape into C; the worker reports it
            self.callback_error = f"{type(e).__name__}: {e}"
        return 0

    def _on_result(self, results: Any, state: int) -> None:
        if self.returned:
            return
        if state == LLMCallState.FINISH:
            self.got_finish = True
            for slot in self.slots:
                if slot.index in self.cancelled or (slot.done and slot not in self.held):
                    continue
                if not slot.done:
                    self._close_slot(slot, "length" if slot.tokens >= slot.limit else "stop")
                self._finish(slot, _perf(results[slot.index].perf))
            self.held.clear()
            return
        if state == LLMCallState.ERROR:
            self._fail("the RKLLM runtime reported an error (RKLLM_RUN_ERROR) during the batch")
            return
        if state not in (LLMCallState.NORMAL, LLMCallState.WAITING):
            return
        runtime_busy = False
        ended: list[_Slot] = []
        for i in range(self.n_batch):
            r = results[i]
            if r.token_id >= 0:
                self.runtime_tokens[i] += 1
                if self.runtime_tokens[i] < self.runtime_limit:
                    runtime_busy = True
            if i >= len(self.slots):
                continue  # padding: its output is discarded
            slot = self.slots[i]
            if slot.done or i in self.cancelled:
                continue
            if r.token_id < 0:
                self._close_slot(slot, "stop")
                ended.append(slot)
                continue
            slot.tokens += 1
            slot.unreported += 1
            text = slot.decoder.decode(ctypes.string_at(r.text)) if r.text else ""
            if slot.tokens >= slot.limit:
                self._emit_text(slot, text)
                self._close_slot(slot, "length")
                ended.append(slot)
            elif text:
                self._emit_text(slot, text)
        if ended:
            if self.live_count() == 0:
                self.held.extend(ended)  # the FINISH callback comes next and brings perf
            else:
                for slot in ended:
                    self._finish(slot, {})
        if self.live_count() == 0 and runtime_busy and not self.abort_wanted:
            self.abort_wanted = True
            self._out.put(AbortWanted(self.id))

    def _emit_text(self, slot: _Slot, text: str) -> None:
        if text:
            self._out.put(TokenEvent(key=slot.key, text=text, tokens=slot.unreported))
            slot.unreported = 0

    def _close_slot(self, slot: _Slot, reason: str) -> None:
        """The slot's generation is over: flush its decoder and mark it done."""
        self._emit_text(slot, slot.decoder.decode(b"", final=True))
        slot.done = True
        slot.reason = reason

    def _finish(self, slot: _Slot, perf: dict[str, float]) -> None:
        if slot.index in self.cancelled:
            return
        prompt_tokens = int(perf["prefill_tokens"]) if perf.get("prefill_tokens", 0) > 0 else None
        self._out.put(
            FinishEvent(
                key=slot.key,
                reason="length" if slot.reason == "length" else "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=slot.tokens,
                slot=slot.index,
                perf=perf,
                warnings=slot.warnings,
            )
        )

    def _fail(self, message: str) -> None:
        """Answer every real slot still running with engine_error; the engine re-initialises."""
        if self.failure is None:
            self.failure = message
        for slot in self.slots:
            if not slot.done and slot.index not in self.cancelled:
                slot.done = True
                self._out.put(
                    ErrorEvent(key=slot.key, code=ErrorCode.ENGINE_ERROR, message=f"{message}; the engine restarts")
                )
        for slot in self.held:  # they had their whole answer before the failure
            self._finish(slot, {})
        self.held.clear()

    # ---- worker thread ------------------------------------------------------------------------

    def run_returned(self, rc: int) -> str | None:
        """rkllm_run has returned `rc`: answer whatever is still open. Returns the failure, if any
        (the engine then destroys and re-initialises the runtime)."""
        if self.callback_error is not None:
            self._fail(f"internal error in the result callback ({self.callback_error})")
        elif rc != 0 and not (self.aborted and self.live_count() == 0):
            self._fail(f"rkllm_run returned {rc}")
        self.returned = True
        for slot in self.slots:
            if not slot.done and slot.index not in self.cancelled:
                # The run ended without a negative token_id or FINISH for this slot.
                self._close_slot(slot, "length" if slot.tokens >= slot.limit else "stop")
                self._finish(slot, {})
        for slot in self.held:
            self._finish(slot, {})
        self.held.clear()
        return self.failure


def _perf(perf: Any) -> dict[str, float]:
    return {name: float(getattr(perf, name)) for name in _PERF_FIELDS}
