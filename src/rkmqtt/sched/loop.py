"""The scheduler loop: the one thread ("rkmqtt-scheduler") that owns the engines (one per loaded
model, `Lineup`) and carries out the policy's `Step`s and `Residency`'s moves: engine calls here,
replies to each request's route's sink (never waiting). Other threads only put commands on its inbox
(`submit`, `cancel`, `refused`, `repeated`, `shutdown`, a load's end, an engine's wake), which return
at once. It knows no transport: the stats go to `on_stats`, the models' state to `on_models`."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from rkmqtt.engines.base import Engine
from rkmqtt.errors import RequestRejected
from rkmqtt.logbudget import limited
from rkmqtt.protocol import ErrorCode, Stats
from rkmqtt.sched.admission import no_tools_message, warn_tools_left_out
from rkmqtt.sched.lineup import Lineup
from rkmqtt.sched.policy import CoreConfig, SchedulingCore, Step
from rkmqtt.sched.request import Outcome, Request, RequestKey
from rkmqtt.sched.residency import Moves, Phase

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
    # A model found to take no tools once loaded: refuse its requests with tools (else answer them without).
    strict_tools: bool = False


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


@dataclass(frozen=True)
class _Preload:
    name: str


@dataclass(frozen=True)
class _Loaded:
    """A model's load ended: its engine, or why not."""

    name: str
    engine: Engine | None
    problem: str | None


_WAKE = _Wake()

_Command = _Submit | _Cancel | _Refused | _Repeated | _Shutdown | _Wake | _Loaded | _Preload


@dataclass(frozen=True)
class ModelsState:
    """What `on_models` gets when a model is loaded, unloaded or fails: loaded engines by name, and
    the failures."""

    engines: dict[str, Engine]
    failures: dict[str, str]


class Scheduler:
    def __init__(
        self,
        engine: Engine | Lineup,
        config: SchedulerConfig,
        on_stats: Callable[[Stats], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_models: Callable[[ModelsState], None] | None = None,
    ) -> None:
        self.lineup = engine if isinstance(engine, Lineup) else Lineup.single("", engine)
        # One engine that never changes: it runs every request, whatever model it names.
        self._one = None if self.lineup.can_load() or len(self.lineup.engines) != 1 else self.lineup.engines
        self.on_models = on_models
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
        # Engines that wake this loop (no polling in a loop for them).
        self._wakers = {name for name, e in self.lineup.engines.items() if e.set_wake(self._wake)}
        self._loaded_names = tuple(self.lineup.engines)  # for other threads (replaced, never changed)
        self._warned_tools: set[str] = set()  # models whose requests' tools were left out (said once)

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

    def preload(self, name: str) -> None:
        """Load model `name` now, before any request asks for it (thread-safe)."""
        self._inbox.put(_Preload(name))

    def _loaded(self, name: str, engine: Engine | None, problem: str | None) -> None:
        """A load's end (its thread): never blocks."""
        self._inbox.put(_Loaded(name, engine, problem))

    def close_engines(self) -> None:
        """Release every engine (main thread, after `join`)."""
        self.lineup.close()

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
        if self.lineup.can_load() and not core.shutting_down:
            self._move(self.clock())
        ready = self._ready()
        for name in ready:
            self._carry_out(core.plan(self.lineup.engines[name].free_slots(), self.clock(), self._plan_model(name)))
        if not ready:
            self._carry_out(core.plan(0, self.clock()))  # expiries and the end of a shutdown
        busy = self._busy()
        for name in busy:
            engine = self.lineup.engines[name]
            timeout = 0.0 if core.config.continuous else _STATIC_POLL_S / len(busy)
            try:
                events = engine.poll(timeout)
            except Exception as e:
                _LOGGER.exception("engine poll failed")
                failed = [r for r in core.running_requests() if self._one is not None or r.model == name]
                self._carry_out(core.fail(failed, ErrorCode.ENGINE_ERROR, f"engine failed: {e}", self.clock()))
                events = []
            if events:
                self.last_event = self.clock()
                self._carry_out(core.apply(events, self.last_event))
        self.queue_depth = core.waiting
        self.active = core.running
        self._maybe_stats()

    def _plan_model(self, name: str) -> str | None:
        return None if self._one is not None else name

    def _ready(self) -> list[str]:
        if self._one is not None:
            return list(self._one)
        return [n for n in self.lineup.residency.ready() if n in self.lineup.engines]

    def _busy(self) -> list[str]:
        if not self.core.running:
            return []
        if self._one is not None:
            return list(self._one)
        return [n for n in self.core.busy_models() if n in self.lineup.engines]

    def _engine_for(self, req: Request) -> Engine | None:
        if self._one is not None:
            return next(iter(self._one.values()))
        if self.lineup.residency.phase(req.model) != Phase.READY:
            return None
        return self.lineup.engines.get(req.model)

    def _inbox_timeout(self, now: float) -> float:
        core = self.core
        busy = self._busy()
        if any(n not in self._wakers for n in busy):
            return 0.0
        ready = self._ready()
        if core.waiting and ready and all(self.lineup.engines[n].free_slots() == 0 for n in ready):
            # A static engine still winding down its batch: don't spin. One that wakes the loop
            # (full, or its upstream unavailable) does so when a slot frees.
            return _FULL_WAIT_S if all(n in self._wakers for n in ready) else 0.005
        wait = min(_IDLE_WAIT_S, max(0.01, self._last_stats + self.config.stats_interval_s - now))
        wake = core.wake_at(now, None if self._one is not None else ready)
        return wait if wake is None else max(0.0, min(wait, wake - now))

    # -- models ---------------------------------------------------------------------------------
    def _move(self, now: float) -> None:
        """Carry out what `Residency` decides: unload (never while a request of the model runs), load."""
        self._carry_moves(self.lineup.residency.decide(self.core.demand(), self.core.busy_models(), now))

    def _carry_moves(self, moves: Moves) -> None:
        lineup = self.lineup
        for name in moves.unload:
            lineup.unload(name)
            self._wakers.discard(name)
            for req in self.core.waiting_for(name):
                req.prepared = None  # the next engine of this model prepares it again
        for name in moves.load:
            _LOGGER.debug("model %s to load (%d waiting)", name, len(self.core.waiting_for(name)))
            lineup.start_load(name, self._loaded)
        if moves:
            self._models_changed()

    def _on_loaded(self, cmd: _Loaded, now: float) -> None:
        lineup = self.lineup
        if cmd.engine is not None and self.core.shutting_down:
            cmd.engine.close()
            return
        lineup.residency.load_done(cmd.name, now, cmd.problem)
        if cmd.engine is None:
            message = f"model {cmd.name} cannot be loaded: {cmd.problem}"
            self._carry_out(self.core.fail(self.core.waiting_for(cmd.name), ErrorCode.ENGINE_ERROR, message, now))
        else:
            lineup.engines[cmd.name] = cmd.engine
            if cmd.engine.set_wake(self._wake):
                self._wakers.add(cmd.name)
            for req in sorted(self.core.waiting_for(cmd.name), key=lambda r: r.arrival):
                self._prepare(req)
        self._models_changed()

    def _models_changed(self) -> None:
        self._loaded_names = tuple(self.lineup.engines)
        if self.on_models is not None:
            state = ModelsState(dict(self.lineup.engines), self.lineup.residency.failures())
            try:
                self.on_models(state)
            except Exception:
                _LOGGER.exception("on_models failed")
        self._last_stats = 0.0  # the stats (loaded models, readiness) go out at once

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
            elif isinstance(cmd, _Loaded):
                self._on_loaded(cmd, now)
            elif isinstance(cmd, _Preload):
                if self.lineup.can_load():
                    self._carry_moves(self.lineup.residency.preload(cmd.name, now))
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
            # The engine that runs it, whatever its model's phase (a draining model's batch runs on).
            engine = next(iter(self._one.values())) if self._one is not None else self.lineup.engines.get(req.model)
            try:
                if engine is not None:
                    engine.cancel(req.key)
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
        if req.state.is_finished():
            return
        engine = self._engine_for(req)
        if engine is None:
            failed = self.lineup.residency.failure(req.model, now)
            if failed is not None:
                message = f"model {req.model} cannot be loaded: {failed}"
                self._carry_out(self.core.refuse(req, ErrorCode.ENGINE_ERROR, message, now))
            return  # it waits for its model's engine, which prepares it once loaded
        if req.gen.tools and not engine.capabilities.tools:
            # Admission could not tell before the model loaded: the same rule as its (strict_tools).
            if self.config.strict_tools:
                self._carry_out(self.core.refuse(req, ErrorCode.INVALID_REQUEST, no_tools_message(req.model), now))
                return
            if req.model not in self._warned_tools:
                self._warned_tools.add(req.model)
                warn_tools_left_out(req.key.client, req.model)
            req.gen = replace(req.gen, tools=())
        try:
            handle = engine.prepare(req.gen)
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
        engine = self._engine_for(reqs[0])
        try:
            if engine is None:
                raise RuntimeError(f"model {reqs[0].model} has no engine")
            engine.submit(handles)
        except Exception as e:
            _LOGGER.exception("engine submit failed")
            self._carry_out(
                self.core.fail(reqs, ErrorCode.ENGINE_ERROR, f"engine failed to start it: {e}", self.clock())
            )
            return
        self.last_event = self.clock()
        self.lineup.residency.used(reqs[0].model, self.last_event)
        for req in reqs:
            waited = ((req.started or req.arrival) - req.arrival) * 1000
            _LOGGER.debug("request %s: started (batch of %d, waited %.0f ms)", req.key, req.batch_size, waited)

    def _answer(self, outcome: Outcome) -> None:
        req = outcome.request
        req.route.sink.final(outcome)
        residency = self.lineup.residency
        residency.used(req.model, outcome.finished)
        if req.keep_alive is not None:
            residency.keep(req.model, req.keep_alive.seconds)
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
            loaded=[] if self._one is not None else sorted(self.lineup.engines),
        )

    def loaded_models(self) -> list[str]:
        """The models loaded now (any thread: the snapshot the scheduler thread last took)."""
        return list(self._loaded_names)

    def _problem(self) -> str | None:
        """Why requests cannot run now: an engine's problem, a model that failed to load, or (with no
        model loaded) the one being loaded."""
        for name, engine in list(self.lineup.engines.items()):
            problem = engine.problem()
            if problem is not None:
                return problem if self._one is not None else f"model {name}: {problem}"
        failures = self.lineup.residency.failures()
        for name, problem in failures.items():
            if self.lineup.residency.failure(name, self.clock()) is not None or not self.lineup.engines:
                return f"model {name} cannot be loaded: {problem}"
        if not self.lineup.engines and (loading := self.lineup.loading()):
            return f"loading model {loading[0]}"
        return None

    def _maybe_stats(self) -> None:
        now = self.clock()
        problem = self._problem()
        if now - self._last_stats < self.config.stats_interval_s and problem == self._engine_problem:
            return
        # A change of the engine's readiness goes out at once (Home Assistant's engine connectivity).
        self._engine_problem = problem
        if self.on_stats is not None:
            self.on_stats(self.stats(now))
        self._tokens_at_stats = self.core.counters.tokens
        self._last_stats = now
