"""The harness's sweep (main thread): scenarios × n_batch × (MQTT | HTTP | the engine alone), each
point on a fresh bridge it starts as a `rkmqtt run` child process under a topic prefix of its own,
against a private Mosquitto (or the given broker). HTTP points turn the bridge's Ollama API on;
direct points drive the same engine in this process (`direct.py`) for the bridge's cost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import standin
from benchmarks.bridgeproc import BridgeProcess, SettingValue
from benchmarks.direct import DirectDriver
from rkmqtt.bench import runner
from rkmqtt.bench.cpuusage import CpuMeter
from rkmqtt.bench.httpload import HttpLoadGenerator
from rkmqtt.bench.load import LoadGenerator
from rkmqtt.bench.metrics import RequestRecord
from rkmqtt.bench.runner import Point, Runner
from rkmqtt.bench.workload import Workload, device_name
from rkmqtt.bench.writes import WriteMeter, per_request
from rkmqtt.engines import create_engine
from rkmqtt.engines.base import SamplingParams
from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.settings import Settings, load_settings, with_model_defaults

_LOGGER = logging.getLogger(__name__)

ENGINES = ("numpy", "rkllm", "rkllm-zero")

# What the bench sets on the bridges it starts, unless its command line gives the setting:
# no rate limit (devices send far more than 120 a minute), greedy sampling (the same prompt gives
# the same tokens through MQTT and directly) with the repeat penalty of the figures in
# docs/benchmarks.md (it sets the answers' lengths; SmolLM2's own default is 1.05), no discovery,
# a deep queue, quiet logs.
BRIDGE_DEFAULTS: dict[str, SettingValue] = {
    "rate_limit": "0",
    "temperature": "0",
    "repeat_penalty": "1.1",
    "discovery": False,
    "max_queue": "4096",
    "log_level": "WARNING",
    "grace_period": "5",
    "embedded_broker": False,
}


@dataclass(frozen=True)
class Scenario(runner.Scenario):
    """A scenario of the harness: also through HTTP and the engine alone, and the bridges' set-up."""

    direct_n_batch: tuple[int, ...] = ()  # the engine alone, in this process, at these n_batch values
    http_n_batch: tuple[int, ...] = ()  # also through the HTTP API (Ollama's /api/chat) at these
    # The private Mosquitto with `set_tcp_nodelay true` (its default is false: Nagle's algorithm
    # then holds small packets back for the peer's delayed ACK). Ignored with --broker.
    broker_nodelay: bool = True
    bridge_flags: Mapping[str, SettingValue] = field(default_factory=dict)  # settings of this scenario's bridges
    bridges: int = 1  # bridges on one broker and prefix, sharing the requests (the scale-out curve)
    # The private Mosquitto's persistence: "" none, "on changes" (the shipped conf's and the embedded
    # broker's: saved in the loop turn after any change), "every 30 s" (the old setting). With it the
    # run also measures what the bridge and the broker write per request. Ignored with --broker.
    broker_persistence: str = ""


# broker_persistence -> (save on changes, autosave_interval)
PERSISTENCE = {"on changes": (True, 1), "every 30 s": (False, 30)}


class _Meters(CpuMeter):
    """The CPU meter, and the writes over the same measured part."""

    def __init__(self, pids: dict[str, int | list[int]], writes: WriteMeter | None) -> None:
        super().__init__(pids)
        self.writes = writes
        self.written: dict[str, float] = {}

    def start(self) -> None:
        super().start()
        if self.writes is not None:
            self.writes.start()

    def stop(self) -> dict[str, float]:
        out = super().stop()
        if self.writes is not None:
            self.written = self.writes.stop()
        return out


def device_tokens(devices: int) -> dict[str, str]:
    """The devices' bearer tokens, device name -> token, on the bridges the harness starts."""
    return {device_name(i): f"bench-token-{device_name(i)}" for i in range(devices)}


def tokens_setting(devices: int) -> str:
    """The same as the setting `http_tokens` (name:token,...)."""
    return ",".join(f"{name}:{token}" for name, token in device_tokens(devices).items())


class Sweep(Runner):
    def __init__(
        self,
        scenarios: list[Scenario],
        user_flags: Mapping[str, SettingValue],
        config_file: Path | None,
        repeat: int = 1,
        rkllm_library: Path | None = None,
        rkllm_model: Path | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(list(scenarios), repeat)
        self.user_flags = dict(user_flags)
        self.config_file = config_file
        self.rkllm_library = rkllm_library
        self.rkllm_model = rkllm_model
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="rkmqtt-bench-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._standin_lib: Path | None = None
        self._standin_model: Path | None = None
        self.broker_url: str | None = None
        self.broker_notes: set[str] = set()
        self._brokers: dict[tuple[bool, str], Mosquitto] = {}
        self._extra: dict[str, Any] = {}
        if rkllm_library is not None and rkllm_model is None and any(s.engine == "rkllm" for s in scenarios):
            raise ConfigError("--rkllm-library needs --rkllm-model: the .rkllm model file the runtime loads")

    # -- engines ----------------------------------------------------------------------------
    def _standin(self) -> tuple[Path, Path]:
        if self._standin_lib is None or self._standin_model is None:
            self._standin_lib = standin.build_library(self.workdir / "standin")
            self._standin_model = standin.model_file(self.workdir / "standin")
        return self._standin_lib, self._standin_model

    def engine_setup(self, engine: str) -> tuple[dict[str, SettingValue], dict[str, str]]:
        """(settings, environment) of an engine name of the sweep."""
        if engine == "numpy":
            return {"engine": "numpy"}, standin.environment(False)
        if engine == "rkllm" and self.rkllm_library is not None:
            assert self.rkllm_model is not None
            flags: dict[str, SettingValue] = {
                "engine": "rkllm",
                "rkllm_library": str(self.rkllm_library),
                "model": str(self.rkllm_model),
            }
            return flags, dict(os.environ)
        if engine in ("rkllm", "rkllm-zero"):
            lib, model = self._standin()
            env = standin.environment(engine == "rkllm-zero")
            return {"engine": "rkllm", "rkllm_library": str(lib), "model": str(model)}, env
        raise ConfigError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")

    def point_flags(
        self,
        engine_flags: Mapping[str, SettingValue],
        n_batch: int,
        prefix: str,
        scenario_flags: Mapping[str, SettingValue] | None = None,
    ) -> dict[str, Any]:
        assert self.broker_url is not None
        flags: dict[str, Any] = dict(BRIDGE_DEFAULTS)
        flags.update(self.user_flags)
        flags.update(scenario_flags or {})
        flags.update(engine_flags)
        # Each bridge its own node, session and journal: nothing of one point is taken up by the next.
        flags.update({"broker": self.broker_url, "topic_prefix": prefix, "n_batch": str(n_batch), "node_name": prefix})
        flags.setdefault("state_dir", str(self.workdir / "state"))
        return flags

    def _settings(self, flags: Mapping[str, Any]) -> Settings:
        return load_settings(dict(flags), config_file=self.config_file)

    # -- broker -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def brokers(self) -> Iterator[None]:
        """The given broker, or private ones started on first use (one per `broker_nodelay`)."""
        try:
            yield
        finally:
            for m in self._brokers.values():
                m.close()
            self._brokers.clear()

    def _broker_for(self, nodelay: bool, persistence: str = "") -> str:
        given = self.user_flags.get("broker")
        if given:
            self.broker_notes.add(f"given broker {given}")
            return str(given)
        m = self._brokers.get((nodelay, persistence))
        if m is None:
            on_changes, interval = PERSISTENCE.get(persistence, (True, 1))
            m = Mosquitto(
                workdir=self.workdir / f"mosquitto-{int(nodelay)}-{persistence.replace(' ', '')}",
                nodelay=nodelay,
                persistence=bool(persistence),
                save_on_changes=on_changes,
                autosave_interval=interval,
                extra_config="log_type information" if persistence else "",  # its saves, counted
            ).start()
            self._brokers[(nodelay, persistence)] = m
            note = "set_tcp_nodelay true" if nodelay else "default config"
            self.broker_notes.add(f"private Mosquitto ({note}{f', persistence {persistence}' if persistence else ''})")
        return m.url

    @property
    def broker_note(self) -> str:
        return "; ".join(sorted(self.broker_notes))

    # -- running ----------------------------------------------------------------------------
    def plan(self) -> list[Point]:
        points: list[Point] = []
        for sc in self._scenarios():
            label = self._label(sc.engine)
            for nb in sc.n_batch:
                points.append(Point(sc.name, sc.engine, label, nb, "mqtt", sc.workload.describe()))
                if nb in sc.http_n_batch:
                    points.append(Point(sc.name, sc.engine, label, nb, "http", sc.workload.describe()))
                if nb in sc.direct_n_batch:
                    points.append(Point(sc.name, sc.engine, label, nb, "direct", sc.workload.describe()))
        return points

    def _scenarios(self) -> list[Scenario]:
        return [s for s in self.scenarios if isinstance(s, Scenario)]

    def _label(self, engine: str) -> str:
        if engine == "numpy":
            return "numpy (CPU)"
        if engine == "rkllm" and self.rkllm_library is not None:
            return "rkllm (librkllmrt.so)"
        return "rkllm stand-in, zero delay" if engine == "rkllm-zero" else "rkllm stand-in (RK3588 model)"

    def run(self, checkpoint: Callable[[list[Point]], None] | None = None) -> list[Point]:
        with self.brokers():
            return super().run(checkpoint)

    def run_point(self, p: Point, sc: runner.Scenario) -> tuple[list[RequestRecord], dict[str, float]]:
        """One run of a point: its requests' records and its processes' CPU (MQTT and HTTP runs)."""
        assert isinstance(sc, Scenario)
        self.broker_url = self._broker_for(sc.broker_nodelay, sc.broker_persistence)
        given = self.user_flags.get("broker")
        p.broker = (
            self.broker_url if given else ("set_tcp_nodelay true" if sc.broker_nodelay else "Mosquitto default config")
        )
        engine_flags, env = self.engine_setup(sc.engine)
        # The bridges read the harness's --config, or none: not a config.yaml of the folder it runs in.
        env = {**env, "RKMQTT_CONFIG": str(self.config_file.resolve()) if self.config_file else os.devnull}
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        flags = self.point_flags(engine_flags, p.n_batch, prefix, sc.bridge_flags)
        settings = self._settings(flags)
        if p.mode == "direct":
            return self._run_direct(settings, env, sc.workload), {}
        if p.mode == "http":
            port = free_port()
            flags.update({"http_listen": f"127.0.0.1:{port}", "http_tokens": tokens_setting(sc.workload.devices)})
            settings = self._settings(flags)
        bridges: list[BridgeProcess] = []
        try:
            self.progress.phase(f"starting {sc.bridges} bridge{'s' if sc.bridges > 1 else ''} (the model loads)")
            for i in range(sc.bridges):  # one broker and prefix; each bridge a node of its own
                node_flags = flags if sc.bridges == 1 else {**flags, "node_name": f"{prefix}-{i}"}
                log = self.workdir / f"bridge-{p.scenario}-{p.n_batch}-{p.mode}-{i}.log"
                bridges.append(BridgeProcess(self._settings(node_flags), node_flags, env, log).start())
            p.bridge_info = bridges[0].info
            self.progress.phase(f"{sc.workload.warmup} warm-up round(s), then the measured requests")
            t0 = time.monotonic()
            meter = _Meters(self._pids(bridges), self._write_meter(sc, bridges))
            gen: LoadGenerator | HttpLoadGenerator
            if p.mode == "http":
                url, tokens = f"http://127.0.0.1:{port}", device_tokens(sc.workload.devices)
                gen = HttpLoadGenerator(url, sc.workload, self.progress.advance, meter, tokens)
            else:
                gen = LoadGenerator(settings, sc.workload, self.progress.advance, meter)
            records = gen.run()
            if meter.writes is not None:
                self._extra = {"writes": per_request(meter.written, len(records))}
            _LOGGER.debug("point took %.1f s", time.monotonic() - t0)
        finally:
            for bridge in bridges:
                rc = bridge.stop()
                if rc not in (0, None):
                    p.failures.append(f"the bridge exited with status {rc}: {bridge.log_tail(300)}")
        return records, gen.cpu

    def take_extra(self) -> dict[str, Any]:
        extra, self._extra = self._extra, {}
        return extra

    def _write_meter(self, sc: Scenario, bridges: list[BridgeProcess]) -> WriteMeter | None:
        """With broker persistence: the bridges' and our broker's writes, and its saves."""
        broker = self._brokers.get((sc.broker_nodelay, sc.broker_persistence))
        if not sc.broker_persistence or broker is None or broker.proc is None:
            return None
        pids = {"bridge": [b.pid for b in bridges if b.pid is not None], "broker": [broker.proc.pid]}
        return WriteMeter(pids, broker.workdir / "mosquitto.log")

    def _pids(self, bridges: list[BridgeProcess]) -> dict[str, int | list[int]]:
        """The processes whose CPU a run reports: this one, the bridges (together), and the broker if ours."""
        pids: dict[str, int | list[int]] = {"bench": os.getpid()}
        bridge_pids = [b.pid for b in bridges if b.pid is not None]
        if bridge_pids:
            pids["bridge"] = bridge_pids
        for m in self._brokers.values():
            if m.url == self.broker_url and m.proc is not None:
                pids["broker"] = m.proc.pid
        return pids

    def _run_direct(self, settings: Settings, env: dict[str, str], workload: Workload) -> list[RequestRecord]:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # the stand-in reads its timing model at every init and run
        try:
            self.progress.phase("loading the engine (no bridge)")
            engine = create_engine(settings)
            engine.load()
            settings = with_model_defaults(settings, engine.recommended_sampling)  # as the bridge does
            self.progress.phase("the measured requests, straight to the engine")
            try:
                sampling = SamplingParams(
                    temperature=settings.temperature,
                    top_k=settings.top_k,
                    top_p=settings.top_p,
                    repeat_penalty=settings.repeat_penalty,
                )
                driver = DirectDriver(
                    engine, workload, sampling, settings.batch_window_ms / 1000.0, self.progress.advance
                )
                return driver.run()
            finally:
                engine.close()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def meta(self) -> dict[str, Any]:
        uses_standin = self.rkllm_library is None and any(s.engine.startswith("rkllm") for s in self.scenarios)
        return {
            "broker": self.broker_note,
            "bridge": "child process `rkmqtt run` per point",
            "bridge_settings": {**BRIDGE_DEFAULTS, **{k: v for k, v in self.user_flags.items() if k != "password"}},
            "standin_timing_model": standin.timing_model(standin.environment(False)) if uses_standin else None,
        }

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
