"""Is a bridge serving topic prefix P? Which topics carry each node's retained status, and how to read
them (any thread; pure). `rkmqtt ask` asks here before it sends anything."""

from __future__ import annotations

from collections.abc import Mapping

from rkmqtt.topics import Topics

ONLINE = b"online"


def status_subscriptions(topics: Topics) -> list[str]:
    """The topic filters whose retained messages tell whether a bridge is online."""
    return [topics.every_node("status")]


def is_status_topic(topics: Topics, topic: str) -> bool:
    return topics.node_of(topic, "status") is not None


def bridge_online(statuses: Mapping[str, bytes]) -> bool | None:
    """From the status messages seen so far (topic -> payload): True when any node is online,
    False when nodes were and none is any more, None when none ever was (no status at all)."""
    if not statuses:
        return None
    return any(payload.strip() == ONLINE for payload in statuses.values())
