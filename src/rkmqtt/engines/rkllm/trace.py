"""A record of every call into the RKLLM runtime and every callback out of it, for `rkmqtt probe`
(called on the scheduler, worker and callback threads; it only copies, under its own lock). Its
format, which the stand-in replays: docs/rkllm-runtime.md, "Probe traces"."""

from __future__ import annotations

import copy
import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

PERF_FIELDS = ("prefill_time_ms", "prefill_tokens", "generate_time_ms", "generate_tokens", "memory_usage_mb")
FINISH, ERROR = 2, 3

RunInput = str | dict[str, list[int]]  # a prompt, or {"tokens": [...]} for RKLLM_INPUT_TOKEN


class TraceRecorder:
    """Collects the calls of one engine's life; `calls` is ready to be written as JSON."""

    def __init__(self, *, all_finish_slots: bool = False) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.calls: list[dict[str, Any]] = []
        self.all_finish_slots = all_finish_slots
        self._run: dict[str, Any] | None = None
        self._run_t0 = 0.0
        self._run_thread = 0

    def _ms(self, since: float) -> float:
        return round((time.monotonic() - since) * 1000.0, 3)

    def _call(self, fn: str, **fields: Any) -> dict[str, Any]:
        call = {"fn": fn, "t_ms": self._ms(self._t0), **fields}
        self.calls.append(call)
        return call

    def call(self, fn: str, **fields: Any) -> None:
        """A call that is complete when it returns (init, destroy, is_running, clear_kv_cache, ...)."""
        with self._lock:
            self._call(fn, **fields)

    def init(self, n_batch: int, rc: int) -> None:
        self.call("init", n_batch=n_batch, rc=rc)

    def destroy(self, rc: int) -> None:
        self.call("destroy", rc=rc)

    def run_start(self, n_batch: int, inputs: tuple[RunInput, ...], max_new_tokens: int, save_cache: bool) -> None:
        """On the thread that is about to call rkllm_run."""
        with self._lock:
            self._run = self._call(
                "run",
                n_batch=n_batch,
                inputs=list(inputs),
                max_new_tokens=max_new_tokens,
                save_prompt_cache=save_cache,
                callback_threads={"caller": 0, "other": 0},
                events=[],
            )
            self._run_t0 = time.monotonic()
            self._run_thread = threading.get_ident()

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
            count = n_batch if state not in (FINISH, ERROR) or self.all_finish_slots else 1
            slots = []
            for i in range(count):
                r = results[i]
                text = ctypes.string_at(r.text).hex() if r.text else None
                slots.append([int(r.token_id), text])
            event["slots"] = slots
            if state == FINISH:  # perf is filled only here
                event["perf"] = [[_num(getattr(results[i].perf, f)) for f in PERF_FIELDS] for i in range(count)]
        on_caller = threading.get_ident() == self._run_thread
        with self._lock:
            event["t_ms"] = self._ms(self._run_t0)
            if self._run is not None:
                self._run["events"].append(event)
                self._run["callback_threads"]["caller" if on_caller else "other"] += 1
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

    def snapshot(self, since: int) -> list[dict[str, Any]]:
        """Copies of the calls from index `since` on, the run in progress with its events so far."""
        with self._lock:
            return copy.deepcopy(self.calls[since:])


def _num(value: float | int) -> float | int:
    return value if isinstance(value, int) else round(float(value), 3)
