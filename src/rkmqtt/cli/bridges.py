"""Which bridges (nodes) serve topic prefix P on the broker, from their retained `P/node/<node>/status`
and `info` (main thread; paho's network thread for the callbacks): what `rkmqtt check` reports. A
broker whose ACL hides the info (devices read status only) still gives the statuses."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.mqtt.connection import make_client, set_nodelay
from rkmqtt.mqtt.presence import ONLINE
from rkmqtt.protocol import Info
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics

#: Seconds to wait after the SUBACKs for the retained messages (the broker sends them at once).
RETAINED_WAIT_S = 1.5


@dataclass
class Nodes:
    """What the broker holds for the nodes of one prefix."""

    status: dict[str, bool] = field(default_factory=dict)  # node -> online
    info: dict[str, Info] = field(default_factory=dict)
    status_readable: bool = True
    info_readable: bool = True

    @property
    def online(self) -> list[str]:
        return sorted(n for n, up in self.status.items() if up)


def read_nodes(settings: Settings, timeout_s: float = 5.0) -> Nodes | str:
    """The nodes' retained status and info, or why they could not be read."""
    topics = Topics(settings.topic_prefix)
    nodes = Nodes()
    acks: dict[int, bool] = {}  # SUBACK mid -> granted
    lock = threading.Lock()
    acked = threading.Event()
    failure: list[str] = []
    client = make_client(settings, f"rkmqtt-check-{uuid.uuid4().hex[:8]}")
    client.on_socket_open = set_nodelay
    mids: dict[str, int] = {}

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            failure.append(str(reason))
            acked.set()
            return
        for kind in ("status", "info"):  # one SUBSCRIBE each: an ACL may refuse one of them only
            _, mid = c.subscribe(topics.every_node(kind), 1)
            mids[kind] = -1 if mid is None else mid

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, p: Any) -> None:
        with lock:
            acks[mid] = not any(code.is_failure for code in codes)
            if len(acks) == 2:
                acked.set()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        with lock:
            if (node := topics.node_of(msg.topic, "status")) is not None and payload:
                nodes.status[node] = payload.strip() == ONLINE
            elif (node := topics.node_of(msg.topic, "info")) is not None and payload:
                with contextlib.suppress(ValueError):  # not ours to judge: the status says whether it serves
                    nodes.info[node] = Info.model_validate_json(payload)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    addr = settings.broker_url
    try:
        client.connect(addr.host, addr.port, keepalive=10)
    except OSError as e:
        return str(e)
    client.loop_start()
    try:
        if not acked.wait(timeout_s):
            return f"no answer to the subscriptions within {timeout_s:.0f} s"
        if failure:
            return f"the broker refused the connection: {failure[0]}"
        time.sleep(RETAINED_WAIT_S)
        with lock:
            granted = [acks.get(mids.get(kind, -1), False) for kind in ("status", "info")]
            return Nodes(dict(nodes.status), dict(nodes.info), *granted)
    finally:
        client.disconnect()
        client.loop_stop()


def describe(node: str, info: Info | None, now: float) -> str:
    if info is None:
        return node
    up = max(0.0, now - info.started)
    since = f"{up / 3600:.1f} h" if up >= 3600 else f"{up / 60:.0f} min"
    return f"{node} ({info.engine}, {info.model}, n_batch {info.n_batch}, on {info.host}, up {since})"


def bridge_lines(settings: Settings) -> list[tuple[bool | None, str, str]]:
    """`rkmqtt check`'s lines about the bridges: (ok, what, detail)."""
    topics = Topics(settings.topic_prefix)
    where = f"topic_prefix {settings.topic_prefix!r}"
    nodes = read_nodes(settings)
    if isinstance(nodes, str):
        return [(False, "bridges", f"could not read {topics.every_node('status')}: {nodes}")]
    if not nodes.status_readable:
        return [(False, "bridges", f"cannot read {topics.every_node('status')} (the broker's ACL): cannot tell")]
    now = time.time()
    online = nodes.online
    offline = sorted(n for n, up in nodes.status.items() if not up)
    out: list[tuple[bool | None, str, str]] = []
    if online:
        listed = "; ".join(describe(n, nodes.info.get(n), now) for n in online)
        out.append((True, "bridges", f"{len(online)} online with {where}: {listed}"))
    elif offline:
        out.append((None, "bridges", f"none online with {where} (offline: {', '.join(offline)}): start `rkmqtt run`"))
    else:
        out.append((None, "bridges", f"none has run on this broker with {where}: start `rkmqtt run`"))
    if offline and online:
        out.append((None, "offline bridges", ", ".join(offline)))
    # Mosquitto grants a subscription its ACL denies and then delivers nothing: an online node
    # whose retained info never came is the sign (a bridge publishes its info before `online`).
    hidden = online if not nodes.info_readable else [n for n in online if n not in nodes.info]
    if hidden:
        out.append((None, "node info", f"cannot read node info of {', '.join(hidden)} (the broker's ACL, most "
                    "likely): engine and model not shown"))  # fmt: skip
    return out
