"""MQTT as a reply sink: replies and stats onto the outbox, and a journal row closed when the broker
has the final reply (scheduler thread: the `ReplySink` methods and `stats`; paho network thread and
the main thread's take-up: `refusal` and `recorded`). Nothing here waits: the outbox never blocks."""

from __future__ import annotations

import dataclasses
import functools

from rkmqtt.mqtt.journal import Journal
from rkmqtt.mqtt.outbox import Outbox, Outgoing
from rkmqtt.mqtt.replies import MqttRoute, Refusal, Replies, route_of
from rkmqtt.protocol import Stats
from rkmqtt.sched.request import Chunk, Outcome, Request


class MqttSink:
    def __init__(
        self, outbox: Outbox, replies: Replies, journal: Journal | None = None, stats_topic: str | None = None
    ) -> None:
        self.outbox = outbox
        self.replies = replies
        self.journal = journal
        self.stats_topic = stats_topic

    # -- the scheduler's replies (scheduler thread) -----------------------------------------
    def chunk(self, chunk: Chunk) -> None:
        self.outbox.put(self.replies.chunk(chunk))

    def final(self, outcome: Outcome) -> None:
        route = route_of(outcome.request)
        self._deliver(outcome, route, route.journal_seq)

    def repeat(self, outcome: Outcome, retry: Request) -> None:
        route = route_of(retry)
        self._deliver(outcome, route, None)  # the first request's row recorded it already
        self._drop(route)

    def ignored(self, retry: Request) -> None:
        self._drop(route_of(retry))

    def stats(self, stats: Stats) -> None:
        if self.stats_topic:
            self.outbox.put(Outgoing(self.stats_topic, stats.model_dump_json().encode(), 0, droppable=True))

    # -- the bridge's own answers (paho network thread; main thread at take-up) ----------------
    def refusal(self, refusal: Refusal) -> None:
        self.outbox.put(self.replies.refusal(refusal))

    def recorded(self, route: MqttRoute, final: bytes) -> None:
        """A retried id whose final reply the journal recorded: that reply again."""
        self.outbox.put(self.replies.recorded(route, final))

    def _deliver(self, outcome: Outcome, route: MqttRoute, journal_seq: int | None) -> None:
        """A journaled request's row closes when the broker has the final reply, not when paho has it."""
        msg = self.replies.final(outcome, route)
        if self.journal is not None and journal_seq is not None:
            started = outcome.request.started is not None
            record = functools.partial(self.journal.delivered, journal_seq, msg.payload, started)
            msg = dataclasses.replace(msg, on_delivered=record)
        self.outbox.put(msg)

    def _drop(self, route: MqttRoute) -> None:
        """A retry answered without running: its own row goes."""
        if self.journal is not None and route.journal_seq is not None:
            self.journal.drop(route.journal_seq)
