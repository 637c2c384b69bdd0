"""A test-side MQTT client: publishes like a device and collects what the bridge sends."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    at: float = 0.0  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.payload)

    def is_node(self, kind: str) -> bool:
        """On a node's `P/node/<node>/<kind>` (status, info or stats)."""
        parts = self.topic.split("/")
        return len(parts) >= 3 and parts[-3] == "node" and parts[-1] == kind


class Probe:
    def __init__(
        self,
        url: str,
        subscriptions: list[str],
        mqtt5: bool = True,
        client_id: str | None = None,
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.subscriptions = subscriptions
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(0.2, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self._connected.clear()
        props = None
        if mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
        if mqtt5:
            self.client.connect(host, int(port), keepalive=10, clean_start=not persistent, properties=props)
        else:
            self.client.connect(host, int(port), keepalive=10)
        self.client.loop_start()
        assert self._connected.wait(10), "probe could not connect"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
            time.sleep(0.05)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), corr, time.monotonic()))
            self._cond.notify_all()

    def wait_connected(self, timeout: float = 15) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        topic: str,
        payload: str | bytes | dict[str, Any],
        qos: int = 1,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry: int | None = None,
        wait: bool = True,
    ) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if response_topic or correlation or expiry is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        if wait:
            info.wait_for_publish(5)

    def wait_for(self, pred: Callable[[Received], bool], timeout: float = 20.0, count: int = 1) -> list[Received]:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if pred(m)]
                if len(found) >= count:
                    return found
                left = end - time.monotonic()
                if left <= 0:
                    topics = sorted({m.topic for m in self.messages})[:20]
                    raise AssertionError(f"timed out: {len(found)}/{count} matching messages; saw topics {topics}")
                self._cond.wait(min(left, 0.1))

    def final(self, topic: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(lambda m: m.topic == topic, timeout)[0].json()  # type: ignore[no-any-return]

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def finals_under(self, prefix: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic.startswith(prefix) and not m.topic.endswith("/stream")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
