"""Which models are loaded, as fake-clock steps of the pure `Residency` policy: loads on demand up to
`max_loaded`, a switch that waits for the running batch, oldest request first, idle unloads by
keep_alive (a request's own included), and a failed load answered at once for a while."""

from __future__ import annotations

from rkmqtt.sched.residency import Moves, Phase, Residency, ResidencyConfig


def moves(m: Moves) -> tuple[list[str], list[str]]:
    return m.load, m.unload


def test_models_load_on_demand_up_to_the_limit_oldest_request_first() -> None:
    r = Residency(ResidencyConfig(max_loaded=2, keep_alive_s=None))
    assert moves(r.decide({"b": 2.0, "a": 1.0, "c": 3.0}, set(), 10.0)) == (["a", "b"], [])
    assert r.phase("a") == Phase.LOADING and r.ready() == []
    r.load_done("a", 11.0, None)
    assert r.ready() == ["a"]
    # c waits: the two places are taken (b is still loading), and nothing is switched meanwhile.
    assert moves(r.decide({"c": 3.0}, {"a"}, 12.0)) == ([], [])


def test_a_switch_waits_for_the_running_batch_then_unloads_and_loads() -> None:
    r = Residency(ResidencyConfig(max_loaded=1, keep_alive_s=None))
    r.adopt("a", 0.0)
    # b's request is waiting; a is running a batch and has nothing older waiting: a drains.
    assert moves(r.decide({"b": 5.0}, {"a"}, 6.0)) == ([], [])
    assert r.phase("a") == Phase.DRAINING and r.ready() == []
    # Still running: nothing moves (and a new request of a does not bring it back).
    assert moves(r.decide({"b": 5.0, "a": 6.5}, {"a"}, 7.0)) == ([], [])
    # Its batch ended: a goes, b comes, in the same step.
    assert moves(r.decide({"b": 5.0, "a": 6.5}, set(), 8.0)) == (["b"], ["a"])
    r.load_done("b", 9.0, None)
    # b's batch (its request of 5.0) runs; a's request of 6.5 is older than b's next one (8.5): b
    # starts nothing new, and a comes back once the batch has ended.
    assert moves(r.decide({"a": 6.5, "b": 8.5}, {"b"}, 9.5)) == ([], [])
    assert r.phase("b") == Phase.DRAINING
    assert moves(r.decide({"a": 6.5, "b": 8.5}, set(), 10.0)) == (["a"], ["b"])


def test_a_loaded_model_serves_its_own_older_requests_before_a_switch() -> None:
    r = Residency(ResidencyConfig(max_loaded=1, keep_alive_s=None))
    r.adopt("a", 0.0)
    assert moves(r.decide({"a": 1.0, "b": 2.0}, {"a"}, 3.0)) == ([], [])
    assert r.phase("a") == Phase.READY
    # An idle model with nothing waiting goes at once.
    assert moves(r.decide({"b": 2.0}, set(), 4.0)) == (["b"], ["a"])


def test_idle_models_unload_after_keep_alive_and_a_request_sets_its_own() -> None:
    r = Residency(ResidencyConfig(max_loaded=2, keep_alive_s=60.0))
    r.adopt("a", 0.0)
    r.used("a", 10.0)
    assert moves(r.decide({}, set(), 69.0)) == ([], [])
    assert moves(r.decide({}, {"a"}, 80.0)) == ([], [])  # running: never unloaded
    assert r.wake_at(80.0) == 70.0
    assert moves(r.decide({}, set(), 80.0)) == ([], ["a"])
    r.adopt("b", 100.0)
    r.keep("b", None)  # -1: for ever
    assert moves(r.decide({}, set(), 10_000.0)) == ([], [])
    r.keep("b", 0.0)  # 0: as soon as it is idle
    r.used("b", 10_001.0)
    assert moves(r.decide({}, set(), 10_001.0)) == ([], ["b"])


def test_a_failed_load_is_answered_at_once_for_a_while_then_tried_again() -> None:
    r = Residency(ResidencyConfig(max_loaded=1, keep_alive_s=None, retry_s=30.0))
    assert moves(r.decide({"a": 0.0}, set(), 0.0)) == (["a"], [])
    r.load_done("a", 1.0, "no network")
    assert r.failure("a", 2.0) == "no network" and r.failures() == {"a": "no network"}
    assert moves(r.decide({"a": 2.0}, set(), 2.0)) == ([], [])
    assert r.failure("a", 31.0) is None
    assert moves(r.decide({"a": 31.0}, set(), 31.0)) == (["a"], [])
    r.load_done("a", 32.0, None)
    assert r.failures() == {} and r.ready() == ["a"]


def test_preload_takes_a_free_place_only() -> None:
    r = Residency(ResidencyConfig(max_loaded=1, keep_alive_s=None))
    assert moves(r.preload("a", 0.0)) == (["a"], [])
    assert moves(r.preload("b", 0.0)) == ([], [])


def test_the_core_plans_one_models_prepared_requests_and_never_mixes_models_in_a_batch() -> None:
    from rkmqtt.engines.base import ChatMessage, Generation, Prepared, SamplingParams
    from rkmqtt.mqtt.replies import MqttRoute
    from rkmqtt.sched.policy import CoreConfig, SchedulingCore
    from rkmqtt.sched.request import Request, RequestKey

    core = SchedulingCore(CoreConfig(n_batch=4, continuous=False, max_queue=8, batch_window_s=0.0, dedup_window_s=0))

    def add(client: str, rid: str, model: str, now: float) -> Request:
        key = RequestKey(client, rid)
        gen = Generation(key, (ChatMessage("user", "hi"),), 8, SamplingParams())
        req = Request(key, MqttRoute(f"p/reply/{key}", sink=None, stream=False), gen, arrival=now, model=model)
        assert core.add(req, now).prepare == [req]
        return req

    a1, b1, a2 = add("x", "1", "a", 0.0), add("y", "1", "b", 1.0), add("z", "1", "a", 2.0)
    for r in (a1, b1):
        core.prepared(r, Prepared(r.gen, 2))
    assert core.demand() == {"a": 0.0, "b": 1.0}
    # a2 is not prepared yet (its model's engine has not seen it): a batch of a takes a1 alone.
    assert [r.key.client for r in core.plan(4, 3.0, "a").start] == ["x"]
    core.prepared(a2, Prepared(a2.gen, 2))
    assert [r.key.client for r in core.plan(4, 3.0, "b").start] == ["y"]
    assert core.busy_models() == {"a", "b"} and core.waiting_for("a") == [a2]
    assert core.wake_at(3.0, ["b"]) is None  # nothing of b waits: no reason to wake for it
