"""Logs bounded per second: the budget as a table on a fake clock, and a real bridge (`rkmqtt run`)
flooded with 5,000 refused requests and 5,000 cancels of unknown ids, whose log stays a few lines."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rkmqtt.logbudget import LogBudget
from rkmqtt.mqtt.broker import Mosquitto
from tests.bridge_process import BridgeProcess
from tests.mqtt_probe import Probe


def _messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    """This test's lines only: a bridge of an earlier test may still summarise its own window."""
    return [r.getMessage() for r in caplog.records if r.name == logger]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_few_lines_per_window_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = LogBudget(window_s=10.0, per_window=3, max_clients=2, clock=clock)
    log = logging.getLogger("test.budget")
    caplog.set_level(logging.INFO, "test.budget")
    allowed = [budget.allow(log, logging.WARNING, "refusals", "kitchen") for _ in range(5000)]
    assert allowed[:3] == [True] * 3 and not any(allowed[3:])
    assert budget.allow(log, logging.WARNING, "refusals", "hall"), "another client has a budget of its own"
    assert budget.allow(log, logging.WARNING, "cancels of unknown ids", "kitchen"), "and another kind"
    # Beyond max_clients, new clients share one budget.
    assert [budget.allow(log, logging.WARNING, "refusals", f"c{i}") for i in range(5)] == [True] * 3 + [False] * 2
    assert _messages(caplog, "test.budget") == []
    clock.now = 10.0
    assert budget.allow(log, logging.WARNING, "refusals", "kitchen"), "a new window"
    assert sorted(_messages(caplog, "test.budget")) == [
        "… and 2 more refusals of other clients in the last 10 s",
        "… and 4,997 more refusals of client kitchen in the last 10 s",
    ]
    caplog.clear()
    budget.flush()
    assert _messages(caplog, "test.budget") == [], "nothing held back in the new window yet"


def test_the_summary_comes_when_the_window_ends_without_another_line(caplog: pytest.LogCaptureFixture) -> None:
    budget = LogBudget(window_s=0.3, per_window=1)
    log = logging.getLogger("test.budget.timer")
    caplog.set_level(logging.INFO, "test.budget.timer")
    for _ in range(10):
        budget.allow(log, logging.INFO, "refusals", "kitchen")
    deadline = time.monotonic() + 5
    while not _messages(caplog, "test.budget.timer") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _messages(caplog, "test.budget.timer") in (
        ["… and 9 more refusals of client kitchen in the last 0 s"],
        ["… and 9 more refusals of client kitchen in the last 1 s"],
    )


def test_5000_refusals_and_5000_unknown_cancels_write_a_bounded_log(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    log = tmp_path / "bridge.log"
    bridge = BridgeProcess(mosquitto.url, prefix, log, "--engine", "tests.fake_engine:FakeEngine",
                           "--rate-limit", "1", "--rate-burst", "1")  # fmt: skip
    bridge.start()
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status", f"{prefix}/reply/flood/#"])
    flood = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood", protocol=mqtt.MQTTv5)
    flood.max_inflight_messages_set(1000)
    flood.connect("127.0.0.1", mosquitto.port)
    flood.loop_start()
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 60)
        before = log.read_bytes()

        def send() -> None:
            for n in range(5000):
                flood.publish(f"{prefix}/request/flood", json.dumps({"id": f"r{n}", "prompt": "hi"}), 1)
                flood.publish(f"{prefix}/cancel/flood", f"nobody{n}", 1)

        t0 = time.monotonic()
        sender = threading.Thread(target=send)
        sender.start()
        sender.join(60)
        # Every request gets its final reply (one ok, the rest rate_limited) ...
        probe.wait_for(lambda m: m.topic.startswith(f"{prefix}/reply/flood/"), count=5000, timeout=120)
        # ... and the log: a few lines of each kind per 10 s window, then one summary each when the
        # window ends (on a slow machine the flood spans more than one window).
        bridge.wait_for_log("more refusals of client flood in the last", timeout=30)
        bridge.wait_for_log("more cancels of unknown ids of client flood in the last", timeout=30)
        windows = int((time.monotonic() - t0) // 10) + 2
        written = log.read_bytes()[len(before) :].decode()
        lines = written.splitlines()
        # Per window and kind: 5 lines and a summary; and the one request that ran.
        assert len(lines) <= windows * 2 * 6 + 2 and len(written) < windows * 2000, written
        refused = [m for m in probe.finals_under(f"{prefix}/reply/flood/") if b"rate_limited" in m.payload]
        assert len(refused) >= 4990, "one a minute, after the first"
    finally:
        flood.disconnect()
        flood.loop_stop()
        bridge.stop()
        probe.close()
