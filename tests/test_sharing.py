"""How a node takes requests (sharing.py), as tables of events and the actions they give."""

from __future__ import annotations

from typing import Any

import pytest

from rkmqtt.mqtt.sharing import Announce, Sharing, Subscribe, Unsubscribe, Warn


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
    "a node that shared once and is offline now: its session may hold shares, so share": (
        "auto",
        [("status", "a", False), ("info", "a", "shared"), ("decide", None, None)],
        [[], [], ["-plain", "+shared", "=shared"]],
        "shared"),
    "an offline node with a plain subscription: a warning, and alone": (
        "auto",
        [("status", "a", False), ("info", "a", "alone"), ("decide", None, None)],
        [[], [], ["-shared", "+plain", "=alone", "warn"]],
        "alone"),
    "shared stays shared when the others go": (
        "auto",
        [("status", "a", True), ("info", "a", "shared"), ("decide", None, None), ("status", "a", False)],
        [[], [], ["-plain", "+shared", "=shared"], []],
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
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_sharing(name: str) -> None:
    setting, events, expected, mode = CASES[name]
    s = Sharing(setting)  # type: ignore[arg-type]
    assert run(s, events) == expected
    assert s.mode == mode
    assert s.subscription() == {"alone": "plain", "off": "plain", "shared": "shared"}.get(mode)
