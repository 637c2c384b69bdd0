"""Pure logic: topics, fair queues, intake checks, settings layers (no broker, no threads)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams
from rkmqtt.errors import ConfigError
from rkmqtt.http.exchange import HttpRoute, _QueueSink
from rkmqtt.mqtt.intake import Incoming, Intake
from rkmqtt.mqtt.outbox import Outbox
from rkmqtt.mqtt.replies import MqttRoute, Refusal, Replies
from rkmqtt.mqtt.sink import MqttSink
from rkmqtt.protocol import ErrorCode, parse_cancel_payload
from rkmqtt.sched.admission import Admission, Ask, RateLimiter, Refused
from rkmqtt.sched.fairqueue import FairQueue
from rkmqtt.sched.finals import Finals
from rkmqtt.sched.request import Request, RequestKey, RequestState
from rkmqtt.settings import Settings, load_settings
from rkmqtt.topics import Topics


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("home/llm/reply/dev/1", True),
        ("home/llm/reply/dev/1/x", True),
        ("home/llm/reply/", False),
        ("home/llm/reply//x", False),
        ("home/llm/reply/+/x", False),
        ("home/llm/reply/#", False),
        ("home/llm/replyx/a", False),
        ("home/llm/status", False),
        ("other/reply/a", False),
    ],
)
def test_reply_topic_confinement(topic: str, allowed: bool) -> None:
    assert Topics("home/llm").is_allowed_reply_topic(topic) is allowed


def test_topic_scheme() -> None:
    t = Topics("p")
    assert t.request_subscription() == "p/request/+"
    assert t.request_subscription("g1") == "$share/g1/p/request/+"
    assert t.client_of("p/request/dev", "request") == "dev"
    assert t.client_of("p/request/dev/x", "request") is None
    assert t.client_of("p/cancel/dev", "request") is None
    assert t.stream_of(t.reply("c", "i")) == "p/reply/c/i/stream"


SINK = MqttSink(Outbox(100), Replies(Finals("model")))


def _intake(s: Settings, topics: Topics) -> Intake:
    return Intake(s, topics, Admission(s, lambda code: None), SINK)


def _job(client: str, n: int, temp: float = 0.0) -> Request:
    key = RequestKey(client, str(n))
    gen = Generation(key, (ChatMessage("user", "x"),), 8, SamplingParams(temperature=temp))
    return Request(key=key, route=MqttRoute("r", SINK), gen=gen, arrival=float(n))


@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=60), st.integers(1, 8))
def test_fair_queue_serves_one_per_client_per_round(clients: list[str], n: int) -> None:
    q = FairQueue()
    for i, c in enumerate(clients):
        q.push(_job(c, i))
    taken: list[Request] = []
    while len(q):
        batch = q.take(n)
        assert batch and len(batch) <= n
        # Within a batch no client gets a second request while another waiting client got none.
        per_client = {c: sum(j.client == c for j in batch) for c in {j.client for j in batch}}
        if max(per_client.values()) > 1:
            assert all(c in per_client for c in {j.client for j in q})
        taken.extend(batch)
    assert sorted(str(j.key) for j in taken) == sorted(f"{c}/{i}" for i, c in enumerate(clients))
    for c in set(clients):  # each client's own order is kept
        ids = [int(j.id) for j in taken if j.client == c]
        assert ids == sorted(ids)


def test_fair_queue_quiet_client_within_one_batch() -> None:
    q = FairQueue()
    for i in range(50):
        q.push(_job("flood", i))
    q.take(4)
    q.push(_job("quiet", 99))
    assert "quiet" in [j.client for j in q.take(4)]


def test_fair_queue_groups_by_key_and_keeps_place() -> None:
    q = FairQueue()
    q.push(_job("a", 1, temp=0.0))
    q.push(_job("b", 2, temp=0.7))
    q.push(_job("c", 3, temp=0.0))
    first = q.take(4, key=lambda j: j.gen.sampling.temperature)
    assert [j.client for j in first] == ["a", "c"]
    assert [j.client for j in q.take(4, key=lambda j: j.gen.sampling.temperature)] == ["b"]


def test_request_states_are_ordered() -> None:
    assert not RequestState.RUNNING.is_finished()
    assert RequestState.FINISHED_LENGTH.is_finished() and RequestState.FINISHED_LENGTH.finish_reason == "length"
    assert RequestState.FINISHED_ERROR.finish_reason is None


def test_rate_limiter_refills() -> None:
    r = RateLimiter(per_minute=60, burst=2)
    assert [r.allow("a", 0.0), r.allow("a", 0.0), r.allow("a", 0.0)] == [True, True, False]
    assert r.allow("b", 0.0)
    assert r.allow("a", 1.01) and not r.allow("a", 1.02)


def test_intake_resolves_defaults_messages_and_expiry() -> None:
    s = load_settings({"temperature": 0.5, "default_new_tokens": 33})
    intake = _intake(s, Topics(s.topic_prefix))
    job = intake.accept(Incoming("dev", b'{"id": "a", "system": "be brief", "prompt": "hi", "expires_in": 5}'), 100.0)
    assert not isinstance(job, Refusal)
    assert [m.role for m in job.gen.messages] == ["system", "user"]
    assert job.gen.max_new_tokens == 33 and job.gen.sampling.temperature == 0.5
    assert not job.gen.sampling_requested and job.deadline == 105.0
    job = intake.accept(Incoming("dev", b'{"prompt": "hi", "expires_in": 50, "seed": 3}', expiry_s=2.0), 0.0)
    assert not isinstance(job, Refusal) and job.deadline == 2.0 and job.gen.sampling_requested
    job = intake.accept(Incoming("dev", b'{"prompt": "hi", "expires_in": 2}', expiry_s=50.0), 1.0)
    assert not isinstance(job, Refusal) and job.deadline == 51.0  # the MQTT 5 property wins
    msgs = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    job = intake.accept(Incoming("dev", msgs), 0.0)
    assert not isinstance(job, Refusal) and [m.content for m in job.gen.messages] == ["a", "b"]


def test_cancel_payloads() -> None:
    assert parse_cancel_payload(b" abc-1 \n").id == "abc-1"
    assert parse_cancel_payload(b'{"id": "x.y"}').id == "x.y"
    with pytest.raises(ValueError):
        parse_cancel_payload(b"has space")


def test_refusal_goes_to_a_valid_reply_to_even_for_bad_fields() -> None:
    s = load_settings({"topic_prefix": "p"})
    r = _intake(s, Topics("p")).accept(Incoming("dev", b'{"id": "i1", "prompt": 5, "reply_to": "p/reply/dev/mine"}'))
    assert isinstance(r, Refusal) and r.code == ErrorCode.INVALID_REQUEST and r.route.topic == "p/reply/dev/mine"


def test_settings_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_batch: 3\nmax_queue: 9\nstats_interval: 7\n")
    monkeypatch.setenv("RKMQTT_MAX_QUEUE", "11")
    s = load_settings({"stats_interval": "2"}, config_file=cfg, file_layers=[({"n_batch": 6, "grace_period": 4}, "x")])
    assert (s.n_batch, s.max_queue, s.stats_interval, s.grace_period) == (3, 11, 2.0, 4.0)
    with pytest.raises(ConfigError, match=r"setting max_queue='0' \(RKMQTT_MAX_QUEUE\) is not allowed"):
        monkeypatch.setenv("RKMQTT_MAX_QUEUE", "0")
        load_settings()
    monkeypatch.delenv("RKMQTT_MAX_QUEUE")
    cfg.write_text("n_batch: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_settings(config_file=cfg)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(config_file=tmp_path / "missing.yaml")


def test_broker_url_parsing() -> None:
    a = load_settings({"broker": "mqtts://u%20x:p%40ss@example.org"}).broker_url
    assert (a.host, a.port, a.tls, a.username, a.password) == ("example.org", 8883, True, "u x", "p@ss")
    a = load_settings({"broker": "mqtt://h:1999", "username": "me", "password": "pw"}).broker_url
    assert (a.port, a.username, a.password) == (1999, "me", "pw")
    assert str(a) == "mqtt://me@h:1999"
    with pytest.raises(ConfigError, match="port"):
        load_settings({"broker": "mqtt://h:99999"})


def test_routes_are_equal_when_they_are_the_same_reply_target() -> None:
    """The core compares routes: a retried id from the same target is ignored, from another one it
    is answered `duplicate_id`. MQTT's target is the topic, Correlation Data and streaming (not the
    sink or the journal row); every HTTP exchange is a target of its own."""
    other = MqttSink(Outbox(1), Replies(Finals("model")))
    a = MqttRoute("p/reply/dev/1", SINK, b"c")
    assert a == MqttRoute("p/reply/dev/1", other, b"c").journaled(7)
    assert a != MqttRoute("p/reply/dev/1", SINK, b"d") and a != MqttRoute("p/reply/dev/2", SINK, b"c")
    assert a != MqttRoute("p/reply/dev/1", SINK, b"c", stream=False)
    loop = asyncio.new_event_loop()
    try:
        sink = _QueueSink(loop, Finals("model"))
        h = HttpRoute(sink, stream=True)
        assert h == h and h != HttpRoute(sink, stream=True) and h != a
    finally:
        loop.close()


def test_admission_is_one_wording_for_both_doors() -> None:
    """The same `Ask` gets the same refusal whichever door it came through; an admitted one gets
    the settings' defaults where it set nothing, and its deadline from `expires_in`."""
    s = load_settings({"max_prompt_chars": 30, "max_new_tokens": 50, "default_new_tokens": 7, "temperature": 0.3})
    counted: list[ErrorCode] = []
    adm = Admission(s, counted.append, "m", tools=False)
    key, route = RequestKey("dev", "1"), MqttRoute("p/reply/dev/1", SINK)
    long = adm.admit(key, Ask((ChatMessage("user", "x" * 31),)), route, 0.0)
    assert long == Refused(ErrorCode.TOO_LONG, "prompt is 31 characters; the limit is 30")
    many = adm.admit(key, Ask((ChatMessage("user", "hi"),), max_new_tokens=51), route, 0.0)
    assert many == Refused(ErrorCode.TOO_MANY_TOKENS, "max_new_tokens is 51; the limit is 50")
    tools = adm.admit(key, Ask((ChatMessage("user", "hi"),), tools=({"type": "function"},)), route, 0.0)
    assert isinstance(tools, Refused) and tools.code == ErrorCode.INVALID_REQUEST
    assert tools.message.startswith("m takes no tools")
    req = adm.admit(key, Ask((ChatMessage("user", "hi"),), top_k=3), route, 2.0, expires_in=5.0)
    assert isinstance(req, Request) and req.route is route and req.deadline == 7.0
    assert (req.gen.max_new_tokens, req.gen.sampling.temperature, req.gen.sampling.top_k) == (7, 0.3, 3)
    assert req.gen.sampling_requested
    assert counted == []  # a door counts what it answers
    adm.refused(ErrorCode.TOO_LONG)
    assert counted == [ErrorCode.TOO_LONG]


def test_an_assistant_turns_tool_calls_count_towards_the_prompt_length() -> None:
    """The template renders them for the model, so a client cannot slip a long prompt past
    max_prompt_chars inside a call's arguments (engine openai takes such turns over MQTT too)."""
    s = load_settings({"max_prompt_chars": 100})
    adm = Admission(s, lambda code: None, "m", tools=True)
    call = {"type": "function", "function": {"name": "f", "arguments": {"text": "x" * 100}}}
    turns = (ChatMessage("user", "hi"), ChatMessage("assistant", "", (call,)), ChatMessage("tool", "ok", (), "c1"))
    refused = adm.admit(RequestKey("dev", "1"), Ask(turns), MqttRoute("p/reply/dev/1", SINK), 0.0)
    assert isinstance(refused, Refused) and refused.code == ErrorCode.TOO_LONG
    assert Ask(turns).prompt_chars() == len("hi") + len(json.dumps([call])) + len("ok")
