"""Shared fixtures: private Mosquitto brokers on free ports, in-process bridges, the local Hugging Face
endpoint and the openai fronts' devices."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from rkmqtt.engines.base import Engine
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.service import Service
from rkmqtt.settings import Settings, load_settings
from tests.mqtt_probe import Probe

if TYPE_CHECKING:
    from tests.hf_endpoint import HfEndpoint
    from tests.upstream_server import Device


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's bridges (in-process or `rkmqtt run` processes that inherit the environment)
    keep their journal and the private broker's data in a directory of their own."""
    monkeypatch.setenv("RKMQTT_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private broker for one test; the test may kill() and start() it again."""
    broker = Mosquitto(workdir=tmp_path_factory.mktemp("mosquitto"), persistence=True)
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def bridge_settings(url: str, prefix: str, **overrides: Any) -> Settings:
    flags: dict[str, Any] = {
        "broker": url,
        "topic_prefix": prefix,
        "stats_interval": 1.0,
        "batch_window_ms": 10,
        "discovery": False,
        "temperature": 0.0,
        "grace_period": 5,
        # One node per test: a bridge started again in a test resumes its session (tests that run
        # two bridges at once name their nodes).
        "node_name": f"node-{prefix}",
    }
    flags.update(overrides)
    return load_settings(flags)


@pytest.fixture
def start_bridge(
    mosquitto: Mosquitto, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Service]]:
    """start_bridge(engine, **settings) -> a running in-process Service on the test's broker.

    A bridge started while another of the test still runs gets a state directory of its own: one
    journal file is one process's (it is locked), and in a test both bridges are in this process."""
    services: list[Service] = []

    def start(engine: Engine | None = None, **overrides: Any) -> Service:
        if any(not s.stopped for s in services):
            overrides.setdefault("state_dir", str(tmp_path_factory.mktemp("state")))
        svc = Service(bridge_settings(mosquitto.url, prefix, **overrides), engine=engine)
        svc.start()
        assert svc.bridge is not None and svc.bridge.wait_connected(15), "bridge did not connect"
        services.append(svc)
        return svc

    yield start
    for svc in services:
        svc.stop(grace_s=1)


@pytest.fixture
def probe_factory(mosquitto: Mosquitto) -> Iterator[Callable[..., Probe]]:
    probes: list[Probe] = []

    def make(subscriptions: list[str], **kw: Any) -> Probe:
        p = Probe(mosquitto.url, subscriptions, **kw)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HfEndpoint]:
    """A local Hugging Face endpoint (HF_ENDPOINT) whose repository holds the packaged SmolLM2 GGUF."""
    from tests.hf_endpoint import serve_smollm2

    endpoint = serve_smollm2()
    monkeypatch.setenv("HF_ENDPOINT", endpoint.url)
    yield endpoint
    endpoint.close()


@pytest.fixture
def start_front(mosquitto: Mosquitto, prefix: str) -> Iterator[Callable[..., Service]]:
    """start_front(upstream_url, **settings) -> a running bridge with engine openai (tests/upstream_server.py)."""
    from tests.upstream_server import Fronts  # it imports this module's bridge_settings

    fronts = Fronts(mosquitto.url, prefix)
    yield fronts.start
    fronts.close()


@pytest.fixture
def device(probe_factory: Callable[..., Probe], prefix: str) -> Device:
    """An MQTT device that asks a front and reads its node's stats (tests/upstream_server.py)."""
    from tests.upstream_server import Device

    return Device(probe_factory([f"{prefix}/reply/#", f"{prefix}/node/+/stats"]), prefix)
