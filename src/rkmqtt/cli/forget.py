"""`rkmqtt forget-node NODE` (main thread): retire a node that is gone for good, ending its persistent
session and clearing its retained status, info and Home Assistant device; refused while it is
online (docs/architecture.md, "Several nodes on one broker")."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.errors import RkmqttError
from rkmqtt.mqtt.connection import connect_args, make_client
from rkmqtt.mqtt.discovery import discovery_topic
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics, is_valid_client


def forget_node(settings: Settings, node: str, client_id: str | None = None) -> int:
    if not is_valid_client(node):
        raise RkmqttError(f"node {node!r}: a node name is 1-64 characters of A-Z a-z 0-9 _ -")
    topics = Topics(settings.topic_prefix, node)
    addr = settings.broker_url
    if _retained(settings, topics.status) == b"online":
        raise RkmqttError(f"node {node} is online ({topics.status}): stop it first, then forget it")
    session = client_id or f"rkmqtt-{node}"
    c = _connected(make_client(settings, session), settings)  # clean start, expiry 0: the session ends
    try:
        node_settings = settings.model_copy(update={"node_name": node})
        for topic in (topics.status, topics.info, discovery_topic(node_settings)):
            c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
    print(
        f"forgot node {node} on {addr}: its session {session} (and the requests queued in it) ended; its status, "
        f"info and Home Assistant device cleared. Its journal, if any, stays in its state_dir."
    )
    return 0


def _connected(client: mqtt.Client, settings: Settings, timeout: float = 10.0) -> mqtt.Client:
    done = threading.Event()
    failure: list[str] = []

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            failure.append(str(reason))
        done.set()

    client.on_connect = on_connect
    addr = settings.broker_url
    try:
        client.connect(addr.host, addr.port, **connect_args(settings, keepalive=10))
    except OSError as e:
        raise RkmqttError(f"cannot reach the broker at {addr}: {e}") from e
    client.loop_start()
    if not done.wait(timeout) or failure:
        client.loop_stop()
        raise RkmqttError(f"the broker at {addr} refused or did not answer: {failure[0] if failure else 'no answer'}")
    return client


def _retained(settings: Settings, topic: str, wait: float = 1.0) -> bytes | None:
    """The retained message on `topic`, or None."""
    got: list[bytes] = []
    c = make_client(settings, f"rkmqtt-forget-{uuid.uuid4().hex[:8]}")
    c.on_message = lambda cl, u, msg: got.append(bytes(msg.payload))
    _connected(c, settings)
    try:
        c.subscribe(topic, 1)
        end = time.monotonic() + wait
        while not got and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0] if got else None
