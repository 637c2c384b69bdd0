"""The MQTT door's client: one paho-mqtt 2.x client with a persistent session. Main thread: start,
take-up, stop; paho's network thread: every `_on_*`, which parses, journals and enqueues and never
waits on the engine. Why the session and the acknowledgement are as they are: docs/architecture.md,
"The MQTT session"."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from rkmqtt.logtext import clip
from rkmqtt.mqtt.connection import connect_args, make_client, set_nodelay
from rkmqtt.mqtt.intake import Incoming, Intake
from rkmqtt.mqtt.journal import Delivered
from rkmqtt.mqtt.link import Link, describe_failure, describe_reason
from rkmqtt.mqtt.outbox import Outgoing, Publisher
from rkmqtt.mqtt.reach import not_mqtt
from rkmqtt.mqtt.replies import Refusal, route_of
from rkmqtt.mqtt.sharing import Action, Announce, Kind, Sharing, Subscribe, Unsubscribe
from rkmqtt.mqtt.sink import MqttSink
from rkmqtt.protocol import ErrorCode, Info, parse_cancel_payload
from rkmqtt.sched.admission import Admission, Refused
from rkmqtt.sched.loop import Scheduler
from rkmqtt.sched.request import Request, RequestKey
from rkmqtt.settings import BrokerAddress, Settings
from rkmqtt.topics import Topics, is_valid_client

_LOGGER = logging.getLogger(__name__)

# The journal cannot take a request (a full or failing disk): it is refused rather than acknowledged.
_CANNOT_RECORD = Refused(ErrorCode.BUSY, "the bridge cannot record requests now; try again later")

# Reason codes that mean "your credentials are wrong": MQTT 5 (134, 135) and 3.1.1 (4, 5).
_BAD_CREDENTIALS = {134, 135, 4, 5}
# What paho reports when no packet came for a keep-alive period (141, "Keep alive timeout").
_KEEPALIVE_TIMEOUT = 141

CredentialsProvider = Callable[[], "tuple[str | None, str | None] | None"]
RetainedProvider = Callable[[], "list[tuple[str, bytes]]"]

# First reconnect within half a second, then doubling up to a few seconds: a broker that restarts
# is found again at once, and requests sent to it meanwhile reach this session quickly.
RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 5.0


class _QuietPaho(logging.Filter):
    """paho logs 'Client is not connected' on every loop turn of an outage; `Link` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


logging.getLogger("paho").addFilter(_QuietPaho())


class Bridge:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        admission: Admission,
        sink: MqttSink,
        info: Info,
        retained_extra: RetainedProvider | None = None,
        extra_subscriptions: dict[str, Callable[[bytes], None]] | None = None,
        credentials_provider: CredentialsProvider | None = None,
        link: Link | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, settings.effective_node_name())
        self.shared_group = settings.effective_shared_group()
        self.sharing = Sharing(settings.share_requests)
        self._sharing_lock = threading.Lock()  # never held while calling paho
        self.scheduler = scheduler
        self.admission = admission
        self.sink = sink  # replies and their journal rows
        self.outbox = sink.outbox
        self.journal = sink.journal
        self.intake = Intake(settings, self.topics, admission, sink)
        self.info = info
        self._taken_over = False
        self._decide_after: int | None = None  # the SUBACK after which `sharing` decides
        self._retained_extra = retained_extra
        self._extra_subs = extra_subscriptions or {}
        self._credentials_provider = credentials_provider
        self.address: BrokerAddress = settings.broker_url
        self.link = link or Link(str(self.address))  # the service's, when it tried the broker already
        self.mqtt5 = settings.mqtt_version == "5"
        self._accepting = True
        self._stopping = False
        self._connected = threading.Event()
        self._answered = False  # a CONNACK came on this connection (paho's network thread only)
        self._ready = threading.Event()  # connected, and taking requests (or handing them to the others)
        self.connects = 0
        self.client = self._make_client()
        self.publisher = Publisher(self.outbox, self.client, self.mqtt5, self._connected.is_set)
        self.client.on_publish = self.publisher.acknowledged

    # -- set-up -----------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client_id = self.settings.effective_client_id()
        client = make_client(self.settings, client_id, self.address, persistent=True, manual_ack=True)
        client.enable_logger(logging.getLogger("paho"))
        client.will_set(self.topics.status, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)  # type: ignore[arg-type]
        client.on_socket_open = set_nodelay
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def taken_over(self) -> bool:
        """A newer run of this node connected: this one must go (and not fight it for the session)."""
        return self._taken_over

    def start(self) -> None:
        self.publisher.start()
        args = connect_args(self.settings, persistent=True)
        self.client.connect_async(self.address.host, self.address.port, **args)
        self.client.loop_start()
        down = self.link.cause is not None  # the service's own try found it down (its line says why)
        _LOGGER.log(
            logging.WARNING if down else logging.INFO,
            "connecting to %s as %s%s",
            self.address,
            self.settings.effective_client_id(),
            " (it has not answered yet, see above; retrying until it does)" if down else "",
        )

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the bridge is connected and has its request subscription (or, joining other
        nodes, knows that they take the requests): what its `online` status says."""
        return self._ready.wait(timeout)

    @property
    def peers_online(self) -> list[str]:
        with self._sharing_lock:
            return self.sharing.online_peers

    def stop_accepting(self) -> None:
        """Stop taking requests: the ones that arrive from now on are answered `shutting_down`.

        Alone, the bridge keeps its subscription in the persistent session: what is sent once it is
        gone waits in the broker for its next start (for `session_expiry` seconds). With other nodes
        online it leaves the shared subscription first, so that the broker hands new requests to
        them rather than queue them for a bridge that is going away."""
        self._accepting = False
        if not self.connected:
            return
        with self._sharing_lock:
            actions = self.sharing.stopping()
        self._carry_out(actions)
        if actions:
            _LOGGER.info("left the shared subscription: nodes %s take the new requests", ", ".join(self.peers_online))

    def stop(self, flush_timeout: float = 10.0) -> None:
        """Flush replies, publish `offline`, disconnect. Replies still held by paho (published
        during an outage) get up to `flush_timeout` for the broker to come back."""
        if self._taken_over:  # the newer run has the session; our connection is closed already
            self.publisher.stop()
            self.client.loop_stop()
            return
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
            later = "they are sent again at the next start" if self.journal else "they are lost"
            _LOGGER.error("%d replies were not acknowledged by the broker before exit: %s", self._unacked(), later)
        self.client.disconnect()
        self.client.loop_stop()

    def _unacked(self) -> int:
        """QoS>0 messages paho holds until the broker acknowledges them (final replies)."""
        return len(getattr(self.client, "_out_messages", ()))

    # -- paho callbacks (network thread) ----------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._answered = True
        if reason.is_failure:
            self.link.failed(describe_reason(int(reason.value)))
            if int(reason.value) in _BAD_CREDENTIALS and self._credentials_provider is not None:
                self._refresh_credentials()
            return
        self.connects += 1
        resumed = bool(getattr(flags, "session_present", False))
        self.link.up(session_present=resumed or self.connects == 1)
        _LOGGER.info(
            "connected to %s (connection %d, %s session)", self.address, self.connects, "resumed" if resumed else "new"
        )
        # Every node's status and info: who else serves this prefix, how it takes requests, and
        # (our own info) whether a newer run of this node has started.
        subs = [
            self.topics.cancel_subscription(),
            self.topics.every_node("status"),
            self.topics.every_node("info"),
            *self._extra_subs,
        ]
        _, mid = client.subscribe([(topic, 1) for topic in subs])
        with self._sharing_lock:
            kind = self.sharing.subscription() if self._accepting else None
            decided = self.sharing.mode is not None
        if kind is not None:
            self._subscribe_requests(kind)
        self._connected.set()
        self.publish_retained_extra()
        if decided:
            self._announce_online()
        else:
            self._decide_after = mid  # once the others' retained statuses and infos are in

    def _announce_online(self) -> None:
        """Status `online` and the info, after the request subscription: a device that sees the
        status can send at once."""
        self.client.publish(self.topics.info, self.info.model_dump_json().encode(), qos=1, retain=True)
        self.client.publish(self.topics.status, b"online", qos=1, retain=True)
        self._ready.set()

    def update_info(self, **fields: Any) -> None:
        """Change the info (the models, the first model's facts once it is loaded): kept for the next
        connect and published retained through the outbox (any thread; never waits)."""
        with self._sharing_lock:
            self.info = self.info.model_copy(update=fields)
            payload = self.info.model_dump_json().encode()
        if self.connected:
            self.outbox.put(Outgoing(self.topics.info, payload, 1, retain=True))

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

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` around the connect: the exception is current.
        self.link.failed(describe_failure(sys.exc_info()[1]))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._ready.clear()
        code = int(getattr(reason, "value", 0))
        if was:
            self.link.lost(code if getattr(reason, "is_failure", False) else None, self._stopping)
        elif not self._answered and not self._stopping:
            # Closed, or silent for a keep-alive, before any CONNACK: the peer does not speak MQTT.
            self.link.failed(not_mqtt(closed=code != _KEEPALIVE_TIMEOUT))
        self._answered = False
        if self.link.taken_over and not self._taken_over:
            self._yield("another client connected with our client id")
            return
        if code in _BAD_CREDENTIALS and self._credentials_provider is not None:
            self._refresh_credentials()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._dispatch(msg)
        except Exception as e:  # never let one message kill the network thread
            # One bounded line: the topic and the error may quote what the client sent.
            _LOGGER.error("message on %s could not be handled: %s: %s", clip(msg.topic), type(e).__name__, clip(str(e)))
            _LOGGER.debug("the failure's traceback", exc_info=True)
        finally:
            # Manual acknowledgement: only now, with the request in the journal, may the broker
            # forget it.
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)

    def _yield(self, why: str) -> None:
        """A newer run of this node is on the broker: stop at once rather than take the session
        (and the requests in it) from each other for ever."""
        _LOGGER.error(
            "%s: node %s (client id %s) is served by a newer run of rkmqtt; this one stops with exit status 3. "
            "Give each bridge its own node_name",
            why,
            self.info.node,
            self.settings.effective_client_id(),
        )
        self._taken_over = True
        self._stopping = True
        self.client.disconnect()

    def _check_newer_run(self, other: Info) -> None:
        me = self.info
        if (
            other.node == me.node
            and other.instance != me.instance
            and (other.started, other.instance)
            > (
                me.started,
                me.instance,
            )
        ):
            self._yield(f"another bridge (host {other.host or '?'}) announced the same node")

    def _dispatch(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        node = self.topics.node_of(topic, "info")
        if node is not None:
            self._on_node_info(node, bytes(msg.payload))
            return
        handler = self._extra_subs.get(topic)
        if handler is not None:
            handler(bytes(msg.payload))
            return
        node = self.topics.node_of(topic, "status")
        if node is not None:
            if node != self.topics.node:
                online = msg.payload.strip() == b"online"
                with self._sharing_lock:
                    actions = self.sharing.peer_status(node, online)
                if online:
                    _LOGGER.debug("node %s is online on this broker and prefix", clip(node, 64))
                self._carry_out(actions)
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

    # -- sharing the requests with the other nodes (sharing.py decides) -------------------------
    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid == self._decide_after:
            self._decide_after = None
            # The broker sends retained messages right after the SUBACK; give them a moment.
            timer = threading.Timer(0.5, self._decide)
            timer.daemon = True
            timer.start()

    def _decide(self) -> None:
        """Timer thread: alone, joining or shared, from what the other nodes said."""
        with self._sharing_lock:
            actions = self.sharing.decide() if self.sharing.mode is None else []
        self._carry_out(actions)

    def _on_node_info(self, node: str, payload: bytes) -> None:
        try:
            other = Info.model_validate_json(payload) if payload else None
        except ValueError:
            return
        if other is None:
            return
        if node == self.topics.node:
            if not self._taken_over:
                self._check_newer_run(other)
            return
        with self._sharing_lock:
            actions = self.sharing.peer_info(node, other.share or None)
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Subscribe):
                if self._accepting:
                    self._subscribe_requests(action.kind)
            elif isinstance(action, Unsubscribe):
                self.client.unsubscribe(self._request_topic(action.kind))
            elif isinstance(action, Announce):
                with self._sharing_lock:
                    self.info = self.info.model_copy(update={"share": action.mode})
                self._announce_online()
                _LOGGER.info(
                    "requests: %s (%s)",
                    action.mode,
                    self._request_topic("shared" if action.mode in ("shared", "left") else "plain"),
                )
            else:
                _LOGGER.warning("%s", action.message)

    def _request_topic(self, kind: Kind) -> str:
        return self.topics.request_subscription(self.shared_group if kind == "shared" else None)

    def _subscribe_requests(self, kind: Kind) -> None:
        # A retained request is old news: it was answered when it was published (or it would be
        # run again on every reconnect). MQTT 5 can ask the broker not to send them at all.
        topic = self._request_topic(kind)
        if self.mqtt5:
            self.client.subscribe(
                [(topic, SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))]
            )
        else:
            self.client.subscribe(topic, 1)

    def _on_request(self, client: str, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            _LOGGER.warning(
                "ignoring a retained request on %s: publish requests without the retain flag", clip(msg.topic)
            )
            return
        props = getattr(msg, "properties", None)
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        incoming = Incoming(
            client,
            bytes(msg.payload),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation=getattr(props, "CorrelationData", None) if props else None,
            expiry_s=float(expiry) if expiry is not None else None,
        )
        accepted = self.intake.accept(incoming)
        result: Request | Refusal | None = accepted
        if isinstance(accepted, Request):
            closed = not self._accepting
            result = _refusal(accepted, Admission.shutting_down()) if closed else self._journal(incoming, accepted)
        if isinstance(result, Refusal):
            self._refuse(result)
            _LOGGER.warning("request %s/%s: %s: %s", clip(client, 64), result.id, result.code.value, result.message)
        elif result is not None:
            self.scheduler.submit(result)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a refusal now and count it (the scheduler never sees the request)."""
        self.sink.refusal(refusal)
        self.admission.refused(refusal.code)

    def _journal(self, incoming: Incoming, req: Request) -> Request | Refusal | None:
        """Journal an accepted request; None when it is a retried id answered from the journal."""
        if self.journal is None:
            return req
        try:
            row = self.journal.admit(incoming, req.key)
        except sqlite3.Error as e:
            _LOGGER.error("the journal cannot record request %s: %s", req.key, e)
            return _refusal(req, _CANNOT_RECORD)
        if isinstance(row, Delivered):
            _LOGGER.info("request %s: retried after it ran; its recorded final reply is sent again", req.key)
            self.sink.recorded(route_of(req), row.final)
            self.scheduler.repeated()
            return None
        req.route = route_of(req).journaled(row)
        return req

    def take_up(self) -> None:
        """Main thread, before `start`: submit what the journal holds from the last run, in arrival
        order. A request that had started runs again from the start; its expiry still counts from
        its first arrival."""
        journal = self.journal
        pending = journal.pending() if journal is not None else []
        if journal is None or not pending:
            return
        now, wall = time.monotonic(), time.time()
        for p in pending:
            result = self.intake.accept(p.incoming, now - max(0.0, wall - p.arrived), rate_limit=False)
            if isinstance(result, Refusal):  # the settings changed since: answer as they now say
                journal.drop(p.seq)
                self._refuse(result)
                continue
            result.route = route_of(result).journaled(p.seq)
            self.scheduler.submit(result)
        _LOGGER.warning("taking up %d requests from the journal %s", len(pending), journal.path)

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


def _refusal(req: Request, refused: Refused) -> Refusal:
    return Refusal(req.id, route_of(req), refused.code, refused.message)
