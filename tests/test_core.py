"""The scheduling core's policy as fake-clock tables: no broker, no engine, no threads, no sleeps.

Each scenario is a table of rows `(time, action, argument, expected)`. The harness feeds the core
and reduces each `Step` it returns to a short summary that the row's `expected` must equal:

    "start": keys started together      "cancel": keys to cancel on the engine
    "out":   `key=result` per outcome   "again": retried keys answered with their outcome
    "chunks": `key#seq` per chunk       "prepare": keys to prepare

`key` is `client/id`; a result is the finish reason (stop, length, cancelled) or the error code.
Keys a step leaves empty are left out of its summary. After every scenario the counters must add
up: once nothing is in flight, received = completed + errors, each request answered once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkmqtt.engines.base import ChatMessage, ErrorEvent, FinishEvent, Generation, Prepared, SamplingParams, TokenEvent
from rkmqtt.mqtt.replies import MqttRoute
from rkmqtt.protocol import ErrorCode
from rkmqtt.sched.policy import CoreConfig, SchedulingCore, Step
from rkmqtt.sched.request import Request, RequestKey, RequestState


def key(text: str) -> RequestKey:
    client, rid = text.split("/")
    return RequestKey(client, rid)


@dataclass
class Harness:
    config: CoreConfig
    core: SchedulingCore = field(init=False)
    answered: Counter[int] = field(default_factory=Counter)  # by id() of the Request object
    seen: list[Request] = field(default_factory=list)  # keeps those ids unique
    refuse_prepare: set[str] = field(default_factory=set)  # keys the "engine" refuses: too_long
    kept: int = 0  # left unanswered at a shutdown, for their door to keep

    def __post_init__(self) -> None:
        self.core = SchedulingCore(self.config)

    def request(self, text: str, now: float, **opts: Any) -> Request:
        k = key(text)
        temp = opts.pop("temperature", 0.0)
        gen = Generation(k, (ChatMessage("user", "hi"),), 8, SamplingParams(temperature=temp))
        expires = opts.pop("expires", None)
        # The harness carries out the steps itself: the routes need no sink.
        route = MqttRoute(opts.pop("topic", f"p/reply/{k}"), sink=None, stream=opts.pop("stream", True))
        assert not opts, opts
        return Request(k, route, gen, arrival=now, deadline=None if expires is None else now + expires)

    def summary(self, step: Step, now: float) -> dict[str, list[str]]:
        """Carry out `prepare` as an engine would (prepare or refuse), then summarise the step."""
        for req in list(step.prepare):
            if str(req.key) in self.refuse_prepare:
                step.merge(self.core.refuse(req, ErrorCode.TOO_LONG, "does not fit", now))
            else:
                self.core.prepared(req, Prepared(req.gen, 3, batch_key=req.gen.sampling.temperature))
        for outcome in step.outcomes:
            self.answered[id(outcome.request)] += 1
            self.seen.append(outcome.request)
        out = {
            "prepare": [str(r.key) for r in step.prepare],
            "start": [str(r.key) for r in step.start],
            "cancel": [str(r.key) for r in step.cancel],
            "out": [f"{o.request.key}={o.error[0].value if o.error else o.state.finish_reason}" for o in step.outcomes],
            "again": [f"{o.request.key}>{retry.route.topic}" for o, retry in step.repeats],
            "chunks": [f"{c.request.key}#{c.seq}" for c in step.chunks],
            "kept": [str(r.key) for r in step.kept],
        }
        self.kept += len(step.kept)
        return {k: v for k, v in out.items() if v}

    def do(self, now: float, action: str, arg: Any) -> dict[str, list[str]]:
        core = self.core
        if action == "add":  # arg: "client/id" or ("client/id", {options})
            text, opts = (arg, {}) if isinstance(arg, str) else arg
            return self.summary(core.add(self.request(text, now, **opts), now), now)
        if action == "plan":  # arg: free slots
            return self.summary(core.plan(arg, now), now)
        if action == "cancel":
            return self.summary(core.cancel(key(arg), now), now)
        if action == "shutdown":  # arg: grace seconds
            return self.summary(core.shutdown(arg, now), now)
        if action == "shutdown, keeping k's":  # arg: grace seconds; client k's requests stay with their door
            return self.summary(core.shutdown(arg, now, keep=lambda r: r.client == "k"), now)
        if action == "tokens":  # arg: ("client/id", "text") or "client/id"
            text, piece = (arg, "x") if isinstance(arg, str) else arg
            return self.summary(core.apply([TokenEvent(key(text), piece)], now), now)
        if action == "finish":  # arg: "client/id" or ("client/id", "stop"|"length")
            text, reason = (arg, "stop") if isinstance(arg, str) else arg
            return self.summary(core.apply([FinishEvent(key(text), reason, None, 1, slot=0)], now), now)
        if action == "fail":  # the engine reports an error for one request
            return self.summary(core.apply([ErrorEvent(key(arg), ErrorCode.ENGINE_ERROR, "boom")], now), now)
        raise AssertionError(action)

    def check_books(self) -> None:
        c = self.core.counters
        in_flight = self.core.waiting + self.core.running
        assert c.received == c.completed + c.errors + in_flight + self.kept
        assert sum(c.by_code.values()) == c.errors
        assert all(n == 1 for n in self.answered.values()), self.answered


def cfg(**kw: Any) -> CoreConfig:
    base: dict[str, Any] = {
        "n_batch": 2,
        "continuous": True,
        "max_queue": 8,
        "batch_window_s": 0.03,
        "dedup_window_s": 60.0,
    }
    base.update(kw)
    return CoreConfig(**base)


STATIC = {"continuous": False, "n_batch": 4}

Row = tuple[float, str, Any, dict[str, list[str]]]

SCENARIOS: dict[str, tuple[CoreConfig, list[Row]]] = {
    "continuous: starts what fits, the next joins when a slot frees": (cfg(), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "add", "a/2", {"prepare": ["a/2"]}),
        (0.0, "add", "b/1", {"prepare": ["b/1"]}),
        (0.0, "plan", 2, {"start": ["a/1", "b/1"]}),  # one per client per round
        (0.1, "plan", 0, {}),
        (0.2, "finish", "a/1", {"out": ["a/1=stop"]}),
        (0.2, "plan", 1, {"start": ["a/2"]}),
        (0.3, "finish", ("b/1", "length"), {"out": ["b/1=length"]}),
        (0.3, "finish", "a/2", {"out": ["a/2=stop"]}),
    ]),
    "static: the batch window waits for batch-mates, then starts what is there": (cfg(**STATIC), [
        (0.00, "add", "a/1", {"prepare": ["a/1"]}),
        (0.00, "plan", 4, {}),
        (0.02, "add", "b/1", {"prepare": ["b/1"]}),
        (0.02, "plan", 4, {}),
        (0.03, "plan", 4, {"start": ["a/1", "b/1"]}),
        (0.04, "add", "c/1", {"prepare": ["c/1"]}),
        (0.10, "plan", 0, {}),  # busy: a static engine takes a batch only when idle
        (0.20, "finish", "a/1", {"out": ["a/1=stop"]}),
        (0.20, "finish", "b/1", {"out": ["b/1=stop"]}),
        (0.20, "plan", 4, {"start": ["c/1"]}),  # its window has long passed
        (0.30, "finish", "c/1", {"out": ["c/1=stop"]}),
    ]),
    "static: a full batch starts at once; sampling splits batches": (cfg(**STATIC), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "add", ("b/1", {"temperature": 0.7}), {"prepare": ["b/1"]}),
        (0.0, "add", "c/1", {"prepare": ["c/1"]}),
        (0.0, "add", "d/1", {"prepare": ["d/1"]}),
        (0.0, "add", "e/1", {"prepare": ["e/1"]}),
        (0.0, "plan", 4, {"start": ["a/1", "c/1", "d/1", "e/1"]}),
        (0.1, "finish", "a/1", {"out": ["a/1=stop"]}),
        (0.1, "finish", "c/1", {"out": ["c/1=stop"]}),
        (0.1, "finish", "d/1", {"out": ["d/1=stop"]}),
        (0.1, "finish", "e/1", {"out": ["e/1=stop"]}),
        (0.1, "plan", 4, {"start": ["b/1"]}),  # alone: its window, from its arrival, is long past
        (0.2, "finish", "b/1", {"out": ["b/1=stop"]}),
    ]),
    "fairness: a quiet client's one request goes in the next batch, ahead of a flood": (cfg(max_queue=20), [
        *[(0.0, "add", f"flood/{i}", {"prepare": [f"flood/{i}"]}) for i in range(6)],
        (0.0, "plan", 2, {"start": ["flood/0", "flood/1"]}),
        (0.1, "add", "quiet/q", {"prepare": ["quiet/q"]}),
        (0.2, "finish", "flood/0", {"out": ["flood/0=stop"]}),
        (0.2, "plan", 1, {"start": ["quiet/q"]}),
    ]),
    "full queue: the newcomer bumps the flooder's newest; or is refused busy": (cfg(max_queue=3, n_batch=1), [
        (0.0, "add", "f/1", {"prepare": ["f/1"]}),
        (0.0, "add", "f/2", {"prepare": ["f/2"]}),
        (0.0, "add", "f/3", {"prepare": ["f/3"]}),
        (0.1, "add", "q/1", {"out": ["f/3=busy"], "prepare": ["q/1"]}),
        (0.2, "add", "f/4", {"out": ["f/4=busy"]}),  # f holds 2 of 3: more than the newcomer's 1
        (0.2, "add", "r/1", {"out": ["f/2=busy"], "prepare": ["r/1"]}),  # f's 2 > the 1 r would hold
        (0.2, "add", "s/1", {"out": ["s/1=busy"]}),  # now nobody holds more than s would
        (0.3, "plan", 1, {"start": ["f/1"]}),
        (0.4, "add", "f/3", {"prepare": ["f/3"]}),  # a bumped id may come again: it never ran
    ]),
    "dedupe: in flight, same route: nothing; another route: duplicate_id; finished: the same outcome": (cfg(), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "add", "a/1", {}),
        (0.0, "add", ("a/1", {"topic": "p/reply/a/other"}), {"out": ["a/1=duplicate_id"]}),
        (0.0, "plan", 2, {"start": ["a/1"]}),
        (0.5, "finish", "a/1", {"out": ["a/1=stop"]}),
        (1.0, "add", "a/1", {"again": ["a/1>p/reply/a/1"]}),
        (2.0, "add", ("a/1", {"topic": "p/reply/a/x"}), {"again": ["a/1>p/reply/a/x"]}),
        (61.0, "add", "a/1", {"prepare": ["a/1"]}),  # past the dedup window: a new request
    ]),
    "dedupe: an id refused before it ran (too_long, busy, cancelled) may be sent again": (cfg(max_queue=1), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "cancel", "a/1", {"out": ["a/1=cancelled"]}),
        (0.1, "add", "a/1", {"prepare": ["a/1"]}),
    ]),
    "expiry: answered expired when not started in time; a running request does not expire": (cfg(n_batch=1), [
        (0.0, "add", ("a/1", {"expires": 5.0}), {"prepare": ["a/1"]}),
        (0.0, "add", ("b/1", {"expires": 1.0}), {"prepare": ["b/1"]}),
        (0.0, "plan", 1, {"start": ["a/1"]}),
        (0.9, "plan", 0, {}),
        (1.0, "plan", 0, {"out": ["b/1=expired"]}),
        (9.0, "plan", 0, {}),
        (9.0, "finish", "a/1", {"out": ["a/1=stop"]}),
    ]),
    "cancel in every state": (cfg(n_batch=1), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "add", "a/2", {"prepare": ["a/2"]}),
        (0.0, "plan", 1, {"start": ["a/1"]}),
        (0.1, "cancel", "a/2", {"out": ["a/2=cancelled"]}),  # waiting: an error reply, nothing to cancel
        (0.2, "tokens", ("a/1", "he"), {"chunks": ["a/1#0"]}),
        (0.3, "cancel", "a/1", {"cancel": ["a/1"], "out": ["a/1=cancelled"]}),  # running: ok, what came so far
        (0.3, "tokens", "a/1", {}),  # late events of a cancelled request are dropped
        (0.3, "finish", "a/1", {}),
        (0.4, "cancel", "a/1", {}),  # finished
        (0.4, "cancel", "zz/9", {}),  # unknown
    ]),
    "engine events: chunks numbered per request, none when not streaming; an engine error": (cfg(), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "add", ("b/1", {"stream": False}), {"prepare": ["b/1"]}),
        (0.0, "plan", 2, {"start": ["a/1", "b/1"]}),
        (0.1, "tokens", "a/1", {"chunks": ["a/1#0"]}),
        (0.1, "tokens", "b/1", {}),
        (0.2, "tokens", ("a/1", ""), {}),  # a token with no text yet (half a character): no chunk
        (0.3, "tokens", "a/1", {"chunks": ["a/1#1"]}),
        (0.4, "fail", "b/1", {"out": ["b/1=engine_error"]}),
        (0.5, "finish", "a/1", {"out": ["a/1=stop"]}),
    ]),
    "prepare refused: too_long, answered at once": (cfg(), [
        (0.0, "add", "long/1", {"prepare": ["long/1"], "out": ["long/1=too_long"]}),
        (0.0, "plan", 2, {}),
    ]),
    "shutdown: waiting answered at once, running get the grace period, late ones refused": (cfg(n_batch=2), [
        (0.0, "add", "a/1", {"prepare": ["a/1"]}),
        (0.0, "add", "b/1", {"prepare": ["b/1"]}),
        (0.0, "add", "c/1", {"prepare": ["c/1"]}),
        (0.0, "plan", 2, {"start": ["a/1", "b/1"]}),
        (1.0, "shutdown", 5.0, {"out": ["c/1=shutting_down"]}),
        (1.0, "add", "d/1", {"out": ["d/1=shutting_down"]}),
        (2.0, "finish", "a/1", {"out": ["a/1=stop"]}),
        (5.9, "plan", 2, {}),
        (6.0, "plan", 2, {"cancel": ["b/1"], "out": ["b/1=shutting_down"]}),
    ]),
    "shutdown keeping some: those wait for the next start, unanswered; the rest as always": (cfg(n_batch=1), [
        (0.0, "add", "k/1", {"prepare": ["k/1"]}),
        (0.0, "add", "k/2", {"prepare": ["k/2"]}),
        (0.0, "add", "h/1", {"prepare": ["h/1"]}),
        (0.0, "plan", 1, {"start": ["k/1"]}),
        (1.0, "shutdown, keeping k's", 5.0, {"out": ["h/1=shutting_down"], "kept": ["k/2"]}),
        (1.0, "add", "k/3", {"kept": ["k/3"]}),
        (1.0, "add", "h/2", {"out": ["h/2=shutting_down"]}),
        (6.0, "plan", 1, {"cancel": ["k/1"], "out": ["k/1=shutting_down"]}),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_policy(name: str) -> None:
    config, rows = SCENARIOS[name]
    h = Harness(config, refuse_prepare={"long/1"})
    for i, (now, action, arg, expected) in enumerate(rows):
        got = h.do(now, action, arg)
        assert got == expected, f"row {i}: {now} {action} {arg!r}"
    h.check_books()


def test_largest_batch_a_request_ran_in() -> None:
    h = Harness(cfg(n_batch=4))
    h.do(0.0, "add", "a/1")
    h.do(0.0, "plan", 4)
    for c in "bcd":
        h.do(0.1, "add", f"{c}/1")
    h.do(0.1, "plan", 3)
    a = h.core.get(key("a/1"))
    assert a is not None and a.batch_size == 4  # it started alone, then shared the engine with 3 more
    for c in "abcd":
        h.do(0.2, "finish", f"{c}/1")
    h.do(0.3, "add", "e/1")
    h.do(0.3, "plan", 4)
    e = h.core.get(key("e/1"))
    assert e is not None and e.batch_size == 1


def test_wake_at_names_the_next_deadline() -> None:
    h = Harness(cfg(**STATIC))
    assert h.core.wake_at(0.0) is None
    h.do(0.0, "add", ("a/1", {"expires": 10.0}))
    assert h.core.wake_at(0.0) == pytest.approx(0.03)  # the batch window
    h.do(0.03, "plan", 4)
    assert h.core.wake_at(0.03) == pytest.approx(10.0)  # a stale expiry entry of a started request is harmless
    h.do(1.0, "shutdown", 4.0)
    assert h.core.wake_at(1.0) == pytest.approx(5.0) and not h.core.stopped
    h.do(2.0, "finish", "a/1")
    assert h.core.stopped


def test_a_continuous_engine_with_requests_waiting_is_planned_at_once() -> None:
    """n_batch 1: when the running request ends, the next waiting one must start without waiting
    for another arrival (the scheduler sleeps on its inbox until `wake_at`)."""
    h = Harness(cfg(n_batch=1))
    h.do(0.0, "add", "a/1")
    h.do(0.0, "add", "b/1")
    h.do(0.0, "plan", 1)
    h.do(0.5, "finish", "a/1")
    assert h.core.running == 0 and h.core.waiting == 1
    assert h.core.wake_at(0.5) == pytest.approx(0.5)
    h.do(0.5, "plan", 1)
    h.do(0.9, "finish", "b/1")
    assert h.core.wake_at(0.9) is None  # nothing waits: sleep until something arrives


def test_a_request_cannot_finish_twice_and_the_handle_is_dropped() -> None:
    h = Harness(cfg())
    h.do(0.0, "add", "a/1")
    req = h.core.get(key("a/1"))
    assert req is not None and req.prepared is not None
    h.do(0.0, "cancel", "a/1")
    assert req.state == RequestState.FINISHED_ERROR and req.prepared is None  # nothing left of it in the engine
    with pytest.raises(RuntimeError):
        h.core._finish(Step(), req, RequestState.FINISHED_STOPPED, 1.0)


def test_a_retry_is_answered_from_what_was_kept_and_the_prompt_is_not_kept() -> None:
    h = Harness(cfg())
    h.do(0.0, "add", "a/1")
    h.do(0.0, "plan", 2)
    h.do(0.1, "tokens", ("a/1", "Par"))
    h.do(0.2, "tokens", ("a/1", "is"))
    h.do(0.3, "finish", "a/1")
    step = h.core.add(h.request("a/1", 1.0, topic="p/reply/a/again"), 1.0)
    [(done, retry)] = step.repeats
    assert retry.route.topic == "p/reply/a/again"
    assert done.ok and done.request.text == "Paris" and done.request.completion_tokens == 2
    assert done.request.started == 0.0 and done.request.first_token == 0.1 and done.request.route.topic == "p/reply/a/1"
    assert done.request.gen.messages == () and done.request.prepared is None  # the prompt is not held for retries


ACTIONS = st.sampled_from(["add", "add", "add", "plan", "tokens", "finish", "fail", "cancel", "shutdown"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(ACTIONS, st.sampled_from("abc"), st.integers(0, 3), st.floats(0, 2)), max_size=60),
    st.booleans(),
    st.integers(1, 4),
    st.integers(1, 5),
)
def test_books_always_add_up(
    ops: list[tuple[str, str, int, float]], continuous: bool, n_batch: int, max_queue: int
) -> None:
    """Whatever happens, every request is answered once and the counters add up."""
    h = Harness(cfg(continuous=continuous, n_batch=n_batch, max_queue=max_queue, batch_window_s=0.5))
    now = 0.0
    for action, client, n, dt in ops:
        now += dt
        text = f"{client}/{n}"
        if action == "add":
            h.do(now, "add", (text, {"expires": 1.5}) if n == 3 else text)
        elif action == "plan":
            h.do(now, "plan", max(0, n_batch - h.core.running) if continuous or not h.core.running else 0)
        elif action == "shutdown":
            h.do(now, "shutdown", dt)
        else:
            h.do(now, action, text)
        h.check_books()
    # finish everything: shut down and let the grace period end
    h.do(now, "shutdown", 0.0)
    h.do(now, "plan", 0)
    assert h.core.stopped
    h.check_books()
    c = h.core.counters
    assert c.received == c.completed + c.errors == sum(h.answered.values())
