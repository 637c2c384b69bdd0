"""A bridge with engine openai in front of a real OpenAI-compatible server: `rkmqtt run` serving the
numpy engine (SmolLM2-135M) over its HTTP API, as a process that the tests kill and restart.
MQTT devices ask the front bridge; the upstream rkmqtt generates; its health file shows how many
requests its engine runs."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from tests.upstream_server import Device, UpstreamRkmqtt

QUESTION = "What is the capital of France?"
# Greedy SmolLM2-135M goes on counting far beyond what the tests wait for.
LONG = "Count from 1 to 1000, one number per line."


@pytest.fixture
def upstream_factory(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Callable[..., UpstreamRkmqtt]]:
    made: list[UpstreamRkmqtt] = []

    def make(*args: str) -> UpstreamRkmqtt:
        up = UpstreamRkmqtt(mosquitto.url, tmp_path, *args)
        made.append(up)
        return up.start()

    yield make
    for up in made:
        up.stop()


def test_six_mqtt_requests_at_once_are_answered_by_the_upstream(
    upstream_factory: Callable[..., UpstreamRkmqtt], start_front: Callable[..., Service], device: Device
) -> None:
    """n_batch 6: six devices' requests stream from the upstream at once; its answer and its usage
    come back over MQTT, and over the front's own HTTP API. The upstream takes 7 requests at once
    from its one HTTP client and refuses the next (429): that request alone is `rate_limited`."""
    up = upstream_factory("--rate-burst", "7", "--rate-limit", "1", "--http-wait-s", "0")  # refuse, not wait
    port = free_port()
    start_front(up.url, n_batch=6, http_listen=f"127.0.0.1:{port}")
    direct = openai.OpenAI(base_url=up.url, api_key="none", max_retries=0, timeout=120)
    model = direct.models.list().data[0].id
    msgs: Any = [{"role": "user", "content": QUESTION}]
    alone = direct.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    assert alone.usage is not None and "Paris" in (alone.choices[0].message.content or "")

    rids = [device.send({"prompt": QUESTION, "max_new_tokens": 12}) for _ in range(6)]
    replies = [device.final(rid, 120) for rid in rids]
    for reply in replies:
        assert reply["status"] == "ok", reply
        assert "Paris" in reply["text"] and reply["model"] == model
        assert reply["usage"]["prompt_tokens"] == alone.usage.prompt_tokens
        assert reply["batch"]["size"] == 6, "six in flight at once"
        chunks = [json.loads(m.payload) for m in device.probe.on(f"{device.prefix}/reply/dev/{reply['id']}/stream")]
        assert "".join(c["text"] for c in chunks) == reply["text"]
    log = up.process.output()
    assert log.count("request http/") >= 7, "the upstream generated them"
    # Its engine ran them together (its log, not its health file: a once-a-second sample can miss
    # a batch that lasts about a second).
    batches = [int(n) for n in re.findall(r"request http/\S+: done \(.*?batch of (\d+)", log)]
    assert max(batches) >= 2, log[-3000:]

    refused = device.ask({"prompt": QUESTION, "max_new_tokens": 4}, 60)
    assert refused["error"]["code"] == "rate_limited" and "answered 429" in refused["error"]["message"]
    stats = device.stats(lambda s: s["errors"] == 1)
    assert stats["engine_ready"] and stats["completed"] == 6


def test_a_cancel_ends_the_upstream_generation(
    upstream_factory: Callable[..., UpstreamRkmqtt], start_front: Callable[..., Service], device: Device
) -> None:
    up = upstream_factory()
    start_front(up.url)
    rid = device.send({"prompt": LONG, "max_new_tokens": 1000})
    device.first_chunk(rid)
    assert up.wait_active(lambda n: n == 1) == 1
    device.probe.publish(f"{device.prefix}/cancel/dev", rid)
    reply = device.final(rid)
    assert reply["finish_reason"] == "cancelled"
    up.wait_active(lambda n: n == 0, 10)  # within seconds, not after 1000 tokens
    up.process.wait_for_log("the HTTP client went away; cancelling it", 10)


def test_the_upstream_killed_and_restarted_mid_stream(
    upstream_factory: Callable[..., UpstreamRkmqtt],
    start_front: Callable[..., Service],
    device: Device,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The running request ends at once with an error that says what happened; the front shows its
    engine unavailable (one log line) while requests wait; once the upstream is back, they run."""
    caplog.set_level(logging.INFO, logger="rkmqtt.engines.openai")
    up = upstream_factory()
    start_front(up.url)
    rid = device.send({"prompt": LONG, "max_new_tokens": 1000})
    device.first_chunk(rid)
    up.kill9()
    broken = device.final(rid, 20)
    assert broken["error"]["code"] == "engine_error" and "upstream" in broken["error"]["message"], broken
    down = device.stats(lambda s: not s["engine_ready"], 30)
    assert up.url in down["engine_problem"]
    waiting = device.send({"prompt": QUESTION, "max_new_tokens": 8})
    time.sleep(2)
    assert not device.probe.on(f"{device.prefix}/reply/dev/{waiting}"), "it waits for the upstream"
    t0 = time.monotonic()
    up.start()
    answered = device.final(waiting, 60)
    assert answered["status"] == "ok" and "Paris" in answered["text"], answered
    assert time.monotonic() - t0 < 60
    assert device.stats(lambda s: s["engine_ready"], 30)["engine_problem"] is None
    lines = [r.getMessage() for r in caplog.records if r.name == "rkmqtt.engines.openai.link"]
    assert len([m for m in lines if "unavailable" in m]) == 1, lines
    assert up.url in lines[0]
