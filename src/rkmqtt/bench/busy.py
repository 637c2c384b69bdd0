"""Was the machine quiet enough for the figures to mean something? A thread ("rkmqtt-bench-load")
samples, every few seconds, the threads that want a CPU (running or in uninterruptible sleep, what
Linux's load average counts) of processes other than the bench, rkmqtt and Mosquitto; their mean over
the run is the others' load average. Above the core count the run is reported as not meaningful."""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Seconds between two samples (Linux's own load average samples every 5 s).
SAMPLE_EVERY_S = 2.0


@dataclass
class LoadVerdict:
    cores: int
    loadavg_start: float | None  # the 1-minute load average before the run, everything counted
    others_mean: float | None  # other processes' threads that wanted a CPU, mean over the run
    others_max: int | None
    samples: int

    @property
    def meaningful(self) -> bool | None:
        """False when other work loaded the machine past its cores; None when not measured."""
        if self.others_mean is None:
            return None
        return self.others_mean <= self.cores

    def text(self) -> str:
        if self.others_mean is None:
            return "machine load not measured (no /proc here)"
        others = (
            f"other processes' load average {self.others_mean:.1f} (at most {self.others_max}) on {self.cores} cores "
            "while it ran (the bench, rkmqtt and Mosquitto not counted)"
        )
        if self.meaningful:
            return f"the machine was quiet enough: {others}"
        return f"NOT MEANINGFUL: the machine was busy with other work: {others}; measure again on a quiet machine"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "meaningful": self.meaningful, "verdict": self.text()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LoadVerdict | None:
        if not data:
            return None
        names = ("cores", "loadavg_start", "others_mean", "others_max", "samples")
        return cls(**{k: data.get(k) for k in names})  # type: ignore[arg-type]


def _ours(pid: str, me: str, cache: dict[str, bool]) -> bool:
    """The bench itself, an rkmqtt process (the bridge under test) or a Mosquitto (its broker)."""
    known = cache.get(pid)
    if known is None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        except OSError:
            return False
        known = pid == me or b"rkmqtt" in cmdline or comm == b"mosquitto"
        cache[pid] = known
    return known


def others_wanting_cpu(cache: dict[str, bool] | None = None) -> int | None:
    """Threads of other processes that are running, waiting for a CPU or in uninterruptible sleep
    now; None where there is no /proc."""
    cache = {} if cache is None else cache
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    count = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
            except OSError:
                continue
            state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
            if state in (b"R", b"D") and not _ours(pid, me, cache):
                count += 1
    return count


class LoadWatch:
    """Samples the others' load on a thread of its own between `start` and `stop`."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S) -> None:
        self.every_s = every_s
        self.samples: list[int] = []
        self.loadavg_start: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rkmqtt-bench-load", daemon=True)
        self._cache: dict[str, bool] = {}

    def start(self) -> LoadWatch:
        self.loadavg_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            n = others_wanting_cpu(self._cache)
            if n is not None:
                self.samples.append(n)
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> LoadVerdict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        s = list(self.samples)
        return LoadVerdict(
            cores=os.cpu_count() or 1,
            loadavg_start=None if self.loadavg_start is None else round(self.loadavg_start, 2),
            others_mean=round(sum(s) / len(s), 2) if s else None,
            others_max=max(s) if s else None,
            samples=len(s),
        )
