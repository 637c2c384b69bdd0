"""The MQTT side: one paho-mqtt 2.x client (callback API version 2).

Threads: every `_on_*` method runs on paho's network thread ("paho-mqtt-client-…"). It only
parses, validates (`Intake`) and enqueues — onto the scheduler's inbox or the outbox — and never
waits on the engine. Outgoing replies are published by the publisher thread (`outbox.py`).
On every (re)connect the bridge subscribes again and republishes `status`, `info` and the
Home Assistant discovery; the Last Will turns `status` to `offline` when it vanishes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from rkmqtt.connection import connect_args, make_client, set_nodelay
from rkmqtt.intake import Incoming, Intake
from rkmqtt.logtext import clip
from rkmqtt.outbox import Outbox, Publisher
from rkmqtt.protocol import ErrorCode, parse_cancel_payload
from rkmqtt.replies import Refusal, Replies
from rkmqtt.request import RequestKey
from rkmqtt.scheduler import Scheduler
from rkmqtt.settings import BrokerAddress, Settings
from rkmqtt.topics import Topics, is_valid_client

_LOGGER = logging.getLogger(__name__)

# Reason codes that mean "your credentials are wrong": MQTT 5 (134, 135) and 3.1.1 (4, 5).
_BAD_CREDENTIALS = {134, 135, 4, 5}

CredentialsProvider = Callable[[], "tuple[str | None, str | None] | None"]
RetainedProvider = Callable[[], "list[tuple[str, bytes]]"]


class Bridge:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        outbox: Outbox,
        info_payload: bytes,
        retained_extra: RetainedProvider | None = None,
        extra_subscriptions: dict[str, Callable[[bytes], None]] | None = None,
        credentials_provider: CredentialsProvider | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.scheduler = scheduler
        self.outbox = outbox
        self.intake = Intake(settings, self.topics)
        self.info_payload = info_payload
        self._retained_extra = retained_extra
        self._extra_subs = extra_subscriptions or {}
        self._credentials_provider = credentials_provider
        self.address: BrokerAddress = settings.broker_url
        self.mqtt5 = settings.mqtt_version == "5"
        self._accepting = True
        self._stopping = False
        self._connected = threading.Event()
        self.connects = 0
        self.client = self._make_client()
        self.publisher = Publisher(outbox, self.client, self.mqtt5, self._connected.is_set)

    # -- set-up -----------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = make_client(self.settings, self.settings.effective_client_id(), self.address)
        client.enable_logger(logging.getLogger("paho"))
        client.will_set(self.topics.status, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_socket_open = set_nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self.publisher.start()
        self.client.connect_async(self.address.host, self.address.port, **connect_args(self.settings))
        self.client.loop_start()
        _LOGGER.info("connecting to %s", self.address)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop_accepting(self, timeout: float = 3.0) -> None:
        """Stop taking requests: unsubscribe (so the broker stops sending them, and with a shared
        group hands them to the other bridges) and answer any still in flight `shutting_down`."""
        self._accepting = False
        if not self.connected:
            return
        done = threading.Event()
        self.client.on_unsubscribe = lambda *args: done.set()
        self.client.unsubscribe(self.topics.request_subscription(self.settings.shared_group))
        done.wait(timeout)

    def stop(self, flush_timeout: float = 10.0) -> None:
        """Flush replies, publish `offline`, disconnect. Replies still held by paho (published
        during an outage) get up to `flush_timeout` for the broker to come back."""
        self.outbox.wait_empty(flush_timeout)
        self._stopping = True
        self.publisher.stop()
        end = time.monotonic() + flush_timeout
        if self._unacked() and not self.connected:
            _LOGGER.warning("waiting up to %.0f s for the broker to deliver the last replies", flush_timeout)
            self._connected.wait(flush_timeout)
        if self.connected:
            info = self.client.publish(self.topics.status, b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError):  # raised when the connection is gone meanwhile
                info.wait_for_publish(timeout=3)
            while self._unacked() and self.connected and time.monotonic() < end:
                time.sleep(0.02)
        if self._unacked():
            _LOGGER.error("%d replies could not be delivered before exit", self._unacked())
        self.client.disconnect()
        self.client.loop_stop()

    def _unacked(self) -> int:
        """QoS>0 messages paho holds until the broker acknowledges them (final replies)."""
        return len(getattr(self.client, "_out_messages", ()))

    # -- paho callbacks (network thread) ----------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            _LOGGER.warning("broker %s refused the connection: %s", self.address, reason)
            if int(reason.value) in _BAD_CREDENTIALS and self._credentials_provider is not None:
                self._refresh_credentials()
            return
        self.connects += 1
        _LOGGER.info("connected to %s (connection %d)", self.address, self.connects)
        if self._accepting:
            # A retained request is old news: it was answered when it was published (or it would be
            # run again on every reconnect). MQTT 5 can ask the broker not to send them at all.
            topic = self.topics.request_subscription(self.settings.shared_group)
            if self.mqtt5:
                opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
                client.subscribe([(topic, opts)])
            else:
                client.subscribe(topic, 1)
        client.subscribe([(self.topics.cancel_subscription(), 1), *((topic, 1) for topic in self._extra_subs)])
        client.publish(self.topics.status, b"online", qos=1, retain=True)
        client.publish(self.topics.info, self.info_payload, qos=1, retain=True)
        self.publish_retained_extra()
        self._connected.set()

    def publish_retained_extra(self) -> None:
        if self._retained_extra is None:
            return
        for topic, payload in self._retained_extra():
            self.client.publish(topic, payload, qos=1, retain=True)

    def _refresh_credentials(self) -> None:
        assert self._credentials_provider is not None
        try:
            creds = self._credentials_provider()
        except Exception as e:  # the next attempt tries again
            _LOGGER.warning("could not refresh broker credentials: %s", e)
            return
        if creds is not None:
            username, password = creds
            self.client.username_pw_set(username, password)
            self.address.username, self.address.password = username, password
            _LOGGER.info("broker credentials refreshed; the next connect uses them")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            _LOGGER.warning("disconnected from %s (%s); reconnecting", self.address, reason)
        if int(getattr(reason, "value", 0)) in _BAD_CREDENTIALS and self._credentials_provider is not None:
            self._refresh_credentials()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._dispatch(msg)
        except Exception as e:  # never let one message kill the network thread
            # One bounded line: the topic and the error may quote what the client sent.
            _LOGGER.error("message on %s could not be handled: %s: %s", clip(msg.topic), type(e).__name__, clip(str(e)))
            _LOGGER.debug("the failure's traceback", exc_info=True)

    def _dispatch(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        handler = self._extra_subs.get(topic)
        if handler is not None:
            handler(bytes(msg.payload))
            return
        client = self.topics.client_of(topic, "request")
        if client is not None:
            self._on_request(client, msg)
            return
        client = self.topics.client_of(topic, "cancel")
        if client is not None:
            self._on_cancel(client, bytes(msg.payload))
            return
        _LOGGER.debug("ignoring message on %s", clip(topic))

    def _on_request(self, client: str, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            _LOGGER.warning(
                "ignoring a retained request on %s: publish requests without the retain flag", clip(msg.topic)
            )
            return
        props = getattr(msg, "properties", None)
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        result = self.intake.accept(
            Incoming(
                client,
                bytes(msg.payload),
                response_topic=getattr(props, "ResponseTopic", None) if props else None,
                correlation=getattr(props, "CorrelationData", None) if props else None,
                expiry_s=float(expiry) if expiry is not None else None,
            )
        )
        if not isinstance(result, Refusal) and not self._accepting:
            result = Refusal(result.id, result.route, ErrorCode.SHUTTING_DOWN, "the bridge is shutting down")
        if isinstance(result, Refusal):
            self.outbox.put(Replies.refusal(result))
            self.scheduler.refused(result.code)
            _LOGGER.warning("request %s/%s: %s: %s", clip(client, 64), result.id, result.code.value, result.message)
            return
        self.scheduler.submit(result)

    def _on_cancel(self, client: str, payload: bytes) -> None:
        if not is_valid_client(client):  # no request of such a client can exist
            _LOGGER.warning("cancel from %s: not a valid client name; ignored", clip(client, 64))
            return
        try:
            req = parse_cancel_payload(payload)
        except (ValueError, UnicodeDecodeError) as e:
            # A cancel has no reply topic of its own; say so in the log rather than drop it silently.
            _LOGGER.warning(
                'cancel from %s: not an id or {"id": ...}: %s', clip(client, 64), clip(str(e).splitlines()[0])
            )
            return
        self.scheduler.cancel(RequestKey(client, req.id))
