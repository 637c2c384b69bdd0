"""The shipped broker side (deploy/mosquitto/rkmqtt.conf and rkmqtt.acl) on a real Mosquitto,
with a password file made here and a real bridge: device A cannot read, cancel, answer or pose
as device B; A, B and Home Assistant are all served. The same run without the ACL shows that the
checks can fail: there A does read B's replies."""

from __future__ import annotations

import getpass
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jinja2
import pytest

from rkmqtt.mqtt import discovery as ha
from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
P = "rkmqtt"  # the shipped ACL is written for the default topic prefix
USERS = {"rkmqtt": "bridge-pw", "homeassistant": "ha-pw", "alice": "alice-pw", "bob": "bob-pw"}


def shipped_config(port: int, workdir: Path, password_file: Path, acl_file: Path) -> str:
    """The shipped conf with only what ties it to a machine changed: the port (on loopback), the
    files' paths, the log and pid files, and the user to run as."""
    text = (DEPLOY / "rkmqtt.conf").read_text()
    swaps = {
        r"^listener 1883$": f"listener {port} 127.0.0.1",
        r"^password_file .*$": f"password_file {password_file}",
        r"^acl_file .*$": f"acl_file {acl_file}",
        r"^persistence_location .*$": f"persistence_location {workdir}/",
        r"^log_dest .*$": "log_dest stderr",
        r"^pid_file .*$": "",
    }
    for pattern, line in swaps.items():
        text, n = re.subn(pattern, line, text, flags=re.M)
        assert n == 1, f"the shipped conf has no single line matching {pattern}"
    return text + f"user {getpass.getuser()}\n"


def make_broker(tmp: Path, acl: bool) -> Mosquitto:
    tmp.mkdir(parents=True, exist_ok=True)
    passwd = tmp / "rkmqtt.passwd"
    passwd.write_text("")
    for user, pw in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True, timeout=30)
    port = free_port()
    config = shipped_config(port, tmp, passwd, DEPLOY / "rkmqtt.acl")
    if not acl:
        config = re.sub(r"^acl_file .*$", "", config, flags=re.M)
    return Mosquitto(port=port, workdir=tmp, config=config).start()


def test_the_shipped_conf_has_what_the_bridge_needs() -> None:
    conf = dict(
        line.split(" ", 1)
        for line in (DEPLOY / "rkmqtt.conf").read_text().splitlines()
        if line and not line.startswith("#") and not line.startswith("log_type")
    )
    assert conf["allow_anonymous"] == "false"
    assert conf["password_file"] and conf["acl_file"]
    assert conf["persistence"] == "true" and conf["persistence_location"]
    assert int(conf["max_queued_messages"]) >= 10_000
    assert int(conf["max_queued_bytes"]) >= 16 * 1024 * 1024
    assert int(conf["max_inflight_messages"]) >= 20
    assert conf["set_tcp_nodelay"] == "true"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Callable[[bool], tuple[Mosquitto, Service]]]:
    started: list[tuple[Mosquitto, Service]] = []

    def start(acl: bool = True) -> tuple[Mosquitto, Service]:
        workdir = tmp_path / ("acl" if acl else "open")
        broker = make_broker(workdir, acl)
        secret = workdir / "bridge.secret"
        secret.write_text(USERS["rkmqtt"] + "\n")
        settings = bridge_settings(
            broker.url,
            P,
            username="rkmqtt",
            password_file=str(secret),
            shared_group="bridges",  # the ACL must cover a shared subscription too
            discovery=True,
            node_name="acl_node",
        )
        svc = Service(settings, engine=FakeEngine(step_s=0.02))
        started.append((broker, svc))
        svc.start()
        assert svc.bridge is not None and svc.bridge.wait_connected(15), "the bridge could not log in"
        return broker, svc

    yield start
    for broker, svc in started:
        svc.stop(grace_s=0)
        broker.close()


def device(broker: Mosquitto, user: str, subscriptions: list[str]) -> Probe:
    probe = Probe(broker.url, [*subscriptions, f"{P}/node/+/status"], username=user, password=USERS[user])
    # Subscriptions are made at once with this one: the retained `online` proves they are active.
    probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 15)
    return probe


def test_devices_cannot_read_cancel_spoof_or_impersonate_each_other(
    secured: Callable[[bool], tuple[Mosquitto, Service]],
) -> None:
    broker, svc = secured(True)
    alice = device(broker, "alice", ["#", f"{P}/reply/#"])  # asks for everything
    bob = device(broker, "bob", [f"{P}/reply/bob/#"])
    homeassistant = device(broker, "homeassistant", ["homeassistant/#", f"{P}/reply/homeassistant/#"])
    try:
        # B's long request; A tries to cancel it (on B's topic, and on its own with B's id).
        bob.publish(f"{P}/request/bob", {"id": "long1", "prompt": "tokens:150"})
        bob.wait_for(lambda m: m.topic == f"{P}/reply/bob/long1/stream", 15)
        alice.publish(f"{P}/cancel/bob", "long1")
        alice.publish(f"{P}/cancel/alice", "long1")
        # A publishes a spoofed final on B's reply topic, and a request in B's name.
        fake = {"v": 1, "id": "long1", "status": "ok", "text": "SPOOFED"}
        alice.publish(f"{P}/reply/bob/long1", json.dumps(fake))
        alice.publish(f"{P}/request/bob", {"id": "as-bob", "prompt": "sent by alice"})
        # ... and tries to take the bridge offline for everyone.
        alice.publish(f"{P}/node/acl_node/status", "offline")

        # B gets its own answer, uncancelled and unspoofed, and nothing in its name.
        reply = bob.final(f"{P}/reply/bob/long1", 30)
        assert reply["status"] == "ok" and reply["finish_reason"] == "stop"
        assert reply["text"] == "".join(f"t{i} " for i in range(150))
        # A's own request is served too (after B's, so every earlier publish has been handled).
        alice.publish(f"{P}/request/alice", {"id": "a1", "prompt": "hello from alice"})
        assert alice.final(f"{P}/reply/alice/a1", 20)["text"] == "hello from alice "
        # Home Assistant: discovery, and a prompt from the dashboard answered on its private topic.
        doc = homeassistant.wait_for(lambda m: m.topic == "homeassistant/device/acl_node/config", 15)[0].json()
        prompt = doc["cmps"]["prompt"]
        command = ha_command(prompt["command_template"], "hello from the dashboard")
        homeassistant.publish(prompt["command_topic"], command)
        dashboard = f"{P}/reply/homeassistant/dashboard"
        assert homeassistant.final(dashboard, 20)["text"] == "hello from the dashboard "

        time.sleep(0.5)  # anything late would have arrived by now
        assert [m.json()["text"] for m in bob.on(f"{P}/reply/bob/long1")] == [reply["text"]]
        assert bob.on(f"{P}/reply/bob/as-bob") == [], "A's request in B's name was not run"
        assert not [m for m in alice.messages if m.topic.startswith(f"{P}/reply/bob/")], "A read B's replies"
        assert not [m for m in alice.messages if m.topic.startswith(f"{P}/reply/homeassistant/")]
        assert not [m for m in alice.messages if m.topic.startswith("homeassistant/")]
        assert {m.payload for m in alice.on(f"{P}/node/acl_node/status")} == {b"online"}, "A could not spoof the status"
        stats = svc.scheduler.stats() if svc.scheduler is not None else None
        assert stats is not None and stats.requests_total == 3  # long1, a1, the dashboard's
        assert stats.errors == 0
    finally:
        for p in (alice, bob, homeassistant):
            p.close()


def test_without_the_acl_a_device_reads_and_spoofs_another(
    secured: Callable[[bool], tuple[Mosquitto, Service]],
) -> None:
    """The control: with passwords alone, everything the test above checks is possible (what the
    docs warn about), so that test can fail."""
    broker, _ = secured(False)
    alice = device(broker, "alice", [f"{P}/reply/#"])
    bob = device(broker, "bob", [f"{P}/reply/bob/#"])
    try:
        bob.publish(f"{P}/request/bob", {"id": "b1", "prompt": "private words"})
        alice.wait_for(lambda m: m.topic == f"{P}/reply/bob/b1", 20)  # reads
        alice.publish(f"{P}/reply/bob/b1", json.dumps({"id": "b1", "status": "ok", "text": "SPOOFED"}))
        bob.wait_for(lambda m: m.topic == f"{P}/reply/bob/b1" and b"SPOOFED" in m.payload, 20)  # spoofs
        bob.publish(f"{P}/request/bob", {"id": "long1", "prompt": "tokens:150"})
        bob.wait_for(lambda m: m.topic == f"{P}/reply/bob/long1/stream", 15)
        alice.publish(f"{P}/cancel/bob", "long1")
        assert bob.final(f"{P}/reply/bob/long1", 20)["finish_reason"] == "cancelled"  # cancels
        alice.publish(f"{P}/request/bob", {"id": "as-bob", "prompt": "sent by alice"})
        assert bob.final(f"{P}/reply/bob/as-bob", 20)["text"] == "sent by alice "  # poses as B
    finally:
        alice.close()
        bob.close()


def ha_command(template: str, value: str) -> str:
    """The text entity's command as Home Assistant renders it."""
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(value=value)


def test_the_acl_names_the_bridge_and_home_assistant_users() -> None:
    acl = (DEPLOY / "rkmqtt.acl").read_text()
    users = re.findall(r"^user (\S+)$", acl, flags=re.M)
    assert users == ["rkmqtt", ha.HA_CLIENT]
