"""A bridge that is already running, measured as it is (main thread; the watcher's callbacks run on
paho's network thread): its retained status and info, and `rkmqtt bench`'s runner, which sends the
workload over MQTT and, with `--http-url`, the same workload over its Ollama HTTP API."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.bench.cpuusage import CpuMeter
from rkmqtt.bench.httpload import HttpLoadGenerator
from rkmqtt.bench.load import LoadGenerator
from rkmqtt.bench.metrics import RequestRecord
from rkmqtt.bench.mqttclient import BenchClient
from rkmqtt.bench.runner import Mode, Point, Runner, Scenario
from rkmqtt.bench.workload import Workload, device_name
from rkmqtt.errors import RkmqttError
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics


class InfoWatcher:
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
    w = InfoWatcher(settings)
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
            "start one, or let the bench harness start its own (python -m benchmarks)"
        )
    return w.info


class RunningBridge(Runner):
    """The workload against the bridge online under the settings' topic prefix: over MQTT, and over
    HTTP at `http_url` too when given (all devices with `http_token`, when the bridge wants one)."""

    def __init__(
        self,
        settings: Settings,
        workload: Workload,
        repeat: int = 1,
        http_url: str | None = None,
        http_token: str | None = None,
    ) -> None:
        super().__init__([Scenario("running", "running", workload, (0,))], repeat)
        self.settings = settings
        self.http_url = http_url
        self.http_token = http_token

    def plan(self) -> list[Point]:
        sc = self.scenarios[0]
        modes: tuple[Mode, ...] = ("mqtt", "http") if self.http_url else ("mqtt",)
        return [Point(sc.name, sc.engine, sc.engine, 0, mode, sc.workload.describe()) for mode in modes]

    def run_point(self, p: Point, sc: Scenario) -> tuple[list[RequestRecord], dict[str, float]]:
        p.bridge_info = read_info(self.settings)
        p.n_batch = int(p.bridge_info.get("n_batch", 0))
        p.label = f"{p.bridge_info.get('engine', '?')} (running bridge)"
        p.broker = str(self.settings.broker_url)
        self.progress.phase(f"{sc.workload.warmup} warm-up round(s), then the measured requests")
        meter = CpuMeter({"bench": os.getpid()})  # the bridge's process is not ours to measure
        gen: LoadGenerator | HttpLoadGenerator
        if p.mode == "http":
            assert self.http_url is not None
            tokens = None if self.http_token is None else dict.fromkeys(_devices(sc.workload), self.http_token)
            gen = HttpLoadGenerator(self.http_url, sc.workload, self.progress.advance, meter, tokens)
        else:
            gen = LoadGenerator(self.settings, sc.workload, self.progress.advance, meter)
        return gen.run(), gen.cpu

    def meta(self) -> dict[str, Any]:
        return {
            "broker": str(self.settings.broker_url),
            "bridge": "running bridge" + (f", HTTP API at {self.http_url}" if self.http_url else ""),
        }


def _devices(workload: Workload) -> list[str]:
    return [device_name(i) for i in range(workload.devices)]
