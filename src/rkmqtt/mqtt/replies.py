"""The one place that turns outcomes, stream chunks, refusals and recorded finals into MQTT
messages: the topic, QoS and Correlation Data of an `MqttRoute` (any thread; pure)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rkmqtt.mqtt.outbox import Outgoing
from rkmqtt.protocol import ErrorCode, StreamChunk
from rkmqtt.sched.finals import Finals
from rkmqtt.sched.request import Chunk, Outcome, ReplySink, Request
from rkmqtt.topics import Topics

FINAL_QOS = 1
STREAM_QOS = 0


@dataclass(frozen=True)
class MqttRoute:
    """An MQTT request's route: the final reply's topic (chunks go to `<topic>/stream`) and the
    Correlation Data echoed on every reply. Equal routes have the same topic, Correlation Data and
    streaming; the sink and the journal row are not part of the reply target."""

    topic: str
    sink: ReplySink = field(compare=False, repr=False)
    correlation: bytes | None = None
    stream: bool = True
    journal_seq: int | None = field(default=None, compare=False)  # its row in the request journal

    def journaled(self, seq: int) -> MqttRoute:
        return replace(self, journal_seq=seq)


def route_of(req: Request) -> MqttRoute:
    """The MQTT route of a request the MQTT door admitted."""
    route = req.route
    if not isinstance(route, MqttRoute):
        raise TypeError(f"request {req.key} did not come over MQTT: {route!r}")
    return route


def in_journal(req: Request) -> bool:
    """Whether `req` came over MQTT and has its row in the journal (it can wait there for a restart)."""
    return isinstance(req.route, MqttRoute) and req.route.journal_seq is not None


@dataclass(frozen=True)
class Refusal:
    """A request refused before it became a `Request` (bad payload, limits, rate)."""

    id: str
    route: MqttRoute
    code: ErrorCode
    message: str


class Replies:
    def __init__(self, finals: Finals) -> None:
        self.finals = finals

    def final(self, outcome: Outcome, route: MqttRoute | None = None) -> Outgoing:
        """The final reply of `outcome`, to its own route or (a retried id) to `route`."""
        route = route or route_of(outcome.request)
        return _final(route, self.finals.reply(outcome).model_dump_json().encode())

    def chunk(self, chunk: Chunk) -> Outgoing:
        route = route_of(chunk.request)
        payload = StreamChunk(id=chunk.request.id, seq=chunk.seq, text=chunk.text).model_dump_json().encode()
        return Outgoing(Topics.stream_of(route.topic), payload, STREAM_QOS, False, route.correlation, droppable=True)

    def refusal(self, r: Refusal) -> Outgoing:
        return _final(r.route, self.finals.error(r.id, r.code, r.message).model_dump_json().encode())

    def recorded(self, route: MqttRoute, final: bytes) -> Outgoing:
        """A final reply the journal recorded, sent again to a retry of its id."""
        return _final(route, final)


def _final(route: MqttRoute, payload: bytes) -> Outgoing:
    return Outgoing(route.topic, payload, FINAL_QOS, False, route.correlation)
