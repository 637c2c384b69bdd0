"""`rkmqtt probe`: the fixed script a board owner runs once against the real RKLLM runtime, and shares.

The main thread drives an `RkllmEngine` as the scheduler would; the engine's threads only record.
It writes probe-trace.json, probe-summary.md and runtime.log (docs/rkllm-runtime.md, "Inside
rkmqtt's binding" and "Probe traces")."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rkmqtt import __version__
from rkmqtt.engines.base import (
    ChatMessage,
    ErrorEvent,
    FinishEvent,
    Generation,
    Prepared,
    SamplingParams,
    TokenEvent,
)
from rkmqtt.engines.rkllm.platform import find_soc, read_compatible, read_driver_version
from rkmqtt.engines.rkllm.trace import TraceRecorder
from rkmqtt.errors import ConfigError, RequestRejected, RkmqttError
from rkmqtt.settings import Settings

if TYPE_CHECKING:  # the engine is imported when the probe runs, not when the CLI builds its parser
    from rkmqtt.engines.rkllm.engine import RkllmEngine

SCRIPT_VERSION = 1
TRACE_FORMAT = "rkmqtt-rkllm-trace"
TRACE_FORMAT_VERSION = 1

SPEED_PROMPT = (
    "You are helping to measure how fast a small language model runs on a single-board computer. "
    "Write a long and detailed story about a lighthouse keeper on a rocky island who finds an old "
    "radio in the cellar, repairs it over a stormy winter, and hears voices from ships that sank a "
    "hundred years ago. Describe the weather, the sea, the sounds of the radio and the keeper's "
    "thoughts in full sentences. Do not use lists or headings, do not summarise, and keep writing "
    "until you are stopped."
)
CHINESE_PROMPT = "请用中文写一篇关于大海和灯塔的短文，不少于三百字，不要使用列表。"
EMOJI_PROMPT = "🌊🐚☀️🏖️🦀 Reply only with emoji like these: tell the story of a day at the beach in thirty emoji."
AFTER_PROMPT = "Say hello in one short sentence."


@dataclass
class Scenario:
    """One step of the script: requests submitted together to an engine of `n_batch` slots."""

    name: str
    n_batch: int
    prompts: list[str]
    max_new_tokens: int
    cancel_after_tokens: dict[int, int] = field(default_factory=dict)  # request index -> TokenEvents
    cancel_all_at_ms: float | None = None  # every request is cancelled this long after its run began
    prepare: bool = False  # ask the engine's prepare() first and record its answer

    def keys(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(len(self.prompts))]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scenario:
        return cls(
            name=str(data["name"]),
            n_batch=int(data["n_batch"]),
            prompts=[str(p) for p in data["prompts"]],
            max_new_tokens=int(data["max_new_tokens"]),
            cancel_after_tokens={int(k): int(v) for k, v in data.get("cancel_after_tokens", {}).items()},
            cancel_all_at_ms=None if data.get("cancel_all_at_ms") is None else float(data["cancel_all_at_ms"]),
            prepare=bool(data.get("prepare", False)),
        )


@dataclass
class Options:
    library: Path
    model: Path
    out: Path
    n_batch: list[int]
    tokens: int
    max_context: int
    tokenizer: Path | None
    abi: str
    cpus: str
    timeout: float
    scenarios_from: Path | None


# ---- the script -----------------------------------------------------------------------------------


def _repeat_to_tokens(tokens_per_byte: float, target_tokens: float) -> str:
    """SPEED_PROMPT repeated until it is about `target_tokens` tokens long."""
    unit = SPEED_PROMPT + "\n\n"
    copies = max(1, round(target_tokens / (tokens_per_byte * len(unit.encode()))))
    return unit * copies


def _calibration(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> tuple[float, float]:
    """(tokens per prompt byte, prefill ms per token) measured by speed-n1, with cautious defaults."""
    per_byte, ms_per_token = 0.3, 3.0
    for result in done:
        if result["name"] != "speed-n1" or not result["runs"]:
            continue
        run = calls[result["runs"][0]]
        finish = [e for e in run["events"] if e.get("state") == 2 and e.get("perf")]
        if finish:
            p_ms, p_tokens = finish[-1]["perf"][0][0], finish[-1]["perf"][0][1]
            if p_tokens > 0:
                per_byte = p_tokens / len(SPEED_PROMPT.encode())
                if p_ms > 0:
                    ms_per_token = p_ms / p_tokens
    return per_byte, ms_per_token


def live_script(opts: Options) -> list[Callable[[list[dict[str, Any]], list[dict[str, Any]]], Scenario]]:
    """The script's scenarios, each made when its turn comes (some depend on what came before)."""
    t = opts.tokens
    steps: list[Callable[[list[dict[str, Any]], list[dict[str, Any]]], Scenario]] = []

    def fixed(sc: Scenario) -> Callable[[list[dict[str, Any]], list[dict[str, Any]]], Scenario]:
        return lambda done, calls: sc

    def cancel_all_prefill(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> Scenario:
        per_byte, ms_per_token = _calibration(done, calls)
        prompt = _repeat_to_tokens(per_byte, 0.5 * opts.max_context)
        expected_ms = ms_per_token * per_byte * len(prompt.encode())
        return Scenario("cancel-all-prefill", 1, [prompt], t, cancel_all_at_ms=round(max(1.0, 0.25 * expected_ms), 1))

    def over_long(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> Scenario:
        per_byte, _ = _calibration(done, calls)
        return Scenario("over-long", 1, [_repeat_to_tokens(per_byte, 1.5 * opts.max_context)], t, prepare=True)

    steps += [
        fixed(Scenario("speed-n1", 1, [SPEED_PROMPT], t)),
        fixed(Scenario("chinese-n1", 1, [CHINESE_PROMPT], t)),
        fixed(Scenario("emoji-n1", 1, [EMOJI_PROMPT], t)),
        cancel_all_prefill,
        over_long,
        fixed(Scenario("after-over-long", 1, [AFTER_PROMPT], min(t, 16))),
        fixed(Scenario("speed-n2", 2, [SPEED_PROMPT] * 2, t)),
        fixed(Scenario("chinese+emoji-n2", 2, [CHINESE_PROMPT, EMOJI_PROMPT], t)),
        fixed(Scenario("cancel-one-slot", 2, [SPEED_PROMPT] * 2, t, cancel_after_tokens={1: 3})),
        fixed(Scenario("padding", 2, [SPEED_PROMPT], min(t, 4))),
    ]
    for n in opts.n_batch:
        if n > 2:
            steps.append(fixed(Scenario(f"speed-n{n}", n, [SPEED_PROMPT] * n, t)))
    return steps


# ---- running it -------------------------------------------------------------------------------------


class Runner:
    """Runs scenarios through RkllmEngine instances (one per consecutive n_batch), recording all."""

    def __init__(self, opts: Options, progress: TextIO) -> None:
        self.opts = opts
        self.recorder = TraceRecorder()
        self.results: list[dict[str, Any]] = []
        self.scenarios: list[Scenario] = []
        self._progress = progress
        self._engine: RkllmEngine | None = None
        self._engine_batch = 0
        self._engine_error: str | None = None

    def say(self, line: str) -> None:
        self._progress.write(line + "\n")
        self._progress.flush()

    def run(self, scenarios: Iterator[Scenario]) -> None:
        try:
            for sc in scenarios:
                self.scenarios.append(sc)
                self.results.append(self._scenario(sc))
        finally:
            self._close_engine()

    def _settings(self, n_batch: int) -> Settings:
        o = self.opts
        return Settings(
            engine="rkllm",
            model=str(o.model),
            rkllm_library=str(o.library),
            rkllm_abi=o.abi,
            rkllm_cpus=o.cpus,
            rkllm_tokenizer=o.tokenizer,
            n_batch=n_batch,
            max_context=o.max_context,
            max_new_tokens=o.tokens,
            default_new_tokens=o.tokens,
            rkllm_pad_batch=True,
            temperature=0.0,
        )

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None

    def _engine_for(self, n_batch: int) -> RkllmEngine | None:
        if self._engine_batch == n_batch:
            return self._engine
        from rkmqtt.engines.rkllm.engine import RkllmEngine

        self._close_engine()
        self._engine_batch = n_batch
        self._engine_error = None
        engine = RkllmEngine(self._settings(n_batch), backoff_s=0.2, backoff_max_s=2.0, recorder=self.recorder)
        try:
            engine.load()
        except RkmqttError as e:
            self._engine_error = str(e)
            self.say(f"  n_batch {n_batch}: the runtime did not start: {e}")
            return None
        self._engine = engine
        return engine

    def _scenario(self, sc: Scenario) -> dict[str, Any]:
        self.say(f"probe: {sc.name} (n_batch {sc.n_batch}, {len(sc.prompts)} request(s))")
        result: dict[str, Any] = {"name": sc.name, "runs": [], "prepare": [], "replies": {}}
        engine = self._engine_for(sc.n_batch)
        if engine is None:
            result["error"] = f"rkllm_init failed: {self._engine_error}"
            return result
        reqs = [
            Generation(
                key=key,
                messages=(ChatMessage("user", prompt),),
                max_new_tokens=sc.max_new_tokens,
                sampling=SamplingParams(temperature=0.0),
            )
            for key, prompt in zip(sc.keys(), sc.prompts, strict=True)
        ]
        if sc.prepare:
            result["prepare"] = [_prepare(engine, r) for r in reqs]
        first_call = len(self.recorder.calls)
        t0 = time.monotonic()
        result["replies"] = self._drive(engine, sc, reqs)
        result["wall_ms"] = round((time.monotonic() - t0) * 1000.0, 1)
        result["runs"] = [i for i, c in enumerate(self.recorder.calls[first_call:], first_call) if c["fn"] == "run"]
        result["engine"] = {k: engine.info()[k] for k in ("recoveries", "batches")}
        return result

    def _drive(self, engine: RkllmEngine, sc: Scenario, reqs: list[Generation]) -> dict[Hashable, dict[str, Any]]:
        """Submit the requests, cancel as the scenario says, poll until all are answered and the engine is idle."""
        replies: dict[Hashable, dict[str, Any]] = {r.key: {"text": "", "final": None, "token_events": 0} for r in reqs}
        runs_before = self.recorder.runs_started()
        # Not through prepare(): the scenarios that send an over-long prompt want it to reach the runtime.
        engine.submit([Prepared(r, None, engine.batch_key(r)) for r in reqs])
        cancel_at = {reqs[i].key: n for i, n in sc.cancel_after_tokens.items() if i < len(reqs)}
        cancel_all_pending = sc.cancel_all_at_ms is not None
        deadline = time.monotonic() + self.opts.timeout
        while time.monotonic() < deadline:
            if cancel_all_pending and self._run_began(runs_before, sc.cancel_all_at_ms):
                cancel_all_pending = False
                for r in reqs:
                    _cancel(engine, replies, r.key)
            for ev in engine.poll(0.002 if cancel_all_pending else 0.05):
                reply = replies[ev.key]
                if reply["final"] is not None:
                    continue
                if isinstance(ev, TokenEvent):
                    reply["text"] += ev.text
                    reply["token_events"] += 1
                    if cancel_at.get(ev.key) == reply["token_events"]:
                        _cancel(engine, replies, ev.key)
                else:
                    reply.update(_final(ev))
            if all(r["final"] is not None for r in replies.values()) and engine.free_slots() > 0:
                return replies
        for reply in replies.values():
            if reply["final"] is None:
                reply["final"] = "timeout"
        self.say(f"  {sc.name}: no answer within {self.opts.timeout:.0f} s")
        return replies

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


# ---- the runtime's own output -------------------------------------------------------------------------


@contextlib.contextmanager
def native_output_to(path: Path) -> Iterator[TextIO]:
    """Send file descriptors 1 and 2 (what the C runtime prints) to `path`; yields a stream to the
    terminal's original standard output for the probe's own progress lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    progress = os.fdopen(os.dup(saved_out), "w", encoding="utf-8", errors="replace")
    with path.open("wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield progress
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            progress.close()


# ---- the trace ---------------------------------------------------------------------------------------


def host_facts() -> dict[str, Any]:
    compatible = read_compatible()
    return {
        "machine": platform.machine(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "soc": find_soc(),
        "board": compatible[0] if compatible else None,
        "npu_driver": read_driver_version(),
    }


def build_trace(opts: Options, runner: Runner, runtime: dict[str, Any], log_lines: list[str]) -> dict[str, Any]:
    scenarios = []
    for sc, result in zip(runner.scenarios, runner.results, strict=True):
        scenarios.append({**asdict(sc), **result})
    return {
        "format": TRACE_FORMAT,
        "format_version": TRACE_FORMAT_VERSION,
        "script_version": SCRIPT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rkmqtt": __version__,
        "host": host_facts(),
        "runtime": runtime,
        "options": {
            "tokens": opts.tokens,
            "max_context": opts.max_context,
            "n_batch": opts.n_batch,
            "tokenizer": opts.tokenizer is not None,
            "scenarios_from": str(opts.scenarios_from) if opts.scenarios_from else None,
        },
        "scenarios": scenarios,
        "calls": runner.recorder.calls,
        "runtime_log": log_lines[:400],
    }


def dump_trace(trace: dict[str, Any]) -> str:
    """The trace as JSON: indented, but each callback of a run on one line (a trace stays readable
    and small enough to commit as a test fixture)."""
    compact: dict[str, str] = {}

    def mark(event: dict[str, Any]) -> str:
        key = f"\x00event{len(compact)}\x00"
        compact[json.dumps(key)] = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return key

    calls = [{**c, "events": [mark(e) for e in c["events"]]} if "events" in c else c for c in trace["calls"]]
    text = json.dumps({**trace, "calls": calls}, ensure_ascii=False, indent=1)
    for key, event in compact.items():
        text = text.replace(key, event, 1)
    return text + "\n"


def load_trace(path: Path) -> dict[str, Any]:
    """A trace written by `rkmqtt probe`. Raises ConfigError with one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it as a probe trace ({e})") from e
    if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
        raise ConfigError(f"{path} is not a trace written by `rkmqtt probe` (no format {TRACE_FORMAT!r})")
    if data.get("format_version") != TRACE_FORMAT_VERSION:
        raise ConfigError(
            f"{path} is trace format {data.get('format_version')}; this rkmqtt reads format {TRACE_FORMAT_VERSION}"
        )
    return data


# ---- the command ---------------------------------------------------------------------------------------


def add_probe_parser(sub: Any) -> None:
    """`rkmqtt probe`'s arguments (cli/main.py's one entry for it)."""
    p = sub.add_parser(
        "probe",
        help="run a fixed script against the RKLLM runtime and write a trace and a summary to share",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--rkllm-library", type=Path, required=True, help="path of librkllmrt.so")
    p.add_argument("--model", type=Path, required=True, help="a .rkllm model converted for that runtime")
    p.add_argument("--out", type=Path, required=True, help="directory for probe-trace.json and probe-summary.md")
    p.add_argument("--n-batch", default="1,2,4,8", help="n_batch values of the speed runs (default 1,2,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--max-context", type=int, default=2048, help="max_context of the runtime (default 2048)")
    p.add_argument("--tokenizer", type=Path, default=None, help="the model's tokenizer.json (exact prompt lengths)")
    p.add_argument("--rkllm-abi", default="auto", choices=("auto", "1.2", "1.3"), help="ABI (default: from version)")
    p.add_argument("--rkllm-cpus", default="auto", help="CPU cores for the runtime (default: the SoC's big cores)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one scenario may take (default 300)")
    p.add_argument("--scenarios-from", type=Path, default=None, help="run the scenarios of a recorded trace")


def _options(args: argparse.Namespace) -> Options:
    try:
        n_batch = sorted({int(x) for x in str(args.n_batch).split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--n-batch {args.n_batch!r}: give numbers from 1 to 8, e.g. 1,2,4,8") from None
    if not n_batch or not all(1 <= n <= 8 for n in n_batch):
        raise ConfigError(f"--n-batch {args.n_batch!r}: give numbers from 1 to 8, e.g. 1,2,4,8")
    if not 1 <= args.tokens <= 4096:
        raise ConfigError(f"--tokens {args.tokens}: give 1 to 4096")
    if not 64 <= args.max_context <= 131_072:
        raise ConfigError(f"--max-context {args.max_context}: give 64 to 131072")
    if not args.model.is_file():
        raise ConfigError(f"--model {str(args.model)!r}: no such file; give the path of a .rkllm model")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout}: give a number of seconds above 0")
    return Options(
        library=args.rkllm_library,
        model=args.model,
        out=args.out,
        n_batch=n_batch,
        tokens=args.tokens,
        max_context=args.max_context,
        tokenizer=args.tokenizer,
        abi=args.rkllm_abi,
        cpus=args.rkllm_cpus,
        timeout=args.timeout,
        scenarios_from=args.scenarios_from,
    )


def _scenarios(opts: Options, runner: Runner, recorded: dict[str, Any] | None) -> Iterator[Scenario]:
    if recorded is not None:
        for data in recorded["scenarios"]:
            yield Scenario.from_json(data)
        return
    for make in live_script(opts):
        yield make(runner.results, runner.recorder.calls)


def run_probe(args: argparse.Namespace) -> int:
    """The `rkmqtt probe` command. Raises ConfigError/EngineError (exit 2) with one line."""
    from rkmqtt.engines.rkllm.library import locate_runtime
    from rkmqtt.engines.rkllm.probe_report import render_summary

    opts = _options(args)
    recorded = load_trace(opts.scenarios_from) if opts.scenarios_from else None
    rt = locate_runtime(opts.library, opts.abi)  # refuses a wrong library before anything runs
    runtime = {
        "library": str(rt.path),
        "version": rt.version,
        "abi": rt.abi.name,
        "model": opts.model.name,
        "model_bytes": opts.model.stat().st_size,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    log_path = opts.out / "runtime.log"
    with native_output_to(log_path) as progress:
        runner = Runner(opts, progress)
        progress.write(
            f"probe: runtime {rt.version or '(no version string)'} (ABI {rt.abi.name}) from {rt.path}, "
            f"model {opts.model.name}; the runtime's output goes to {log_path}\n"
        )
        runner.run(_scenarios(opts, runner, recorded))
    log_lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    trace = build_trace(opts, runner, runtime, log_lines)
    trace_path, summary_path = opts.out / "probe-trace.json", opts.out / "probe-summary.md"
    _write_atomic(trace_path, dump_trace(trace))
    summary = render_summary(trace)
    _write_atomic(summary_path, summary)
    print(summary)
    print(f"probe: wrote {trace_path} and {summary_path}; please share both (docs/benchmarks.md)")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
