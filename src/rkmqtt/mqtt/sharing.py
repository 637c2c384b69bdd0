"""How a node takes requests: alone, joining, shared with the other nodes of its broker and prefix,
off or left; and which node takes over the session of one that went offline (paho network thread
and the bridge's timers, under the bridge's lock; pure: it returns actions, the bridge carries them
out). Why: docs/architecture.md, "Several nodes on one broker" and "Failover"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["alone", "joining", "shared", "off", "left"]
Setting = Literal["auto", "on", "off"]
Kind = Literal["plain", "shared"]


@dataclass(frozen=True)
class Subscribe:
    kind: Kind


@dataclass(frozen=True)
class Unsubscribe:
    kind: Kind


@dataclass(frozen=True)
class Announce:
    mode: Mode


@dataclass(frozen=True)
class Warn:
    message: str


@dataclass(frozen=True)
class Drain:
    """A node is offline: in a moment (`Sharing.drains` says whether it is still ours to do), take
    over the requests queued in its session."""

    node: str


Action = Subscribe | Unsubscribe | Announce | Warn | Drain

# The modes of a node that takes requests: the ones that may take over an offline node's session.
SERVING = ("alone", "shared")


@dataclass
class Peer:
    online: bool = False
    mode: str | None = None  # what its retained info says


@dataclass
class Sharing:
    setting: Setting
    me: str = ""  # this node's name
    mode: Mode | None = None  # None until `decide()`
    peers: dict[str, Peer] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    @property
    def online_peers(self) -> list[str]:
        return sorted(n for n, p in self.peers.items() if p.online)

    def subscription(self) -> Kind | None:
        """What to subscribe on (re)connect."""
        if self.mode in ("alone", "off"):
            return "plain"
        if self.mode == "shared":
            return "shared"
        return None

    # -- events ------------------------------------------------------------------------------
    def decide(self) -> list[Action]:
        """Once, at start, after the retained statuses and infos of the other nodes came in."""
        if self.setting == "off":
            return [Unsubscribe("shared"), *self._enter("off"), *self._warn_off()]
        # An offline node's session may hold its share of the requests, or (it was alone) a
        # subscription to every request: what is queued there is taken over, and the session ends.
        offline: list[Action] = [Drain(n) for n, p in sorted(self.peers.items()) if not p.online and p.mode]
        ever_shared = any(p.mode == "shared" for p in self.peers.values())
        if self.setting == "on" or ever_shared or self.online_peers:
            return [Unsubscribe("plain"), *self._join(), *offline]
        return [Unsubscribe("shared"), *self._enter("alone"), *offline]

    def peer_status(self, node: str, online: bool) -> list[Action]:
        peer = self.peers.setdefault(node, Peer())
        came = online and not peer.online
        went = peer.online and not online
        peer.online = online
        if went and self.mode in SERVING:
            return [Drain(node)]
        if self.mode == "off":
            return self._warn_off()
        if self.mode == "alone" and came:
            # Another node: share from now on. The shared subscription comes first, so no request
            # falls between the two (one that comes through both is the same request twice).
            self.mode = "shared"
            return [Subscribe("shared"), Unsubscribe("plain"), Announce("shared")]
        if self.mode == "joining":
            return self._join()
        return []

    def peer_info(self, node: str, mode: str | None) -> list[Action]:
        self.peers.setdefault(node, Peer()).mode = mode
        return self._join() if self.mode == "joining" else []

    def drains(self, node: str) -> bool:
        """Whether this node takes over offline `node`'s session now: it is still offline, this node
        serves, and among the serving nodes online this one has the lowest name (one node does it)."""
        peer = self.peers.get(node)
        if peer is None or peer.online or self.mode not in SERVING:
            return False
        serving = [n for n in self.online_peers if self.peers[n].mode in SERVING]
        return all(self.me < n for n in serving)

    def stopping(self) -> list[Action]:
        """A clean stop: with other nodes online, leave the shared subscription so that the broker
        hands new requests to them; alone, keep it, so that requests wait for the next start."""
        if self.mode == "shared" and self.online_peers:
            self.mode = "left"
            return [Unsubscribe("shared"), Announce("left")]
        return []

    # -- helpers -----------------------------------------------------------------------------
    def _join(self) -> list[Action]:
        waiting_for = [n for n in self.online_peers if self.peers[n].mode in ("alone", "off", None)]
        if waiting_for:
            first = self.mode != "joining"
            self.mode = "joining"
            if first:
                return [Announce("joining")]
            return []
        return self._enter("shared")

    def _enter(self, mode: Mode) -> list[Action]:
        self.mode = mode
        kind: Kind = "shared" if mode == "shared" else "plain"
        return [Subscribe(kind), Announce(mode)]

    def _warn_off(self) -> list[Action]:
        out: list[Action] = []
        for node in self.online_peers:
            if node not in self._warned:
                self._warned.add(node)
                out.append(
                    Warn(
                        f"node {node} is also online on this broker and prefix, and share_requests is off here: both "
                        f"bridges answer every request. Leave share_requests at auto on every bridge of the prefix"
                    )
                )
        return out
