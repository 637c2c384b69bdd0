"""CPU used by the processes of one bench run (main thread): the bench itself, the bridge and the
broker, each as a share of one core over the measured part of the run.

Why: when the relay figure is limited, the question is by whom. Throughput alone cannot tell a
busy bridge from a busy load generator on a shared machine; CPU seconds per process can.
"""

from __future__ import annotations

import os
import time

import psutil


class CpuMeter:
    """`start()` and `stop()` around the measured part; `stop()` returns {name: share of a core}
    for the processes that were still there (a process that exited is left out). A name may stand
    for several processes (the bridges of a scale-out run): their shares add up."""

    def __init__(self, pids: dict[str, int | list[int]]) -> None:
        self._procs: dict[str, list[psutil.Process]] = {}
        for name, some in pids.items():
            procs = []
            for pid in some if isinstance(some, list) else [some]:
                try:
                    procs.append(psutil.Process(pid))
                except psutil.Error:
                    continue
            if procs:
                self._procs[name] = procs
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}

    def start(self) -> None:
        self._cpu0 = {n: c for n, p in self._procs.items() if (c := _cpu_s(p)) is not None}
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        out: dict[str, float] = {}
        if wall <= 0:
            return out
        for name, before in self._cpu0.items():
            now = _cpu_s(self._procs[name])
            if now is not None:
                out[name] = round((now - before) / wall, 3)
        return out


def _cpu_s(procs: list[psutil.Process]) -> float | None:
    """User and system seconds of all the processes' threads (not their children). This process's
    own come from its CPU clock: the kernel's per-process figures are in 10 ms ticks, which the
    bench's light share of a short run may not reach."""
    me = os.getpid()
    try:
        return float(sum(time.process_time() if p.pid == me else sum(p.cpu_times()[:2]) for p in procs))
    except psutil.Error:
        return None
