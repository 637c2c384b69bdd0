"""The shipped broker side (deploy/mosquitto/rkmqtt.conf and rkmqtt.acl) on a real Mosquitto,
with a password file made here and a real bridge: device A cannot read, cancel, answer or pose
as device B; A, B and Home Assistant are all served. The same run without the ACL shows that the
checks can fail: there A does read B's replies."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jinja2
import pytest

from rkmqtt.mqtt import discovery as ha
from rkmqtt.service import Service
from tests.bridge_process import BridgeProcess
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe
from tests.shipped_broker import BRIDGE_USER, BRIDGES, DEPLOY, USERS, P, ShippedBroker
from tests.test_cli import rkmqtt


def test_the_shipped_conf_has_what_the_bridge_needs() -> None:
    text = (DEPLOY / "rkmqtt.conf").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    conf = dict(
        line.split(" ", 1) for line in lines if not line.startswith(("log_type", "listener", "allow_", "pass", "acl"))
    )
    assert conf["per_listener_settings"] == "true"
    assert conf["persistence"] == "true" and conf["persistence_location"]
    assert conf["autosave_on_changes"] == "true" and conf["autosave_interval"] == "1"
    assert int(conf["max_queued_messages"]) >= 10_000
    assert int(conf["max_queued_bytes"]) >= 16 * 1024 * 1024
    assert int(conf["max_inflight_messages"]) >= 20
    assert conf["set_tcp_nodelay"] == "true"
    # Two listeners, each with logins and an ACL; client ids bound to users on the devices' one.
    listeners = re.split(r"^listener ", text, flags=re.M)[1:]
    assert [b.split()[0] for b in listeners] == ["1883", "1884"]
    for block in listeners:
        assert "allow_anonymous false" in block and "password_file" in block and "acl_file" in block
    assert "use_username_as_clientid true" in listeners[0] and "use_username_as_clientid" not in listeners[1]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Callable[[bool], tuple[ShippedBroker, Service]]]:
    started: list[tuple[ShippedBroker, Service]] = []

    def start(acl: bool = True) -> tuple[ShippedBroker, Service]:
        broker = ShippedBroker(tmp_path / ("acl" if acl else "open"), acl).start()
        assert isinstance(broker, ShippedBroker)
        settings = bridge_settings(
            broker.bridge_url,
            P,
            username=BRIDGE_USER,
            password_file=str(broker.bridge_secret),
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


def device(broker: ShippedBroker, user: str, subscriptions: list[str]) -> Probe:
    probe = Probe(broker.url, [*subscriptions, f"{P}/node/+/status"], username=user, password=USERS[user])
    # Subscriptions are made at once with this one: the retained `online` proves they are active.
    probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 15)
    return probe


def test_devices_cannot_read_cancel_spoof_or_impersonate_each_other(
    secured: Callable[[bool], tuple[ShippedBroker, Service]],
) -> None:
    broker, svc = secured(True)
    alice = device(broker, "alice", ["#", f"{P}/reply/#"])  # asks for everything
    bob = device(broker, "bob", [f"{P}/reply/bob/#"])
    homeassistant = device(
        broker,
        "homeassistant",
        ["homeassistant/#", f"{P}/reply/homeassistant/#", f"{P}/node/+/info", f"{P}/node/+/stats"],
    )
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
        # A device reads the nodes' status, not their info and stats (everyone's traffic); Home
        # Assistant reads both.
        assert not [m for m in alice.messages if m.is_node("info") or m.is_node("stats")]
        homeassistant.wait_for(lambda m: m.is_node("stats"), 10)
        assert homeassistant.wait_for(lambda m: m.is_node("info"), 10)[0].json()["node"] == "acl_node"
        stats = svc.scheduler.stats() if svc.scheduler is not None else None
        assert stats is not None and stats.requests_total == 3  # long1, a1, the dashboard's
        assert stats.errors == 0
    finally:
        for p in (alice, bob, homeassistant):
            p.close()


def test_without_the_acl_a_device_reads_and_spoofs_another(
    secured: Callable[[bool], tuple[ShippedBroker, Service]],
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


def test_check_and_ask_on_the_shipped_files(secured: Callable[[bool], tuple[ShippedBroker, Service]]) -> None:
    """`rkmqtt check` with the bridges' login checks everything; with a device's (or Home Assistant's),
    whose client id is its user name and which may not publish on P/check/, it says why it skips the
    session check, still finds the bridge, and exits 0. `rkmqtt ask` as the device is answered; asked in
    another client's name, the broker's refusal is said at once (not a wait for a reply that never comes)."""
    broker, _ = secured(True)
    bridge = rkmqtt("check", *broker.bridge_flags())
    assert bridge.returncode == 0, bridge.stdout + bridge.stderr
    assert "[ok  ] broker sessions: kept while a client is away" in bridge.stdout
    assert "[ok  ] bridges: 1 online with topic_prefix 'rkmqtt': acl_node (fake, fake-echo" in bridge.stdout
    for user in ("alice", "homeassistant"):
        out = rkmqtt("check", "--broker", broker.url, "--username", user, env={"RKMQTT_PASSWORD": USERS[user]})
        assert out.returncode == 0, out.stdout + out.stderr
        note = f"[note] broker sessions: not checked with this login: the broker did not let user {user} publish on "
        assert f"{note}{P}/check/" in out.stdout, out.stdout
        assert "run the check with the bridges' login and listener" in out.stdout
        assert "[ok  ] bridges: 1 online with topic_prefix 'rkmqtt': acl_node" in out.stdout
    login = ("--broker", broker.url, "--username", "alice")
    env = {"RKMQTT_PASSWORD": USERS["alice"]}
    out = rkmqtt("ask", "hello", "--client", "alice", *login, env=env)
    assert out.returncode == 0 and out.stdout.startswith("hello "), out.stdout + out.stderr
    out = rkmqtt("ask", "hello", "--client", "bob", *login, env=env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == (
        f"rkmqtt: the broker refused the request on {P}/request/bob: Not authorized (deploy/mosquitto/rkmqtt.acl "
        "lets a device's login ask only as itself, on the devices' listener: --client alice)"
    )


def test_check_says_when_the_broker_binds_client_ids(tmp_path: Path) -> None:
    """The shipped conf without its ACLs: a device may publish on P/check/, but its two check clients get
    one client id (its user name), so the session check cannot be made with its login; check says so."""
    with ShippedBroker(tmp_path / "open", acl=False) as broker:
        out = rkmqtt("check", "--broker", broker.url, "--username", "alice", env={"RKMQTT_PASSWORD": USERS["alice"]})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "[note] broker sessions: not checked with this login: the broker gives every connection of user alice one "
        "client id (use_username_as_clientid)" in out.stdout
    ), out.stdout


def ha_command(template: str, value: str) -> str:
    """The text entity's command as Home Assistant renders it."""
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(value=value)


def test_the_acls_name_the_bridge_home_assistant_and_admin_users() -> None:
    devices = re.findall(r"^user (\S+)$", (DEPLOY / "rkmqtt.acl").read_text(), flags=re.M)
    assert devices == [ha.HA_CLIENT, "admin"]
    bridges = re.findall(r"^user (\S+)$", (DEPLOY / "rkmqtt-bridges.acl").read_text(), flags=re.M)
    assert bridges == [BRIDGE_USER] and BRIDGE_USER not in USERS and set(BRIDGES) == {BRIDGE_USER}


def _replies_queued_for_bob(broker: ShippedBroker) -> None:
    """bob, with a persistent session, asks for 10 replies and goes away before they come."""
    bob = Probe(broker.url, [f"{P}/reply/bob/#", f"{P}/node/+/status"], client_id="bob-phone", persistent=True,
                username="bob", password=USERS["bob"])  # fmt: skip
    bob.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 15)
    for n in range(10):
        bob.publish(f"{P}/request/bob", {"id": f"q{n}", "prompt": "tokens:30", "stream": False})
    bob.close()


def _bob_again(broker: ShippedBroker, wait: float) -> set[str]:
    bob = Probe(broker.url, [], client_id="bob-phone", persistent=True, username="bob", password=USERS["bob"])
    try:
        time.sleep(wait)
        return {m.topic for m in bob.finals_under(f"{P}/reply/bob/")}
    finally:
        bob.close()


def test_a_device_with_the_bridges_or_another_devices_client_id_disturbs_nothing(tmp_path: Path) -> None:
    """alice logs in with her own password but the client id of the bridge, then of bob (clean start,
    which would erase bob's session): the broker gives her her own (use_username_as_clientid). The
    bridge keeps its session (every acknowledged request of carol answered), and bob's queued replies
    reach him."""
    broker = ShippedBroker(tmp_path / "broker").start()
    assert isinstance(broker, ShippedBroker)
    bridge = BridgeProcess(broker.url, P, tmp_path / "bridge.log", *broker.bridge_flags(), "--engine",
                           "tests.fake_engine:FakeEngine", "--node-name", "north", "--rate-limit", "0")  # fmt: skip
    bridge.start()
    carol = Probe(broker.url, [f"{P}/reply/carol/#", f"{P}/node/+/status"], username="carol", password=USERS["carol"])
    hijackers: list[Probe] = []
    try:
        carol.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 60)
        _replies_queued_for_bob(broker)
        for n in range(100):
            carol.publish(f"{P}/request/carol", {"id": f"c{n}", "prompt": f"carol {n}", "stream": False}, wait=False)
            if n in (10, 50):  # while carol's requests are in flight
                for cid in ("rkmqtt-north", "bob-phone"):
                    hijackers.append(Probe(broker.url, [f"{P}/reply/#"], client_id=cid, username="alice",
                                           password=USERS["alice"]))  # fmt: skip
        carol.wait_for(lambda m: m.topic.startswith(f"{P}/reply/carol/"), count=100, timeout=60)
        assert {m.topic for m in carol.finals_under(f"{P}/reply/carol/")} == {
            f"{P}/reply/carol/c{n}" for n in range(100)
        }
        assert _bob_again(broker, 3.0) == {f"{P}/reply/bob/q{n}" for n in range(10)}
        assert bridge.proc is not None and bridge.proc.poll() is None
        assert "our client id" not in bridge.output(), "the bridge kept its session"
        assert all(not m.topic.startswith(f"{P}/reply/bob/") for h in hijackers for m in h.messages)
    finally:
        for p in [carol, *hijackers]:
            p.close()
        bridge.stop()
        broker.close()


def test_without_bound_client_ids_a_device_erases_anothers_queued_replies(tmp_path: Path) -> None:
    """The control: the shipped conf without use_username_as_clientid. alice, with bob's client id
    and a clean start, erases the replies queued for bob (what the test above checks cannot happen)."""
    broker = ShippedBroker(tmp_path / "broker", swaps={r"^use_username_as_clientid true$": ""}).start()
    assert isinstance(broker, ShippedBroker)
    bridge = BridgeProcess(broker.url, P, tmp_path / "bridge.log", *broker.bridge_flags(), "--engine",
                           "tests.fake_engine:FakeEngine", "--node-name", "north")  # fmt: skip
    bridge.start()
    try:
        _replies_queued_for_bob(broker)
        time.sleep(2.0)  # answered, queued in bob's session
        Probe(broker.url, [], client_id="bob-phone", username="alice", password=USERS["alice"]).close()
        assert _bob_again(broker, 2.0) == set()
    finally:
        bridge.stop()
        broker.close()
