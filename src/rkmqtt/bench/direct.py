"""The same workload against an engine called directly, without MQTT (caller's thread owns the
engine, as the scheduler thread does in the bridge).

A tight loop plays the scheduler's part and nothing else: it admits waiting requests whenever the
engine has free slots (static engines: when idle, up to `n_batch` sharing a batch key, after the
same collection window as the bridge's `batch_window_ms`), polls the engine, and records what the
devices would have seen. Closed-loop devices issue their next request the moment one finishes,
open-loop requests arrive on the same Poisson schedule, bursts in the same rounds. The ratio of
the bridge's tokens/s to this loop's is the bridge's cost: MQTT, the broker, JSON, the threads.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from rkmqtt.bench.metrics import RequestRecord
from rkmqtt.bench.workload import Workload
from rkmqtt.engines.base import (
    ChatMessage,
    Engine,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from rkmqtt.errors import RequestRejected

_STATIC_POLL_S = 0.05


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
        self.batch_window_s = batch_window_s
        self.progress = progress
        self._waiting: deque[tuple[RequestRecord, GenerationRequest]] = deque()
        self._running: dict[str, RequestRecord] = {}
        self._records: list[RequestRecord] = []
        self._seqs = [0] * workload.devices
        self._issued = 0
        self._finished = 0
        self._n = 0

    def _new(self, device: int, measured: bool) -> None:
        w = self.workload
        seq = self._seqs[device]
        self._seqs[device] += 1
        self._n += 1
        key = f"direct-{self._n}"
        pidx = w.prompt_index(device, seq)
        rec = RequestRecord(device=device, seq=seq, id=key if measured else key + ".w", prompt_index=pidx, sent=0.0)
        req = GenerationRequest(
            key=key,
            messages=(ChatMessage("user", w.prompts[pidx]),),
            max_new_tokens=w.max_new_tokens,
            sampling=self.sampling,
        )
        if measured:
            self._records.append(rec)
        rec.sent = time.monotonic()
        try:
            rec.prompt_tokens = self.engine.prepare(req)
        except RequestRejected as e:
            rec.status, rec.error_code, rec.done = "error", e.code.value, time.monotonic()
            self._record_done(rec)
            return
        self._waiting.append((rec, req))

    def _record_done(self, rec: RequestRecord) -> None:
        if rec.id.endswith(".w"):
            return
        self._finished += 1
        if self.progress is not None:
            self.progress(1)
        if self.workload.shape == "closed" and self._issued < self.workload.total:
            self._issued += 1
            self._new(rec.device, measured=True)

    def _admit(self, now: float) -> None:
        if not self._waiting:
            return
        free = self.engine.free_slots()
        if free <= 0:
            return
        caps = self.engine.capabilities
        take: list[tuple[RequestRecord, GenerationRequest]] = []
        if caps.continuous:
            take = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        else:
            oldest = self._waiting[0][0].sent
            if len(self._waiting) < free and now - oldest < self.batch_window_s:
                return
            key = self.engine.batch_key(self._waiting[0][1])
            keep: deque[tuple[RequestRecord, GenerationRequest]] = deque()
            while self._waiting:
                item = self._waiting.popleft()
                if len(take) < free and self.engine.batch_key(item[1]) == key:
                    take.append(item)
                else:
                    keep.append(item)
            self._waiting = keep
        size = len(take) + (len(self._running) if caps.continuous else 0)
        for rec, req in take:
            rec.queued_ms = (now - rec.sent) * 1000.0
            rec.batch_size = size
            self._running[req.key] = rec
        self.engine.submit([req for _, req in take])

    def _poll(self) -> None:
        timeout = 0.0 if self.engine.capabilities.continuous else _STATIC_POLL_S
        for ev in self.engine.poll(timeout):
            rec = self._running.get(ev.key)
            if rec is None:
                continue
            now = time.monotonic()
            if isinstance(ev, TokenEvent):
                if rec.first_token is None:
                    rec.first_token = now
                rec.completion_tokens += ev.tokens
                if ev.text:
                    rec.chunks += 1
                    rec.max_seq += 1
            elif isinstance(ev, FinishEvent):
                del self._running[ev.key]
                rec.status, rec.done, rec.finish_reason = "ok", now, ev.reason
                rec.completion_tokens = max(rec.completion_tokens, ev.completion_tokens)
                if ev.prompt_tokens is not None:
                    rec.prompt_tokens = ev.prompt_tokens
                self._record_done(rec)
            elif isinstance(ev, ErrorEvent):
                del self._running[ev.key]
                rec.status, rec.done, rec.error_code = "error", now, ev.code.value
                self._record_done(rec)

    def _drain(self, until: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.workload.timeout_s
        while not until():
            now = time.monotonic()
            if now > deadline:
                return False
            self._admit(now)
            if self._running:
                self._poll()
            elif self._waiting:
                time.sleep(0.001)  # a static engine's collection window
            else:
                return until()
        return True

    def _finished_at_least(self, n: int) -> Callable[[], bool]:
        return lambda: self._finished >= n

    def run(self) -> list[RequestRecord]:
        w = self.workload
        for _ in range(w.warmup):  # as through MQTT: every device sends one at once
            for d in range(w.devices):
                self._new(d, measured=False)
            self._drain(lambda: not self._running and not self._waiting)
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
            while arrivals or self._running or self._waiting:
                now = time.monotonic()
                while arrivals and start + arrivals[0][0] <= now:
                    self._new(arrivals.popleft()[1], measured=True)
                self._admit(now)
                if self._running:
                    self._poll()
                elif arrivals:
                    time.sleep(max(0.0, min(0.05, start + arrivals[0][0] - time.monotonic())))
                elif self._waiting:
                    time.sleep(0.001)
                if now - start > w.timeout_s + (w.requests / w.rate):
                    break
        for key in list(self._running):
            self.engine.cancel(key)
        for rec in self._records:
            if rec.status == "pending":
                rec.status, rec.error_code = "timeout", "timeout"
        return sorted(self._records, key=lambda r: r.sent)
