"""Broker outages, scale-out with shared subscriptions, and shutdown on SIGTERM — with real
Mosquitto processes and, for shutdown, `rkmqtt run` as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from rkmqtt.mqtt.broker import Mosquitto, free_port, port_answers
from rkmqtt.service import Service
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[1]


def test_broker_killed_mid_generation_and_restarted(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]
) -> None:
    engine = FakeEngine(n_batch=4, step_s=0.05)
    svc = start_bridge(engine, rate_limit=0)
    # The device keeps a persistent session, as a real device that must not miss its reply does.
    probe = Probe(mosquitto.url, [f"{prefix}/reply/+/+"], client_id="device-1", persistent=True)
    try:
        for i in range(3):
            probe.publish(f"{prefix}/request/dev", {"id": f"r{i}", "prompt": "tokens:60", "stream": False})
        deadline = time.monotonic() + 10
        while engine.active() < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.active() == 3
        time.sleep(0.3)
        mosquitto.kill()
        assert svc.bridge is not None
        deadline = time.monotonic() + 5
        while svc.bridge.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not svc.bridge.connected
        time.sleep(1.5)  # generation goes on without a broker
        mosquitto.start()
        assert svc.bridge.wait_connected(30), "the bridge did not reconnect by itself"
        assert probe.wait_connected(30)
        for i in range(3):
            reply = probe.final(f"{prefix}/reply/dev/r{i}", timeout=30)
            assert reply["status"] == "ok" and reply["text"] == "".join(f"t{k} " for k in range(60))
        # Status and info were republished on reconnect, and new requests are served.
        probe2 = Probe(mosquitto.url, [f"{prefix}/node/+/status", f"{prefix}/reply/#"])
        try:
            assert probe2.wait_for(lambda m: m.is_node("status"))[0].payload == b"online"
            probe2.publish(f"{prefix}/request/dev", {"id": "after", "prompt": "back again"})
            assert probe2.final(f"{prefix}/reply/dev/after")["text"] == "back again "
        finally:
            probe2.close()
        assert svc.bridge.connects >= 2
    finally:
        probe.close()


def test_two_bridges_share_one_broker(mosquitto: Mosquitto, prefix: str) -> None:
    engines = [FakeEngine(n_batch=2, step_s=0.01), FakeEngine(n_batch=2, step_s=0.01)]
    services = []
    for i, eng in enumerate(engines):
        svc = Service(bridge_settings(mosquitto.url, prefix, shared_group="llm", rate_limit=0, node_name=f"b{i}"),
                      engine=eng)  # fmt: skip
        svc.start()
        assert svc.bridge is not None and svc.bridge.wait_connected(10)
        services.append(svc)
    probe = Probe(mosquitto.url, [f"{prefix}/reply/+/+"])
    try:
        time.sleep(0.3)
        for n in range(50):
            probe.publish(f"{prefix}/request/dev{n % 5}", {"id": f"q{n}", "prompt": f"tokens:{3 + n % 4}"})
        finals = probe.wait_for(lambda m: True, count=50, timeout=60)
        time.sleep(0.5)  # any duplicate would arrive by now
        topics = Counter(m.topic for m in probe.messages)
        assert len(topics) == 50 and set(topics.values()) == {1}, topics.most_common(3)
        assert all(m.json()["status"] == "ok" for m in finals)
        served = [sum(len(b) for b in e.batches) for e in engines]
        assert sum(served) == 50 and min(served) > 0, served
    finally:
        probe.close()
        for svc in services:
            svc.stop(grace_s=1)


def _run_bridge_process(url: str, prefix: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RKMQTT_LOG_LEVEL": "INFO"}
    return subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "run", "--broker", url, "--topic-prefix", prefix,
         "--engine", "tests.fake_engine:FakeEngine", "--no-discovery", "--rate-limit", "0", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip


def test_sigterm_alone_keeps_the_queue_for_the_restart(mosquitto: Mosquitto, prefix: str) -> None:
    """32 requests accepted (4 running, 28 waiting), SIGTERM, 4 more sent while it stops: the running
    ones finish within the grace period; the waiting ones stay in the journal and the late ones with
    the broker; after the restart all 36 are answered ok, each once."""
    probe = Probe(mosquitto.url, [f"{prefix}/reply/+/+", f"{prefix}/node/+/status"])
    args = ("--grace-period", "20", "--node-name", "solo")
    proc = _run_bridge_process(mosquitto.url, prefix, *args)
    again = None
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", timeout=30)
        # FakeEngine(): 4 slots, 10 ms a step. Four run (1.5 s each), 28 wait.
        for n in range(32):
            probe.publish(f"{prefix}/request/dev{n % 8}", {"id": f"x{n}", "prompt": "tokens:150", "stream": False})
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        for n in range(32, 36):
            probe.publish(f"{prefix}/request/dev{n % 8}", {"id": f"x{n}", "prompt": "tokens:5", "stream": False})
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        shutdown = re.search(r"(\d+) running get up to 20 s; 0 waiting answered, (\d+) kept for the next start", out)
        assert shutdown is not None and int(shutdown[2]) >= 20, out[-2000:]
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"offline", timeout=10)
        # Only the running ones are answered before the restart; the late four may reach the queue
        # before the signal does (a loaded machine), and are then kept with the waiting ones.
        first = {m.topic: m.json() for m in probe.finals_under(f"{prefix}/reply/")}
        assert len(first) == int(shutdown[1]) and all(v["status"] == "ok" for v in first.values()), first
        again = _run_bridge_process(mosquitto.url, prefix, *args)
        probe.wait_for(lambda m: "/reply/" in m.topic, count=36, timeout=60)
        time.sleep(0.5)  # a second answer would be here by now
        finals = probe.finals_under(f"{prefix}/reply/")
        assert Counter(m.topic for m in finals) == Counter(f"{prefix}/reply/dev{n % 8}/x{n}" for n in range(36))
        assert all(m.json()["status"] == "ok" for m in finals), [m.json() for m in finals if m.json()["status"] != "ok"]
    finally:
        for p in (proc, again):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=30)
        probe.close()


def test_sigterm_with_another_node_online_answers_the_waiting_for_it_to_take(mosquitto: Mosquitto, prefix: str) -> None:
    """Two nodes share; one stops: its waiting requests are answered shutting_down at once (its
    journal is on its own disk), and their retries are served by the other node."""
    probe = Probe(mosquitto.url, [f"{prefix}/reply/+/+", f"{prefix}/node/+/info"])
    a = _run_bridge_process(mosquitto.url, prefix, "--grace-period", "20", "--node-name", "a")
    b = _run_bridge_process(mosquitto.url, prefix, "--grace-period", "20", "--node-name", "b")
    try:
        for node in ("a", "b"):
            probe.wait_for(lambda m, n=node: m.topic == f"{prefix}/node/{n}/info" and m.json()["share"] == "shared", 60)  # type: ignore[misc]
        for n in range(24):
            probe.publish(f"{prefix}/request/dev{n % 8}", {"id": f"y{n}", "prompt": "tokens:150", "stream": False})
        time.sleep(0.5)
        a.send_signal(signal.SIGTERM)
        out, _ = a.communicate(timeout=60)
        assert a.returncode == 0 and ", 0 kept for the next start" in out, out[-2000:]
        probe.wait_for(lambda m: "/reply/" in m.topic, count=24, timeout=60)
        finals = {m.topic: m.json() for m in probe.finals_under(f"{prefix}/reply/")}
        down = [t for t, v in finals.items() if v["status"] == "error"]
        assert down and all(finals[t]["error"]["code"] == "shutting_down" for t in down), finals
        for t in down:  # the devices send them again: the other node answers
            dev, rid = t.split("/")[-2:]
            probe.publish(f"{prefix}/request/{dev}", {"id": rid, "prompt": "tokens:5", "stream": False})
        probe.wait_for(lambda m: "/reply/" in m.topic, count=24 + len(down), timeout=60)
        retried = [m.json() for m in probe.finals_under(f"{prefix}/reply/")][24:]
        assert all(r["status"] == "ok" and r["node"] == "b" for r in retried), retried
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=30)
        probe.close()


def test_sigterm_grace_period_cuts_long_requests(mosquitto: Mosquitto, prefix: str) -> None:
    probe = Probe(mosquitto.url, [f"{prefix}/reply/#", f"{prefix}/node/+/status"])
    proc = _run_bridge_process(mosquitto.url, prefix, "--grace-period", "0.5")
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", timeout=30)
        probe.publish(f"{prefix}/request/dev", {"id": "long", "prompt": "tokens:100000", "max_new_tokens": 1000})
        probe.wait_for(lambda m: m.topic.endswith("/stream"), timeout=10)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert time.monotonic() - t0 < 10
        assert probe.final(f"{prefix}/reply/dev/long")["error"]["code"] == "shutting_down"
    finally:
        if proc.poll() is None:
            proc.kill()
        probe.close()


def test_embedded_broker_when_none_is_configured(tmp_path: Path) -> None:
    """`rkmqtt run` with no broker starts a private Mosquitto. Port 1883 is taken on this machine
    by the system broker, so the test runs the bridge in a network namespace of its own where
    localhost:1883 is free — or, without the rights for that, checks the decision logic directly."""
    from rkmqtt.settings import load_settings

    svc = Service(load_settings({"topic_prefix": "emb", "discovery": False}), engine=FakeEngine())
    svc._ensure_broker()
    if svc.embedded is None:
        # Something answers on localhost:1883 (the machine's own broker): it is used, not replaced.
        assert svc.settings.broker == "mqtt://127.0.0.1:1883"
    else:
        assert svc.embedded.port == 1883
        svc.embedded.close()
    ns = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    unshare = subprocess.run([*ns, "true"], capture_output=True)
    assert unshare.returncode == 0, "network namespaces are needed for this test: " + unshare.stderr.decode()
    script = (
        "ip link set lo up; "
        f"{sys.executable} -m rkmqtt run --engine tests.fake_engine:FakeEngine --no-discovery "
        "--topic-prefix emb > log.txt 2>&1 & pid=$!; "
        "for i in $(seq 1 100); do "
        "mosquitto_sub -p 1883 -t 'emb/node/+/status' -C 1 -W 1 2>/dev/null | grep -q online && break; "
        "sleep 0.1; done; "
        'mosquitto_rr -p 1883 -t emb/request/cli -e emb/reply/cli/one -m \'{"id":"one","prompt":"hi there"}\' -W 10; '
        "kill -TERM $pid; wait $pid; echo exit=$?; "
        "sleep 0.2; (echo > /dev/tcp/127.0.0.1/1883) 2>/dev/null && echo broker-still-up || echo broker-gone"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([*ns, "bash", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=90)  # fmt: skip
    log = (tmp_path / "log.txt").read_text()
    assert '"text":"hi there "' in out.stdout, out.stdout + out.stderr + log
    assert "exit=0" in out.stdout and "broker-gone" in out.stdout, out.stdout + log
    assert "started a private Mosquitto" in log


CTRL_C_RUN = """
import sys
import rkmqtt.service
rkmqtt.service.EMBEDDED_PORT = int(sys.argv[1])  # where 1883 would be (never the system's broker)
from rkmqtt.cli.main import main
sys.exit(main(["run", "--engine", "tests.fake_engine:FakeEngine", "--no-discovery", "--grace-period", "30",
               "--topic-prefix", sys.argv[2]]))
"""


def test_ctrl_c_with_the_embedded_broker_keeps_the_last_replies(tmp_path: Path) -> None:
    """`rkmqtt run` with no broker starts its own Mosquitto. Ctrl-C in a terminal sends SIGINT to the
    whole foreground process group: the broker must not die with it before the bridge has sent the
    running requests' final replies; the bridge stops it afterwards."""
    port, prefix = free_port(), "ctrlc"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    env.update(PYTHONPATH=str(REPO), RKMQTT_STATE_DIR=str(tmp_path / "state"))
    # A process group of its own, like a shell's foreground job; killpg below is the terminal's Ctrl-C.
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_RUN, str(port), prefix],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    probe = None
    try:
        deadline = time.monotonic() + 60
        while not port_answers("127.0.0.1", port) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
        probe = Probe(f"mqtt://127.0.0.1:{port}", [f"{prefix}/reply/#", f"{prefix}/node/+/status"])
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 60)
        probe.publish(f"{prefix}/request/dev", {"id": "last", "prompt": "tokens:200"})  # ~2 s of answer
        probe.wait_for(lambda m: m.topic.endswith("/stream"), 30)
        os.killpg(proc.pid, signal.SIGINT)
        final = probe.final(f"{prefix}/reply/dev/last", 60)
        assert final["status"] == "ok" and final["usage"]["completion_tokens"] == 200, final
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if probe is not None:
            probe.close()
    assert not port_answers("127.0.0.1", port), "the private broker stops with rkmqtt"


def test_the_embedded_broker_does_not_outlive_a_killed_rkmqtt(tmp_path: Path) -> None:
    """In a session of its own the broker would survive a SIGKILLed rkmqtt (and hold the port);
    the parent-death signal ends it too."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    env.update(PYTHONPATH=str(REPO), RKMQTT_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_RUN, str(port), "killed"], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_answers("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_answers("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 20
    while port_answers("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_answers("127.0.0.1", port)


def test_online_follows_the_brokers_grant_of_the_request_subscription(mosquitto: Mosquitto) -> None:
    """A fresh session each time: a request published the moment `wait_connected` returns, and one
    published the moment a device sees the status `online`, both reach the bridge (each would be
    lost if it reached the broker before the bridge's subscription)."""
    got: list[str] = []
    cond = threading.Condition()
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        prefix = msg.topic.split("/")[0]
        if msg.topic.endswith("/status") and msg.payload == b"online" and not msg.retain:
            c.publish(f"{prefix}/request/dev", json.dumps({"id": "on-status", "prompt": "x", "stream": False}), 1)
        elif "/reply/" in msg.topic:
            with cond:
                got.append(msg.topic)
                cond.notify_all()

    device.on_message = on_message
    device.connect("127.0.0.1", mosquitto.port)
    device.subscribe([("+/node/+/status", 1), ("+/reply/dev/+", 1)])
    device.loop_start()
    try:
        for i in range(12):
            prefix = f"sub{i}{uuid.uuid4().hex[:6]}"  # a new node, so a new session, every time
            svc = Service(bridge_settings(mosquitto.url, prefix), engine=FakeEngine())
            svc.start()
            try:
                assert svc.bridge is not None and svc.bridge.wait_connected(15)
                device.publish(
                    f"{prefix}/request/dev", json.dumps({"id": "on-wait", "prompt": "x", "stream": False}), 1
                )
                want = {f"{prefix}/reply/dev/on-wait", f"{prefix}/reply/dev/on-status"}
                with cond:
                    cond.wait_for(lambda w=want: w <= set(got), 10)  # type: ignore[misc]
                assert want <= set(got), f"round {i}: {sorted(want - set(got))} never answered"
            finally:
                svc.stop(grace_s=0)
    finally:
        device.disconnect()
        device.loop_stop()
