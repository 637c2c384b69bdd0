"""The MQTT door's client: one paho-mqtt 2.x client with a persistent session. Main thread: start,
take-up, stop; paho's network thread: every `_on_*`, which parses, journals and enqueues and never
waits on the engine; timer threads: sharing decisions and failover drains (`drain.py`, each on its
own client). Why the session, the acknowledgement and the takeover checks are as they are:
docs/architecture.md, "The MQTT session" and "Failover"."""

from __future__ import annotations

import contextlib
import functools
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

from rkmqtt.logbudget import limited
from rkmqtt.logtext import clip
from rkmqtt.mqtt import takeover
from rkmqtt.mqtt.connection import connect_args, make_client, set_nodelay
from rkmqtt.mqtt.drain import Drains
from rkmqtt.mqtt.intake import Incoming, Intake
from rkmqtt.mqtt.journal import Delivered
from rkmqtt.mqtt.link import TAKEN_OVER, Link, describe_failure, describe_reason
from rkmqtt.mqtt.outbox import Outgoing, Publisher
from rkmqtt.mqtt.reach import not_mqtt
from rkmqtt.mqtt.replies import Refusal, route_of
from rkmqtt.mqtt.sharing import Action, Announce, Kind, Mode, Sharing, Subscribe, Unsubscribe
from rkmqtt.mqtt.sharing import Drain as DrainAction
from rkmqtt.mqtt.sink import MqttSink
from rkmqtt.mqtt.subacks import Subacks
from rkmqtt.protocol import ErrorCode, Info, extract_routing, parse_cancel_payload
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

# A node's status said offline: wait this long (it may be restarting, and every node's view of who
# is online settles) before the lowest-named serving node takes over its session.
DRAIN_AFTER_S = 2.0


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
        self.sharing = Sharing(settings.share_requests, me=self.topics.node)
        self._sharing_lock = threading.Lock()  # never held while calling paho
        self.scheduler = scheduler
        self.admission = admission
        self.sink = sink  # replies and their journal rows
        self.outbox = sink.outbox
        self.journal = sink.journal
        self.intake = Intake(settings, self.topics, admission, sink)
        self.info = info.model_copy(update={"client_id": settings.effective_client_id()})
        self._taken_over = False
        self._decide_after: int | None = None  # the SUBACK after which `sharing` decides
        self._retained_extra = retained_extra
        self._extra_subs = extra_subscriptions or {}
        self._credentials_provider = credentials_provider
        self.address: BrokerAddress = settings.broker_url
        self.link = link or Link(str(self.address))  # the service's, when it tried the broker already
        self.mqtt5 = settings.mqtt_version == "5"
        self._accepting = True
        self._keeping = False  # stopping alone: new requests stay with the broker for the next start
        self._stopping = False
        self._connected = threading.Event()
        self._answered = False  # a CONNACK came on this connection (paho's network thread only)
        self._ready = threading.Event()  # connected, and taking requests (or handing them to the others)
        self.connects = 0
        self._subacks = Subacks()
        self._backoff = takeover.Backoff(RECONNECT_MIN_S)
        self._own_instances: list[str] = []  # infos seen on our own info topic while connected
        self.drains = Drains(settings, self.topics, self.shared_group, self._on_drained)
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
        """A newer run of this node took the session: this one must go (and not fight it for it)."""
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
        """Wait until the bridge is connected and the broker granted its request subscription (or,
        joining other nodes, it knows that they take the requests): what its `online` status says."""
        return self._ready.wait(timeout)

    @property
    def peers_online(self) -> list[str]:
        with self._sharing_lock:
            return self.sharing.online_peers

    @property
    def keeps_waiting(self) -> bool:
        """Stopping alone: the requests waiting in the scheduler stay in the journal for the next
        start (no other node could take them)."""
        return self._keeping and self.journal is not None

    def stop_accepting(self) -> None:
        """Stop taking requests.

        Alone, the bridge keeps its subscription in the persistent session and acknowledges nothing
        more: what comes from now on stays with the broker for its next start (for `session_expiry`
        seconds), and what waits in the scheduler stays in the journal (`keeps_waiting`). With other
        nodes online it leaves the shared subscription first, so that the broker hands new requests
        to them, and what still arrives is answered `shutting_down` for the device to send again."""
        with self._sharing_lock:
            alone = not self.sharing.online_peers
        self.drains.stop()  # first: what they have not acknowledged stays in their sessions
        self._keeping = alone
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
        self._backoff.connected(time.monotonic())
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)  # type: ignore[arg-type]
        resumed = bool(getattr(flags, "session_present", False))
        self.link.up(session_present=resumed or self.connects == 1)
        _LOGGER.info(
            "connected to %s (connection %d, %s session)", self.address, self.connects, "resumed" if resumed else "new"
        )
        # Every node's status and info: who else serves this prefix, and how it takes requests.
        subs = [
            self.topics.cancel_subscription(),
            self.topics.every_node("status"),
            self.topics.every_node("info"),
            *self._extra_subs,
        ]
        _, mid = client.subscribe([(topic, 1) for topic in subs])
        with self._sharing_lock:
            kind = self.sharing.subscription() if self._accepting else None
            mode = self.sharing.mode
        self._connected.set()
        self.publish_retained_extra()
        if mode is None:
            self._decide_after = mid  # once the others' retained statuses and infos are in
        elif kind is not None:
            mid = self._subscribe_requests(kind)
            if mid is not None:  # else the connection is gone already: the next connect does this again
                self._subacks.then(mid, lambda codes: self._announce(mode, codes))
        else:
            self._announce(mode, [])

    def _announce(self, mode: Mode | None, codes: list[ReasonCode], changed: bool = False) -> None:
        """Status `online` and the info, once the broker granted the request subscription (`codes`,
        its SUBACK): a device that sees the status can send at once."""
        refused = [c for c in codes if c.is_failure]
        if refused:
            _LOGGER.error(
                "the broker refused the subscription to the requests (%s): this bridge takes none. Check the "
                "broker's ACL for user %s (deploy/mosquitto/rkmqtt.acl)",
                refused[0],
                self.address.username or "(anonymous)",
            )
            return
        with self._sharing_lock:  # update_info changes the info from other threads
            if mode is not None:
                self.info = self.info.model_copy(update={"share": mode})
            payload = self.info.model_dump_json().encode()
        self.client.publish(self.topics.info, payload, qos=1, retain=True)
        self.client.publish(self.topics.status, b"online", qos=1, retain=True)
        self._ready.set()
        if changed:
            kind: Kind = "shared" if mode in ("shared", "left") else "plain"
            _LOGGER.info("requests: %s (%s)", mode, self._request_topic(kind))

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
        self._subacks.clear()
        code = int(getattr(reason, "value", 0))
        answered, self._answered = self._answered, False
        if code in _BAD_CREDENTIALS and self._credentials_provider is not None:
            self._refresh_credentials()
        if not was:
            if not answered and not self._stopping:
                # Closed, or silent for a keep-alive, before any CONNACK: the peer does not speak MQTT.
                self.link.failed(not_mqtt(closed=code != _KEEPALIVE_TIMEOUT))
            return
        if self._stopping or self._taken_over:
            self.link.lost(None, stopping=True)
        else:
            self._after_loss(code if getattr(reason, "is_failure", False) else None)

    def _after_loss(self, code: int | None) -> None:
        """The broker closed our connection, or it was lost: find out whether a newer run of this
        node has the session now (then stop), else reconnect after the back-off. Runs before paho's
        reconnect, so that this run never takes the session back from a newer one."""
        seen = takeover.look(self.settings, self.address, self.topics, self.info, self._own_instances)
        newer = takeover.newer_run(self.info, seen, self._own_instances)
        if newer is not None:
            self._yield(newer)
            return
        # Closed (no reason, or 128: Mosquitto 2.0 sends no DISCONNECT 142 when a client takes our
        # client id) while the broker answers others: another client with our client id, or a blip.
        taken = code == TAKEN_OVER
        suspect = taken or (seen.reachable and code in (None, 128))
        delay = self._backoff.lost(time.monotonic(), suspect, taken=taken)
        self.client.reconnect_delay_set(min_delay=delay, max_delay=max(delay, RECONNECT_MAX_S))  # type: ignore[arg-type]
        if not suspect:
            self.link.lost(code, stopping=False)  # an outage, or a reason of its own: the link says so once
            return
        cause = takeover.describe_close(self.settings.effective_client_id(), self._backoff.strikes, taken)
        self.link.failed(f"{cause}; reconnecting in {delay:.0f} s" if delay >= 1 else cause)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._keeping and msg.qos > 0 and self.topics.client_of(msg.topic, "request") is not None:
            return  # not acknowledged: the broker keeps it for the next start
        self._handle(client, msg)

    def _handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
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

    def _yield(self, newer: Info) -> None:
        """A newer run of this node has the session: stop at once rather than take the session (and
        the requests in it) from each other for ever."""
        _LOGGER.error(
            "node %s (client id %s) is served by a newer run of rkmqtt (host %s, instance %s), which took over "
            "its session; this one stops with exit status 3. Give each bridge its own node_name",
            self.info.node,
            self.settings.effective_client_id(),
            clip(newer.host or "?", 64),
            clip(newer.instance, 32),
        )
        self._taken_over = True
        self._stopping = True
        self.client.disconnect()

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

    # -- subscriptions and their SUBACKs (subacks.py) -----------------------------------------------
    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._subacks.acked(mid, list(codes))
        if mid == self._decide_after:
            self._decide_after = None
            # The broker sends retained messages right after the SUBACK; give them a moment.
            timer = threading.Timer(0.5, self._decide)
            timer.daemon = True
            timer.start()

    # -- sharing the requests with the other nodes (sharing.py decides) -------------------------
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
            # Seen while connected, so not proof of a takeover later (takeover.newer_run).
            if other.instance not in self._own_instances:
                self._own_instances = [*self._own_instances[-63:], other.instance]
            return
        self.drains.session_of(node, other.client_id or f"rkmqtt-{node}")
        with self._sharing_lock:
            actions = self.sharing.peer_info(node, other.share or None)
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action]) -> None:
        subscribed: int | None = None  # the SUBACK an announcement that follows waits for
        # Not connected (a timer fired after the connection went): nothing is sent, and no `online`;
        # the next connect subscribes and announces from the mode decided here.
        unsent = False
        for action in actions:
            if isinstance(action, Subscribe):
                if self._accepting:
                    subscribed = self._subscribe_requests(action.kind)
                    unsent |= subscribed is None
            elif isinstance(action, Unsubscribe):
                self.client.unsubscribe(self._request_topic(action.kind))
            elif isinstance(action, Announce):
                mode = action.mode
                if unsent:
                    continue
                if subscribed is None:
                    self._announce(mode, [], changed=True)
                else:
                    self._subacks.then(subscribed, functools.partial(self._announce, mode, changed=True))
            elif isinstance(action, DrainAction):
                timer = threading.Timer(DRAIN_AFTER_S, self._maybe_drain, (action.node,))
                timer.daemon = True
                timer.start()
            else:
                _LOGGER.warning("%s", action.message)

    def _request_topic(self, kind: Kind) -> str:
        return self.topics.request_subscription(self.shared_group if kind == "shared" else None)

    def _subscribe_requests(self, kind: Kind) -> int | None:
        """Subscribe the requests; returns the SUBSCRIBE's mid (None: not connected, nothing sent)."""
        # A retained request is old news: it was answered when it was published (or it would be
        # run again on every reconnect). MQTT 5 can ask the broker not to send them at all.
        topic = self._request_topic(kind)
        if self.mqtt5:
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            _, mid = self.client.subscribe([(topic, options)])
        else:
            _, mid = self.client.subscribe(topic, 1)
        return mid

    # -- failover: the session of a node that went offline (drain.py) -------------------------------
    def _maybe_drain(self, node: str) -> None:
        """Timer thread: take over offline `node`'s queued requests if it is still offline and this
        node is the one to do it."""
        with self._sharing_lock:
            ours = self.sharing.drains(node)
        if ours and self._accepting and self.connected:
            self.drains.start(node, self.address)

    def _on_drained(self, msg: mqtt.MQTTMessage) -> bool:
        """A drain's network thread: a message queued in the offline node's session, taken as if it
        had come here; True for a request taken. A request this node has already (it reached both
        sessions while a plain and a shared subscription overlapped) is not taken twice."""
        client = self.topics.client_of(msg.topic, "request")
        if client is not None:
            if self._journaled(client, bytes(msg.payload)):
                return False
            self._on_request(client, msg)
            return True
        client = self.topics.client_of(msg.topic, "cancel")
        if client is not None:
            self._on_cancel(client, bytes(msg.payload))
        # Anything else queued there (statuses, infos) is old news about the other nodes.
        return False

    def _journaled(self, client: str, payload: bytes) -> bool:
        if self.journal is None or not is_valid_client(client):
            return False
        rid = extract_routing(payload)[0]
        return rid is not None and self.journal.has(RequestKey(client, rid))

    # -- requests and cancels ----------------------------------------------------------------------
    def _on_request(self, client: str, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            if limited(_LOGGER, logging.WARNING, "retained requests", clip(client, 64)):
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
            if limited(_LOGGER, logging.WARNING, "refusals", clip(client, 64)):
                _LOGGER.warning(
                    "request %s/%s: %s: %s", clip(client, 64), clip(result.id, 64), result.code.value, result.message
                )
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
            if limited(_LOGGER, logging.INFO, "retries answered from the journal", req.client):
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
            if limited(_LOGGER, logging.WARNING, "cancels from invalid client names"):
                _LOGGER.warning("cancel from %s: not a valid client name; ignored", clip(client, 64))
            return
        try:
            req = parse_cancel_payload(payload)
        except (ValueError, UnicodeDecodeError) as e:
            # A cancel has no reply topic of its own; say so in the log rather than drop it silently.
            if limited(_LOGGER, logging.WARNING, "unreadable cancels", client):
                _LOGGER.warning(
                    'cancel from %s: not an id or {"id": ...}: %s', clip(client, 64), clip(str(e).splitlines()[0])
                )
            return
        self.scheduler.cancel(RequestKey(client, req.id))


def _refusal(req: Request, refused: Refused) -> Refusal:
    return Refusal(req.id, route_of(req), refused.code, refused.message)
