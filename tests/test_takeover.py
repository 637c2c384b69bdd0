"""Who may stop a bridge: a forged `P/node/<node>/info` stops nothing (even with the connection
taken from the bridge meanwhile); a client that borrows the bridge's client id is named in one line
and fought with a growing back-off, not in a loop, and the bridge serves again once it is gone. A
real newer run of the node still ends the older one with exit status 3 (tests/test_durability.py).
On a Mosquitto without an ACL or bound client ids: the worst case for these checks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from rkmqtt.mqtt.broker import Mosquitto
from tests.bridge_process import BridgeProcess
from tests.mqtt_probe import Probe

ARGS = ("--engine", "tests.fake_engine:FakeEngine", "--node-name", "victim")


def borrower(mosquitto: Mosquitto, client_id: str, reconnect_s: float = 0.2) -> mqtt.Client:
    """A client with the bridge's client id that keeps reconnecting, as a device's library does."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(reconnect_s, reconnect_s)
    c.connect("127.0.0.1", mosquitto.port, clean_start=False)
    c.loop_start()
    return c


def borrow_once(mosquitto: Mosquitto, client_id: str) -> None:
    """Connect once with `client_id` (the broker closes its holder's connection) and leave."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", mosquitto.port, clean_start=False)
    c.loop_start()
    assert connected.wait(10)
    c.disconnect()
    c.loop_stop()


def test_a_forged_info_stops_nothing(mosquitto: Mosquitto, prefix: str, tmp_path: Path) -> None:
    bridge = BridgeProcess(mosquitto.url, prefix, tmp_path / "bridge.log", *ARGS).start()
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status", f"{prefix}/node/+/info", f"{prefix}/reply/dev/#"])
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 60)
        info = probe.wait_for(lambda m: m.is_node("info"), 10)[0].json()
        # Another instance of the node, started later: retained, and then live, twice.
        for n, retain in enumerate((True, False, True)):
            forged = {**info, "instance": f"f0f0f0f0f0f{n}", "started": info["started"] + 1000 + n, "host": "forger"}
            probe.client.publish(f"{prefix}/node/victim/info", json.dumps(forged), qos=1, retain=retain)
        time.sleep(3.0)
        # The connection taken from it for a moment (a client with its client id, gone at once):
        # what the bridge then reads of its node is the forged info it saw while connected.
        borrowed = time.monotonic()
        borrow_once(mosquitto, "rkmqtt-victim")
        # Back with a session of its own (the borrower's, with no expiry, replaced and ended it).
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online" and m.at > borrowed, 60)
        time.sleep(2.0)
        assert bridge.proc is not None and bridge.proc.poll() is None, bridge.output()[-2000:]
        probe.publish(f"{prefix}/request/dev", {"id": "after", "prompt": "still here", "stream": False})
        assert probe.final(f"{prefix}/reply/dev/after", 30)["status"] == "ok"
        assert "newer run" not in bridge.output()
    finally:
        bridge.stop()
        probe.close()
    assert bridge.proc is not None and bridge.proc.returncode == 0


def test_a_client_borrowing_the_client_id_is_named_and_not_fought_in_a_loop(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    bridge = BridgeProcess(mosquitto.url, prefix, tmp_path / "bridge.log", *ARGS).start()
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status", f"{prefix}/reply/dev/#"])
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 60)
        before = bridge.output().count("connected to")
        thief = borrower(mosquitto, "rkmqtt-victim")
        time.sleep(12.0)
        thief.disconnect()
        thief.loop_stop()
        gone = time.monotonic()
        out = bridge.output()
        connects = out.count("connected to") - before
        # Without the back-off the two took the session from each other about once a second.
        assert 1 <= connects <= 5, out[-3000:]
        named = [
            line
            for line in out.splitlines()
            if "another client keeps connecting with our client id rkmqtt-victim" in line
        ]
        assert 1 <= len(named) <= 3, out[-3000:]
        # Once the borrower is gone the bridge is back within its longest back-off, and serves. (The
        # borrower's session, with no expiry, replaced the bridge's: what was sent before it is back
        # is lost, which bound client ids prevent: tests/test_broker_acl.py.)
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online" and m.at > gone, 90)
        probe.publish(f"{prefix}/request/dev", {"id": "back", "prompt": "served again", "stream": False})
        assert probe.final(f"{prefix}/reply/dev/back", 30)["status"] == "ok"
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        bridge.stop()
        probe.close()
