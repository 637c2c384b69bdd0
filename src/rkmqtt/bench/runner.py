"""Points of a benchmark and the loop that measures them (main thread): scenarios × n_batch × mode,
each run `repeat` times with the repeats outermost, so that a noisy minute on a shared machine
spreads over every point. A `Runner` says how one point runs (a running bridge, or the harness's
bridges it starts)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from rkmqtt.bench.metrics import RequestRecord, RunMetrics, median_of_runs, summarize
from rkmqtt.bench.workload import Workload

_LOGGER = logging.getLogger(__name__)

Mode = Literal["mqtt", "http", "direct"]


class ProgressSink(Protocol):
    def plan(self, runs: int) -> None:
        """The session makes `runs` runs (points x repeats)."""

    def begin(self, description: str, total: int) -> None:
        """A run starts; `total` requests are to be answered."""

    def phase(self, text: str) -> None:
        """What the run does now, before its requests go out (starting a bridge, say)."""

    def advance(self, n: int) -> None:
        """`n` more of the run's requests were answered."""

    def end(self) -> None:
        """The run is over."""


class NoProgress:
    def plan(self, runs: int) -> None:
        pass

    def begin(self, description: str, total: int) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: str
    workload: Workload
    n_batch: tuple[int, ...]
    description: str = ""


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


class Runner:
    """Measures the points of `scenarios`: subclasses plan them and run one."""

    def __init__(self, scenarios: list[Scenario], repeat: int = 1) -> None:
        self.scenarios = scenarios
        self.repeat = max(1, repeat)
        self.progress: ProgressSink = NoProgress()

    def plan(self) -> list[Point]:
        raise NotImplementedError

    def run_point(self, p: Point, sc: Scenario) -> tuple[list[RequestRecord], dict[str, float]]:
        """One run of a point: its requests' records and its processes' CPU (share of a core)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """What the report says about where the figures come from (broker, bridge, settings)."""
        return {}

    def take_extra(self) -> dict[str, Any]:
        """Figures of the run just measured that go into its `extra` (e.g. "writes"); {} by default."""
        return {}

    def close(self) -> None:
        pass

    def run(self, checkpoint: Callable[[list[Point]], None] | None = None) -> list[Point]:
        """Run every point `repeat` times; `checkpoint(points)` after each run (to save partial results)."""
        points = self.plan()
        by_name = {s.name: s for s in self.scenarios}
        self.progress.plan(len(points) * self.repeat)
        for rep in range(self.repeat):
            for p in points:
                sc = by_name[p.scenario]
                what = f"{p.label} n_batch {p.n_batch} {p.mode} ({sc.workload.label()})"
                if self.repeat > 1:
                    what += f" [{rep + 1}/{self.repeat}]"
                self.progress.begin(what, sc.workload.total)
                try:
                    records, cpu = self.run_point(p, sc)
                except Exception as e:  # one failed point must not lose the others
                    _LOGGER.exception("bench point failed: %s", what)
                    p.failures.append(f"{type(e).__name__}: {e}")
                    continue
                finally:
                    self.progress.end()
                m = summarize(records)
                m.cpu = cpu
                m.extra.update(self.take_extra())
                p.runs.append(m)
                start = min((r.sent for r in records), default=0.0)
                p.requests += [{"repeat": rep + 1, **r.row(start)} for r in records]
                if checkpoint is not None:
                    checkpoint(points)
        return points
