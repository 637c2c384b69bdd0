"""The scheduling core: every request's life from arrival to its one outcome (scheduler thread; pure).

No threads, engine calls, transport or JSON: each method takes the time and returns a `Step` for the
loop to carry out, and every end goes through `_finish()`. The policy (batches, a full queue,
retries, expiry, shutdown): docs/architecture.md, "The scheduling policy"."""

from __future__ import annotations

import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from rkmqtt.engines.base import EngineEvent, ErrorEvent, FinishEvent, Prepared, TokenEvent
from rkmqtt.logbudget import limited
from rkmqtt.protocol import ErrorCode
from rkmqtt.sched.fairqueue import FairQueue
from rkmqtt.sched.request import Chunk, Outcome, Request, RequestKey, RequestState

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreConfig:
    n_batch: int
    continuous: bool  # the engine's batching style
    max_queue: int
    batch_window_s: float
    dedup_window_s: float
    dedup_max: int = 10_000  # finished outcomes kept for de-duplication, at most


@dataclass
class Step:
    """What the loop must do, in this order: prepare, start, cancel, then answer."""

    prepare: list[Request] = field(default_factory=list)  # new: `prepared()` or `refuse()` each
    start: list[Request] = field(default_factory=list)  # one `engine.submit` of their handles
    cancel: list[Request] = field(default_factory=list)  # they left while the engine held them
    chunks: list[Chunk] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)  # one final reply each
    repeats: list[tuple[Outcome, Request]] = field(default_factory=list)  # a finished id retried: reply again
    ignored: list[Request] = field(default_factory=list)  # a retry of an id in flight: nothing to answer
    kept: list[Request] = field(default_factory=list)  # left unanswered at shutdown: their door keeps them

    def __bool__(self) -> bool:
        return any(
            (self.prepare, self.start, self.cancel, self.chunks, self.outcomes, self.repeats, self.ignored, self.kept)
        )

    def merge(self, other: Step) -> Step:
        self.prepare += other.prepare
        self.start += other.start
        self.cancel += other.cancel
        self.chunks += other.chunks
        self.outcomes += other.outcomes
        self.repeats += other.repeats
        self.ignored += other.ignored
        self.kept += other.kept
        return self


@dataclass
class Counters:
    """What `P/node/<node>/stats` reports. Once nothing is in flight, received = completed + errors; every
    outcome and every repeat is one final reply published."""

    received: int = 0  # requests that reached the core (retries of a finished id not counted)
    completed: int = 0  # outcomes with status ok (stop, length, cancelled while running)
    errors: int = 0  # outcomes with status error
    by_code: Counter[str] = field(default_factory=Counter)
    repeated: int = 0  # retried ids answered again with their recorded outcome
    tokens: int = 0  # completion tokens produced, in all


class OutcomeLog:
    """Outcomes of requests that started, by key, for `window_s` seconds (and `max_entries` at most)."""

    def __init__(self, window_s: float, max_entries: int) -> None:
        self._window = window_s
        self._max = max_entries
        self._items: OrderedDict[RequestKey, Outcome] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, outcome: Outcome) -> None:
        if self._window <= 0:
            return
        req = outcome.request
        # A retry is answered from the route, text, counts and times: the prompt (up to max_prompt_chars
        # a request, 10,000 requests) and the text's pieces are not kept for it.
        slim = replace(req, gen=replace(req.gen, messages=(), tools=()), parts=[req.text], prepared=None)
        self._items.pop(req.key, None)
        self._items[req.key] = replace(outcome, request=slim)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def get(self, key: RequestKey, now: float) -> Outcome | None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.finished <= self._window:
                break
            self._items.popitem(last=False)
        return self._items.get(key)


class SchedulingCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.counters = Counters()
        self._waiting = FairQueue()
        self._running: dict[RequestKey, Request] = {}
        self._live: dict[RequestKey, Request] = {}  # waiting or running
        self._deadlines: list[tuple[float, int, Request]] = []  # heap of waiting requests' expiries
        self._pushed = 0
        self._log = OutcomeLog(config.dedup_window_s, config.dedup_max)
        self._shutdown_at: float | None = None
        self._keep: Callable[[Request], bool] | None = None  # at shutdown: which waiting ones stay unanswered

    # -- what the loop reads ----------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_at is not None

    @property
    def stopped(self) -> bool:
        """Shutdown asked and nothing left to answer."""
        return self._shutdown_at is not None and not self._live

    def running_requests(self) -> list[Request]:
        return list(self._running.values())

    def get(self, key: RequestKey) -> Request | None:
        return self._live.get(key)

    def wake_at(self, now: float, models: Collection[str] | None = None) -> float | None:
        """When the core next needs `plan()` with no new input: now when a continuous engine has
        requests waiting (a slot may just have freed), the end of a batch window, the first expiry,
        or the end of the shutdown grace period. `models`: those whose requests can start (None: all)."""
        times: list[float] = []
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._shutdown_at is not None:
            if self._running:
                times.append(self._shutdown_at)
        elif len(self._waiting):
            startable = [r for r in self._waiting if r.prepared is not None and (models is None or r.model in models)]
            if startable and self.config.continuous:
                # Without this the loop would sleep on its inbox until the next arrival or its idle
                # wait after the last running request ended, with requests still queued.
                times.append(now)
            elif startable:
                times.append(min(r.arrival for r in startable) + self.config.batch_window_s)
        return min(times) if times else None

    def demand(self) -> dict[str, float]:
        """The oldest arrival among the waiting requests of each model that has some."""
        out: dict[str, float] = {}
        for r in self._waiting:
            out[r.model] = min(out.get(r.model, r.arrival), r.arrival)
        return out

    def busy_models(self) -> set[str]:
        """Models with requests running."""
        return {r.model for r in self._running.values()}

    def waiting_for(self, model: str) -> list[Request]:
        """The waiting requests of `model`, in no particular order."""
        return [r for r in self._waiting if r.model == model]

    # -- arrivals ---------------------------------------------------------------------------
    def add(self, req: Request, now: float) -> Step:
        """A new request. Accepted ones come back in `step.prepare`."""
        step = Step()
        live = self._live.get(req.key)
        if live is not None:
            if live.route == req.route:
                if limited(_LOGGER, logging.INFO, "retries of requests in flight", req.client):
                    _LOGGER.info("request %s: retried while in flight; not run again", req.key)
                step.ignored.append(req)
                return step
            self.counters.received += 1
            return self._finish(
                step, req, RequestState.FINISHED_ERROR, now, (ErrorCode.DUPLICATE_ID, _duplicate_message(live))
            )
        done = self._log.get(req.key, now)
        if done is not None:
            if limited(_LOGGER, logging.INFO, "retries of finished requests", req.client):
                _LOGGER.info("request %s: retried after it ran; its final reply is sent again", req.key)
            self.counters.repeated += 1
            step.repeats.append((done, req))
            return step
        self.counters.received += 1
        if self._shutdown_at is not None:
            if self._keep is not None and self._keep(req):
                step.kept.append(req)
                return step
            return self._finish(
                step, req, RequestState.FINISHED_ERROR, now, (ErrorCode.SHUTTING_DOWN, "the bridge is shutting down")
            )
        if len(self._waiting) >= self.config.max_queue:
            bumped = self._waiting.newest_of_largest(more_than=self._waiting.count(req.client) + 1)
            busy = f"the queue is full ({self.config.max_queue} waiting)"
            if bumped is None:
                return self._finish(
                    step, req, RequestState.FINISHED_ERROR, now, (ErrorCode.BUSY, f"{busy}; try again later")
                )
            self._finish(
                step,
                bumped,
                RequestState.FINISHED_ERROR,
                now,
                (ErrorCode.BUSY, f"{busy} and {bumped.client!r} holds the most places; try again later"),
            )
        self._live[req.key] = req
        self._waiting.push(req)
        if req.deadline is not None:
            self._pushed += 1
            heapq.heappush(self._deadlines, (req.deadline, self._pushed, req))
        step.prepare.append(req)
        return step

    def prepared(self, req: Request, handle: Prepared) -> None:
        """The engine accepted `req` (from `step.prepare`); it may now be planned."""
        req.prepared = handle
        req.prompt_tokens = handle.prompt_tokens

    def refuse(self, req: Request, code: ErrorCode, message: str, now: float) -> Step:
        """The engine refused to prepare `req` (from `step.prepare`)."""
        return self._finish(Step(), req, RequestState.FINISHED_ERROR, now, (code, message))

    def cancel(self, key: RequestKey, now: float) -> Step:
        step = Step()
        req = self._live.get(key)
        if req is None:
            if limited(_LOGGER, logging.INFO, "cancels of unknown ids", key.client):
                _LOGGER.info("cancel %s: no such request waiting or running", key)
        elif req.state == RequestState.WAITING:
            self._finish(
                step, req, RequestState.FINISHED_ERROR, now, (ErrorCode.CANCELLED, "cancelled before it started")
            )
        else:
            self._finish(step, req, RequestState.FINISHED_CANCELLED, now)
        return step

    def shutdown(self, grace_s: float, now: float, keep: Callable[[Request], bool] | None = None) -> Step:
        """Answer every waiting request `shutting_down`, but those `keep` says their door keeps for
        the next start (MQTT's journal): they leave unanswered, in `step.kept`, as do such ones that
        arrive from now on. Running ones get `grace_s` to finish."""
        step = Step()
        end = now + grace_s  # asked again, the sooner end wins
        self._shutdown_at = end if self._shutdown_at is None else min(self._shutdown_at, end)
        self._keep = keep if self._keep is None else self._keep
        for req in list(self._waiting):
            if self._keep is not None and self._keep(req):
                self._waiting.remove(req.key)
                del self._live[req.key]
                req.prepared = None
                step.kept.append(req)
                continue
            self._finish(
                step,
                req,
                RequestState.FINISHED_ERROR,
                now,
                (ErrorCode.SHUTTING_DOWN, "the bridge is shutting down; try again later"),
            )
        return step

    def refused_early(self, code: ErrorCode) -> None:
        """Count a request the bridge refused before it became a `Request` (it sent the reply)."""
        self.counters.received += 1
        self.counters.errors += 1
        self.counters.by_code[code.value] += 1

    def fail(self, reqs: list[Request], code: ErrorCode, message: str, now: float) -> Step:
        """Answer `reqs` (those still in flight) with `code`: the engine failed them."""
        step = Step()
        for req in reqs:
            if not req.state.is_finished():
                self._finish(step, req, RequestState.FINISHED_ERROR, now, (code, message))
        return step

    def fail_running(self, code: ErrorCode, message: str, now: float) -> Step:
        return self.fail(list(self._running.values()), code, message, now)

    def fail_all(self, code: ErrorCode, message: str, now: float) -> Step:
        """Answer everything in flight with `code` (the loop itself failed)."""
        return self.fail([*self._waiting, *self._running.values()], code, message, now)

    # -- planning ---------------------------------------------------------------------------
    def plan(self, free_slots: int, now: float, model: str | None = None) -> Step:
        """Expire, cut at the end of a shutdown, and start what fits in `free_slots` (of `model`'s
        engine: only its prepared requests; None: any request, one engine)."""
        step = Step()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self._deadlines)
            if req.state == RequestState.WAITING and self._live.get(req.key) is req:
                self._finish(
                    step, req, RequestState.FINISHED_ERROR, now, (ErrorCode.EXPIRED, "not started before it expired")
                )
        if self._shutdown_at is not None:
            if now >= self._shutdown_at:
                for req in list(self._running.values()):
                    self._finish(
                        step,
                        req,
                        RequestState.FINISHED_ERROR,
                        now,
                        (ErrorCode.SHUTTING_DOWN, "the bridge stopped before it finished"),
                    )
            return step
        if free_slots <= 0 or not len(self._waiting):
            return step
        accept = None if model is None else (lambda r: r.model == model and r.prepared is not None)
        if self.config.continuous:
            taken = self._waiting.take(free_slots, accept=accept)
        else:
            mine = list(self._waiting) if model is None else [r for r in self._waiting if accept and accept(r)]
            oldest = min((r.arrival for r in mine), default=None)
            if oldest is None:
                return step
            if len(mine) < free_slots and now - oldest < self.config.batch_window_s:
                return step  # the collection window: let batch-mates arrive
            taken = self._waiting.take(free_slots, key=_batch_key, accept=accept)
        for req in taken:
            if req.prepared is None:
                raise RuntimeError(f"request {req.key} was planned before it was prepared")
            req.state = RequestState.RUNNING
            req.started = now
            self._running[req.key] = req
        size = len(taken)
        if self.config.continuous:
            size = sum(1 for r in self._running.values() if r.model == taken[0].model) if taken else 0
        for req in self._running.values():
            if not taken or req.model == taken[0].model:
                req.batch_size = max(req.batch_size, size)
        step.start = taken
        return step

    # -- engine events ----------------------------------------------------------------------
    def apply(self, events: list[EngineEvent], now: float) -> Step:
        step = Step()
        for ev in events:
            req = self._running.get(ev.key)  # type: ignore[call-overload]
            if req is None:
                continue  # it was cancelled or answered: its late events are dropped
            if isinstance(ev, TokenEvent):
                self._on_tokens(step, req, ev, now)
            elif isinstance(ev, FinishEvent):
                if ev.prompt_tokens is not None:
                    req.prompt_tokens = ev.prompt_tokens
                req.completion_tokens = max(req.completion_tokens, ev.completion_tokens)
                req.slot = ev.slot
                req.perf = dict(ev.perf)
                req.tool_calls = ev.tool_calls
                state = RequestState.FINISHED_STOPPED if ev.reason == "stop" else RequestState.FINISHED_LENGTH
                self._finish(step, req, state, now, warnings=ev.warnings, engine_ended=True)
            elif isinstance(ev, ErrorEvent):
                self._finish(step, req, RequestState.FINISHED_ERROR, now, (ev.code, ev.message), engine_ended=True)
        return step

    def _on_tokens(self, step: Step, req: Request, ev: TokenEvent, now: float) -> None:
        if req.first_token is None:
            req.first_token = now
        req.last_token = now
        req.completion_tokens += ev.tokens
        self.counters.tokens += ev.tokens
        if not ev.text:
            return
        req.parts.append(ev.text)
        if req.route.stream:
            step.chunks.append(Chunk(req, req.seq, ev.text))
            req.seq += 1

    # -- the one way out ----------------------------------------------------------------------
    def _finish(
        self,
        step: Step,
        req: Request,
        state: RequestState,
        now: float,
        error: tuple[ErrorCode, str] | None = None,
        warnings: tuple[str, ...] = (),
        engine_ended: bool = False,
    ) -> Step:
        """End `req` in `state`: out of every structure, cancelled on the engine if it still holds
        it, counted, remembered for de-duplication if it started, and answered once."""
        if req.state.is_finished():
            raise RuntimeError(f"request {req.key} finished twice")
        if (state == RequestState.FINISHED_ERROR) != (error is not None):
            raise ValueError("an error outcome needs an error code, and only it")
        was = req.state
        if was == RequestState.RUNNING:
            del self._running[req.key]
            if not engine_ended:
                step.cancel.append(req)
        elif self._live.get(req.key) is req:
            self._waiting.remove(req.key)
        if self._live.get(req.key) is req:
            del self._live[req.key]
        req.state = state
        req.prepared = None  # the engine's handle (a tokenized prompt) is not needed any more
        outcome = Outcome(req, state, now, error, warnings)
        if was == RequestState.RUNNING:
            self._log.add(outcome)
        if error is None:
            self.counters.completed += 1
        else:
            self.counters.errors += 1
            self.counters.by_code[error[0].value] += 1
        step.outcomes.append(outcome)
        return step


def _batch_key(req: Request) -> object:
    assert req.prepared is not None
    return req.prepared.batch_key


def _duplicate_message(live: Request) -> str:
    where = "running" if live.state == RequestState.RUNNING else "waiting"
    return f"a request with this id is already {where}, answering elsewhere; use a new id"
