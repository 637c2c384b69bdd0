"""A paho-mqtt 2.x client set up like a device's (callers' threads; the callbacks run in paho's
network thread, or in the shared `NetLoop` thread when one is given): the broker address and
credentials, TLS, MQTT 5 or 3.1.1, and TCP_NODELAY.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.bench.netloop import NetLoop
from rkmqtt.errors import RkmqttError
from rkmqtt.mqtt.connection import connect_args, make_client, set_nodelay
from rkmqtt.settings import Settings

MessageHandler = Callable[[mqtt.MQTTMessage], None]


class BenchClient:
    """One connection; `subscriptions` are (re)made on connect and `ready` is set after SUBACK."""

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        subscriptions: list[str],
        on_message: MessageHandler,
        netloop: NetLoop | None = None,
    ) -> None:
        self.settings = settings
        self.netloop = netloop
        self.mqtt5 = settings.mqtt_version == "5"
        self.subscriptions = subscriptions
        self.ready = threading.Event()
        self._on_message_cb = on_message
        self._pending_mid: int | None = None
        c = make_client(settings, client_id)
        c.max_inflight_messages_set(1000)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c
        if netloop is not None:
            netloop.attach(c, set_nodelay)
        else:
            c.on_socket_open = set_nodelay

    def start(self, timeout: float = 15.0) -> BenchClient:
        addr = self.settings.broker_url
        args = connect_args(self.settings, keepalive=30)
        if self.netloop is None:
            self.client.connect_async(addr.host, addr.port, **args)
            self.client.loop_start()
        else:
            try:  # the TCP (and TLS) handshake here; CONNECT goes out from the loop's thread
                self.client.connect(addr.host, addr.port, **args)
            except (OSError, ValueError) as e:
                raise RkmqttError(f"bench: could not connect to {addr}: {e}") from e
        if not self.ready.wait(timeout):
            self.stop()
            raise RkmqttError(f"bench: could not connect and subscribe to {addr} within {timeout:.0f} s")
        return self

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)
        if self.netloop is not None:
            self.netloop.kick(self.client)

    def stop(self, timeout: float = 2.0) -> None:
        self.begin_stop()
        self.wait_stopped(time.monotonic() + timeout)

    def begin_stop(self) -> None:
        """Send DISCONNECT (with a NetLoop: queue it; `wait_stopped` waits for the socket to close)."""
        self.client.disconnect()
        if self.netloop is None:
            self.client.loop_stop()
        else:
            self.netloop.kick(self.client)

    def wait_stopped(self, deadline: float) -> bool:
        """With a NetLoop: wait until the loop's thread has sent DISCONNECT and closed the socket,
        at most until `deadline` (`NetLoop.stop()` closes what is left). True when it closed."""
        if self.netloop is None:
            return True
        while self.client.socket() is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        self.netloop.detach(self.client)
        return self.client.socket() is None

    # -- paho network thread ---------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        if not self.subscriptions:
            self.ready.set()
            return
        _, mid = client.subscribe([(t, 1) for t in self.subscriptions])
        self._pending_mid = mid

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid == self._pending_mid:
            self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message_cb(msg)
