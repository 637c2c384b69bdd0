"""The same workload against an engine called directly, without a transport (the caller's thread
owns the engine, as the scheduler thread does in the bridge): a tight loop runs the bridge's own
scheduling core and is its requests' sink. Its tokens/s against the bridge's is the bridge's cost."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rkmqtt.bench.metrics import RequestRecord
from rkmqtt.bench.workload import Workload
from rkmqtt.engines.base import ChatMessage, Engine, Generation, SamplingParams
from rkmqtt.errors import RequestRejected
from rkmqtt.sched.policy import CoreConfig, SchedulingCore, Step
from rkmqtt.sched.request import Chunk, Outcome, ReplySink, Request, RequestKey

_STATIC_POLL_S = 0.05


@dataclass(frozen=True, eq=False)
class _Route:
    """A request's route here: the driver is its sink (each request a reply target of its own)."""

    sink: ReplySink
    stream: bool = True


class DirectDriver:
    def __init__(
        self,
        engine: Engine,
        workload: Workload,
        sampling: SamplingParams,
        batch_window_s: float,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.workload = workload
        self.sampling = sampling
        self.progress = progress
        caps = engine.capabilities
        self.core = SchedulingCore(
            CoreConfig(
                n_batch=caps.max_batch,
                continuous=caps.continuous,
                max_queue=10**9,  # the devices' own pace bounds the queue, as the bench sizes the bridge's
                batch_window_s=batch_window_s,
                dedup_window_s=0.0,
            )
        )
        self._records: dict[RequestKey, RequestRecord] = {}
        self._measured: list[RequestRecord] = []
        self._seqs = [0] * workload.devices
        self._issued = 0
        self._finished = 0
        self._n = 0

    def _new(self, device: int, measured: bool) -> None:
        w = self.workload
        seq = self._seqs[device]
        self._seqs[device] += 1
        self._n += 1
        rid = f"direct-{self._n}"
        key = RequestKey(f"device-{device}", rid)
        pidx = w.prompt_index(device, seq) if measured else w.warmup_prompt_index(device, seq)
        rec = RequestRecord(device=device, seq=seq, id=rid if measured else rid + ".w", prompt_index=pidx, sent=0.0)
        gen = Generation(
            key=key,
            messages=(ChatMessage("user", w.prompts[pidx]),),
            max_new_tokens=w.max_new_tokens,
            sampling=self.sampling,
        )
        if measured:
            self._measured.append(rec)
        self._records[key] = rec
        rec.sent = time.monotonic()
        self._carry_out(self.core.add(Request(key, _Route(self), gen, arrival=rec.sent), rec.sent))

    def _carry_out(self, step: Step) -> None:
        for req in step.prepare:
            try:
                self.core.prepared(req, self.engine.prepare(req.gen))
            except RequestRejected as e:
                self._carry_out(self.core.refuse(req, e.code, e.message, time.monotonic()))
        if step.start:
            self.engine.submit([r.prepared for r in step.start if r.prepared is not None])
        for req in step.cancel:
            self.engine.cancel(req.key)
        for chunk in step.chunks:
            chunk.request.route.sink.chunk(chunk)
        for outcome in step.outcomes:
            outcome.request.route.sink.final(outcome)

    # -- the requests' sink (dedup_window_s is 0 and ids are unique: no repeats, nothing ignored) --
    def chunk(self, chunk: Chunk) -> None:
        rec = self._records[chunk.request.key]
        rec.chunks += 1
        rec.max_seq = chunk.seq

    def final(self, outcome: Outcome) -> None:
        req = outcome.request
        rec = self._records.pop(req.key)
        rec.done = outcome.finished
        rec.first_token = req.first_token
        rec.completion_tokens = req.completion_tokens
        rec.prompt_tokens = req.prompt_tokens
        rec.batch_size = req.batch_size or None
        if req.started is not None:
            rec.queued_ms = (req.started - req.arrival) * 1000.0
        if outcome.error is None:
            rec.status, rec.finish_reason = "ok", outcome.state.finish_reason
        else:
            rec.status, rec.error_code = "error", outcome.error[0].value
        self._record_done(rec)

    def repeat(self, outcome: Outcome, retry: Request) -> None:
        raise AssertionError(f"request {retry.key} repeated: the direct driver's ids are unique")

    def ignored(self, retry: Request) -> None:
        raise AssertionError(f"request {retry.key} ignored: the direct driver's ids are unique")

    def _record_done(self, rec: RequestRecord) -> None:
        if rec.id.endswith(".w"):
            return
        self._finished += 1
        if self.progress is not None:
            self.progress(1)
        if self.workload.shape == "closed" and self._issued < self.workload.total:
            self._issued += 1
            self._new(rec.device, measured=True)

    def _turn(self) -> None:
        """Plan, start, and run one engine step (or wait for a static engine's events)."""
        self._carry_out(self.core.plan(self.engine.free_slots(), time.monotonic()))
        if self.core.running:
            timeout = 0.0 if self.engine.capabilities.continuous else _STATIC_POLL_S
            events = self.engine.poll(timeout)
            if events:
                self._carry_out(self.core.apply(events, time.monotonic()))
        elif self.core.waiting:
            time.sleep(0.001)  # a static engine's collection window

    def _idle(self) -> bool:
        return not self.core.running and not self.core.waiting

    def _drain(self, until: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.workload.timeout_s
        while not until():
            if time.monotonic() > deadline:
                return False
            if self._idle():
                return until()
            self._turn()
        return True

    def _finished_at_least(self, n: int) -> Callable[[], bool]:
        return lambda: self._finished >= n

    def run(self) -> list[RequestRecord]:
        w = self.workload
        for _ in range(w.warmup):  # as through MQTT: every device sends one at once
            for d in range(w.devices):
                self._new(d, measured=False)
            self._drain(self._idle)
        self._seqs = [0] * w.devices
        if w.shape == "closed":
            first = min(w.devices, w.total)
            self._issued = first
            for d in range(first):
                self._new(d, measured=True)
            self._drain(lambda: self._finished >= w.total)
        elif w.shape == "burst":
            for r in range(w.rounds):
                for d in range(w.devices):
                    self._new(d, measured=True)
                if not self._drain(self._finished_at_least((r + 1) * w.devices)):
                    break
        else:
            start = time.monotonic()
            arrivals = deque(w.open_arrivals())
            while arrivals or not self._idle():
                now = time.monotonic()
                while arrivals and start + arrivals[0][0] <= now:
                    self._new(arrivals.popleft()[1], measured=True)
                if not self._idle():
                    self._turn()
                elif arrivals:
                    time.sleep(max(0.0, min(0.05, start + arrivals[0][0] - time.monotonic())))
                if now - start > w.timeout_s + (w.requests / w.rate):
                    break
        # What is still in flight is abandoned: cancel it on the engine; its records read "timeout".
        stop = time.monotonic()
        for req in self.core.shutdown(0.0, stop).merge(self.core.plan(0, stop)).cancel:
            self.engine.cancel(req.key)
        for rec in self._measured:
            if rec.status == "pending":
                rec.status, rec.error_code = "timeout", "timeout"
        return sorted(self._measured, key=lambda r: r.sent)
