"""Does the broker answer MQTT? One throw-away connection with a time limit (main thread; paho's
network thread for its callbacks): `rkmqtt run` asks before it loads the model, `rkmqtt check`
and `rkmqtt ask` word their answers with it. A peer that is not an MQTT broker (an HTTP port, say)
closes the connection or never sends a CONNACK; both are named as such."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.mqtt.connection import make_client
from rkmqtt.mqtt.link import describe_failure, describe_reason
from rkmqtt.settings import Settings

#: Seconds a broker gets to answer CONNECT before it is taken for something else.
CONNECT_TIMEOUT_S = 5.0


def not_mqtt(closed: bool) -> str:
    """The cause for a peer that took the TCP connection but gave no MQTT answer (the same words
    whoever waited how long, so that the log says it once)."""
    what = "it closed the connection without an MQTT answer" if closed else "no MQTT answer to our CONNECT"
    return f"{what} (is it an MQTT broker, not an HTTP port or another service?)"


@dataclass(frozen=True)
class Reach:
    ok: bool
    detail: str  # the cause when not ok; how long the handshake took when ok


def reach_broker(settings: Settings, timeout_s: float = CONNECT_TIMEOUT_S) -> Reach:
    """Connect with a clean session and disconnect: the cause in words when it fails."""
    outcome: list[str | None] = []  # None: connected; else the cause
    done = threading.Event()
    client = make_client(settings, f"rkmqtt-reach-{uuid.uuid4().hex[:8]}")
    client.connect_timeout = timeout_s

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        outcome.append(describe_reason(int(reason.value)) if reason.is_failure else None)
        done.set()

    def on_disconnect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not done.is_set():
            outcome.append(not_mqtt(True))
            done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    addr = settings.broker_url
    t0 = time.monotonic()
    try:
        client.connect(addr.host, addr.port, keepalive=max(5, int(timeout_s) * 2))
    except (OSError, ValueError) as e:
        return Reach(False, describe_failure(e))
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            return Reach(False, not_mqtt(False))
        cause = outcome[0]
        if cause is not None:
            return Reach(False, cause)
        return Reach(True, f"accepted a connection in {(time.monotonic() - t0) * 1000:.0f} ms")
    finally:
        client.disconnect()
        client.loop_stop()
