"""`rkmqtt check` (main thread): settings, broker reachability, engine readiness and, for the
rkllm engine, the board (driver, NPU device, runtime library, model, platform), in plain words.
Exit 0 when everything needed to run is fine, 1 otherwise.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.broker import port_answers
from rkmqtt.connection import make_client
from rkmqtt.engines import create_engine, resolve_engine_name
from rkmqtt.errors import RkmqttError
from rkmqtt.settings import Settings


def _line(ok: bool | None, what: str, detail: str) -> None:
    mark = {True: "ok  ", False: "FAIL", None: "note"}[ok]
    print(f"[{mark}] {what}: {detail}")


def check_broker(settings: Settings, timeout: float = 5.0) -> tuple[bool | None, str]:
    if settings.broker is None:
        if port_answers("127.0.0.1", 1883):
            settings = settings.model_copy(update={"broker": "mqtt://127.0.0.1:1883"})
        elif settings.embedded_broker:
            return None, "none set and none on localhost:1883; `rkmqtt run` will start a private Mosquitto"
        else:
            return False, "none set and none answers on localhost:1883: set broker=mqtt://host:port"
    addr = settings.broker_url
    result: dict[str, Any] = {}
    done = threading.Event()
    client = make_client(settings, f"rkmqtt-check-{uuid.uuid4().hex[:8]}")

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    t0 = time.monotonic()
    try:
        client.connect(addr.host, addr.port, keepalive=10)
    except OSError as e:
        return False, f"cannot reach {addr}: {e}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False, f"{addr} did not answer the MQTT handshake within {timeout:.0f} s"
        reason = result["reason"]
        if reason.is_failure:
            return False, f"{addr} refused the connection: {reason} (check username and password)"
        return True, f"{addr} accepted a connection in {(time.monotonic() - t0) * 1000:.0f} ms"
    finally:
        client.disconnect()
        client.loop_stop()


def run_checks(settings: Settings) -> int:
    failures = 0
    _line(
        True,
        "settings",
        f"engine={settings.engine} model={settings.model or '(default)'} "
        f"n_batch={settings.n_batch} topic_prefix={settings.topic_prefix}",
    )
    ok, detail = check_broker(settings)
    _line(ok, "broker", detail)
    failures += ok is False
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
    t0 = time.monotonic()
    try:
        engine = create_engine(settings)
        engine.load()
    except RkmqttError as e:
        _line(False, "engine", f"{name}: {e}")
        return 1
    info = engine.info()
    _line(
        True,
        "engine",
        f"{name} loaded {engine.model_name} in {time.monotonic() - t0:.1f} s; "
        f"{engine.capabilities.max_batch} slots, {'continuous' if engine.capabilities.continuous else 'static'} "
        f"batching" + (f"; {info['rss_mb']:.0f} MB resident" if "rss_mb" in info else ""),
    )
    engine.close()
    print("all good" if failures == 0 else f"{failures} problem(s) found")
    return 0 if failures == 0 else 1
