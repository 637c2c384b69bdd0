"""The bench's shared network loop: many paho clients in one thread against a real Mosquitto -
every message delivered in order (published from the caller's thread and from the loop's own
callbacks), TLS, and a broker that dies seen as closed sockets, not a hang.
"""

from __future__ import annotations

import selectors
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil

from rkmqtt.bench.mqttclient import BenchClient
from rkmqtt.bench.netloop import NetLoop
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.settings import Settings
from tests.conftest import bridge_settings
from tests.test_tls_auth import _make_certs


class _Inbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: dict[str, list[bytes]] = {}
        self.threads: set[str] = set()

    def handler(self, name: str) -> Callable[[mqtt.MQTTMessage], None]:
        def on(msg: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.got.setdefault(name, []).append(bytes(msg.payload))
                self.threads.add(threading.current_thread().name)

        return on

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.got.values())


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _clients(settings: Settings, loop: NetLoop, inbox: _Inbox, n: int, prefix: str) -> list[BenchClient]:
    return [
        BenchClient(settings, f"{prefix}-nl{i}", [f"{prefix}/nl/{i}"], inbox.handler(f"c{i}"), loop).start()
        for i in range(n)
    ]


def test_one_thread_carries_many_clients(mosquitto: Mosquitto, prefix: str) -> None:
    settings = bridge_settings(mosquitto.url, prefix)
    loop = NetLoop().start()
    inbox = _Inbox()
    clients = _clients(settings, loop, inbox, 6, prefix)
    # The last client answers every message it gets from inside its callback, on the loop's thread.
    echo: list[bytes] = []
    echo_lock = threading.Lock()

    def on_echo(msg: mqtt.MQTTMessage) -> None:
        with echo_lock:
            echo.append(bytes(msg.payload))
        responder.publish(f"{prefix}/nl/0", b"echo:" + bytes(msg.payload), qos=1)

    responder = BenchClient(settings, f"{prefix}-echo", [f"{prefix}/echo"], on_echo, loop).start()
    try:
        assert not [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-")]
        per_client = 300
        for k in range(per_client):  # from this thread, through the loop's clients themselves
            for i, c in enumerate(clients):
                c.publish(f"{prefix}/nl/{(i + 1) % len(clients)}", f"{i}:{k}".encode(), qos=k % 2)
        for k in range(50):
            clients[3].publish(f"{prefix}/echo", str(k).encode(), qos=1)
        expected = per_client * len(clients) + 50
        assert _wait(lambda: inbox.count() >= expected), inbox.count()
        time.sleep(0.2)
        assert inbox.count() == expected
        for i in range(len(clients)):  # every sender's messages, in its order for each QoS
            sender = (i - 1) % len(clients)
            mine = [p for p in inbox.got[f"c{i}"] if not p.startswith(b"echo:")]
            for qos in (0, 1):
                sent = [f"{sender}:{k}".encode() for k in range(qos, per_client, 2)]
                assert [p for p in mine if p in set(sent)] == sent
        assert [p for p in inbox.got["c0"] if p.startswith(b"echo:")] == [f"echo:{k}".encode() for k in range(50)]
        assert inbox.threads == {"rkmqtt-bench-net"}
        assert loop.error is None
    finally:
        for c in [*clients, responder]:
            c.stop()
        loop.stop()
    assert all(c.client.socket() is None for c in clients)


def test_a_broker_that_dies_closes_the_sockets_without_a_hang(mosquitto: Mosquitto, prefix: str) -> None:
    settings = bridge_settings(mosquitto.url, prefix)
    loop = NetLoop().start()
    inbox = _Inbox()
    clients = _clients(settings, loop, inbox, 4, prefix)
    try:
        clients[0].publish(f"{prefix}/nl/1", b"before", qos=1)
        assert _wait(lambda: inbox.count() == 1)
        mosquitto.kill()
        assert _wait(lambda: all(c.client.socket() is None for c in clients), 10)
        assert loop.error is None
    finally:
        t0 = time.monotonic()
        for c in clients:
            c.stop()
        loop.stop()
        assert time.monotonic() - t0 < 5


def test_tls_through_the_loop(tmp_path: Path, prefix: str) -> None:
    """The TLS handshake in the caller's thread, then reads in the loop's: a burst of messages,
    some spanning several TLS records, all arrive. (Mosquitto writes one record per packet, so
    this does not reach the case of a second packet already decrypted in the SSL buffer.)"""
    _make_certs(tmp_path)
    conf = f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\n"
    tls = Mosquitto(workdir=tmp_path / "broker", extra_config=conf).start()
    loop = NetLoop().start()
    inbox = _Inbox()
    try:
        settings = bridge_settings(f"mqtts://localhost:{tls.port}", prefix, tls_ca=str(tmp_path / "ca.crt"))
        a, b = _clients(settings, loop, inbox, 2, prefix)
        payloads = [bytes([65 + k % 26]) * (40_000 if k % 10 == 0 else 30) for k in range(400)]
        for p in payloads:
            a.publish(f"{prefix}/nl/1", p, qos=0)
        assert _wait(lambda: inbox.count() >= len(payloads)), inbox.count()
        assert inbox.got["c1"] == payloads
        a.stop()
        b.stop()
    finally:
        loop.stop()
        tls.close()


def test_a_publish_racing_the_loop_is_sent_and_the_loop_goes_idle(mosquitto: Mosquitto, prefix: str) -> None:
    """The interleaving paho's "already asked for writing" flag allows: the loop's thread has just
    found nothing to write and is about to clear the flag when another thread publishes and, seeing
    the flag still set, asks for nothing. The message must go out, and afterwards the socket must
    not stay registered for writing (the loop would spin at 100 % of a core)."""
    settings = bridge_settings(mosquitto.url, prefix)
    loop = NetLoop().start()
    inbox = _Inbox()
    (sub,) = _clients(settings, loop, inbox, 1, prefix)
    pub = BenchClient(settings, f"{prefix}-pub", [], lambda m: None, loop).start()
    c = pub.client
    real_want_write = c.want_write
    paused, resume = threading.Event(), threading.Event()
    armed = [True]

    def want_write() -> bool:
        r = real_want_write()
        if armed[0] and not r and threading.current_thread().name == "rkmqtt-bench-net":
            armed[0] = False
            paused.set()
            resume.wait(5)
        return r

    c.want_write = want_write  # type: ignore[method-assign]
    try:
        pub.publish(f"{prefix}/nl/0", b"first", qos=0)
        assert paused.wait(5)  # the loop wrote it and stands where it decides to stop writing
        pub.publish(f"{prefix}/nl/0", b"second", qos=0)
        resume.set()
        assert _wait(lambda: inbox.count() == 2, 5), inbox.got
        assert inbox.got["c0"] == [b"first", b"second"]
        time.sleep(0.3)
        key = loop._sel.get_map()[c.socket()]
        assert key.events == selectors.EVENT_READ
        thread = next(t for t in psutil.Process().threads() if t.id == loop._thread.native_id)
        t0 = thread.user_time + thread.system_time
        time.sleep(1.0)
        thread = next(t for t in psutil.Process().threads() if t.id == loop._thread.native_id)
        assert thread.user_time + thread.system_time - t0 < 0.5  # idle, not spinning
    finally:
        resume.set()
        sub.stop()
        pub.stop()
        loop.stop()


def test_stop_closes_the_sockets_of_clients_that_did_not_disconnect(mosquitto: Mosquitto, prefix: str) -> None:
    settings = bridge_settings(mosquitto.url, prefix)
    loop = NetLoop().start()
    clients = _clients(settings, loop, _Inbox(), 3, prefix)
    socks = [c.client.socket() for c in clients]
    assert all(s is not None and s.fileno() >= 0 for s in socks)
    loop.stop()
    assert all(s is not None and s.fileno() == -1 for s in socks)
