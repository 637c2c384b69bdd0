"""The outgoing queue, bounded in messages and in bytes (stream chunks dropped past either bound,
final replies always kept), and the publisher thread ("rkmqtt-publisher"), the one that calls
paho's `publish`. Putting never waits; our lock is never held while paho is called."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkmqtt.logtext import clip

_LOGGER = logging.getLogger(__name__)

# A PUBACK can overtake the registration of its message by microseconds; one older than this is for
# another message (paho's message ids wrap after 65,535 publishes) and is forgotten.
_EARLY_S = 0.5

_STREAM_SUFFIX = "/stream"
_FAILED_TOPICS_KEPT = 1024  # reply topics whose failure was logged, to log each once


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None  # MQTT 5 Correlation Data to echo
    droppable: bool = False  # stream chunks may be dropped when the queue is full
    # QoS 1: called once the broker has acknowledged the message, on paho's network thread (or on the
    # publisher thread when the PUBACK overtook the registration): a final's journal row closes then.
    on_delivered: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        """What it costs to hold: payload, topic and Correlation Data."""
        return len(self.payload) + len(self.topic) + len(self.correlation or b"")


class Outbox:
    def __init__(self, maxsize: int, max_bytes: int = 1 << 62) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._queue: deque[Outgoing] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self.dropped = 0

    def put(self, msg: Outgoing) -> bool:
        """Queue a message without waiting. Returns False when a droppable one was dropped."""
        size = msg.size
        with self._cond:
            if msg.droppable and (len(self._queue) >= self.maxsize or self._bytes + size > self.max_bytes):
                self.dropped += 1
                return False
            self._queue.append(msg)
            self._bytes += size
            self._cond.notify()
        return True

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes of the messages waiting."""
        return self._bytes

    def get(self, timeout: float) -> Outgoing | None:
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout)
            if not self._queue:
                self._busy = False
                return None
            self._busy = True
            msg = self._queue.popleft()
            self._bytes -= msg.size
            return msg

    def done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wait_empty(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Publisher:
    """Drains an Outbox into a paho client on its own thread."""

    def __init__(self, outbox: Outbox, client: mqtt.Client, mqtt5: bool, is_connected: Callable[[], bool]) -> None:
        self._outbox = outbox
        self._client = client
        self._mqtt5 = mqtt5
        self._is_connected = is_connected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rkmqtt-publisher", daemon=True)
        # QoS 1 messages with an `on_delivered`, by paho's message id, until the broker's PUBACK.
        self._awaiting: dict[int, Callable[[], None]] = {}
        # PUBACKs that came before their message was registered, oldest first.
        self._early: OrderedDict[int, float] = OrderedDict()
        self._lock = threading.Lock()  # never held while calling paho or a callback
        self.published = 0
        self.failed = 0
        self._failed_topics: OrderedDict[str, None] = OrderedDict()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._outbox.close()
        self._thread.join(timeout)

    @property
    def awaiting(self) -> int:
        """Messages with an `on_delivered` that the broker has not acknowledged yet."""
        return len(self._awaiting)

    def _paho_backlog(self) -> int:
        """Packets paho has queued for the socket but not yet written."""
        return len(getattr(self._client, "_out_packet", ()))

    def _properties(self, msg: Outgoing) -> Properties | None:
        if not self._mqtt5 or msg.correlation is None:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.correlation
        return props

    def _run(self) -> None:
        while True:
            msg = self._outbox.get(timeout=0.2)
            if msg is None:
                if self._stop.is_set():
                    return
                continue
            try:
                self._publish(msg)
            except Exception as e:  # a bad message must not stop the publisher
                self._failed(msg, e)
            finally:
                self._outbox.done()

    def _failed(self, msg: Outgoing, error: Exception) -> None:
        """Log a failed publish once per reply topic (a stream and its final count as one)."""
        self.failed += 1
        key = msg.topic.removesuffix(_STREAM_SUFFIX)
        if key in self._failed_topics:
            return
        self._failed_topics[key] = None
        if len(self._failed_topics) > _FAILED_TOPICS_KEPT:
            self._failed_topics.popitem(last=False)
        _LOGGER.error(
            "publishing to %s failed: %s: %s (further failures on this topic are not logged)",
            clip(msg.topic),
            type(error).__name__,
            clip(str(error)),
        )

    def acknowledged(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        """paho's `on_publish` (network thread): the broker has a QoS 1 message. Its `on_delivered`
        runs here, at once: the shorter the time between the broker's PUBACK and the journal's
        record, the smaller the window in which a crash makes a reply go out twice."""
        now = time.monotonic()
        with self._lock:
            callback = self._awaiting.pop(mid, None)
            if callback is None:
                # Also every QoS 0 chunk (paho calls on_publish once it is written): thousands a second,
                # so the old ones go from the front, oldest first, never by a scan of them all.
                self._early[mid] = now
                self._early.move_to_end(mid)
                while self._early and now - next(iter(self._early.values())) >= _EARLY_S:
                    self._early.popitem(last=False)
        if callback is not None:
            _delivered(callback)

    def _register(self, mid: int, callback: Callable[[], None]) -> None:
        """Publisher thread, right after paho took the message: its PUBACK may have come already."""
        now = time.monotonic()
        with self._lock:
            t = self._early.pop(mid, None)
            came = t is not None and now - t < _EARLY_S
            if not came:
                self._awaiting[mid] = callback
        if came:
            _delivered(callback)

    def _publish(self, msg: Outgoing) -> None:
        if msg.qos == 0 and not self._is_connected():
            return  # QoS 0 is fire-and-forget: a chunk during an outage is lost, its seq gap shows it
        if msg.droppable and self._paho_backlog() > self._outbox.maxsize:
            # The socket is not keeping up (slow link): paho's own queue would grow without bound.
            self._outbox.dropped += 1
            return
        while True:
            info = self._client.publish(
                msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, properties=self._properties(msg)
            )
            # paho keeps QoS>0 messages published while disconnected and sends them on
            # reconnect (rc NO_CONN); only a full paho queue needs us to wait and retry.
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                self.published += 1
                if msg.on_delivered is not None:
                    self._register(info.mid, msg.on_delivered)
                return
            if self._stop.is_set() and msg.qos == 0:
                return
            time.sleep(0.01)


def _delivered(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        _LOGGER.exception("recording a delivered reply failed")
