"""The sweep (main thread): scenarios × n_batch values × (through MQTT | through the HTTP API |
engine called directly), repeated, against one broker (a private Mosquitto, or the given one).

For every point through MQTT the bench starts a fresh bridge as a child process (see
`bridgeproc`) with the point's engine and `n_batch` under a topic prefix of its own, runs the
workload with simulated devices (`load`), and stops it. HTTP points do the same with the bridge's
Ollama API on (`http_listen`, a token per device) and the same devices over HTTP (`httpload`),
right after the MQTT point, for HTTP's cost against MQTT's. Direct points load the same engine in
this process and drive it with the same workload (`direct`). Repeats are the outer loop, so a
noisy minute on a shared machine spreads over every point instead of spoiling one.
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
from typing import Any, Literal, Protocol

from rkmqtt.bench import standin
from rkmqtt.bench.bridgeproc import BridgeProcess, SettingValue, read_info
from rkmqtt.bench.cpuusage import CpuMeter
from rkmqtt.bench.direct import DirectDriver
from rkmqtt.bench.httpload import HttpLoadGenerator, tokens_setting
from rkmqtt.bench.load import LoadGenerator
from rkmqtt.bench.metrics import RequestRecord, RunMetrics, median_of_runs, summarize
from rkmqtt.bench.workload import Workload
from rkmqtt.broker import Mosquitto, free_port
from rkmqtt.engines import create_engine
from rkmqtt.engines.base import SamplingParams
from rkmqtt.errors import ConfigError
from rkmqtt.settings import Settings, load_settings, with_model_defaults

_LOGGER = logging.getLogger(__name__)

ENGINES = ("numpy", "rkllm", "rkllm-zero")
Mode = Literal["mqtt", "http", "direct"]

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


class ProgressSink(Protocol):
    def begin(self, description: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    def begin(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: str  # one of ENGINES
    workload: Workload
    n_batch: tuple[int, ...]
    direct_n_batch: tuple[int, ...] = ()
    description: str = ""
    http_n_batch: tuple[int, ...] = ()  # also through the HTTP API (Ollama's /api/chat) at these
    # The private Mosquitto with `set_tcp_nodelay true` (its default is false: Nagle's algorithm
    # then holds small packets back for the peer's delayed ACK, ~40 ms). Ignored with --broker.
    broker_nodelay: bool = True
    bridge_flags: Mapping[str, SettingValue] = field(default_factory=dict)  # settings of this scenario's bridges
    bridges: int = 1  # bridges on one broker and prefix, sharing the requests (the scale-out curve)


@dataclass
class Point:
    scenario: str
    engine: str
    label: str
    n_batch: int
    mode: Mode
    workload: dict[str, Any]
    runs: list[RunMetrics] = field(default_factory=list)
    bridge_info: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    broker: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)  # one row per request of every run

    @property
    def metrics(self) -> RunMetrics | None:
        return median_of_runs(self.runs) if self.runs else None

    def as_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "scenario": self.scenario,
            "engine": self.engine,
            "label": self.label,
            "n_batch": self.n_batch,
            "mode": self.mode,
            "workload": self.workload,
            "median": m.as_dict() if m else None,
            "runs": [r.as_dict() for r in self.runs],
            "broker": self.broker,
            "bridge_info": self.bridge_info,
            "failures": self.failures,
        }


def scaleout_suite(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """1, 2 and 3 bridges on one broker and prefix sharing the requests (each its own RK3588 model,
    n_batch 4), under a closed loop of 24 devices: requests/s against the number of bridges."""
    what = "runtime" if rkllm_real else "stand-in RK3588 timing model"
    w = Workload("closed", devices=24, requests=96, max_new_tokens=32, prompts=prompts)
    return [
        Scenario(f"scale-out-{n}", "rkllm", w, (4,), (), f"{n} bridge(s), RKLLM {what}, shared requests", bridges=n)
        for n in (1, 2, 3)
    ]


def journal_suite(prompts: tuple[str, ...]) -> list[Scenario]:
    """The request journal's cost: the zero-cost relay with the journal and without, side by side."""
    w = Workload("closed", devices=16, requests=1600, max_new_tokens=64, prompts=prompts)
    return [
        Scenario("relay-zero-cost", "rkllm-zero", w, (8,), (), "stand-in with zero delays, with the journal"),
        Scenario(
            "relay-journal-off",
            "rkllm-zero",
            w,
            (8,),
            (),
            "the same without the request journal",
            bridge_flags={"journal": False},
        ),
    ]


def _cpu_closed_loop(prompts: tuple[str, ...], n_batch: tuple[int, ...], http: tuple[int, ...] = ()) -> Scenario:
    return Scenario(
        "cpu-8-devices",
        "numpy",
        Workload("closed", devices=8, requests=32, max_new_tokens=32, prompts=prompts),
        n_batch,
        (1, 8),
        "CPU engine, 8 devices in a closed loop",
        http_n_batch=http,
    )


def _cpu_one_round(prompts: tuple[str, ...]) -> Scenario:
    """8 devices ask new questions at the same moment, once (the warm-up sent other prompts)."""
    return Scenario(
        "cpu-8-at-once",
        "numpy",
        Workload("burst", devices=8, requests=8, max_new_tokens=48, prompts=prompts, fresh_prompts=True),
        (1, 8),
        (1, 8),
        "CPU engine, 8 devices asking at the same moment, one round",
    )


def batching_suite(prompts: tuple[str, ...]) -> list[Scenario]:
    """The CPU engine's batching gain, n_batch 8 against 1, in a closed loop and in one round of 8
    at once, each beside the engine alone."""
    return [_cpu_closed_loop(prompts, (1, 8)), _cpu_one_round(prompts)]


def targets_suite(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """The issue's four targets, measured side by side in one run."""
    rk = "rkllm"
    return [
        _cpu_closed_loop(prompts, (1, 2, 4, 8), http=(8,)),
        _cpu_one_round(prompts),
        Scenario(
            "rk3588-4-users",
            rk,
            Workload("closed", devices=4, requests=12, max_new_tokens=64, prompts=prompts),
            (1, 2, 4),
            (),
            "RKLLM " + ("runtime" if rkllm_real else "stand-in RK3588 timing model") + ", 4 users, closed loop",
        ),
        Scenario(
            "rk3588-4-at-once",
            rk,
            Workload("burst", devices=4, requests=12, max_new_tokens=64, prompts=prompts),
            (1, 4),
            (),
            "RKLLM " + ("runtime" if rkllm_real else "stand-in RK3588 timing model") + ", 4 requests at once, 3 rounds",
        ),
        Scenario(
            "relay-zero-cost",
            "rkllm-zero",
            Workload("closed", devices=16, requests=1600, max_new_tokens=64, prompts=prompts),
            (1, 4, 8),
            (8,),
            "stand-in with zero delays: what the bridge itself relays",
            http_n_batch=(8,),
        ),
        Scenario(
            "relay-journal-off",
            "rkllm-zero",
            Workload("closed", devices=16, requests=1600, max_new_tokens=64, prompts=prompts),
            (8,),
            (),
            "the same without the request journal",
            bridge_flags={"journal": False},
        ),
        Scenario(
            "relay-zero-cost-nagle",
            "rkllm-zero",
            Workload("closed", devices=16, requests=1600, max_new_tokens=64, prompts=prompts),
            (8,),
            (),
            "the same, Mosquitto's default set_tcp_nodelay false",
            broker_nodelay=False,
        ),
    ]


class Sweep:
    def __init__(
        self,
        scenarios: list[Scenario],
        user_flags: Mapping[str, SettingValue],
        config_file: Path | None,
        repeat: int = 1,
        rkllm_library: Path | None = None,
        rkllm_model: Path | None = None,
        attach: bool = False,
        workdir: Path | None = None,
        progress: ProgressSink | None = None,
    ) -> None:
        self.scenarios = scenarios
        self.user_flags = dict(user_flags)
        self.config_file = config_file
        self.repeat = max(1, repeat)
        self.rkllm_library = rkllm_library
        self.rkllm_model = rkllm_model
        self.attach = attach
        self.progress: ProgressSink = progress or NoProgress()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="rkmqtt-bench-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._standin_lib: Path | None = None
        self._standin_model: Path | None = None
        self.broker_url: str | None = None
        self.broker_notes: set[str] = set()
        self._brokers: dict[bool, Mosquitto] = {}
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

    def _broker_for(self, nodelay: bool) -> str:
        given = self.user_flags.get("broker")
        if given:
            self.broker_notes.add(f"given broker {given}")
            return str(given)
        if self.attach:
            self.broker_notes.add("broker on localhost:1883")
            return "mqtt://127.0.0.1:1883"
        m = self._brokers.get(nodelay)
        if m is None:
            m = Mosquitto(workdir=self.workdir / f"mosquitto-{int(nodelay)}", nodelay=nodelay).start()
            self._brokers[nodelay] = m
            self.broker_notes.add(f"private Mosquitto ({'set_tcp_nodelay true' if nodelay else 'default config'})")
        return m.url

    @property
    def broker_note(self) -> str:
        return "; ".join(sorted(self.broker_notes))

    # -- running ----------------------------------------------------------------------------
    def plan(self) -> list[Point]:
        points: list[Point] = []
        for sc in self.scenarios:
            label = sc.engine if self.attach else self._label(sc.engine)
            for nb in sc.n_batch:
                points.append(Point(sc.name, sc.engine, label, nb, "mqtt", sc.workload.describe()))
                if nb in sc.http_n_batch and not self.attach:
                    points.append(Point(sc.name, sc.engine, label, nb, "http", sc.workload.describe()))
                if nb in sc.direct_n_batch:
                    points.append(Point(sc.name, sc.engine, label, nb, "direct", sc.workload.describe()))
        return points

    def _label(self, engine: str) -> str:
        if engine == "numpy":
            return "numpy (CPU)"
        if engine == "rkllm" and self.rkllm_library is not None:
            return "rkllm (librkllmrt.so)"
        return "rkllm stand-in, zero delay" if engine == "rkllm-zero" else "rkllm stand-in (RK3588 model)"

    def run(self, checkpoint: Callable[[list[Point]], None] | None = None) -> list[Point]:
        """Run every point `repeat` times; `checkpoint(points)` after each run (to save partial results)."""
        points = self.plan()
        by_name = {s.name: s for s in self.scenarios}
        with self.brokers():
            for rep in range(self.repeat):
                for p in points:
                    sc = by_name[p.scenario]
                    self.broker_url = self._broker_for(sc.broker_nodelay)
                    p.broker = (
                        ("set_tcp_nodelay true" if sc.broker_nodelay else "Mosquitto default config")
                        if not self.attach and not self.user_flags.get("broker")
                        else self.broker_url
                    )
                    what = f"{p.label} n_batch {p.n_batch} {p.mode} ({sc.workload.label()})"
                    if self.repeat > 1:
                        what += f" [{rep + 1}/{self.repeat}]"
                    self.progress.begin(what, sc.workload.total)
                    try:
                        records, cpu = self._run_point(p, sc)
                    except Exception as e:  # one failed point must not lose the others
                        _LOGGER.exception("bench point failed: %s", what)
                        p.failures.append(f"{type(e).__name__}: {e}")
                        continue
                    m = summarize(records)
                    m.cpu = cpu
                    p.runs.append(m)
                    start = min((r.sent for r in records), default=0.0)
                    p.requests += [{"repeat": rep + 1, **r.row(start)} for r in records]
                    if checkpoint is not None:
                        checkpoint(points)
        return points

    def _run_point(self, p: Point, sc: Scenario) -> tuple[list[RequestRecord], dict[str, float]]:
        """One run of a point: its requests' records and its processes' CPU (MQTT and HTTP runs)."""
        if self.attach:
            settings = self._settings(self.user_flags | {"broker": self.broker_url})
            p.bridge_info = read_info(settings)
            p.n_batch = int(p.bridge_info.get("n_batch", 0))
            p.label = f"{p.bridge_info.get('engine', '?')} (running bridge)"
            attached = LoadGenerator(settings, sc.workload, self.progress.advance, CpuMeter({"bench": os.getpid()}))
            return attached.run(), attached.cpu
        engine_flags, env = self.engine_setup(sc.engine)
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
            for i in range(sc.bridges):  # one broker and prefix; each bridge a node of its own
                node_flags = flags if sc.bridges == 1 else {**flags, "node_name": f"{prefix}-{i}"}
                log = self.workdir / f"bridge-{p.scenario}-{p.n_batch}-{p.mode}-{i}.log"
                bridges.append(BridgeProcess(self._settings(node_flags), node_flags, env, log).start())
            p.bridge_info = bridges[0].info
            t0 = time.monotonic()
            meter = CpuMeter(self._pids(bridges))
            gen: LoadGenerator | HttpLoadGenerator
            if p.mode == "http":
                gen = HttpLoadGenerator(f"http://127.0.0.1:{port}", sc.workload, self.progress.advance, meter)
            else:
                gen = LoadGenerator(settings, sc.workload, self.progress.advance, meter)
            records = gen.run()
            _LOGGER.debug("point took %.1f s", time.monotonic() - t0)
        finally:
            for bridge in bridges:
                rc = bridge.stop()
                if rc not in (0, None):
                    p.failures.append(f"the bridge exited with status {rc}: {bridge.log_tail(300)}")
        return records, gen.cpu

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
            engine = create_engine(settings)
            engine.load()
            settings = with_model_defaults(settings, engine.recommended_sampling)  # as the bridge does
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

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
