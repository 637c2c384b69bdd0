"""Is a bridge serving topic prefix P? (any thread; pure functions, no I/O.)

A bridge keeps its state in the retained `P/status` (`online`, and `offline` as its Last Will), so
a client that subscribes learns at once whether a bridge serves P. `rkmqtt ask` asks here before
it sends anything. This module is the one place that knows which topics carry that state and
how to read them.
"""

from __future__ import annotations

from collections.abc import Mapping

from rkmqtt.topics import Topics

ONLINE = b"online"


def status_subscriptions(topics: Topics) -> list[str]:
    """The topic filters whose retained messages tell whether a bridge is online."""
    return [topics.status]


def is_status_topic(topics: Topics, topic: str) -> bool:
    return topic == topics.status


def bridge_online(statuses: Mapping[str, bytes]) -> bool | None:
    """From the status messages seen so far (topic -> payload): True when a bridge is online,
    False when one was and is not any more, None when none ever was (no status at all)."""
    if not statuses:
        return None
    return any(payload.strip() == ONLINE for payload in statuses.values())
