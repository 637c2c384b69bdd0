"""A record of every call into the RKLLM runtime and every callback out of it, for `rkmqtt probe`
(called on the scheduler, worker and callback threads; it only copies, under its own lock). Its
format, which the stand-in replays: docs/rkllm-runtime.md, "Probe traces"."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

PERF_FIELDS = ("prefill_time_ms", "prefill_tokens", "generate_time_ms", "generate_tokens", "memory_usage_mb")


class TraceRecorder:
    """Collects the calls of one probe; `calls` is ready to be written as JSON."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.calls: list[dict[str, Any]] = []
        self._run: dict[str, Any] | None = None
        self._run_t0 = 0.0

    def _ms(self, since: float) -> float:
        return round((time.monotonic() - since) * 1000.0, 3)

    def _call(self, fn: str, **fields: Any) -> dict[str, Any]:
        call = {"fn": fn, "t_ms": self._ms(self._t0), **fields}
        self.calls.append(call)
        return call

    def init(self, n_batch: int, rc: int) -> None:
        with self._lock:
            self._call("init", n_batch=n_batch, rc=rc)

    def destroy(self, rc: int) -> None:
        with self._lock:
            self._call("destroy", rc=rc)

    def run_start(self, n_batch: int, inputs: tuple[bytes, ...], max_new_tokens: int) -> None:
        with self._lock:
            self._run = self._call(
                "run",
                n_batch=n_batch,
                inputs=[i.decode("utf-8", errors="replace") for i in inputs],
                max_new_tokens=max_new_tokens,
                events=[],
            )
            self._run_t0 = time.monotonic()

    def run_end(self, rc: int) -> None:
        with self._lock:
            if self._run is not None:
                self._run["rc"] = rc
                self._run["duration_ms"] = self._ms(self._run_t0)
            self._run = None

    def abort(self, call: Callable[[], int]) -> int:
        """Record an rkllm_abort and make it (`call`): recorded first, so that it precedes the
        callbacks it causes; the recorder's lock is not held during the call."""
        with self._lock:
            if self._run is None:
                event = self._call("abort")
            else:
                event = {"t_ms": self._ms(self._run_t0), "abort": True}
                self._run["events"].append(event)
        rc = call()
        with self._lock:
            event["rc"] = rc
        return rc

    def callback(self, results: Any, n_batch: int, state: int) -> None:
        """Copy one callback (runtime thread): the pointers are valid only during it."""
        event: dict[str, Any] = {"state": int(state), "slots": None}
        if results:
            slots = []
            for i in range(n_batch):
                r = results[i]
                text = ctypes.string_at(r.text).hex() if r.text else None
                slots.append([int(r.token_id), text])
            event["slots"] = slots
            if state == 2:  # FINISH: perf is filled only here
                event["perf"] = [[_num(getattr(results[i].perf, f)) for f in PERF_FIELDS] for i in range(n_batch)]
        with self._lock:
            event["t_ms"] = self._ms(self._run_t0)
            if self._run is not None:
                self._run["events"].append(event)
            else:
                self._call("callback", **event)

    def runs_started(self) -> int:
        """How many rkllm_run calls have begun (the probe times its cancels from a run's start)."""
        with self._lock:
            return sum(1 for c in self.calls if c["fn"] == "run")

    def run_elapsed_ms(self) -> float | None:
        """Milliseconds since the current run began, or None when no run is in progress."""
        with self._lock:
            return self._ms(self._run_t0) if self._run is not None else None


def _num(value: float | int) -> float | int:
    return value if isinstance(value, int) else round(float(value), 3)
