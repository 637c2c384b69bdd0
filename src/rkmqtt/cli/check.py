"""`rkmqtt check` (main thread): settings, broker reachability, the bridges online on it and, for the
rkllm engine, the board (driver, NPU device, runtime library, model, platform), for the openai engine,
the upstream server (reachable, model listed, one token generated), the chat template in use (from the
settings and the model's files), in plain words; the engine's own model only when asked (`--load-model`,
or an engine or model given as a flag). Exit 0 when everything needed to run is fine, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.cli.bridges import bridge_lines
from rkmqtt.engines import create_engine, resolve_engine_name
from rkmqtt.engines.base import Engine
from rkmqtt.errors import RkmqttError
from rkmqtt.mqtt.broker import port_answers
from rkmqtt.mqtt.connection import connect_args, make_client, set_nodelay
from rkmqtt.mqtt.reach import reach_broker
from rkmqtt.settings import Settings


def _line(ok: bool | None, what: str, detail: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "note"}[ok]
    print(f"[{mark}] {what}: {detail}")


def _with_broker(settings: Settings) -> Settings:
    """The settings with the broker `rkmqtt run` would use when none is set and one answers locally."""
    if settings.broker is None and port_answers("127.0.0.1", 1883):
        return settings.model_copy(update={"broker": "mqtt://127.0.0.1:1883"})
    return settings


def check_broker(settings: Settings, timeout: float = 5.0) -> tuple[bool | None, str]:
    settings = _with_broker(settings)
    if settings.broker is None:
        if settings.embedded_broker:
            return None, "none set and none on localhost:1883; `rkmqtt run` will start a private Mosquitto"
        else:
            return False, "none set and none answers on localhost:1883: set broker=mqtt://host:port"
    addr = settings.broker_url
    reach = reach_broker(settings, timeout)
    return reach.ok, f"{addr} {reach.detail}" if reach.ok else f"{addr}: {reach.detail}"


class _Client:
    """A throw-away connection for the broker checks (its own paho thread)."""

    def __init__(self, settings: Settings, client_id: str, subscribe: str | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.subscribe = subscribe
        self.connected = threading.Event()
        self.session_present = False
        self.failure: str | None = None
        self.messages: list[tuple[float, bytes]] = []
        self.got = threading.Condition()
        self.lost = threading.Event()  # the broker closed the connection (not our close)
        self._closing = False
        self.refused: str | None = None  # a PUBACK's failure reason (MQTT 5: e.g. the ACL's "Not authorized")

    def open(self, persistent: bool, timeout: float = 5.0) -> bool:
        self._closing = False
        c = make_client(self.settings, self.client_id, persistent=persistent)
        c.on_socket_open = set_nodelay
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c
        addr = self.settings.broker_url
        try:
            c.connect(addr.host, addr.port, **connect_args(self.settings, keepalive=10, persistent=persistent))
        except OSError as e:
            self.failure = str(e)
            return False
        c.loop_start()
        return self.connected.wait(timeout) and self.failure is None

    def close(self) -> None:
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            self.failure = str(reason)
        else:
            self.session_present = bool(getattr(flags, "session_present", False))
            if self.subscribe:
                c.subscribe(self.subscribe, 1)
        self.connected.set()

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, p: Any) -> None:
        if not self._closing:
            self.lost.set()

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, reason: Any, p: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.refused = str(reason)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.got:
            self.messages.append((time.monotonic(), bytes(msg.payload)))
            self.got.notify_all()

    def wait_messages(self, n: int, timeout: float) -> bool:
        with self.got:
            return self.got.wait_for(lambda: len(self.messages) >= n, timeout)


def check_broker_settings(settings: Settings) -> list[tuple[bool | None, str, str]]:
    """What a client can see of the broker settings the promise needs: sessions kept while a client
    is away, with its QoS 1 messages queued. Persistence across the broker's own restart and
    `set_tcp_nodelay` cannot be seen from a client (Linux's quick ACKs hide Nagle's delay from a
    probe): a note names them."""
    if settings.session_expiry == 0:
        sessions: tuple[bool | None, str, str] = (None, "broker sessions", "session_expiry is 0: not checked")
        out = [sessions]
    else:
        out = [_check_sessions(settings)]
    out.append(
        (
            None,
            "broker settings",
            "not visible from a client: the broker needs `persistence true`, saved on changes (`autosave_on_changes "
            "true`, `autosave_interval 1`), for what it acknowledged to survive its crash or restart, and "
            "`set_tcp_nodelay true` for stream chunks to go out at once (deploy/mosquitto/rkmqtt.conf)",
        )
    )
    return out


def _check_sessions(settings: Settings) -> tuple[bool | None, str, str]:
    tag = uuid.uuid4().hex[:10]
    topic = f"{settings.topic_prefix}/check/{tag}"
    away = _Client(settings, f"rkmqtt-check-{tag}", subscribe=topic)
    sender = _Client(settings, f"rkmqtt-check-{tag}-s")
    try:
        if not away.open(persistent=True):
            return False, "broker sessions", f"could not connect: {away.failure or 'no answer'}"
        time.sleep(0.2)  # the subscription is in place
        away.close()
        if not sender.open(persistent=False):
            return False, "broker sessions", f"could not connect: {sender.failure or 'no answer'}"
        sender.client.publish(topic, b"queued while away", qos=1).wait_for_publish(5)
        sender.close()
        if not away.open(persistent=True):
            return False, "broker sessions", f"could not reconnect: {away.failure or 'no answer'}"
        resumed = away.session_present
        queued = away.wait_messages(1, 3.0)
        away.close()
        if resumed and queued:
            return True, "broker sessions", "kept while a client is away, with its QoS 1 messages queued"
        if sender.refused or _ids_bound(settings, tag):
            return None, "broker sessions", _not_checked(settings, topic, sender.refused)
        return (
            False,
            "broker sessions",
            "the broker did not keep the session (or its queued message) of a client that went away: "
            "requests sent while the bridge restarts would be lost "
            "(check max_queued_messages and persistent_client_expiration)",
        )
    except (OSError, RuntimeError, ValueError) as e:
        return False, "broker sessions", f"could not be checked: {e}"
    finally:
        with contextlib.suppress(OSError, RuntimeError, ValueError):  # forget the check's session
            cleanup = _Client(settings, f"rkmqtt-check-{tag}")
            if cleanup.open(persistent=False):
                cleanup.close()


def _ids_bound(settings: Settings, tag: str) -> bool:
    """Whether the broker gives every connection of this login one client id: a second connection,
    with another client id, then closes the first one."""
    first, second = _Client(settings, f"rkmqtt-check-{tag}-a"), _Client(settings, f"rkmqtt-check-{tag}-b")
    try:
        if not first.open(persistent=False) or not second.open(persistent=False):
            return False
        return first.lost.wait(2.0)
    finally:
        for c in (first, second):
            with contextlib.suppress(OSError, RuntimeError, ValueError, AttributeError):  # never opened
                c.close()


def _not_checked(settings: Settings, topic: str, refused: str | None) -> str:
    """Why this login cannot run the session check: the broker gives all its connections one client id
    (so the check's second client ends the first one's session), or its ACL refuses the check's topic."""
    user = settings.broker_url.username or "(anonymous)"
    why = (
        f"the broker did not let user {user} publish on {topic} ({refused}: its ACL)"
        if refused
        else f"the broker gives every connection of user {user} one client id (use_username_as_clientid)"
    )
    return (
        f"not checked with this login: {why}. With deploy/mosquitto/rkmqtt.conf run the check with the bridges' "
        "login and listener (the bridge's config file: docs/board-install.md)"
    )


def run_checks(settings: Settings, load_model: bool = False, config_file: Path | None = None) -> int:
    failures = 0
    served = (
        f"upstream_model={settings.upstream_model or '(the first listed)'}"
        if settings.engine == "openai"
        else f"model={settings.model or '(default)'}"
    )
    _line(
        True,
        "settings",
        f"{f'config file {config_file}' if config_file else 'no config file'}; engine={settings.engine} "
        f"{served} n_batch={settings.n_batch} topic_prefix={settings.topic_prefix}",
    )
    ok, detail = check_broker(settings)
    _line(ok, "broker", detail)
    failures += ok is False
    none_online = False
    if ok:
        for ok2, what, detail2 in check_broker_settings(_with_broker(settings)):
            _line(ok2, what, detail2)
            failures += ok2 is False
        for ok2, what, detail2 in bridge_lines(_with_broker(settings)):
            _line(ok2, what, detail2)
            failures += ok2 is False
            none_online |= what == "bridges" and ok2 is None
    name = resolve_engine_name(settings)
    if name == "rkllm" or settings.engine == "auto":
        from rkmqtt.engines.rkllm.platform import find_soc, run_checks

        if find_soc() is None:
            _line(
                None,
                "NPU",
                "this is not an RK3588/RK3576 board: the NPU engine cannot run here; "
                "the CPU engine (engine=numpy) can" + ("" if name == "rkllm" else ", and engine=auto uses it"),
            )
        else:
            for c in run_checks(settings):
                _line(c.ok, c.name, c.message)
                failures += not c.ok
    if name == "openai":
        # The model is the upstream server's: checking that server (reachable, the model listed, one
        # token) loads nothing here, so it is done without --load-model, as the board's checks are.
        from rkmqtt.engines.openai.check import check_upstream

        for ok3, what, detail3 in check_upstream(settings):
            _line(ok3, what, detail3)
            failures += ok3 is False
    unchecked = False  # the model cannot be loaded or its template read here: said why
    if name in ("numpy", "rkllm"):
        from rkmqtt.cli.pull import with_local_model

        # A hf:// reference: its pulled file (nothing is downloaded here), or a line saying it is not here.
        try:
            settings, not_here = with_local_model(settings)
        except RkmqttError as e:
            not_here, load_model = str(e), True  # a failure either way
        if not_here is not None:  # `rkmqtt run` pulls what is not here yet
            _line(False if load_model else None, "model", not_here)
            failures += load_model
            unchecked = True
    if unchecked:
        pass  # the line above said why
    elif load_model and not (name == "openai" and failures):  # openai: it would only wait for the same server
        failures += not _check_engine(settings, name)
    elif name != "openai":
        _line(None, "engine", f"{name}: model not loaded (rkmqtt check --load-model loads it to check it)")
        failures += not _check_template(settings)
    if failures:
        print(f"{failures} problem(s) found")
    elif none_online:
        print("no problem found, but no bridge is online: start one with `rkmqtt run`")
    else:
        print("all good")
    return 0 if failures == 0 else 1


def _check_engine(settings: Settings, name: str) -> bool:
    """Load the engine's model (seconds, and its memory; for openai, start its client) and say how it went."""
    t0 = time.monotonic()
    try:
        engine = create_engine(settings)
    except RkmqttError as e:
        _line(False, "engine", f"{name}: {e}")
        return False
    try:
        engine.load()
    except RkmqttError as e:
        _line(False, "engine", f"{name}: {e}")
        _template_line(engine, {})  # still found from the settings and the files
        return False
    info = engine.info()
    problem = engine.problem()
    _line(
        problem is None,
        "engine",
        f"{name}: {problem}"
        if problem is not None
        else f"{name} loaded {engine.model_name} in {time.monotonic() - t0:.1f} s; "
        f"{engine.capabilities.max_batch} slots, {'continuous' if engine.capabilities.continuous else 'static'} "
        f"batching" + (f"; {info['rss_mb']:.0f} MB resident" if "rss_mb" in info else ""),
    )
    ok = problem is None and _template_line(engine, info)
    engine.close()
    return ok


def _template_line(engine: Engine, info: dict[str, Any]) -> bool:
    """Which chat template renders conversations and whether tools reach the model: the loaded model's,
    or, not loaded, the one the settings and the model's files give (file reads; no weights). False when
    it cannot be found or read (as `rkmqtt run` would fail)."""
    try:
        used = engine.template_in_use()
    except RkmqttError as e:
        _line(False, "chat template", str(e))
        return False
    if used is not None:
        tools = (
            "tools reach the model"
            if used.tools
            else "no place for tools (answered without them; strict_tools refuses them)"
        )
        context = f"; context {info['max_context']} tokens" if "max_context" in info else ""
        _line(None, "chat template", f"{used.origin}; {tools}{context}")
    return True


def _check_template(settings: Settings) -> bool:
    """The chat template line without loading the model (the engine built, not loaded)."""
    try:
        engine = create_engine(settings)
    except RkmqttError as e:
        _line(False, "chat template", str(e))
        return False
    return _template_line(engine, {})
