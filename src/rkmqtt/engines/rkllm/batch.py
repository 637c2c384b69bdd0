"""One `rkllm_run`: its C inputs, its slots, and the callback that demultiplexes the results.

Built on the scheduler thread; `on_result` runs on the runtime's callback thread (it copies and
enqueues, nothing else), `run_returned` on the batch's worker thread. How results map to replies:
docs/rkllm-runtime.md, "Batched inference" and "Inside rkmqtt's binding"."""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rkmqtt.engines.base import EngineEvent, ErrorEvent, FinishEvent, Generation, TokenEvent
from rkmqtt.engines.rkllm.abi import Abi, LLMCallState, RKLLMInferMode, RKLLMInputType, RKLLMPromptCacheParam
from rkmqtt.engines.rkllm.prompt import DUMMY_PROMPT, render_prompt
from rkmqtt.engines.rkllm.text import SlotText
from rkmqtt.engines.rkllm.trace import RunInput
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
    __slots__ = ("done", "index", "key", "limit", "reason", "reported", "text", "tokens", "unreported", "warnings")

    def __init__(self, index: int, req: Generation, warnings: tuple[str, ...]) -> None:
        self.index = index
        self.key = req.key
        self.limit = req.max_new_tokens
        self.warnings = warnings
        self.text = SlotText()
        self.tokens = 0
        self.unreported = 0  # tokens counted but not yet carried by a TokenEvent
        self.done = False  # its generation is over
        self.reported = False  # its final event (FinishEvent or ErrorEvent) is queued
        self.reason = "stop"


class Batch:
    """The requests of one rkllm_run and the C objects it reads."""

    def __init__(
        self,
        batch_id: int,
        reqs: Sequence[Generation],
        *,
        abi: Abi,
        n_batch: int,
        pad: bool,
        runtime_limit: int,
        sampling: tuple[int, float, float, float] | None,
        warnings: dict[Hashable, tuple[str, ...]],
        out: queue.Queue[QueueItem],
        render: Callable[[Generation], str] = lambda r: render_prompt(r.messages),
        token_inputs: Mapping[Hashable, Sequence[int]] | None = None,
        save_prompt_cache: bytes | None = None,
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
        self.prompts = [render(r) for r in reqs]
        self.runtime_tokens = [0] * n_batch  # tokens the runtime produced per slot (padding too)
        self.abort_wanted = False
        self.aborted = False  # set by the engine when it called rkllm_abort for this batch
        self.returned = False  # set by the engine when rkllm_run has returned
        self.got_finish = False
        self.got_error = False
        self.called_back = threading.Event()  # the runtime has called back: its run is in progress
        self.failure: str | None = None
        self.callback_error: str | None = None

        # ---- the C side: everything here stays referenced by self.keep until the batch is dropped
        pad_text = DUMMY_PROMPT if pad else ""
        prompt_bytes = [p.encode("utf-8") for p in self.prompts]
        prompt_bytes += [pad_text.encode()] * (n_batch - len(reqs))
        tokens = [list(token_inputs[r.key]) if token_inputs and r.key in token_inputs else None for r in reqs]
        tokens += [None] * (n_batch - len(reqs))
        self.inputs_text: tuple[RunInput, ...] = tuple(
            {"tokens": t} if t is not None else p.decode("utf-8", errors="replace")
            for p, t in zip(prompt_bytes, tokens, strict=True)
        )
        role = b"user"
        inputs: Any = (abi.Input * n_batch)()
        token_arrays: list[Any] = []
        for i, (data, ids) in enumerate(zip(prompt_bytes, tokens, strict=True)):
            inputs[i].role = role
            inputs[i].enable_thinking = False
            if ids is None:
                inputs[i].input_type = RKLLMInputType.PROMPT
                inputs[i].prompt_input = data
            else:
                array = (ctypes.c_int32 * len(ids))(*ids)
                token_arrays.append(array)
                inputs[i].input_type = RKLLMInputType.TOKEN
                inputs[i].token_input.input_ids = ctypes.cast(array, ctypes.POINTER(ctypes.c_int32))
                inputs[i].token_input.n_tokens = len(ids)
        infer: Any = abi.InferParam()
        infer.mode = RKLLMInferMode.GENERATE
        infer.keep_history = 0  # requests are independent
        cache_param: Any = None
        if save_prompt_cache is not None:
            cache_param = RKLLMPromptCacheParam(save_prompt_cache=1, prompt_cache_path=save_prompt_cache)
            infer.prompt_cache_params = ctypes.pointer(cache_param)
        self.saves_prompt_cache = save_prompt_cache is not None
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
        self.keep: tuple[Any, ...] = (inputs, infer, sampling_struct, prompt_bytes, role, token_arrays, cache_param)

    # ---- scheduler thread ----------------------------------------------------------------------

    def live_count(self) -> int:
        """Real requests still running (not ended, not cancelled)."""
        return sum(1 for s in self.slots if not s.done and s.index not in self.cancelled)

    def ending(self) -> bool:
        """The runtime has sent FINISH or ERROR: its run is over, bar the return."""
        return self.got_finish or self.got_error

    def cancel(self, key: Hashable) -> bool:
        """Mark `key` cancelled; True when no real slot is left to run and the run is still on."""
        slot = self.by_key.get(key)
        if slot is None:
            return False
        self.cancelled.add(slot.index)
        return self.live_count() == 0 and not self.returned and not self.ending()

    # ---- callback thread ----------------------------------------------------------------------

    def on_result(self, results: Any, state: int) -> int:
        """The result callback's body for this batch. Always returns 0 (continue)."""
        try:
            self.called_back.set()
            if not self.returned:
                self._dispatch(results, state)
        except BaseException as e:  # nothing may escape into C; run_returned answers what is open
            self.callback_error = f"{type(e).__name__}: {e}"
        return 0

    def _dispatch(self, results: Any, state: int) -> None:
        if state == LLMCallState.FINISH:
            self._on_finish(results)
        elif state == LLMCallState.ERROR:
            self._on_error()
        elif state in (LLMCallState.NORMAL, LLMCallState.WAITING) and results:
            self._on_step(results)

    def _on_step(self, results: Any) -> None:
        """One generation step: every slot's token (padding slots only count as runtime work)."""
        runtime_busy = False
        ended: list[_Slot] = []
        for i in range(self.n_batch):
            r = results[i]
            runtime_busy |= self._count_runtime_token(i, r.token_id)
            slot = self._running_slot(i)
            if slot is not None and self._take_token(slot, r.token_id, r.text):
                ended.append(slot)
        if ended and self.live_count() > 0:
            for slot in ended:  # batch-mates run on: answer now (the FINISH perf is far off)
                self._report(slot, {})
        # (when none is left running, the FINISH callback comes next and brings perf)
        if self.live_count() == 0 and runtime_busy and not self.abort_wanted:
            self.abort_wanted = True
            self._out.put(AbortWanted(self.id))

    def _count_runtime_token(self, index: int, token_id: int) -> bool:
        """Count slot `index`'s token; True when the runtime will go on generating for it."""
        if token_id < 0:
            return False
        self.runtime_tokens[index] += 1
        return self.runtime_tokens[index] < self.runtime_limit

    def _running_slot(self, index: int) -> _Slot | None:
        """The real slot at `index` if it is still generating (None for padding, ended, cancelled)."""
        if index >= len(self.slots) or index in self.cancelled:
            return None
        slot = self.slots[index]
        return None if slot.done else slot

    def _take_token(self, slot: _Slot, token_id: int, text_ptr: int | None) -> bool:
        """Slot `slot`'s result of this step; True when its generation has just ended."""
        if token_id < 0:
            self._close_slot(slot, "stop")
            return True
        slot.tokens += 1
        slot.unreported += 1
        self._emit_text(slot, slot.text.take(ctypes.string_at(text_ptr) if text_ptr else b""))
        if slot.tokens >= slot.limit:
            self._close_slot(slot, "length")
            return True
        return False

    def _on_finish(self, results: Any) -> None:
        """FINISH: every slot not yet answered ends now and gets the perf the runtime reports."""
        self.got_finish = True
        perf = _perf(results)
        for slot in self._unreported():
            if not slot.done:
                self._close_slot(slot, "length" if slot.tokens >= slot.limit else "stop")
            self._report(slot, perf)

    def _on_error(self) -> None:
        self.got_error = True
        if self.aborted and self.live_count() == 0:
            return  # how the runtime may end a run we aborted: no request lost anything
        self._fail("the RKLLM runtime reported an error (RKLLM_RUN_ERROR) during the batch")

    def _emit_text(self, slot: _Slot, text: str) -> None:
        if text:
            self._out.put(TokenEvent(key=slot.key, text=text, tokens=slot.unreported))
            slot.unreported = 0

    def _close_slot(self, slot: _Slot, reason: str) -> None:
        """The slot's generation is over: emit what it still holds and mark it done."""
        self._emit_text(slot, slot.text.flush())
        slot.done = True
        slot.reason = reason

    def _unreported(self) -> list[_Slot]:
        """Real slots that are not cancelled and have no final event yet."""
        return [s for s in self.slots if not s.reported and s.index not in self.cancelled]

    def _report(self, slot: _Slot, perf: dict[str, float]) -> None:
        """Queue the slot's FinishEvent (once)."""
        if slot.reported or slot.index in self.cancelled:
            return
        slot.reported = True
        # A batch's perf is one result's: whose prompt it counts is unknown above n_batch 1.
        counted = self.n_batch == 1 and perf.get("prefill_tokens", 0) > 0
        prompt_tokens = int(perf["prefill_tokens"]) if counted else None
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
        """Answer every real slot still running with engine_error; those that ended keep their reply."""
        if self.failure is None:
            self.failure = message
        for slot in self._unreported():
            if slot.done:
                self._report(slot, {})  # it had its whole answer before the failure
                continue
            slot.done = slot.reported = True
            self._out.put(ErrorEvent(key=slot.key, code=ErrorCode.ENGINE_ERROR, message=f"{message}; try again"))

    # ---- worker thread ------------------------------------------------------------------------

    def not_run(self, reason: str | None) -> str | None:
        """The run was skipped: every request was cancelled before it began (`reason` None), or it
        could not start (`reason`). Returns the failure, if any."""
        if reason is not None:
            self._fail(reason)
        return self.failure

    def run_returned(self, rc: int) -> str | None:
        """rkllm_run has returned `rc` (the engine has set `returned`): answer every slot still open.
        Returns the failure, if any."""
        if self.callback_error is not None:
            self._fail(f"internal error in the result callback ({self.callback_error})")
        elif rc != 0 and not (self.aborted and self.live_count() == 0):
            self._fail(f"rkllm_run returned {rc}")
        for slot in self._unreported():
            if not slot.done:  # the run ended without a negative token_id or FINISH for it
                self._close_slot(slot, "length" if slot.tokens >= slot.limit else "stop")
            self._report(slot, {})
        return self.failure


def _perf(results: Any) -> dict[str, float]:
    """The perf of a FINISH callback, from its first result only ({} when the pointer is NULL)."""
    if not results:
        return {}
    perf = results[0].perf
    out = {name: float(getattr(perf, name)) for name in _PERF_FIELDS}
    # The keys every engine reports (they go into the final reply's timing); the runtime's own stay.
    out["prefill_ms"], out["decode_ms"] = out["prefill_time_ms"], out["generate_time_ms"]
    return out
