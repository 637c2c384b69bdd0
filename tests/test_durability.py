"""No accepted request lost: `rkmqtt run` processes killed with SIGKILL, a broker killed and
restarted (the shipped conf's persistence and the embedded broker's), a flood, retries across a
restart, a damaged journal — against real Mosquitto brokers.

The RKLLM stand-in runs with its timing model sped up (decode 20 ms a step) so that a batch is
still running when the bridge is killed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.mqtt.journal import journal_path
from tests.bridge_process import BridgeProcess
from tests.mqtt_probe import Probe, Received
from tests.rkllm_fixtures import Standin, standin_fixture  # noqa: F401
from tests.shipped_broker import ShippedBroker, device_password

STANDIN_ENV = {"RKLLM_STANDIN_DECODE_MS": "20", "RKLLM_STANDIN_PREFILL_MS_PER_TOKEN": "0.5"}


def rkllm_bridge(standin: Standin, url: str, prefix: str, log: Path, *args: str) -> BridgeProcess:
    return BridgeProcess(
        url, prefix, log, "--engine", "rkllm", "--rkllm-library", str(standin.lib("1.3")),
        "--model", str(standin.model), "--n-batch", "4", "--rate-limit", "0", *args, env=STANDIN_ENV,
    )  # fmt: skip


def finals(probe: Probe, prefix: str) -> list[Received]:
    with probe._cond:
        return [m for m in probe.messages if m.topic.startswith(f"{prefix}/reply/") and not m.topic.endswith("/stream")]


def wait_online(probe: Probe, prefix: str, count: int = 1, timeout: float = 60) -> None:
    probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", count=count, timeout=timeout)


def test_kill_9_with_requests_running_and_waiting_and_more_sent_while_down(
    mosquitto: Mosquitto, prefix: str, standin: Standin, tmp_path: Path
) -> None:
    """32 accepted requests from 8 devices (4 running, 28 waiting), kill -9, 8 more sent while the
    bridge is down, a restart: all 40 answered, at most one of them twice."""
    bridge = rkllm_bridge(standin, mosquitto.url, prefix, tmp_path / "bridge.log").start()
    probe = Probe(mosquitto.url, [f"{prefix}/reply/#", f"{prefix}/node/+/status"])
    try:
        wait_online(probe, prefix)
        for n in range(32):
            probe.publish(f"{prefix}/request/dev{n % 8}", {"id": f"r{n}", "prompt": f"request {n} @len=50"})
        probe.wait_for(lambda m: m.topic.endswith("/stream"), timeout=30)  # the first batch runs
        bridge.kill9()
        answered_before = {m.topic for m in finals(probe, prefix)}
        assert len(answered_before) < 8, "too slow to catch requests waiting"
        for n in range(32, 40):  # sent while the bridge is down: they wait in its session
            probe.publish(f"{prefix}/request/dev{n % 8}", {"id": f"r{n}", "prompt": f"late {n} @len=5"})
        bridge.start()
        probe.wait_for(lambda m: m.topic.startswith(f"{prefix}/reply/") and "/stream" not in m.topic, count=40,
                       timeout=120)  # fmt: skip
        time.sleep(1.0)  # a duplicate would come by now
        counts = Counter(m.topic for m in finals(probe, prefix))
        assert set(counts) == {f"{prefix}/reply/dev{n % 8}/r{n}" for n in range(40)}
        assert sum(counts.values()) <= 41, counts.most_common(3)
        assert all(m.json()["status"] == "ok" for m in finals(probe, prefix))
        assert "taking up" in bridge.output()
    finally:
        bridge.stop()
        probe.close()


def test_broker_outage_requests_queued_in_devices_clients_are_all_answered(
    tmp_path_factory: pytest.TempPathFactory, prefix: str, standin: Standin, tmp_path: Path
) -> None:
    """The broker (with persistence) is killed; every device publishes one request during the
    outage, held in its own client; the broker comes back: all are answered."""
    broker = Mosquitto(workdir=tmp_path_factory.mktemp("broker"), persistence=True).start()
    bridge = rkllm_bridge(standin, broker.url, prefix, tmp_path / "bridge.log").start()
    devices = [Probe(broker.url, [f"{prefix}/reply/dev{i}/#"], client_id=f"dev{i}", persistent=True) for i in range(8)]
    watcher = Probe(broker.url, [f"{prefix}/node/+/status"])
    try:
        wait_online(watcher, prefix)
        time.sleep(1.5)  # the broker's autosave has the bridge's session
        broker.kill()
        for i, dev in enumerate(devices):
            dev.publish(f"{prefix}/request/dev{i}", {"id": "during", "prompt": f"outage {i} @len=8"}, wait=False)
        time.sleep(4)
        broker.start()
        bridge.wait_for_log("is back after", timeout=30)
        for i, dev in enumerate(devices):
            assert dev.final(f"{prefix}/reply/dev{i}/during", timeout=60)["status"] == "ok"
        out = bridge.output()
        assert out.count("connection refused") == 1, out[-2000:]  # one line per outage, not one per retry
    finally:
        bridge.stop()
        for p in [*devices, watcher]:
            p.close()
        broker.close()


def test_a_flood_loses_no_quiet_request(mosquitto: Mosquitto, prefix: str, standin: Standin, tmp_path: Path) -> None:
    """5,000 requests in about a second from one device while three quiet devices send one a
    second: every quiet request is answered ok. (Their latency beside the flood, against without
    it, is a benchmark: `python -m benchmarks.flood_fairness`.)"""
    bridge = rkllm_bridge(standin, mosquitto.url, prefix, tmp_path / "bridge.log", "--rate-limit", "120").start()
    quiet = [Probe(mosquitto.url, [f"{prefix}/reply/quiet{i}/+"]) for i in range(3)]
    flood = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
    flood.max_inflight_messages_set(1000)
    flood.connect("127.0.0.1", mosquitto.port)
    flood.loop_start()
    watcher = Probe(mosquitto.url, [f"{prefix}/node/+/status"])
    try:
        wait_online(watcher, prefix)

        def send_flood() -> None:
            for n in range(5000):
                flood.publish(f"{prefix}/request/flood", json.dumps({"id": f"f{n}", "prompt": "flood @len=3"}), 1)
                if n % 500 == 499:
                    time.sleep(0.1)  # 5,000 in about a second

        flooding = threading.Thread(target=send_flood)
        flooding.start()
        for k in range(8):
            for i, dev in enumerate(quiet):
                dev.publish(f"{prefix}/request/quiet{i}", {"id": f"l{k}", "prompt": f"quiet {k} @len=25",
                                                           "stream": False}, wait=False)  # fmt: skip
            time.sleep(1.0)
        flooding.join(60)
        for i, dev in enumerate(quiet):
            for k in range(8):
                assert dev.final(f"{prefix}/reply/quiet{i}/l{k}", timeout=60)["status"] == "ok"
    finally:
        bridge.stop()
        for p in [*quiet, watcher]:
            p.close()
        flood.disconnect()
        flood.loop_stop()


# The control: the shipped conf saving on a timer, as it did before (every 30 s; an hour here, so that
# a slow start cannot reach the first save).
ON_A_TIMER = {
    r"^autosave_on_changes true$": "autosave_on_changes false",
    r"^autosave_interval 1$": "autosave_interval 3600",
}


@pytest.mark.parametrize("conf", ["shipped", "embedded", "shipped, saved on a timer"])
def test_a_broker_killed_2_s_after_acknowledging_requests_loses_none(conf: str, tmp_path: Path, prefix: str) -> None:
    """The bridge is stopped; 8 devices each get a PUBACK for a request; 2 s later the broker is
    killed with SIGKILL and started again; then the bridge: all 8 are answered. With the shipped
    conf's persistence and the embedded broker's; the control, saving on a timer, loses them."""
    if conf.startswith("shipped"):
        shipped = ShippedBroker(tmp_path / "broker", swaps=ON_A_TIMER if "timer" in conf else None, devices=8)
        broker: Mosquitto = shipped.start()
        prefix, login = "rkmqtt", shipped.bridge_flags()
        creds = [{"username": f"dev{i}", "password": device_password(i)} for i in range(8)]
    else:
        broker = Mosquitto(workdir=tmp_path / "broker", persistence=True).start()  # as `rkmqtt run` starts it
        login, creds = ("--broker", broker.url), [{} for _ in range(8)]
    args = (*login, "--engine", "tests.fake_engine:FakeEngine", "--node-name", "durable")
    bridge = BridgeProcess(broker.url, prefix, tmp_path / "bridge.log", *args)
    devices: list[Probe] = []
    try:
        bridge.start()
        watcher = Probe(broker.url, [f"{prefix}/node/+/status"], **creds[0])
        wait_online(watcher, prefix)
        watcher.close()
        bridge.stop()  # alone: its session keeps the subscription, and requests wait there
        devices = [Probe(broker.url, [f"{prefix}/reply/dev{i}/#"], client_id=f"dev{i}", persistent=True, **creds[i])
                   for i in range(8)]  # fmt: skip
        for i, dev in enumerate(devices):
            dev.publish(f"{prefix}/request/dev{i}", {"id": "acked", "prompt": f"while down {i}"})  # waits for PUBACK
        time.sleep(2.0)
        broker.kill()
        broker.start()
        bridge.start()
        if "timer" in conf:
            time.sleep(10.0)
            assert not [m for d in devices for m in d.messages], "the control: lost with the old setting"
            return
        for i, dev in enumerate(devices):
            assert dev.final(f"{prefix}/reply/dev{i}/acked", timeout=60)["status"] == "ok"
    finally:
        bridge.stop()
        for p in devices:
            p.close()
        broker.close()


def test_a_retried_id_gets_its_recorded_reply_after_a_restart(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    bridge = BridgeProcess(mosquitto.url, prefix, tmp_path / "bridge.log", "--engine", "tests.fake_engine:FakeEngine",
                           "--dedup-window", "600").start()  # fmt: skip
    probe = Probe(mosquitto.url, [f"{prefix}/reply/dev/#", f"{prefix}/node/+/status"])
    try:
        wait_online(probe, prefix)
        probe.publish(f"{prefix}/request/dev", {"id": "once", "prompt": "only once please", "stream": False})
        first = probe.wait_for(lambda m: m.topic == f"{prefix}/reply/dev/once")[0]
        time.sleep(0.5)  # the broker's acknowledgement closes the journal entry
        bridge.kill9()
        bridge.start()
        wait_online(probe, prefix, count=2)
        probe.publish(f"{prefix}/request/dev", {"id": "once", "prompt": "only once please", "stream": False})
        again = probe.wait_for(lambda m: m.topic == f"{prefix}/reply/dev/once", count=2)[1]
        assert again.payload == first.payload  # the recorded reply, timing and all: it did not run again
        assert "recorded final reply is sent again" in bridge.output()
    finally:
        bridge.stop()
        probe.close()


def test_a_damaged_journal_is_moved_aside_and_the_bridge_serves(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    journal = journal_path(state, "rkmqtt-damaged", prefix, f"127.0.0.1:{mosquitto.port}")
    journal.write_bytes(b"this is not a database" * 100)
    bridge = BridgeProcess(mosquitto.url, prefix, tmp_path / "bridge.log", "--engine", "tests.fake_engine:FakeEngine",
                           "--state-dir", str(state), "--node-name", "damaged").start()  # fmt: skip
    probe = Probe(mosquitto.url, [f"{prefix}/reply/dev/#", f"{prefix}/node/+/status"])
    try:
        wait_online(probe, prefix)
        probe.publish(f"{prefix}/request/dev", {"id": "x", "prompt": "still served"})
        assert probe.final(f"{prefix}/reply/dev/x")["status"] == "ok"
        assert "is damaged" in bridge.output() and "moved aside" in bridge.output()
        assert len(list(state.glob(f"{journal.name}.corrupt-*"))) == 1
    finally:
        bridge.stop()
        probe.close()


def test_a_state_dir_that_cannot_be_written_is_one_line_and_exit_2(mosquitto: Mosquitto, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bridge = BridgeProcess(mosquitto.url, "t", tmp_path / "bridge.log", "--engine", "tests.fake_engine:FakeEngine",
                           "--state-dir", str(blocker / "state")).start()  # fmt: skip
    assert bridge.wait(60) == 2
    lines = [line for line in bridge.output().splitlines() if line.startswith("rkmqtt:")]
    assert len(lines) == 1 and "state_dir" in lines[0] and str(blocker / "state") in lines[0], bridge.output()


def test_a_second_bridge_with_the_same_client_id_ends_the_first_in_one_line(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    # Two machines (a cloned SD card): each its own state directory. On one machine the second would
    # not start at all: the journal is locked (tests/test_newcomer.py).
    args = ("--engine", "tests.fake_engine:FakeEngine", "--node-name", "twin")
    first = BridgeProcess(mosquitto.url, prefix, tmp_path / "first.log", *args, "--state-dir", str(tmp_path / "a"))
    first.start()
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status", f"{prefix}/reply/dev/#"])
    second = BridgeProcess(mosquitto.url, prefix, tmp_path / "second.log", *args, "--state-dir", str(tmp_path / "b"))
    try:
        wait_online(probe, prefix)
        second.start()
        assert first.wait(60) == 3
        lines = [line for line in first.output().splitlines() if "newer run of rkmqtt" in line]
        assert len(lines) == 1 and "node twin (client id rkmqtt-twin)" in lines[0], first.output()[-2000:]
        wait_online(probe, prefix, count=2)
        probe.publish(f"{prefix}/request/dev", {"id": "y", "prompt": "the second serves"})
        assert probe.final(f"{prefix}/reply/dev/y")["status"] == "ok"
    finally:
        first.stop()
        second.stop()
        probe.close()


def test_an_unreachable_broker_is_one_line_and_its_return_another(prefix: str, tmp_path: Path) -> None:
    broker = Mosquitto()  # not started yet: nothing listens on its port
    bridge = BridgeProcess(broker.url, prefix, tmp_path / "bridge.log", "--engine", "tests.fake_engine:FakeEngine")
    bridge.start()
    try:
        bridge.wait_for_log("connection refused", timeout=60)
        time.sleep(3)  # a dozen retries
        out = bridge.output()
        assert out.count("connection refused") == 1 and f"127.0.0.1:{broker.port}" in out
        assert "Client is not connected" not in out
        broker.start()
        bridge.wait_for_log("is back after", timeout=30)
    finally:
        bridge.stop()
        broker.close()
