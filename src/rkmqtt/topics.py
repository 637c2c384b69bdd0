"""The topic scheme of wire contract version 1 (any thread; pure). Devices publish on
`P/request/<client>` and `P/cancel/<client>`; a bridge answers on `P/reply/<client>/<id>` (QoS 1) and
`.../<id>/stream` (QoS 0); each bridge is a node with `P/node/<node>/status`, `info` (retained) and
`stats`. The bridges of one broker and prefix share the requests through one shared subscription."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rkmqtt.protocol import CLIENT_PATTERN

_CLIENT_RE = re.compile(CLIENT_PATTERN)


def is_valid_client(name: str) -> bool:
    return bool(_CLIENT_RE.fullmatch(name))


def has_wildcards(topic: str) -> bool:
    return "+" in topic or "#" in topic


def shared_group_of(prefix: str) -> str:
    """The default shared subscription group of a prefix (a group name has no '/')."""
    return prefix.replace("/", "_")


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str = ""  # this bridge's node name: its status, info and stats topics

    # -- device -> bridge -------------------------------------------------------------
    def request(self, client: str) -> str:
        return f"{self.prefix}/request/{client}"

    def cancel(self, client: str) -> str:
        return f"{self.prefix}/cancel/{client}"

    def request_subscription(self, shared_group: str | None = None) -> str:
        sub = f"{self.prefix}/request/+"
        return f"$share/{shared_group}/{sub}" if shared_group else sub

    def cancel_subscription(self) -> str:
        # Cancels are never shared: every bridge hears them and acts on its own requests.
        return f"{self.prefix}/cancel/+"

    # -- bridge -> device -------------------------------------------------------------
    def reply_root(self) -> str:
        return f"{self.prefix}/reply/"

    def reply(self, client: str, request_id: str) -> str:
        return f"{self.prefix}/reply/{client}/{request_id}"

    @staticmethod
    def stream_of(reply_topic: str) -> str:
        return f"{reply_topic}/stream"

    # -- nodes: each bridge's own topics ---------------------------------------------
    def node_topic(self, kind: str, node: str | None = None) -> str:
        """`P/node/<node>/<kind>` for kind status, info or stats (this bridge's node by default)."""
        return f"{self.prefix}/node/{node or self.node}/{kind}"

    @property
    def status(self) -> str:
        return self.node_topic("status")

    @property
    def info(self) -> str:
        return self.node_topic("info")

    @property
    def stats(self) -> str:
        return self.node_topic("stats")

    def every_node(self, kind: str) -> str:
        """The subscription to `kind` of every node: `P/node/+/<kind>`."""
        return f"{self.prefix}/node/+/{kind}"

    def node_of(self, topic: str, kind: str) -> str | None:
        """The `<node>` of `P/node/<node>/<kind>`, or None when the topic is not of that shape."""
        head, tail = f"{self.prefix}/node/", f"/{kind}"
        if not topic.startswith(head) or not topic.endswith(tail):
            return None
        node = topic[len(head) : -len(tail)]
        return node if node and "/" not in node else None

    # -- parsing ----------------------------------------------------------------------
    def client_of(self, topic: str, kind: str) -> str | None:
        """The `<client>` level of `P/<kind>/<client>`, or None when the topic is not of that shape."""
        head = f"{self.prefix}/{kind}/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :]
        return None if "/" in rest else rest

    def is_allowed_reply_topic(self, topic: str, client: str | None = None) -> bool:
        """A reply topic must lie strictly under `P/reply/` — under `P/reply/<client>/` when the
        requesting client is given, so that a broker ACL pinning each device to its own reply
        topics (`pattern read P/reply/%u/#`, deploy/mosquitto/rkmqtt.acl) holds — with no
        wildcards and no empty levels."""
        root = self.reply_root() if client is None else f"{self.reply_root()}{client}/"
        if has_wildcards(topic) or not topic.startswith(root) or len(topic) <= len(root):
            return False
        if "\x00" in topic or len(topic.encode()) > 65535:
            return False
        return "" not in topic[len(root) :].split("/")
