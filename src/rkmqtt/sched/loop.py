"""The scheduler loop: the one thread ("rkmqtt-scheduler") that owns the engine and carries out the
policy's `Step`s: engine calls here, replies to each request's route's sink (never waiting).

Other threads only put commands on its inbox (`submit`, `cancel`, `refused`, `repeated`,
`shutdown`), which return at once. It knows no transport: the stats go to `on_stats`. An
engine that takes `Engine.set_wake` wakes it through the inbox instead of being polled.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rkmqtt.engines.base import Engine
from rkmqtt.errors import RequestRejected
from rkmqtt.logbudget import limited
from rkmqtt.protocol import ErrorCode, Stats
from rkmqtt.sched.policy import CoreConfig, SchedulingCore, Step
from rkmqtt.sched.request import Outcome, Request, RequestKey

_LOGGER = logging.getLogger(__name__)

_STATIC_POLL_S = 0.05  # how long a static engine's poll may wait before the inbox is looked at again
_IDLE_WAIT_S = 0.5
# An engine that wakes the loop, full or unavailable, with requests waiting: it wakes the loop when a
# slot frees; this bounds how late an expiry among the waiting ones is answered.
_FULL_WAIT_S = 0.05


@dataclass(frozen=True)
class SchedulerConfig:
    core: CoreConfig
    stats_interval_s: float


@dataclass(frozen=True)
class _Submit:
    req: Request


@dataclass(frozen=True)
class _Cancel:
    key: RequestKey


@dataclass(frozen=True)
class _Refused:
    code: ErrorCode


@dataclass(frozen=True)
class _Repeated:
    pass


@dataclass(frozen=True)
class _Shutdown:
    grace_s: float
    keep: Callable[[Request], bool] | None


@dataclass(frozen=True)
class _Wake:
    """The engine has events (or free slots): the turn that takes this off the inbox polls it."""


_WAKE = _Wake()

_Command = _Submit | _Cancel | _Refused | _Repeated | _Shutdown | _Wake


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        config: SchedulerConfig,
        on_stats: Callable[[Stats], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config
        self.on_stats = on_stats  # who publishes the stats every `stats_interval_s` (MQTT's sink)
        self.clock = clock
        self.core = SchedulingCore(config.core)
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rkmqtt-scheduler", daemon=True)
        self._stopped = threading.Event()
        self._started_at = clock()
        # Figures other threads read (single writer: this thread; reads of ints are atomic).
        self.heartbeat = time.time()
        self.last_event = clock()
        self.queue_depth = 0
        self.active = 0
        self._last_stats = clock()
        self._tokens_at_stats = 0
        self._engine_problem: str | None = None  # as the last stats said
        self._woken = engine.set_wake(self._wake)  # the engine wakes this loop: no polling in a loop

    # -- thread-safe entry points ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        self._inbox.put(_Submit(req))

    def cancel(self, key: RequestKey) -> None:
        self._inbox.put(_Cancel(key))

    def refused(self, code: ErrorCode) -> None:
        """Count a request another thread refused and answered itself."""
        self._inbox.put(_Refused(code))

    def repeated(self) -> None:
        """Count a retried id that a door answered from its own record of the final reply."""
        self._inbox.put(_Repeated())

    def _wake(self) -> None:
        """The engine's `wake` (any thread): never blocks."""
        self._inbox.put(_WAKE)

    def shutdown(self, grace_s: float, keep: Callable[[Request], bool] | None = None) -> None:
        """Answer waiting requests `shutting_down` (but those `keep` says their door keeps for the
        next start), give running ones `grace_s` to finish."""
        self._inbox.put(_Shutdown(grace_s, keep))

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:  # never started (start-up failed before it)
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def engine_problem(self) -> str | None:
        """Why the engine cannot take requests, as the loop last saw it (None: it can)."""
        return self._engine_problem

    def engine_stalled_s(self) -> float:
        """Seconds the engine has held requests without producing an event (0 when idle)."""
        return self.clock() - self.last_event if self.active else 0.0

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self.core.stopped:
                self._turn()
        except Exception:
            _LOGGER.exception("scheduler failed; answering every request engine_error")
            self._carry_out(self.core.fail_all(ErrorCode.ENGINE_ERROR, "the bridge's scheduler failed", self.clock()))
            self.core.shutdown(0.0, self.clock())
        finally:
            self._stopped.set()
            self._drain_inbox(0.0)  # late arrivals: the core answers them shutting_down

    def _turn(self) -> None:
        self.heartbeat = time.time()
        self._drain_inbox(self._inbox_timeout(self.clock()))
        core = self.core
        self._carry_out(core.plan(self.engine.free_slots(), self.clock()))
        if core.running:
            try:
                events = self.engine.poll(0.0 if core.config.continuous else _STATIC_POLL_S)
            except Exception as e:
                _LOGGER.exception("engine poll failed")
                self._carry_out(core.fail_running(ErrorCode.ENGINE_ERROR, f"engine failed: {e}", self.clock()))
                events = []
            if events:
                self.last_event = self.clock()
                self._carry_out(core.apply(events, self.last_event))
        self.queue_depth = core.waiting
        self.active = core.running
        self._maybe_stats()

    def _inbox_timeout(self, now: float) -> float:
        core = self.core
        if core.running and not self._woken:
            return 0.0
        if core.waiting and self.engine.free_slots() == 0:
            # A static engine still winding down its batch: don't spin. One that wakes the loop
            # (full, or its upstream unavailable) does so when a slot frees.
            return _FULL_WAIT_S if self._woken else 0.005
        wait = min(_IDLE_WAIT_S, max(0.01, self._last_stats + self.config.stats_interval_s - now))
        wake = core.wake_at(now)
        return wait if wake is None else max(0.0, min(wait, wake - now))

    def _drain_inbox(self, timeout: float) -> None:
        try:
            cmd = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            now = self.clock()
            if isinstance(cmd, _Submit):
                self._carry_out(self.core.add(cmd.req, now))
            elif isinstance(cmd, _Cancel):
                self._carry_out(self.core.cancel(cmd.key, now))
            elif isinstance(cmd, _Refused):
                self.core.refused_early(cmd.code)
            elif isinstance(cmd, _Repeated):
                self.core.counters.repeated += 1
            elif isinstance(cmd, _Wake):
                pass  # the turn goes on to poll the engine
            else:
                step = self.core.shutdown(cmd.grace_s, now, cmd.keep)
                _LOGGER.info(
                    "shutting down: %d running get up to %.0f s; %d waiting answered, %d kept for the next start",
                    self.core.running,
                    cmd.grace_s,
                    len(step.outcomes),
                    len(step.kept),
                )
                self._carry_out(step)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    # -- carrying out what the core decided -------------------------------------------------
    def _carry_out(self, step: Step) -> None:
        for req in step.prepare:
            self._prepare(req)
        if step.start:
            self._start(step.start)
        for req in step.cancel:
            try:
                self.engine.cancel(req.key)
            except Exception:
                _LOGGER.exception("request %s: engine cancel failed", req.key)
        # Replies go to the sink of the route concerned, whichever transport it is.
        for chunk in step.chunks:
            chunk.request.route.sink.chunk(chunk)
        for outcome in step.outcomes:
            self._answer(outcome)
        for outcome, retry in step.repeats:
            retry.route.sink.repeat(outcome, retry)
        for retry in step.ignored:
            retry.route.sink.ignored(retry)

    def _prepare(self, req: Request) -> None:
        now = self.clock()
        try:
            handle = self.engine.prepare(req.gen)
        except RequestRejected as e:
            self._carry_out(self.core.refuse(req, e.code, e.message, now))
            return
        except Exception as e:  # an engine bug must not lose the request
            _LOGGER.exception("request %s: prepare failed", req.key)
            self._carry_out(self.core.refuse(req, ErrorCode.ENGINE_ERROR, f"engine failed to prepare it: {e}", now))
            return
        self.core.prepared(req, handle)
        _LOGGER.debug("request %s: queued (%d waiting)", req.key, self.core.waiting)

    def _start(self, reqs: list[Request]) -> None:
        handles = [r.prepared for r in reqs if r.prepared is not None]
        try:
            self.engine.submit(handles)
        except Exception as e:
            _LOGGER.exception("engine submit failed")
            self._carry_out(
                self.core.fail(reqs, ErrorCode.ENGINE_ERROR, f"engine failed to start it: {e}", self.clock())
            )
            return
        self.last_event = self.clock()
        for req in reqs:
            waited = ((req.started or req.arrival) - req.arrival) * 1000
            _LOGGER.debug("request %s: started (batch of %d, waited %.0f ms)", req.key, req.batch_size, waited)

    def _answer(self, outcome: Outcome) -> None:
        req = outcome.request
        req.route.sink.final(outcome)
        if outcome.error is not None:
            code, message = outcome.error
            if limited(_LOGGER, logging.WARNING, f"{code.value} replies", req.client):
                _LOGGER.warning("request %s: %s: %s", req.key, code.value, message)
            return
        # The one INFO line of a request (queued/started are DEBUG): nothing per chunk.
        _LOGGER.info(
            "request %s: done (%s, %d tokens, batch of %d, waited %.0f ms, %.0f ms)",
            req.key,
            outcome.state.finish_reason,
            req.completion_tokens,
            req.batch_size,
            ((req.started or req.arrival) - req.arrival) * 1000,
            (outcome.finished - req.arrival) * 1000,
        )
        _LOGGER.debug("request %s: text %r", req.key, req.text)

    # -- stats ------------------------------------------------------------------------------
    def stats(self, now: float | None = None) -> Stats:
        now = self.clock() if now is None else now
        c = self.core.counters
        interval = max(1e-6, now - self._last_stats)
        return Stats(
            uptime_s=round(now - self._started_at, 1),
            queue_depth=self.core.waiting,
            active=self.core.running,
            n_batch=self.core.config.n_batch,
            tokens_per_s=round((c.tokens - self._tokens_at_stats) / interval, 2),
            requests_total=c.received,
            completed=c.completed,
            errors=c.errors,
            errors_by_code=dict(c.by_code),
            repeated=c.repeated,
            engine_ready=self._engine_problem is None,
            engine_problem=self._engine_problem,
        )

    def _maybe_stats(self) -> None:
        now = self.clock()
        problem = self.engine.problem()
        if now - self._last_stats < self.config.stats_interval_s and problem == self._engine_problem:
            return
        # A change of the engine's readiness goes out at once (Home Assistant's engine connectivity).
        self._engine_problem = problem
        if self.on_stats is not None:
            self.on_stats(self.stats(now))
        self._tokens_at_stats = self.core.counters.tokens
        self._last_stats = now
