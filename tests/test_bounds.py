"""What one request can cost the bridge: Correlation Data and reply topic length are capped and
refused with their own codes (against a real Mosquitto), the outgoing queue is bounded in bytes
as well as messages, and a request writes at most one log line of bounded length, whatever it
sends and however many chunks it gets."""

from __future__ import annotations

import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rkmqtt.mqtt.outbox import Outbox, Outgoing, Publisher
from rkmqtt.protocol import ErrorCode
from rkmqtt.service import Service
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe


def _rkmqtt_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("rkmqtt") and r.levelno >= logging.INFO]


def test_correlation_data_over_the_cap_is_refused_and_never_echoed(
    prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine(), max_correlation_bytes=256)
    probe = probe_factory([f"{prefix}/reply/#"])
    asked = f"{prefix}/reply/dev/mine"
    probe.publish(f"{prefix}/request/dev", {"id": "big", "prompt": "tokens:200"}, response_topic=asked,
                  correlation=b"\xab" * 65_535)  # fmt: skip
    [final] = probe.wait_for(lambda m: m.topic == asked)
    assert final.json()["error"]["code"] == ErrorCode.CORRELATION_TOO_LARGE.value
    assert "65535 bytes; the limit is 256" in final.json()["error"]["message"]
    assert final.correlation is None, "an oversized correlation is never echoed"
    # At the cap it is accepted and echoed on every chunk and the final.
    corr = b"\x01" * 256
    probe.publish(f"{prefix}/request/dev", {"id": "ok", "prompt": "tokens:5"}, response_topic=f"{asked}2",
                  correlation=corr)  # fmt: skip
    [ok] = probe.wait_for(lambda m: m.topic == f"{asked}2")
    assert ok.json()["status"] == "ok" and ok.correlation == corr
    chunks = probe.on(f"{asked}2/stream")
    assert len(chunks) == 5 and all(c.correlation == corr for c in chunks)
    # The refused one cost one small reply: no chunk ever went out for it.
    assert probe.on(f"{asked}/stream") == []
    assert sum(len(m.payload) + len(m.correlation or b"") for m in probe.finals_under(f"{prefix}/reply/")) < 4096


@pytest.mark.parametrize("how", ["response_topic", "reply_to"])
def test_a_reply_topic_over_the_cap_is_refused_on_the_default_topic_with_one_short_log_line(
    how: str,
    prefix: str,
    start_bridge: Callable[..., Service],
    probe_factory: Callable[..., Probe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_bridge(FakeEngine(), max_reply_topic_chars=256, max_payload_bytes=200_000)
    probe = probe_factory([f"{prefix}/reply/#"])
    long_topic = f"{prefix}/reply/dev/" + "x" * 65_000
    caplog.set_level(logging.INFO)
    if how == "response_topic":
        probe.publish(f"{prefix}/request/dev", {"id": "long", "prompt": "tokens:100"}, response_topic=long_topic)
    else:
        probe.publish(f"{prefix}/request/dev", {"id": "long", "prompt": "tokens:100", "reply_to": long_topic})
    reply = probe.final(f"{prefix}/reply/dev/long")
    assert reply["error"]["code"] == ErrorCode.REPLY_TO_TOO_LONG.value
    assert reply["error"]["message"] == f"reply topic is {len(long_topic)} characters; the limit is 256"
    # Just under the cap is fine.
    fits = f"{prefix}/reply/dev/" + "y" * (256 - len(f"{prefix}/reply/dev/"))
    probe.publish(f"{prefix}/request/dev", {"id": "fits", "prompt": "tokens:3", "reply_to": fits})
    assert probe.final(fits)["status"] == "ok"
    lines = [r for r in _rkmqtt_records(caplog) if "dev/long" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage()[:200] for r in lines]
    assert len(lines[0].getMessage()) < 300 and lines[0].exc_info is None
    assert sum(len(r.getMessage()) for r in _rkmqtt_records(caplog)) < 5000


def test_a_long_request_logs_one_line_not_one_per_chunk(
    prefix: str,
    start_bridge: Callable[..., Service],
    probe_factory: Callable[..., Probe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_bridge(FakeEngine(step_s=0.001), max_new_tokens=1000)
    probe = probe_factory([f"{prefix}/reply/#"])
    caplog.set_level(logging.INFO)
    probe.publish(f"{prefix}/request/dev", {"id": "t1", "prompt": "tokens:1000", "max_new_tokens": 1000})
    assert probe.final(f"{prefix}/reply/dev/t1", 60)["usage"]["completion_tokens"] == 1000
    lines = [r.getMessage() for r in _rkmqtt_records(caplog) if "dev/t1" in r.getMessage()]
    assert len(lines) == 1 and "done (stop, 1000 tokens" in lines[0], lines


def test_the_outbox_is_bounded_in_bytes_and_keeps_final_replies() -> None:
    box = Outbox(maxsize=1000, max_bytes=10_000)
    chunk = Outgoing("p/reply/a/1/stream", b"x" * 982, qos=0, droppable=True)  # 1000 bytes with its topic
    assert chunk.size == 1000
    assert [box.put(chunk) for _ in range(12)] == [True] * 10 + [False] * 2
    assert box.queued_bytes == 10_000 and box.dropped == 2
    final = Outgoing("p/reply/a/1", b"y" * 5000, qos=1, correlation=b"c" * 100)
    assert box.put(final) and box.queued_bytes == 15_111  # a final reply is owed: kept past the bound
    assert not box.put(chunk)
    assert box.get(0.1) == chunk and box.queued_bytes == 14_111
    box.done()
    while box.get(0.01) is not None:
        box.done()
    assert box.queued_bytes == 0 and box.put(chunk)


def test_a_failing_reply_topic_is_logged_once_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    # A real paho client refuses to publish on a topic with a wildcard, as on one too long.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="publisher-test")
    box = Outbox(maxsize=10_000)
    publisher = Publisher(box, client, mqtt5=True, is_connected=lambda: True)
    bad = "p/reply/a/+" + "z" * 5000
    caplog.set_level(logging.INFO)
    for seq in range(500):
        box.put(Outgoing(f"{bad}/stream", b'{"seq": %d}' % seq, qos=0, droppable=True))
    box.put(Outgoing(bad, b"{}", qos=1))
    publisher.start()
    try:
        assert box.wait_empty(20)
    finally:
        publisher.stop()
    assert publisher.failed == 501
    lines = [r for r in caplog.records if r.name == "rkmqtt.mqtt.outbox"]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert len(lines[0].getMessage()) < 400 and "ValueError" in lines[0].getMessage()


def test_acknowledgements_nobody_waits_for_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """paho reports every QoS 0 chunk through on_publish as well: thousands a second that no final
    reply waits for. Half a second of them is kept (a PUBACK may overtake its registration), no more.
    (What keeping them costs per chunk shows in `rkmqtt bench`'s relay figures.)"""
    import rkmqtt.mqtt.outbox as outbox

    now = [100.0]
    monkeypatch.setattr(outbox.time, "monotonic", lambda: now[0])
    publisher = Publisher(Outbox(maxsize=10), mqtt.Client(CallbackAPIVersion.VERSION2), True, lambda: True)
    for mid in range(1, 3001):  # 3 s of chunks at 1000 a second
        now[0] += 0.001
        publisher.acknowledged(None, None, mid, None, None)  # type: ignore[arg-type]
        assert len(publisher._early) <= 500
    delivered: list[int] = []
    publisher._register(3000, lambda: delivered.append(3000))  # its PUBACK came a moment ago
    publisher._register(5, lambda: delivered.append(5))  # 3 s ago: that was another message with this id
    assert delivered == [3000] and publisher.awaiting == 1
    publisher.acknowledged(None, None, 5, None, None)  # type: ignore[arg-type]
    assert delivered == [3000, 5] and publisher.awaiting == 0
