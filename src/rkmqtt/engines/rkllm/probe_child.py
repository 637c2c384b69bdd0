"""One part of `rkmqtt probe` in a child process of its own: one engine, its scenarios, in order
(`python3 -m rkmqtt.engines.rkllm.probe_child <fd>`). The child's main thread drives an `RkllmEngine`
as the scheduler would; the engine's threads only record. Its messages to the parent:
docs/rkllm-runtime.md, "The probe's parts"."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Hashable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rkmqtt.engines.base import ChatMessage, ErrorEvent, FinishEvent, Generation, Prepared, SamplingParams, TokenEvent
from rkmqtt.engines.rkllm.board_state import peak_rss_mb, read_npu_memory
from rkmqtt.engines.rkllm.probe_script import PartSpec, Scenario
from rkmqtt.engines.rkllm.trace import TraceRecorder
from rkmqtt.errors import RequestRejected, RkmqttError
from rkmqtt.settings import Settings

if TYPE_CHECKING:
    from rkmqtt.engines.rkllm.engine import RkllmEngine


class Child:
    """Runs one part and reports to the parent."""

    def __init__(self, spec: dict[str, Any], out: IO[str]) -> None:
        self.part = PartSpec.from_json(spec["part"])
        self.options = spec["options"]
        self.recorder = TraceRecorder(all_finish_slots=self.part.all_finish_slots)
        self._out = out
        self._sent = 0  # calls before this index were sent complete
        self._last_shape: tuple[int, ...] = ()

    def send(self, message: dict[str, Any]) -> None:
        self._out.write(json.dumps(message, ensure_ascii=False) + "\n")
        self._out.flush()

    def flush_calls(self) -> None:
        """Send the calls from the first one not yet sent complete on (when something changed)."""
        calls = self.recorder.snapshot(self._sent)
        shape = (self._sent, len(calls), sum(len(c.get("events", ())) for c in calls), sum("rc" in c for c in calls))
        if not calls or shape == self._last_shape:
            return
        self.send({"t": "calls", "from": self._sent, "calls": calls})
        self._last_shape = shape
        for c in calls:
            if c["fn"] == "run" and "rc" not in c:
                break  # the run in progress: sent again, with its new events, next time
            self._sent += 1

    def settings(self) -> Settings:
        o, part = self.options, self.part
        overrides = dict(part.settings)
        if "rkllm_prompt_cache" in overrides:  # a file name in the probe's output directory
            overrides["rkllm_prompt_cache"] = str(Path(o["out"]) / overrides["rkllm_prompt_cache"])
        values: dict[str, Any] = {
            "engine": "rkllm",
            "model": o["model"],
            "rkllm_library": o["library"],
            "rkllm_abi": o["abi"],
            "rkllm_cpus": o["cpus"],
            "rkllm_tokenizer": o["tokenizer"],
            "n_batch": part.n_batch,
            "max_context": o["max_context"],
            "max_new_tokens": o["max_new_tokens"],
            "default_new_tokens": min(o["tokens"], o["max_new_tokens"]),
            "rkllm_pad_batch": True,
            "temperature": 0.0,
        }
        return Settings(**{**values, **overrides})

    def run(self) -> int:
        from rkmqtt.engines.rkllm.engine import RkllmEngine

        engine = RkllmEngine(self.settings(), backoff_s=0.2, backoff_max_s=2.0, recorder=self.recorder)
        try:
            engine.load()
        except RkmqttError as e:
            self.flush_calls()
            self.send({"t": "load_failed", "error": str(e)})
            return 0
        self.flush_calls()
        self.send({"t": "loaded", "info": engine.info()})
        try:
            for sc in self.part.scenarios:
                self.flush_calls()
                self.send({"t": "start", "scenario": sc.name})
                result = self.scenario(engine, sc)
                self.flush_calls()
                self.send({"t": "scenario", "result": result})
        finally:
            engine.close()
            self.flush_calls()
        self.send({"t": "done"})
        return 0

    # ---- one scenario -----------------------------------------------------------------------------

    def scenario(self, engine: RkllmEngine, sc: Scenario) -> dict[str, Any]:
        first_call = len(self.recorder.calls)
        result: dict[str, Any] = {"name": sc.name, "runs": [], "prepare": [], "replies": {}}
        total = sc.warmup + sc.repeats
        t0 = time.monotonic()
        for k in range(total):
            reqs = self.requests(sc, k if total > 1 else None)
            if sc.prepare and k == 0:
                result["prepare"] = [_prepare(engine, r) for r in reqs]
            groups = [[r] for r in reqs] if sc.separate else [reqs]
            for group in groups:
                replies = self.drive(engine, sc, group, ask_running=sc.ask_running and k == 0 and group is groups[0])
                result["replies"].update(replies["replies"])
                result.update({key: value for key, value in replies.items() if key != "replies"})
        result["wall_ms"] = round((time.monotonic() - t0) * 1000.0, 1)
        runs = [i for i, c in enumerate(self.recorder.calls[first_call:], first_call) if c["fn"] == "run"]
        result["runs"] = runs
        result["measured"] = runs[sc.warmup * (len(sc.prompts) if sc.separate else 1) :]
        if sc.ask_kv:
            result["kv_cache_sizes"] = engine.kv_cache_sizes("after the scenario")
        info = engine.info()
        result["engine"] = {k: info[k] for k in ("recoveries", "batches", "failed_runs")}
        result["peak_rss_mb"] = peak_rss_mb()
        if sc.name.startswith("speed-"):
            result["npu_memory"] = read_npu_memory()
        return result

    def requests(self, sc: Scenario, run: int | None) -> list[Generation]:
        prefix = f"{sc.name}/" if run is None else f"{sc.name}/{run}/"
        system = (ChatMessage("system", sc.system),) if sc.system else ()
        return [
            Generation(
                key=f"{prefix}{i}",
                messages=(*system, ChatMessage("user", prompt)),
                max_new_tokens=sc.max_new_tokens,
                sampling=SamplingParams(temperature=0.0),
            )
            for i, prompt in enumerate(sc.prompts)
        ]

    def drive(self, engine: RkllmEngine, sc: Scenario, reqs: list[Generation], ask_running: bool) -> dict[str, Any]:
        """Submit, cancel as the scenario says, poll until all are answered and the engine is idle."""
        replies: dict[Hashable, dict[str, Any]] = {r.key: {"text": "", "final": None, "token_events": 0} for r in reqs}
        out: dict[str, Any] = {"replies": replies}
        index = {r.key: int(str(r.key).rsplit("/", 1)[1]) for r in reqs}
        tokens = {r.key: sc.token_inputs[index[r.key]] for r in reqs if index[r.key] in sc.token_inputs}
        self.flush_calls()
        runs_before = self.recorder.runs_started()
        # Not through prepare(): the scenarios that send an over-long prompt want it to reach the runtime.
        engine.submit([Prepared(r, None, engine.batch_key(r)) for r in reqs], token_inputs=tokens or None)
        cancel_at = {reqs[i].key: n for i, n in sc.cancel_after_tokens.items() if i < len(reqs)}
        cancel_all_pending = sc.cancel_all_at_ms is not None
        run_sent = False  # the run's start has reached the parent (poll fast until it has: a crash may come soon)
        while True:
            if cancel_all_pending and self._run_began(runs_before, sc.cancel_all_at_ms):
                cancel_all_pending = False
                for r in reqs:
                    _cancel(engine, replies, r.key)
            started = self.recorder.runs_started() > runs_before
            events = engine.poll(0.002 if cancel_all_pending or not run_sent else 0.05)
            for ev in events:
                reply = replies[ev.key]
                if reply["final"] is not None:
                    continue
                if isinstance(ev, TokenEvent):
                    reply["text"] += ev.text
                    reply["token_events"] += 1
                    if ask_running and "is_running" not in out:
                        out["is_running"] = {"running": engine.runtime_is_running()}
                    if cancel_at.get(ev.key) == reply["token_events"]:
                        _cancel(engine, replies, ev.key)
                else:
                    reply.update(_final(ev))
            self.flush_calls()
            run_sent = run_sent or started
            if all(r["final"] is not None for r in replies.values()) and engine.free_slots() > 0:
                if ask_running:
                    out.setdefault("is_running", {})["idle"] = engine.runtime_is_running()
                return out

    def _run_began(self, runs_before: int, after_ms: float | None) -> bool:
        """True once the scenario's rkllm_run has been running for `after_ms` (or has ended)."""
        if self.recorder.runs_started() <= runs_before:
            return False
        elapsed = self.recorder.run_elapsed_ms()
        return elapsed is None or elapsed >= (after_ms or 0.0)


def _prepare(engine: RkllmEngine, req: Generation) -> dict[str, Any]:
    try:
        tokens = engine.prepare(req).prompt_tokens
    except RequestRejected as e:
        return {"key": req.key, "result": e.code.value, "message": e.message}
    return {"key": req.key, "result": "ok", "tokens": tokens}


def _cancel(engine: RkllmEngine, replies: dict[Hashable, dict[str, Any]], key: Hashable) -> None:
    if replies[key]["final"] is None:
        engine.cancel(key)
        replies[key]["final"] = "cancelled"


def _final(ev: FinishEvent | ErrorEvent) -> dict[str, Any]:
    if isinstance(ev, ErrorEvent):
        return {"final": ev.code.value, "message": ev.message}
    return {
        "final": ev.reason,
        "completion_tokens": ev.completion_tokens,
        "prompt_tokens": ev.prompt_tokens,
        # The runtime's own figures: the copies under the bridge's common names are left out.
        "perf": {k: v for k, v in ev.perf.items() if k not in ("prefill_ms", "decode_ms")},
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(sys.stdin.read())
    with os.fdopen(int(args[0]), "w", encoding="utf-8") as out:
        return Child(spec, out).run()


if __name__ == "__main__":
    sys.exit(main())
