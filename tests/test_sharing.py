"""How a node takes requests (sharing.py), as tables of events and the actions they give."""

from __future__ import annotations

from typing import Any

import pytest

from rkmqtt.mqtt.sharing import Announce, Drain, Sharing, Subscribe, Unsubscribe, Warn


def run(sharing: Sharing, events: list[tuple[str, Any, Any]]) -> list[list[str]]:
    out = []
    for kind, a, b in events:
        if kind == "status":
            actions = sharing.peer_status(a, b)
        elif kind == "info":
            actions = sharing.peer_info(a, b)
        elif kind == "decide":
            actions = sharing.decide()
        else:
            actions = sharing.stopping()
        out.append([short(x) for x in actions])
    return out


def short(action: Any) -> str:
    if isinstance(action, Subscribe):
        return f"+{action.kind}"
    if isinstance(action, Unsubscribe):
        return f"-{action.kind}"
    if isinstance(action, Announce):
        return f"={action.mode}"
    if isinstance(action, Drain):
        return f">{action.node}"
    assert isinstance(action, Warn)
    return "warn"


CASES: dict[str, tuple[str, list[tuple[str, Any, Any]], list[list[str]], str]] = {
    "alone: a plain subscription, Mosquitto restores it": (
        "auto", [("decide", None, None)], [["-shared", "+plain", "=alone"]], "alone"),
    "alone, then a second node: shared first, then the plain one goes": (
        "auto",
        [("decide", None, None), ("status", "b", True), ("info", "b", "joining"), ("status", "b", True)],
        [["-shared", "+plain", "=alone"], ["+shared", "-plain", "=shared"], [], []],
        "shared"),
    "joining a node that is alone: nothing until it shares": (
        "auto",
        [("status", "a", True), ("info", "a", "alone"), ("decide", None, None), ("info", "a", "shared")],
        [[], [], ["-plain", "=joining"], ["+shared", "=shared"]],
        "shared"),
    "joining nodes that share already: at once": (
        "auto",
        [("status", "a", True), ("info", "a", "shared"), ("decide", None, None)],
        [[], [], ["-plain", "+shared", "=shared"]],
        "shared"),
    "two newcomers wait for the lone node, not for each other": (
        "auto",
        [("status", "a", True), ("info", "a", "alone"), ("status", "c", True), ("info", "c", "joining"),
         ("decide", None, None), ("info", "a", "shared")],
        [[], [], [], [], ["-plain", "=joining"], ["+shared", "=shared"]],
        "shared"),
    "a node that shared once and is offline now: its session may hold shares, so share, and drain it": (
        "auto",
        [("status", "a", False), ("info", "a", "shared"), ("decide", None, None)],
        [[], [], ["-plain", "+shared", "=shared", ">a"]],
        "shared"),
    "an offline node with a plain subscription: alone, and its session drained": (
        "auto",
        [("status", "a", False), ("info", "a", "alone"), ("decide", None, None)],
        [[], [], ["-shared", "+plain", "=alone", ">a"]],
        "alone"),
    "shared stays shared when the others go, and drains the one that went": (
        "auto",
        [("status", "a", True), ("info", "a", "shared"), ("decide", None, None), ("status", "a", False)],
        [[], [], ["-plain", "+shared", "=shared"], [">a"]],
        "shared"),
    "a clean stop with others online hands over; alone it keeps the subscription": (
        "auto",
        [("status", "a", True), ("info", "a", "shared"), ("decide", None, None), ("stop", None, None)],
        [[], [], ["-plain", "+shared", "=shared"], ["-shared", "=left"]],
        "left"),
    "alone, a clean stop keeps the plain subscription": (
        "auto", [("decide", None, None), ("stop", None, None)], [["-shared", "+plain", "=alone"], []], "alone"),
    "off: plain whatever the others do, and one warning per node online": (
        "off",
        [("status", "a", True), ("decide", None, None), ("status", "a", True), ("status", "b", True)],
        [[], ["-shared", "+plain", "=off", "warn"], [], ["warn"]],
        "off"),
    "on: shared even alone": ("on", [("decide", None, None)], [["-plain", "+shared", "=shared"]], "shared"),
    "a node with share_requests off online: a newcomer waits, and shares once it is gone": (
        "auto",
        [("status", "a", True), ("info", "a", "off"), ("decide", None, None), ("status", "a", False)],
        [[], [], ["-plain", "=joining"], ["+shared", "=shared"]],
        "shared"),
    "off drains nobody: its plain subscription had every request already": (
        "off",
        [("status", "a", True), ("decide", None, None), ("status", "a", False)],
        [[], ["-shared", "+plain", "=off", "warn"], []],
        "off"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_sharing(name: str) -> None:
    setting, events, expected, mode = CASES[name]
    s = Sharing(setting)  # type: ignore[arg-type]
    assert run(s, events) == expected
    assert s.mode == mode
    assert s.subscription() == {"alone": "plain", "off": "plain", "shared": "shared"}.get(mode)


def test_the_lowest_named_serving_node_takes_over_an_offline_nodes_session() -> None:
    """Every node runs the same rule on what it sees, so one node (the lowest name among those
    online that serve) drains; one that joins, has share_requests off or is offline does not."""

    def sharing(me: str, peers: dict[str, tuple[bool, str]]) -> Sharing:
        s = Sharing("auto", me=me)
        for node, (online, mode) in peers.items():
            s.peer_status(node, online)
            s.peer_info(node, mode)
        s.decide()
        return s

    seen = {"dead": (False, "shared"), "b": (True, "shared"), "c": (True, "shared")}
    assert sharing("b", {k: v for k, v in seen.items() if k != "b"}).drains("dead")
    assert not sharing("c", {k: v for k, v in seen.items() if k != "c"}).drains("dead")
    # c is the lowest of the serving ones when b does not serve yet (joining) and a is offline; a
    # node that waits for another to share does not drain either.
    assert sharing("c", {"dead": (False, "shared"), "b": (True, "joining"), "a": (False, "shared")}).drains("dead")
    assert not sharing("c", {"dead": (False, "shared"), "b": (True, "off")}).drains("dead"), "c is joining"
    assert not sharing("c", {"dead": (True, "shared"), "b": (False, "shared")}).drains("dead"), "online again"
    assert not sharing("c", {"dead": (False, "shared")}).drains("nobody"), "never seen"
