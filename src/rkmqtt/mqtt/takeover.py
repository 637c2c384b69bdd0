"""Who has our session, after the broker closed our connection (paho network thread, inside
`Bridge._on_disconnect`)? A throw-away connection reads this node's retained status and info: a newer
run of this node, online, took it over (the bridge stops with exit status 3). Anything else — a node
taking over the requests of one it thought offline, a client using our client id, a blip — is
answered by reconnecting, after a back-off that grows while the closes go on. Why it is decided so:
docs/architecture.md, "The MQTT session"."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from rkmqtt.mqtt.connection import connect_args, make_client
from rkmqtt.protocol import Info
from rkmqtt.settings import BrokerAddress, Settings
from rkmqtt.topics import Topics

LOOK_S = 2.0  # how long the look waits for a newer run's status and info after our connection closed
STABLE_S = 60.0  # a connection that lasted this long was not in a fight for the session
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Seen:
    """What a look found: whether the broker answered, whether the node's status is `online`, and
    the node's infos that came (retained or live)."""

    reachable: bool
    online: bool = False
    infos: tuple[Info, ...] = ()


def newer_run(me: Info, seen: Seen, known: Iterable[str]) -> Info | None:
    """The info of a newer run of this node that `seen` shows online: another instance, started
    later, and not one this run saw on its own info topic while it was connected (an info published
    then — forged or stale — proves nothing about who has the session now)."""
    if not seen.online:
        return None
    known = set(known)
    for other in seen.infos:
        if (
            other.node == me.node
            and other.instance
            and other.instance not in known
            and other.instance != me.instance
            and (other.started, other.instance) > (me.started, me.instance)
        ):
            return other
    return None


def look(
    settings: Settings, address: BrokerAddress, topics: Topics, me: Info, known: Iterable[str], wait_s: float = LOOK_S
) -> Seen:
    """Read `topics.status` and `topics.info` on the broker at `address` (the bridge's, with its
    current credentials) over a connection of their own (a random client id, a clean session), for up
    to `wait_s` seconds or until a newer run shows."""
    known = set(known)
    cond = threading.Condition()
    state: dict[str, Any] = {"connected": None, "online": False, "infos": []}
    client = make_client(settings, f"rkmqtt-look-{uuid.uuid4().hex[:12]}", address)
    client.connect_timeout = min(wait_s, 2.0)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        ok = not reason.is_failure
        if ok:
            c.subscribe([(topics.status, 1), (topics.info, 1)])
        with cond:
            state["connected"] = ok
            cond.notify_all()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with cond:
            if msg.topic == topics.status:
                state["online"] = msg.payload.strip() == b"online"
            elif msg.payload:
                with contextlib.suppress(ValidationError):
                    state["infos"].append(Info.model_validate_json(msg.payload))
            cond.notify_all()

    def seen() -> Seen:
        return Seen(state["connected"] is True, state["online"], tuple(state["infos"]))

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(address.host, address.port, **connect_args(settings, keepalive=10))
    except (OSError, ValueError):
        return Seen(False)
    client.loop_start()
    try:
        with cond:
            if not cond.wait_for(lambda: state["connected"] is not None, min(wait_s, 2.0)) or not state["connected"]:
                return Seen(False)
            cond.wait_for(lambda: newer_run(me, seen(), known) is not None, wait_s)
            return seen()
    finally:
        client.disconnect()
        client.loop_stop()


def describe_close(client_id: str, strikes: int, taken: bool) -> str:
    """The log's words for a connection closed while the broker answers (`taken`: it said 142)."""
    who = (
        "a node taking over the requests of one it saw go offline, a second bridge with this client_id, "
        "or a client that borrowed it"
    )
    if taken:
        return f"the broker gave our session to another client with our client id {client_id} ({who})"
    if strikes >= 2:
        return (
            f"connection closed {strikes} times in a row while the broker answers: another client keeps "
            f"connecting with our client id {client_id} ({who})"
        )
    return f"connection closed while the broker answers: another client may have used client id {client_id} ({who})"


class Backoff:
    """The reconnect delay after a close while the broker answers: the first is the usual one; each
    further close of a connection that lasted less than `STABLE_S` multiplies it by 4, up to
    `MAX_BACKOFF_S`, so that two clients with one client id do not take the session from each other
    several times a second."""

    def __init__(self, base_s: float) -> None:
        self.base_s = base_s
        self.strikes = 0
        self._connected_at: float | None = None

    def connected(self, now: float) -> None:
        self._connected_at = now

    def lost(self, now: float, reachable: bool, taken: bool = False) -> float:
        """The delay before the next connect. `reachable`: the broker answered a look at once;
        `taken`: it said so itself (reason code 142)."""
        lasted = None if self._connected_at is None else now - self._connected_at
        self._connected_at = None
        if not reachable and not taken:
            self.strikes = 0  # the broker is down: an outage, not a fight for the session
            return self.base_s
        short = lasted is not None and lasted < STABLE_S
        self.strikes = self.strikes + 1 if short else 1
        if taken:
            self.strikes = max(self.strikes, 2)
        return float(min(MAX_BACKOFF_S, self.base_s * 4 ** (self.strikes - 1)))
