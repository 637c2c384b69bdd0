"""The bridge under test as a `rkmqtt run` child process (main thread), or one already running.

Why a child process and not `Service` in this process: the simulated devices are paho clients
with threads of their own; in one process they would share the bridge's GIL, and their work would
be counted as the bridge's cost. A child process is also exactly what a board runs. The bench
waits for the bridge's retained `P/status` = `online`, reads `P/info`, and after the run stops it
with SIGTERM and clears the retained messages it left under its private topic prefix.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.bench.mqttclient import BenchClient
from rkmqtt.errors import RkmqttError
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics

SettingValue = str | int | float | bool


def as_flags(settings: Mapping[str, SettingValue]) -> list[str]:
    """`rkmqtt run` flags for settings: `--name value`, `--name` / `--no-name` for booleans."""
    out: list[str] = []
    for name, value in settings.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


class _InfoWatcher:
    """Collects the retained status and info of one node (the first node online when `node` is
    None: a running bridge the bench attaches to)."""

    def __init__(self, settings: Settings, node: str | None = None) -> None:
        self.topics = Topics(settings.topic_prefix)
        self.node = node
        self.statuses: dict[str, bytes] = {}
        self.infos: dict[str, dict[str, Any]] = {}
        subs = [self.topics.every_node("status"), self.topics.every_node("info")]
        self.client = BenchClient(settings, f"rkmqtt-bench-watch-{uuid.uuid4().hex[:6]}", subs, self._on)

    def _on(self, msg: mqtt.MQTTMessage) -> None:
        node = self.topics.node_of(msg.topic, "status")
        if node is not None:
            self.statuses[node] = bytes(msg.payload)
            return
        node = self.topics.node_of(msg.topic, "info")
        if node is not None and msg.payload:
            try:
                self.infos[node] = json.loads(msg.payload)
            except ValueError:
                self.infos.pop(node, None)

    def _online_node(self) -> str | None:
        nodes = [self.node] if self.node else sorted(self.statuses)
        return next((n for n in nodes if self.statuses.get(n) == b"online" and n in self.infos), None)

    @property
    def info(self) -> dict[str, Any] | None:
        node = self._online_node()
        return None if node is None else self.infos[node]

    def online(self) -> bool:
        return self._online_node() is not None


def read_info(settings: Settings, timeout: float = 10.0) -> dict[str, Any]:
    """The retained info of a running bridge (the first node online); RkmqttError when none is."""
    w = _InfoWatcher(settings)
    w.client.start()
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not w.online():
            time.sleep(0.05)
    finally:
        w.client.stop()
    if not w.online() or w.info is None:
        raise RkmqttError(
            f"no bridge online under {settings.topic_prefix}/ on {settings.broker_url}: "
            "start one, or let the bench start its own"
        )
    return w.info


class BridgeProcess:
    """`python -m rkmqtt run <flags>` with `env`, logging to `log_path`."""

    def __init__(self, settings: Settings, flags: Mapping[str, SettingValue], env: dict[str, str], log_path: Path):
        self.settings = settings
        self.argv = [sys.executable, "-m", "rkmqtt", "run", *as_flags(flags)]
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 180.0) -> BridgeProcess:
        watcher = _InfoWatcher(self.settings, self.settings.effective_node_name())
        watcher.client.start()
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            end = time.monotonic() + timeout
            while not watcher.online():
                if self.proc.poll() is not None:
                    raise RkmqttError(
                        f"the bridge exited with status {self.proc.returncode} at start:\n{self.log_tail()}"
                    )
                if time.monotonic() > end:
                    self.stop()
                    raise RkmqttError(f"the bridge was not online within {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.05)
            assert watcher.info is not None
            self.info = watcher.info
        finally:
            watcher.client.stop()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._clear_retained()
        return proc.returncode

    def _clear_retained(self) -> None:
        topics = Topics(self.settings.topic_prefix, self.settings.effective_node_name())
        try:
            c = BenchClient(self.settings, f"rkmqtt-bench-clear-{uuid.uuid4().hex[:6]}", [], lambda m: None).start(5)
        except RkmqttError:
            return
        try:
            for t in (topics.status, topics.info):
                c.client.publish(t, b"", qos=1, retain=True).wait_for_publish(3)
        finally:
            c.stop()
