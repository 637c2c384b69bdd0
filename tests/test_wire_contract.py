"""The wire contract against a real Mosquitto: requests, replies, refusals, limits, cancel,
expiry, de-duplication. The bridge runs in-process with the deterministic fake engine."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.protocol import ErrorReply, OkReply, StreamChunk
from rkmqtt.service import Service
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe, Received


def _is_final(prefix: str) -> Callable[[Received], bool]:
    return lambda m: m.topic.startswith(f"{prefix}/reply/") and not m.topic.endswith("/stream")


def test_plain_text_with_mosquitto_pub_streams_then_one_final(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/#"])
    subprocess.run(
        ["mosquitto_pub", "-p", str(mosquitto.port), "-t", f"{prefix}/request/kitchen", "-m", "turn on the lights"],
        check=True,
        timeout=10,
    )
    final = probe.wait_for(_is_final(prefix))[0]
    reply = OkReply.model_validate_json(final.payload)
    assert final.topic == f"{prefix}/reply/kitchen/{reply.id}"
    assert reply.text == "turn on the lights "
    assert reply.finish_reason == "stop"
    assert reply.usage.completion_tokens == 4
    assert reply.timing.total_ms >= reply.timing.queued_ms
    chunks = [StreamChunk.model_validate_json(m.payload) for m in probe.on(final.topic + "/stream")]
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert "".join(c.text for c in chunks) == reply.text
    assert len(probe.finals_under(f"{prefix}/reply/")) == 1


def test_mosquitto_rr_gets_reply_on_its_response_topic_with_correlation_data(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]
) -> None:
    start_bridge(FakeEngine())
    response = f"{prefix}/reply/rr-client/my-topic"
    out = subprocess.run(
        ["mosquitto_rr", "-p", str(mosquitto.port), "-t", f"{prefix}/request/rr-client", "-e", response,
         "-D", "PUBLISH", "correlation-data", "corr-123", "-m", json.dumps({"prompt": "hello rr", "stream": False}),
         "-W", "10", "-F", "%t %p"],
        check=True, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    topic, payload = out.stdout.strip().split(" ", 1)
    assert topic == response
    assert OkReply.model_validate_json(payload).text == "hello rr "

    probe = Probe(mosquitto.url, [response, response + "/stream"])
    try:
        probe.publish(f"{prefix}/request/rr-client", {"prompt": "again please"}, response_topic=response,
                      correlation=b"\x00\x01binary")  # fmt: skip
        final = probe.wait_for(lambda m: m.topic == response)[0]
        assert final.correlation == b"\x00\x01binary"
        stream = probe.wait_for(lambda m: m.topic == response + "/stream", count=2)
        assert all(m.correlation == b"\x00\x01binary" for m in stream)
    finally:
        probe.close()


def test_payload_fallbacks_id_reply_to_for_mqtt311(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/#"], mqtt5=False)
    probe.publish(f"{prefix}/request/ha", {"id": "abc.1", "prompt": "one two", "reply_to": f"{prefix}/reply/ha/x"})
    reply = probe.final(f"{prefix}/reply/ha/x")
    assert reply["id"] == "abc.1" and reply["text"] == "one two "


BAD_INPUTS: list[tuple[str, bytes | str, str]] = [
    ("not-utf8", b"\xff\xfe\xfa prompt", "invalid_request"),
    ("bad-json", '{"prompt": "unterminated', "invalid_request"),
    ("unknown-field", {"prompt": "hi", "temprature": 0.5}, "invalid_request"),  # type: ignore[list-item]
    ("wrong-type", {"prompt": "hi", "max_new_tokens": "ten"}, "invalid_request"),  # type: ignore[list-item]
    ("out-of-range", {"prompt": "hi", "top_p": 1.5}, "invalid_request"),  # type: ignore[list-item]
    ("both", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "invalid_request"),  # type: ignore[list-item]
    ("neither", {"system": "be brief"}, "invalid_request"),  # type: ignore[list-item]
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, "invalid_request"),  # type: ignore[list-item]
    ("oversized", "x" * 3000, "payload_too_large"),
    ("prompt-too-long", "y" * 600, "too_long"),
    ("tokens", {"prompt": "hi", "max_new_tokens": 500}, "too_many_tokens"),  # type: ignore[list-item]
    ("engine-too-long", "this is toolong for the model", "too_long"),
]


@pytest.mark.parametrize(("client", "payload", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_error_code_and_the_bridge_goes_on(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe],
    client: str, payload: bytes | str | dict[str, object], code: str,
) -> None:  # fmt: skip
    start_bridge(FakeEngine(), max_payload_bytes=2048, max_prompt_chars=500, max_new_tokens=100,
                 default_new_tokens=50)  # fmt: skip
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/{client}", payload)  # type: ignore[arg-type]
    final = probe.wait_for(_is_final(prefix))[0]
    assert final.topic.startswith(f"{prefix}/reply/{client}/")
    err = ErrorReply.model_validate_json(final.payload)
    assert err.error.code.value == code, err.error.message
    assert err.error.message
    # ...and the next good request is served.
    probe.publish(f"{prefix}/request/{client}", {"id": "next", "prompt": "still here"})
    assert probe.final(f"{prefix}/reply/{client}/next")["text"] == "still here "


def test_error_keeps_the_request_id_when_it_could_be_read(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "r-42", "prompt": "hi", "color": "blue"})
    err = probe.final(f"{prefix}/reply/dev/r-42")
    assert err["status"] == "error" and "color" in err["error"]["message"]


@pytest.mark.parametrize(
    "reply_to", ["elsewhere/topic", "PFX/reply/dev/+", "PFX/reply/#", "PFX/replyx/a", "PFX/reply/"]
)
def test_reply_topic_outside_prefix_or_with_wildcards_is_refused_on_the_default_topic(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], reply_to: str
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory(["#"])
    reply_to = reply_to.replace("PFX", prefix)
    probe.publish(f"{prefix}/request/dev", {"id": "q1", "prompt": "hi", "reply_to": reply_to})
    err = probe.final(f"{prefix}/reply/dev/q1")
    assert err["error"]["code"] == "invalid_reply_to"
    # The same via the MQTT 5 Response Topic property.
    if "#" not in reply_to and "+" not in reply_to:
        probe.publish(f"{prefix}/request/dev", {"id": "q2", "prompt": "hi"}, response_topic=reply_to)
        assert probe.final(f"{prefix}/reply/dev/q2")["error"]["code"] == "invalid_reply_to"
    published = {m.topic for m in probe.messages}
    assert all(t.startswith(f"{prefix}/") for t in published), published
    assert not any(t.startswith(f"{prefix}/reply/") and t.split("/")[2] != "dev" for t in published)


def test_illegal_client_name_is_refused(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/#"])
    bad = "bad.name with spaces"
    probe.publish(f"{prefix}/request/{bad}", {"id": "z1", "prompt": "hi"})
    err = probe.final(f"{prefix}/reply/{bad}/z1")
    assert err["error"]["code"] == "invalid_client"
    probe.publish(f"{prefix}/request/{'a' * 65}", {"id": "z2", "prompt": "hi"})
    assert probe.final(f"{prefix}/reply/{'a' * 65}/z2")["error"]["code"] == "invalid_client"


def test_rate_limit_per_client(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine(), rate_limit=6, rate_burst=3)
    probe = probe_factory([f"{prefix}/reply/#"])
    for i in range(5):
        probe.publish(f"{prefix}/request/chatty", {"id": f"c{i}", "prompt": "hi"})
    probe.publish(f"{prefix}/request/quiet", {"id": "q0", "prompt": "hi"})
    codes = [probe.final(f"{prefix}/reply/chatty/c{i}").get("error", {}).get("code") for i in range(5)]
    assert codes == [None, None, None, "rate_limited", "rate_limited"]
    assert probe.final(f"{prefix}/reply/quiet/q0")["status"] == "ok"


def test_flood_beyond_queue_is_busy_at_once_and_every_accepted_completes(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=2, continuous=True, step_s=0.02)
    start_bridge(engine, max_queue=6, rate_limit=0)
    probe = probe_factory([f"{prefix}/reply/#"])
    for i in range(20):
        probe.publish(f"{prefix}/request/flood", {"id": f"f{i}", "prompt": "tokens:8", "stream": False}, wait=False)
    finals = {m.topic.rsplit("/", 1)[1]: m for m in probe.wait_for(_is_final(prefix), count=20, timeout=30)}
    busy = [k for k, m in finals.items() if m.json()["status"] == "error"]
    ok = [k for k, m in finals.items() if m.json()["status"] == "ok"]
    assert all(finals[k].json()["error"]["code"] == "busy" for k in busy)
    assert len(busy) >= 20 - 6 - 2 - 2, busy  # at most 2 slots + 6 waiting (+2 freed meanwhile) accepted
    assert all(finals[k].json()["text"] == "".join(f"t{i} " for i in range(8)) for k in ok)
    assert len(ok) + len(busy) == 20 and len(probe.finals_under(f"{prefix}/reply/")) == 20
    # "At once": every busy answer came before the flood's first completion.
    last_busy = max(probe.messages.index(finals[k]) for k in busy)
    first_ok = min(probe.messages.index(finals[k]) for k in ok)
    assert last_busy < first_ok


def test_fairness_continuous_quiet_client_within_one_batch(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=2, continuous=True, step_s=0.02)
    start_bridge(engine, rate_limit=0)
    probe = probe_factory([f"{prefix}/reply/#"])
    for i in range(14):
        probe.publish(f"{prefix}/request/flood", {"id": f"f{i}", "prompt": "tokens:8", "stream": False})
    probe.publish(f"{prefix}/request/quiet", {"id": "q", "prompt": "tokens:8", "stream": False})
    probe.wait_for(_is_final(prefix), count=15, timeout=30)
    order = [k.split("/")[0] for batch in engine.batches for k in batch]
    # However far the flood got before q arrived, q was admitted as soon as a slot freed: at most
    # one more flood request (the one taking the other freed slot of that step) went before it.
    q_at = order.index("quiet")
    queued_flood_before_q = q_at  # flood requests admitted before q
    assert queued_flood_before_q <= 2 + 2, order


def test_fairness_static_batches(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=4, continuous=False, step_s=0.02)
    start_bridge(engine, rate_limit=0, batch_window_ms=50)
    probe = probe_factory([f"{prefix}/reply/#"])
    for i in range(12):
        probe.publish(f"{prefix}/request/flood", {"id": f"f{i}", "prompt": "tokens:5", "stream": False})
    probe.publish(f"{prefix}/request/quiet", {"id": "q", "prompt": "tokens:5", "stream": False})
    probe.wait_for(_is_final(prefix), count=13, timeout=30)
    batch_of_q = next(i for i, b in enumerate(engine.batches) if "quiet/q" in b)
    assert batch_of_q <= 1, engine.batches
    assert all(len(b) <= 4 for b in engine.batches)


def test_cancel_mid_generation_leaves_batch_mates_intact(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    for continuous in (True, False):
        engine = FakeEngine(n_batch=3, continuous=continuous, step_s=0.03)
        svc = start_bridge(engine, rate_limit=0, batch_window_ms=100)
        probe = probe_factory([f"{prefix}/reply/#"])
        tag = "c" if continuous else "s"
        for name in ("a", "b", "c"):
            probe.publish(f"{prefix}/request/{name}", {"id": f"{tag}1", "prompt": "tokens:40"})
        stream_b = f"{prefix}/reply/b/{tag}1/stream"
        probe.wait_for(lambda m, t=stream_b: m.topic == t, count=3)
        probe.publish(f"{prefix}/cancel/b", f"{tag}1")
        b = probe.final(f"{prefix}/reply/b/{tag}1")
        a = probe.final(f"{prefix}/reply/a/{tag}1")
        c = probe.final(f"{prefix}/reply/c/{tag}1")
        assert b["status"] == "ok" and b["finish_reason"] == "cancelled" and 3 <= b["usage"]["completion_tokens"] < 40
        for other in (a, c):
            assert other["finish_reason"] == "stop"
            assert other["text"] == "".join(f"t{i} " for i in range(40))
        assert engine.cancelled == [f"b/{tag}1"]
        assert len(probe.finals_under(f"{prefix}/reply/b/{tag}1")) == 1
        svc.stop(grace_s=1)


def test_cancel_while_waiting_json_form(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=1, step_s=0.03)
    start_bridge(engine)
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "long", "prompt": "tokens:30"})
    probe.publish(f"{prefix}/request/dev", {"id": "waiting", "prompt": "tokens:3"})
    probe.publish(f"{prefix}/cancel/dev", {"id": "waiting"})
    assert probe.final(f"{prefix}/reply/dev/waiting")["error"]["code"] == "cancelled"
    assert probe.final(f"{prefix}/reply/dev/long")["finish_reason"] == "stop"
    assert all("waiting" not in k for b in engine.batches for k in b)


def test_expired_request_is_answered_without_running(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=1, step_s=0.05)
    start_bridge(engine)
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "long", "prompt": "tokens:30"})
    probe.publish(f"{prefix}/request/dev", {"id": "e1", "prompt": "hi", "expires_in": 0.3})
    probe.publish(f"{prefix}/request/dev", {"id": "e2", "prompt": "hi"}, expiry=1)  # MQTT 5 Message Expiry
    assert probe.final(f"{prefix}/reply/dev/e1")["error"]["code"] == "expired"
    assert probe.final(f"{prefix}/reply/dev/e2")["error"]["code"] == "expired"
    assert probe.final(f"{prefix}/reply/dev/long")["status"] == "ok"
    assert [k for b in engine.batches for k in b] == ["dev/long"]


def test_retried_id_is_not_run_twice(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=2, step_s=0.03)
    start_bridge(engine)
    probe = probe_factory([f"{prefix}/reply/#"])
    req = {"id": "same", "prompt": "tokens:10"}
    probe.publish(f"{prefix}/request/dev", req)
    probe.publish(f"{prefix}/request/dev", req)  # retried while in flight
    first = probe.final(f"{prefix}/reply/dev/same")
    probe.publish(f"{prefix}/request/dev", req)  # retried after it finished: the reply again
    finals = probe.wait_for(lambda m: m.topic == f"{prefix}/reply/dev/same", count=2)
    assert finals[1].json() == first
    import time

    time.sleep(0.3)
    assert len(probe.on(f"{prefix}/reply/dev/same")) == 2, "one final per delivery, no more"
    assert [k for b in engine.batches for k in b] == ["dev/same"]
    # The same id from another client is another request.
    probe.publish(f"{prefix}/request/other", req)
    assert probe.final(f"{prefix}/reply/other/same")["status"] == "ok"


def test_an_in_flight_id_resent_with_another_reply_target_is_answered_duplicate_id_there(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=2, step_s=0.02)
    start_bridge(engine)
    probe = probe_factory([f"{prefix}/reply/#"])
    first_topic = f"{prefix}/reply/dev/first"
    probe.publish(f"{prefix}/request/dev", {"id": "dup", "prompt": "tokens:100"}, response_topic=first_topic,
                  correlation=b"one")  # fmt: skip
    probe.wait_for(lambda m: m.topic == f"{first_topic}/stream", 15)  # it is running
    # Another reply topic (MQTT 3.1.1's reply_to), and the same topic with other Correlation Data.
    probe.publish(f"{prefix}/request/dev", {"id": "dup", "prompt": "x", "reply_to": f"{prefix}/reply/dev/second"})
    probe.publish(f"{prefix}/request/dev", {"id": "dup", "prompt": "x"}, response_topic=first_topic,
                  correlation=b"two")  # fmt: skip
    second = probe.final(f"{prefix}/reply/dev/second", 15)
    assert second["status"] == "error" and second["error"]["code"] == "duplicate_id"
    assert "already running" in second["error"]["message"]
    [other] = probe.wait_for(lambda m: m.topic == first_topic and m.correlation == b"two", 15)
    assert other.json()["error"]["code"] == "duplicate_id"
    # The same target again (a QoS 1 redelivery, say) is not answered twice.
    probe.publish(f"{prefix}/request/dev", {"id": "dup", "prompt": "tokens:100"}, response_topic=first_topic,
                  correlation=b"one")  # fmt: skip
    # The first is still answered, once, where it asked; it ran once.
    [final] = probe.wait_for(lambda m: m.topic == first_topic and m.correlation == b"one", 30)
    assert final.json()["status"] == "ok" and final.json()["usage"]["completion_tokens"] == 100
    time.sleep(0.3)
    assert len([m for m in probe.on(first_topic) if m.correlation == b"one"]) == 1
    assert len(probe.on(f"{prefix}/reply/dev/second")) == 1
    assert [k for b in engine.batches for k in b] == ["dev/dup"]


def test_engine_failure_is_answered_engine_error(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine(n_batch=2))
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "boom", "prompt": "explode now please"})
    probe.publish(f"{prefix}/request/dev", {"id": "fine", "prompt": "all good here"})
    assert probe.final(f"{prefix}/reply/dev/boom")["error"]["code"] == "engine_error"
    assert probe.final(f"{prefix}/reply/dev/fine")["text"] == "all good here "


def test_status_info_retained_and_stats_periodic(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine(n_batch=3))
    probe = probe_factory([f"{prefix}/node/+/status", f"{prefix}/node/+/info", f"{prefix}/node/+/stats"])
    status = probe.wait_for(lambda m: m.is_node("status"))[0]
    assert status.payload == b"online" and status.retain
    info = probe.wait_for(lambda m: m.is_node("info"))[0]
    assert info.retain and info.json()["n_batch"] == 3 and info.json()["limits"]["max_queue"] == 64
    stats = probe.wait_for(lambda m: m.is_node("stats"), count=2, timeout=5)
    assert {"queue_depth", "active", "tokens_per_s", "completed"} <= set(stats[0].json())


def test_retained_request_is_not_run_on_connect(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    probe = probe_factory([f"{prefix}/reply/#"])
    subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-r", "-t", f"{prefix}/request/old",
                    "-m", '{"id": "stale", "prompt": "unlock the door"}'], check=True, timeout=10)  # fmt: skip
    engines = [FakeEngine(), FakeEngine()]
    # Two nodes of their own (one node name would make them take one session from each other), each
    # with a plain subscription, so that both get the retained request: MQTT 5 and 3.1.1.
    start_bridge(engines[0], node_name=f"v5-{prefix}", share_requests="off")
    start_bridge(engines[1], node_name=f"v311-{prefix}", share_requests="off", mqtt_version="3.1.1")
    probe.publish(f"{prefix}/request/new", {"id": "fresh", "prompt": "hello"})
    probe.final(f"{prefix}/reply/new/fresh")
    assert not probe.on(f"{prefix}/reply/old/stale")
    assert all("old/stale" not in k for e in engines for b in e.batches for k in b)


def test_quiet_client_gets_a_place_in_a_queue_the_flood_filled(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=1, step_s=0.02)
    start_bridge(engine, max_queue=4, rate_limit=0)
    probe = probe_factory([f"{prefix}/reply/#"])
    for i in range(8):
        probe.publish(f"{prefix}/request/flood", {"id": f"f{i}", "prompt": "tokens:10", "stream": False})
    probe.publish(f"{prefix}/request/quiet", {"id": "q", "prompt": "tokens:2", "stream": False})
    assert probe.final(f"{prefix}/reply/quiet/q")["status"] == "ok"
    finals = probe.wait_for(_is_final(prefix), count=9)
    codes = [m.json().get("error", {}).get("code") for m in finals if "/flood/" in m.topic]
    assert codes.count("busy") >= 3 and codes.count(None) >= 4, codes


def test_deeply_nested_payload_is_refused_not_dropped(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}")
    err = probe.wait_for(_is_final(prefix))[0].json()
    assert err["error"]["code"] == "invalid_request"
    probe.publish(f"{prefix}/request/dev", "[" * 1500)  # plain text that merely looks like brackets
    texts = probe.wait_for(_is_final(prefix), count=2)[1].json()
    assert texts["status"] == "ok" and texts["text"] == "[" * 1500 + " "


def test_response_topic_wins_over_reply_to_and_other_clients_topics_are_refused(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "p1", "prompt": "hi", "reply_to": f"{prefix}/reply/dev/payload"},
                  response_topic=f"{prefix}/reply/dev/property")  # fmt: skip
    assert probe.final(f"{prefix}/reply/dev/property")["id"] == "p1"
    probe.publish(f"{prefix}/request/dev", {"id": "p2", "prompt": "hi", "reply_to": f"{prefix}/reply/victim/x"})
    assert probe.final(f"{prefix}/reply/dev/p2")["error"]["code"] == "invalid_reply_to"
    assert not probe.on(f"{prefix}/reply/dev/payload") and not probe.on(f"{prefix}/reply/victim/x")


def test_static_batch_cancel_keeps_the_batch_together(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    engine = FakeEngine(n_batch=4, continuous=False, step_s=0.03)
    start_bridge(engine, rate_limit=0, batch_window_ms=300)
    probe = probe_factory([f"{prefix}/reply/#"])
    for name in ("a", "b", "c"):
        probe.publish(f"{prefix}/request/{name}", {"id": "s", "prompt": "tokens:30"})
    probe.wait_for(lambda m: m.topic == f"{prefix}/reply/b/s/stream", count=2)
    probe.publish(f"{prefix}/cancel/b", "s")
    finals = {n: probe.final(f"{prefix}/reply/{n}/s") for n in ("a", "b", "c")}
    assert engine.batches == [["a/s", "b/s", "c/s"]]
    assert finals["b"]["finish_reason"] == "cancelled"
    assert finals["a"]["text"] == finals["c"]["text"] == "".join(f"t{i} " for i in range(30))
    assert {f["batch"]["size"] for f in finals.values()} == {3}


def test_every_request_during_shutdown_gets_one_final(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    import threading
    import time

    svc = start_bridge(FakeEngine(n_batch=2, step_s=0.01), rate_limit=0)
    probe = probe_factory([f"{prefix}/reply/#"])
    sent = []

    def flood() -> None:
        for i in range(150):
            probe.publish(f"{prefix}/request/dev", {"id": f"d{i}", "prompt": "tokens:3", "stream": False}, wait=False)
            sent.append(i)
            time.sleep(0.002)

    t = threading.Thread(target=flood)
    t.start()
    time.sleep(0.1)
    svc.stop(grace_s=2)
    t.join()
    time.sleep(0.5)
    # Each request that reached the broker while the bridge listened got exactly one final reply;
    # the rest (after it unsubscribed) were never delivered to it — none got two.
    finals = [m for m in probe.messages if _is_final(prefix)(m)]
    per_topic: dict[str, int] = {}
    for m in finals:
        per_topic[m.topic] = per_topic.get(m.topic, 0) + 1
    assert finals and set(per_topic.values()) == {1}
    codes = {m.json().get("error", {}).get("code") for m in finals}
    assert codes <= {None, "shutting_down"}
    answered = sorted(int(t.rsplit("/d", 1)[1]) for t in per_topic)
    assert answered == list(range(len(answered))), "a request in the middle went unanswered"


class _CancelFails(FakeEngine):
    def cancel(self, key: str) -> None:
        raise RuntimeError("engine cancel is broken")


def test_engine_cancel_raising_does_not_lose_replies(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    svc = start_bridge(_CancelFails(n_batch=2, step_s=0.02))
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "c1", "prompt": "tokens:20"})
    probe.wait_for(lambda m: m.topic.endswith("c1/stream"))
    probe.publish(f"{prefix}/cancel/dev", "c1")
    assert probe.final(f"{prefix}/reply/dev/c1")["finish_reason"] == "cancelled"
    probe.publish(f"{prefix}/request/dev", {"id": "c2", "prompt": "still fine"})
    assert probe.final(f"{prefix}/reply/dev/c2")["text"] == "still fine "
    assert svc.scheduler is not None and not svc.scheduler.stopped


def test_stats_add_up_after_a_flood_with_bumping_cancels_and_expiries(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    """Every way a request can end at once: served, bumped by a quiet device, refused busy,
    cancelled while waiting and while running, expired, refused at intake, retried. Afterwards
    `P/stats` adds up: requests_total = completed + errors = distinct final replies, and
    `repeated` counts the finals sent again for retried ids."""
    engine = FakeEngine(n_batch=2, continuous=True, step_s=0.02)
    start_bridge(engine, max_queue=5, rate_limit=0, dedup_window=60)
    probe = probe_factory([f"{prefix}/reply/#", f"{prefix}/node/+/stats"])
    for i in range(12):
        probe.publish(f"{prefix}/request/flood", {"id": f"f{i}", "prompt": "tokens:30", "stream": False}, wait=False)
    for q in ("q1", "q2", "q3"):  # each bumps the flood's newest
        probe.publish(f"{prefix}/request/{q}", {"id": "a", "prompt": "tokens:3", "stream": False}, wait=False)
    probe.publish(f"{prefix}/request/late", {"id": "x", "prompt": "tokens:3", "expires_in": 0.05}, wait=False)
    probe.publish(f"{prefix}/request/bad", b"{not json", wait=False)
    probe.publish(f"{prefix}/cancel/flood", b"f0", wait=False)  # running
    probe.publish(f"{prefix}/cancel/flood", b"f3", wait=False)  # waiting, if it was not bumped
    expected = 12 + 3 + 1 + 1
    finals = probe.wait_for(_is_final(prefix), count=expected, timeout=60)
    probe.publish(f"{prefix}/request/q1", {"id": "a", "prompt": "tokens:3", "stream": False})  # a retry
    probe.wait_for(lambda m: m.topic == f"{prefix}/reply/q1/a", count=2, timeout=20)
    codes = [m.json().get("error", {}).get("code") or m.json()["finish_reason"] for m in finals]
    assert {"busy", "expired", "invalid_request", "cancelled"} <= set(codes), codes
    assert len({m.topic for m in finals}) == expected  # one final per request

    def settled(m: Received) -> bool:
        s = m.json() if m.is_node("stats") else None
        return bool(s) and s["repeated"] == 1 and s["active"] == 0 and s["queue_depth"] == 0

    stats = probe.wait_for(settled, timeout=20)[0].json()
    assert stats["requests_total"] == stats["completed"] + stats["errors"] == expected, stats
    assert sum(stats["errors_by_code"].values()) == stats["errors"]
    assert stats["completed"] == sum(1 for m in finals if m.json()["status"] == "ok")
