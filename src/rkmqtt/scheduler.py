"""The scheduler: the one thread ("rkmqtt-scheduler") that owns the engine.

Other threads talk to it only through `submit`, `cancel` and `shutdown`, which put commands on
its inbox and return at once. Its loop, each turn:

1. applies the inbox (new jobs: de-duplication, queue limit, too_long; cancels),
2. answers waiting jobs whose expiry has passed with `expired`,
3. admits waiting jobs into engine slots — fairly across clients (`FairQueue`): continuous
   engines whenever a slot is free, static engines when idle, with up to `n_batch` jobs that
   share a batch key, after a short collection window,
4. polls the engine and turns its events into stream chunks and final replies.

Every reply goes to the `Outbox` (it never waits on the network). Every accepted job ends with
exactly one final reply, whatever happens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rkmqtt.engines.base import Engine, EngineEvent, ErrorEvent, FinishEvent, TokenEvent
from rkmqtt.errors import RequestRejected
from rkmqtt.fairqueue import FairQueue
from rkmqtt.outbox import Outbox, Outgoing
from rkmqtt.protocol import (
    BatchInfo,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    FinalReply,
    OkReply,
    Stats,
    StreamChunk,
    Timing,
    Usage,
)
from rkmqtt.request import Job, RequestState

_LOGGER = logging.getLogger(__name__)

_STATIC_POLL_S = 0.05  # how long a static engine's poll may wait before the inbox is looked at again
_IDLE_WAIT_S = 0.5


@dataclass(frozen=True)
class SchedulerConfig:
    n_batch: int
    max_queue: int
    batch_window_s: float
    dedup_window_s: float
    stats_interval_s: float
    stats_topic: str | None
    model_name: str
    last_reply_client: str | None = None  # whose replies `stats.last_reply` shows (Home Assistant's)


@dataclass(frozen=True)
class _Submit:
    job: Job


@dataclass(frozen=True)
class _Cancel:
    client: str
    id: str


@dataclass(frozen=True)
class _Shutdown:
    grace_s: float


class ReplyLog:
    """Recently finished replies by (client, id), so that a retried id (or a QoS 1 duplicate) is
    answered again with the same final reply instead of running twice."""

    def __init__(self, window_s: float, max_entries: int = 10_000) -> None:
        self._window = window_s
        self._max = max_entries
        self._items: OrderedDict[tuple[str, str], tuple[float, FinalReply]] = OrderedDict()

    def add(self, client: str, request_id: str, reply: FinalReply, now: float) -> None:
        if self._window <= 0:
            return
        self._items[(client, request_id)] = (now, reply)
        self._items.move_to_end((client, request_id))
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def get(self, client: str, request_id: str, now: float) -> FinalReply | None:
        while self._items:
            first_key, (t, _) = next(iter(self._items.items()))
            if now - t <= self._window:
                break
            del self._items[first_key]
        item = self._items.get((client, request_id))
        return item[1] if item else None


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        config: SchedulerConfig,
        outbox: Outbox,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config
        self.outbox = outbox
        self.clock = clock
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | _Shutdown] = queue.SimpleQueue()
        self._waiting = FairQueue()
        self._running: dict[str, Job] = {}  # key -> job holding an engine slot
        self._live: dict[tuple[str, str], Job] = {}  # (client, id) -> waiting or running job
        self._replies = ReplyLog(config.dedup_window_s)
        self._continuous = engine.capabilities.continuous
        self._thread = threading.Thread(target=self._run, name="rkmqtt-scheduler", daemon=True)
        self._stopped = threading.Event()
        self._crashed = False
        self._shutdown_deadline: float | None = None
        self._started_at = clock()
        # Figures other threads read (single writer: this thread; reads of ints are atomic).
        self.heartbeat = time.time()
        self.last_event = clock()
        self.queue_depth = 0
        self.active = 0
        self.counters: Counter[str] = Counter()
        self._tokens_since_stats = 0
        self._last_stats = clock()
        self._last_reply: str | None = None
        self.rejections: Counter[str] = Counter()  # written by the paho thread via note_rejection
        self._rejections_lock = threading.Lock()

    # -- thread-safe entry points ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(_Submit(job))

    def cancel(self, client: str, request_id: str) -> None:
        self._inbox.put(_Cancel(client, request_id))

    def shutdown(self, grace_s: float) -> None:
        """Answer waiting jobs `shutting_down`, give running ones `grace_s` to finish."""
        self._inbox.put(_Shutdown(grace_s))

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:  # never started (start-up failed before it)
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def crashed(self) -> bool:
        """True when the loop died of an unexpected error (the service should exit non-zero)."""
        return self._crashed

    def note_rejection(self, code: ErrorCode) -> None:
        """Count a request that the bridge refused before it reached the scheduler."""
        with self._rejections_lock:
            self.rejections[code.value] += 1

    def engine_stalled_s(self) -> float:
        """Seconds the engine has held requests without producing an event (0 when idle)."""
        return self.clock() - self.last_event if self.active else 0.0

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        code, message = ErrorCode.SHUTTING_DOWN, "the bridge is shutting down; try again later"
        try:
            while not self._stopped.is_set():
                self._turn()
        except Exception:
            _LOGGER.exception("scheduler failed; answering every request engine_error")
            self._crashed = True
            code, message = ErrorCode.ENGINE_ERROR, "the bridge's scheduler failed; see its log"
            self._fail_all(code, message)
        finally:
            self._stopped.set()
            self._answer_late_submits(code, message)

    def _answer_late_submits(self, code: ErrorCode, message: str) -> None:
        """Requests that reached the inbox after the loop ended still get their one final reply."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Submit):
                try:
                    self._reject(cmd.job, code, message)
                except Exception:
                    _LOGGER.exception("request %s/%s: could not be answered", cmd.job.client, cmd.job.id)

    def _turn(self) -> None:
        now = self.clock()
        self.heartbeat = time.time()
        self._drain_inbox(self._inbox_timeout(now))
        now = self.clock()
        self._expire(now)
        self._admit(now)
        if self._running:
            try:
                events = self.engine.poll(0.0 if self._continuous else _STATIC_POLL_S)
            except Exception as e:
                _LOGGER.exception("engine poll failed")
                for job in list(self._running.values()):
                    self._finish_error(job, ErrorCode.ENGINE_ERROR, f"engine failed: {e}")
                events = []
            if events:
                self.last_event = self.clock()
            for ev in events:
                self._on_event(ev)
        self.queue_depth = len(self._waiting)
        self.active = len(self._running)
        self._maybe_stats()
        self._maybe_finish_shutdown()

    def _inbox_timeout(self, now: float) -> float:
        if self._running:
            return 0.0
        if len(self._waiting):
            if self.engine.free_slots() == 0:
                return 0.005  # a static engine still winding down its batch: don't spin
            oldest = self._waiting.oldest_arrival() or now
            return max(0.0, min(_IDLE_WAIT_S, oldest + self.config.batch_window_s - now))
        return min(_IDLE_WAIT_S, max(0.01, self._last_stats + self.config.stats_interval_s - now))

    def _drain_inbox(self, timeout: float) -> None:
        try:
            cmd = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(cmd, _Submit):
                self._on_submit(cmd.job)
            elif isinstance(cmd, _Cancel):
                self._on_cancel(cmd.client, cmd.id)
            else:
                self._on_shutdown(cmd.grace_s)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    # -- commands -----------------------------------------------------------------------
    def _on_submit(self, job: Job) -> None:
        now = self.clock()
        ident = (job.client, job.id)
        if ident in self._live:
            _LOGGER.info("request %s/%s: retried while in flight; not run again", job.client, job.id)
            return
        done = self._replies.get(job.client, job.id, now)
        if done is not None:
            _LOGGER.info("request %s/%s: retried after it finished; final reply sent again", job.client, job.id)
            self.outbox.put(Outgoing(job.reply_topic, done.model_dump_json().encode(), 1, False, job.correlation))
            return
        if self._shutdown_deadline is not None:
            self._reject(job, ErrorCode.SHUTTING_DOWN, "the bridge is shutting down")
            return
        if len(self._waiting) >= self.config.max_queue:
            # Full: the newcomer takes the place of the newest request of the client holding the
            # most places, when that client holds more than the newcomer's would — so one flooding
            # device cannot lock the others out. Otherwise the newcomer is the one turned away.
            bumped = self._waiting.pop_newest_of_largest(more_than=self._waiting.count(job.client) + 1)
            if bumped is None:
                self._reject(
                    job, ErrorCode.BUSY, f"the queue is full ({self.config.max_queue} waiting); try again later"
                )
                return
            self._live.pop((bumped.client, bumped.id), None)
            self._reject(
                bumped,
                ErrorCode.BUSY,
                f"the queue is full ({self.config.max_queue} waiting) and "
                f"{bumped.client!r} holds the most places; try again later",
            )
        try:
            job.prompt_tokens = self.engine.prepare(job.gen)
        except RequestRejected as e:
            self._reject(job, e.code, e.message)
            return
        except Exception as e:  # an engine bug must not lose the request
            _LOGGER.exception("request %s/%s: prepare failed", job.client, job.id)
            self._reject(job, ErrorCode.ENGINE_ERROR, f"engine failed to prepare the request: {e}")
            return
        self._live[ident] = job
        self._waiting.push(job)
        self.counters["requests_total"] += 1
        _LOGGER.info("request %s/%s: queued (%d waiting)", job.client, job.id, len(self._waiting))

    def _on_cancel(self, client: str, request_id: str) -> None:
        job = self._live.get((client, request_id))
        if job is None:
            _LOGGER.info("cancel %s/%s: no such request waiting or running", client, request_id)
            return
        if job.state == RequestState.WAITING:
            self._waiting.remove(client, request_id)
            self._finish_error(job, ErrorCode.CANCELLED, "cancelled before it started")
            return
        self._engine_cancel(job)
        self._finish_ok(job, RequestState.FINISHED_CANCELLED)

    def _on_shutdown(self, grace_s: float) -> None:
        now = self.clock()
        self._shutdown_deadline = now + grace_s
        for job in self._waiting.remove_where(lambda j: True):
            self._finish_error(job, ErrorCode.SHUTTING_DOWN, "the bridge is shutting down; try again later")
        _LOGGER.info("shutting down: %d running get up to %.0f s", len(self._running), grace_s)

    # -- admission ----------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        for job in self._waiting.remove_where(lambda j: j.deadline is not None and j.deadline <= now):
            self._finish_error(job, ErrorCode.EXPIRED, "not started before it expired")

    def _admit(self, now: float) -> None:
        if not len(self._waiting) or self._shutdown_deadline is not None:
            return
        free = self.engine.free_slots()
        if free <= 0:
            return
        if self._continuous:
            jobs = self._waiting.take(free)
        else:
            oldest = self._waiting.oldest_arrival()
            if len(self._waiting) < free and oldest is not None and now - oldest < self.config.batch_window_s:
                return  # collection window: let batch-mates arrive
            jobs = self._waiting.take(free, key=lambda j: self.engine.batch_key(j.gen))
        if not jobs:
            return
        batch_size = len(jobs) + (len(self._running) if self._continuous else 0)
        for job in jobs:
            job.state = RequestState.RUNNING
            job.started = now
            job.batch_size = batch_size
            self._running[job.key] = job
        try:
            self.engine.submit([j.gen for j in jobs])
        except Exception as e:
            _LOGGER.exception("engine submit failed")
            for job in jobs:
                self._finish_error(job, ErrorCode.ENGINE_ERROR, f"engine failed to start the request: {e}")
            return
        self.last_event = self.clock()
        for job in jobs:
            _LOGGER.info(
                "request %s/%s: started (batch of %d, waited %.0f ms)",
                job.client,
                job.id,
                batch_size,
                (now - job.arrival) * 1000,
            )

    # -- engine events ---------------------------------------------------------------------
    def _on_event(self, ev: EngineEvent) -> None:
        job = self._running.get(ev.key)
        if job is None:
            return  # cancelled or already answered: its late tokens are dropped
        if isinstance(ev, TokenEvent):
            now = self.clock()
            if job.first_token is None:
                job.first_token = now
            job.last_token = now
            job.completion_tokens += ev.tokens
            self._tokens_since_stats += ev.tokens
            if not ev.text:
                return
            job.parts.append(ev.text)
            if job.stream:
                chunk = StreamChunk(id=job.id, seq=job.seq, text=ev.text)
                job.seq += 1
                self.outbox.put(
                    Outgoing(
                        job.stream_topic, chunk.model_dump_json().encode(), 0, False, job.correlation, droppable=True
                    )
                )
        elif isinstance(ev, FinishEvent):
            if ev.prompt_tokens is not None:
                job.prompt_tokens = ev.prompt_tokens
            job.completion_tokens = max(job.completion_tokens, ev.completion_tokens)
            job.slot = ev.slot
            state = RequestState.FINISHED_STOPPED if ev.reason == "stop" else RequestState.FINISHED_LENGTH
            self._finish_ok(job, state, list(ev.warnings))
        elif isinstance(ev, ErrorEvent):
            self._finish_error(job, ev.code, ev.message)

    # -- final replies -----------------------------------------------------------------------
    def _timing(self, job: Job, now: float) -> Timing:
        started = job.started if job.started is not None else now
        # Tokens per second from the first token to the last (prefill excluded); with one token
        # there is no interval, so the time since the batch started stands in.
        if job.first_token is not None and job.last_token is not None and job.completion_tokens > 1:
            gen_s = (job.last_token - job.first_token) * job.completion_tokens / (job.completion_tokens - 1)
        else:
            gen_s = now - started
        return Timing(
            queued_ms=round((started - job.arrival) * 1000, 2),
            ttft_ms=None if job.first_token is None else round((job.first_token - job.arrival) * 1000, 2),
            total_ms=round((now - job.arrival) * 1000, 2),
            tokens_per_s=round(job.completion_tokens / gen_s, 2) if gen_s > 0 else 0.0,
        )

    def _finish_ok(self, job: Job, state: RequestState, warnings: list[str] | None = None) -> None:
        now = self.clock()
        job.state = state
        reason = state.finish_reason
        assert reason is not None
        reply = OkReply(
            id=job.id,
            text=job.text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens),
            timing=self._timing(job, now),
            batch=BatchInfo(size=job.batch_size, slot=job.slot),
            model=self.config.model_name,
            warnings=warnings or [],
        )
        self._forget(job)
        self.outbox.put(Outgoing(job.reply_topic, reply.model_dump_json().encode(), 1, False, job.correlation))
        self._replies.add(job.client, job.id, reply, now)
        self.counters["completed"] += 1
        if job.client == self.config.last_reply_client:
            self._last_reply = job.text
        _LOGGER.info(
            "request %s/%s: done (%s, %d tokens, %.0f ms)",
            job.client,
            job.id,
            reason,
            job.completion_tokens,
            reply.timing.total_ms,
        )
        _LOGGER.debug("request %s/%s: text %r", job.client, job.id, job.text)

    def _finish_error(self, job: Job, code: ErrorCode, message: str) -> None:
        self._engine_cancel(job)
        job.state = RequestState.FINISHED_ERROR
        job.error = (code, message)
        self._forget(job)
        reply = self._send_error(job, code, message)
        self._replies.add(job.client, job.id, reply, self.clock())

    def _engine_cancel(self, job: Job) -> None:
        """Tell the engine to drop a job (engines ignore keys they do not hold, e.g. prepared-only)."""
        try:
            self.engine.cancel(job.key)
        except Exception:
            _LOGGER.exception("request %s/%s: engine cancel failed", job.client, job.id)

    def _reject(self, job: Job, code: ErrorCode, message: str) -> None:
        job.state = RequestState.FINISHED_ERROR
        self._send_error(job, code, message)

    def _send_error(self, job: Job, code: ErrorCode, message: str) -> ErrorReply:
        reply = ErrorReply(id=job.id, error=ErrorBody(code=code, message=message))
        self.outbox.put(Outgoing(job.reply_topic, reply.model_dump_json().encode(), 1, False, job.correlation))
        self.counters["errors"] += 1
        self.counters[f"error:{code.value}"] += 1
        _LOGGER.warning("request %s/%s: %s: %s", job.client, job.id, code.value, message)
        return reply

    def _forget(self, job: Job) -> None:
        self._running.pop(job.key, None)
        self._live.pop((job.client, job.id), None)

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        for job in [*self._waiting.remove_where(lambda j: True), *self._running.values()]:
            try:
                self._finish_error(job, code, message)
            except Exception:
                _LOGGER.exception("request %s/%s: could not be answered", job.client, job.id)

    # -- stats and shutdown -------------------------------------------------------------------
    def stats(self, now: float | None = None) -> Stats:
        now = self.clock() if now is None else now
        interval = max(1e-6, now - self._last_stats)
        with self._rejections_lock:
            rejected = Counter(self.rejections)
        by_code = Counter({k.removeprefix("error:"): v for k, v in self.counters.items() if k.startswith("error:")})
        by_code.update(rejected)
        return Stats(
            uptime_s=round(now - self._started_at, 1),
            queue_depth=len(self._waiting),
            active=len(self._running),
            n_batch=self.config.n_batch,
            tokens_per_s=round(self._tokens_since_stats / interval, 2),
            requests_total=self.counters["requests_total"] + sum(rejected.values()),
            completed=self.counters["completed"],
            errors=self.counters["errors"] + sum(rejected.values()),
            errors_by_code=dict(by_code),
            last_reply=self._last_reply,
        )

    def _maybe_stats(self) -> None:
        now = self.clock()
        if now - self._last_stats < self.config.stats_interval_s:
            return
        if self.config.stats_topic:
            self.outbox.put(
                Outgoing(self.config.stats_topic, self.stats(now).model_dump_json().encode(), 0, droppable=True)
            )
        self._tokens_since_stats = 0
        self._last_stats = now

    def _maybe_finish_shutdown(self) -> None:
        if self._shutdown_deadline is None:
            return
        if self._running and self.clock() < self._shutdown_deadline:
            return
        for job in list(self._running.values()):
            self._finish_error(job, ErrorCode.SHUTTING_DOWN, "the bridge stopped before it finished")
        self._stopped.set()
