"""Taking over the requests queued in the session of a node that went offline (its own paho client
and network thread, one per drain). It connects with that node's client id (the session resumed),
unsubscribes the requests so that the broker routes no more to it, hands every queued message to the
bridge (intake, journal, then the acknowledgement here), and ends the session once a marker it
published itself comes back: everything queued before it has arrived. The node coming back takes its
session over and the drain stops. Why: docs/architecture.md, "Failover"."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkmqtt.mqtt.connection import connect_args, make_client, set_nodelay
from rkmqtt.mqtt.link import describe_reason
from rkmqtt.settings import BrokerAddress, Settings
from rkmqtt.topics import Topics

_LOGGER = logging.getLogger(__name__)

IDLE_S = 30.0  # no message and no marker for this long: give up, leaving the session as it is


class Drain:
    def __init__(
        self,
        settings: Settings,
        address: BrokerAddress,
        topics: Topics,
        node: str,
        client_id: str,
        shared_group: str,
        handle: Callable[[mqtt.MQTTMessage], bool],
        on_end: Callable[[Drain], None],
    ) -> None:
        self.node = node
        self.client_id = client_id
        self.taken = 0  # requests the bridge took
        self.outcome = ""  # how it ended, in words
        self._settings = settings
        self._address = address  # the bridge's broker and current credentials
        self._node_topics = Topics(topics.prefix, node)
        self._unsubscribe = [
            topics.request_subscription(shared_group),
            topics.request_subscription(None),
            topics.cancel_subscription(),
            topics.every_node("status"),
            topics.every_node("info"),
        ]
        self._marker_topic = self._node_topics.node_topic("drain")
        self._marker = os.urandom(12).hex().encode()
        self._handle = handle
        self._on_end = on_end
        self._ended = threading.Event()
        self._last = time.monotonic()
        self._mqtt5 = settings.mqtt_version == "5"
        self._client = make_client(settings, client_id, address, persistent=True, manual_ack=True)
        self._client.on_socket_open = set_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        addr = self._address
        _LOGGER.warning(
            "node %s is offline: taking over the requests queued in its session (client id %s)",
            self.node,
            self.client_id,
        )
        args = connect_args(self._settings, persistent=True)
        self._client.connect_async(addr.host, addr.port, **args)
        self._client.loop_start()
        watchdog = threading.Thread(target=self._watch, name=f"rkmqtt-drain-{self.node}", daemon=True)
        watchdog.start()

    def stop(self) -> None:
        """The bridge stops: leave the session as it is (what was not acknowledged stays in it)."""
        self._end("stopped with the bridge", end_session=False)

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    # -- paho callbacks (the drain's network thread) -----------------------------------------
    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._end(f"the broker refused the connection: {describe_reason(int(reason.value))}", end_session=False)
            return
        if not getattr(flags, "session_present", False):
            # Nothing was kept for it (the session expired, or another node took it over already);
            # the empty one this connection made goes.
            self._end("its session was empty", end_session=True)
            return
        # In this order, on one connection: the broker stops routing requests here, then the marker
        # goes to the end of what is queued.
        c.unsubscribe(self._unsubscribe)
        c.subscribe(self._marker_topic, 1)
        c.publish(self._marker_topic, self._marker, qos=1)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        self._last = time.monotonic()
        try:
            if msg.topic == self._marker_topic:
                if bytes(msg.payload) == self._marker:
                    self._end(f"{self.taken} requests taken over; its session ended", end_session=True)
                return
            self.taken += self._handle(msg)
        finally:
            if msg.qos > 0 and not self._ended.is_set():
                c.ack(msg.mid, msg.qos)

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._ended.is_set():
            # The node came back and took its session (or the broker went away): it serves again.
            self._end(f"the connection closed ({reason}) after {self.taken} requests: node {self.node} has its session")

    # -- ending ------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._ended.wait(1.0):
            if time.monotonic() - self._last > IDLE_S:
                self._end(f"nothing came for {IDLE_S:.0f} s; its session is left as it is", end_session=False)

    def _end(self, outcome: str, end_session: bool = False) -> None:
        if self._ended.is_set():
            return
        self._ended.set()
        self.outcome = outcome
        if end_session and self._mqtt5:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0  # the session ends with this connection
            self._client.disconnect(properties=props)
        else:
            # MQTT 3.1.1 has no way to end a session but a clean connect, which could take the session
            # of the node just come back: its queued requests (unsubscribed) expire with it.
            self._client.disconnect()
        threading.Thread(target=self._finish, name=f"rkmqtt-drain-end-{self.node}", daemon=True).start()

    def _finish(self) -> None:
        self._client.loop_stop()
        _LOGGER.warning("node %s: %s", self.node, self.outcome)
        self._on_end(self)


class Drains:
    """A bridge's drains, at most one per offline node (started on timer threads, ended on their
    own), and the client id of each node's session, from its info."""

    def __init__(
        self, settings: Settings, topics: Topics, shared_group: str, handle: Callable[[mqtt.MQTTMessage], bool]
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._shared_group = shared_group
        self._handle = handle
        self._lock = threading.Lock()  # never held while calling paho
        self._running: dict[str, Drain] = {}
        self._sessions: dict[str, str] = {}  # node -> the client id of its session

    def session_of(self, node: str, client_id: str) -> None:
        """What a node's info says its session's client id is."""
        with self._lock:
            self._sessions[node] = client_id

    def start(self, node: str, address: BrokerAddress) -> None:
        """Drain `node`'s session, unless a drain of it runs already (or it is our own)."""
        with self._lock:
            client_id = self._sessions.get(node, f"rkmqtt-{node}")
            if node in self._running or client_id == self._settings.effective_client_id():
                return
        topics, group = self._topics, self._shared_group
        drain = Drain(self._settings, address, topics, node, client_id, group, self._handle, self._ended)
        with self._lock:
            if node in self._running:  # another timer was quicker
                return
            self._running[node] = drain
        drain.start()

    def stop(self) -> None:
        """The bridge stops: every drain leaves what it has not acknowledged in its session."""
        with self._lock:
            running = list(self._running.values())
        for drain in running:
            drain.stop()

    def _ended(self, drain: Drain) -> None:
        with self._lock:
            if self._running.get(drain.node) is drain:
                del self._running[drain.node]
