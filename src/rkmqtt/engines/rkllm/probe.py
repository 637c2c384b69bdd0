"""`rkmqtt probe`: the script a board owner runs once against the real RKLLM runtime, and shares.

The main thread drives an `RkllmEngine` as the scheduler would; the engine's threads only record.
It writes probe-trace.json, probe-summary.md and runtime.log (docs/rkllm-runtime.md, "Inside
rkmqtt's binding" and "Probe traces")."""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rkmqtt import __version__
from rkmqtt.engines.rkllm.board_state import read_clocks
from rkmqtt.engines.rkllm.platform import find_soc, read_compatible, read_driver_version
from rkmqtt.engines.rkllm.probe_script import (
    DEFAULT_CHAT_TEMPLATE,
    SCRIPT_VERSION,
    PartSpec,
    Plan,
    Scenario,
    plan,
    split_template,
)
from rkmqtt.errors import ConfigError

TRACE_FORMAT = "rkmqtt-rkllm-trace"
TRACE_FORMAT_VERSION = 2
LOG_LINES_PER_PART = 200


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
    repeats: int
    system_tokens: int
    chat_template: str

    def plan(self) -> Plan:
        return Plan(
            tokens=self.tokens,
            max_context=self.max_context,
            n_batch=self.n_batch,
            repeats=self.repeats,
            system_tokens=self.system_tokens,
            chat_template=self.chat_template,
            tokenizer=self.tokenizer,
        )


class Prober:
    """Runs parts in child processes and keeps the trace written."""

    def __init__(self, opts: Options, runtime: dict[str, Any], progress: TextIO) -> None:
        self.opts = opts
        self.runtime = runtime
        self.calls: list[dict[str, Any]] = []
        self.scenarios: list[dict[str, Any]] = []
        self.parts: list[dict[str, Any]] = []
        self.clocks = read_clocks()
        self._progress = progress
        self.trace_path = opts.out / "probe-trace.json"
        self.summary_path = opts.out / "probe-summary.md"
        self.log_path = opts.out / "runtime.log"
        self.log_path.write_bytes(b"")

    def say(self, line: str) -> None:
        self._progress.write(line + "\n")
        self._progress.flush()

    def results(self) -> list[dict[str, Any]]:
        return self.scenarios

    # ---- a part, attempt by attempt ---------------------------------------------------------------

    def run_part(self, spec: PartSpec) -> None:
        """Run the part's scenarios; after a death mid-scenario, the rest in a fresh child."""
        remaining = list(spec.scenarios)
        attempt = 1
        while remaining:
            record = self._attempt(spec, attempt, remaining)
            self.write()
            if record["outcome"] == "ok":
                return
            done = set(record["completed"])
            if record.get("in") == "rkllm_init":  # it never got to a scenario: the next child would not either
                for sc in remaining:
                    self._not_run(sc, record)
                self.write()
                return
            remaining = [sc for sc in remaining if sc.name not in done and sc.name != record["in"]]
            attempt += 1

    def skip_part(self, spec: PartSpec) -> None:
        """A part with nothing to run (`why` says what was missing)."""
        record = {"id": spec.id, "part": spec.id, "attempt": 1, "n_batch": spec.n_batch, "outcome": "skipped"}
        self.parts.append({**record, "error": spec.why})
        self.say(f"probe: part {spec.id} skipped: {spec.why}")
        self.write()

    def _not_run(self, sc: Scenario, record: dict[str, Any]) -> None:
        error = record.get("error") or f"not run: the part {record['outcome']}"
        self.scenarios.append({**_brief(sc), "part": record["id"], "runs": [], "replies": {}, "error": error})

    def _attempt(self, spec: PartSpec, attempt: int, scenarios: list[Scenario]) -> dict[str, Any]:
        part_id = spec.id if attempt == 1 else f"{spec.id}.{attempt}"
        part = PartSpec(spec.id, spec.n_batch, scenarios, spec.settings, spec.env, spec.all_finish_slots, spec.why)
        record: dict[str, Any] = {
            "id": part_id,
            "part": spec.id,
            "attempt": attempt,
            "n_batch": spec.n_batch,
            "why": spec.why,
            "spec": part.to_json(),
            "clocks_before": read_clocks(),
            "completed": [],
            "outcome": None,
        }
        self.parts.append(record)
        cache = spec.settings.get("rkllm_prompt_cache")
        if cache and attempt == 1:
            (self.opts.out / str(cache)).unlink(missing_ok=True)  # made afresh by this part
        why = "" if spec.why.startswith("n_batch") else f": {spec.why}"
        self.say(f"probe: part {part_id} (n_batch {spec.n_batch}{why})")
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"==== part {part_id} (n_batch {spec.n_batch}) ====\n".encode())
            log.flush()
            offset = log.tell()
            status = self._run_child(part, part_id, record, log)
        record["seconds"] = round(time.monotonic() - t0, 2)
        # VmHWM as the child read it after each scenario (its rusage would count the parent's pages
        # from before the child's exec)
        rss = [s["peak_rss_mb"] for s in self.scenarios if s.get("part") == part_id and s.get("peak_rss_mb")]
        record["peak_rss_mb"] = max(rss) if rss else None
        with self.log_path.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode("utf-8", errors="replace").splitlines()
        record["log"] = lines[:LOG_LINES_PER_PART]
        self._outcome(record, status)
        return record

    def _run_child(self, part: PartSpec, part_id: str, record: dict[str, Any], log: Any) -> int:
        """Start the child, read its messages until it ends or overruns; its exit status."""
        spec = {"part": part.to_json(), "options": self._child_options(part)}
        env = {**os.environ, **part.env, "RKLLM_STANDIN_REPLAY_PART": part_id}
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rkmqtt.engines.rkllm.probe_child", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            env=env,
        )
        os.close(write_fd)
        base = len(self.calls)
        state: dict[str, Any] = {"scenario": None, "first_call": base, "timed_out": False, "eof": False}
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(spec).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            self._read_messages(read_fd, part, part_id, record, base, state)
        finally:
            os.close(read_fd)
            if not state["eof"]:  # timed out, or this process is being interrupted: the child goes too
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        record["in"] = state["scenario"]
        record["timed_out"] = state["timed_out"]
        record["first_call_of_scenario"] = state["first_call"]
        return proc.returncode

    def _child_options(self, part: PartSpec) -> dict[str, Any]:
        o = self.opts
        return {
            "library": str(o.library),
            "model": str(o.model),
            "out": str(o.out.resolve()),
            "abi": o.abi,
            "cpus": o.cpus,
            "tokenizer": str(o.tokenizer) if o.tokenizer else None,
            "max_context": o.max_context,
            "tokens": o.tokens,
            "max_new_tokens": max([o.tokens, *(sc.max_new_tokens for sc in part.scenarios)]),
        }

    def _read_messages(
        self, fd: int, part: PartSpec, part_id: str, record: dict[str, Any], base: int, state: dict[str, Any]
    ) -> None:
        buffer = b""
        deadline = time.monotonic() + self.opts.timeout
        state["scenario"] = "rkllm_init"
        defs = {sc.name: sc for sc in part.scenarios}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                state["timed_out"] = True
                return
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                state["eof"] = True  # the child has closed its end: it is exiting
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                kind = message["t"]
                if kind == "calls":
                    at = base + int(message["from"])
                    self.calls[at:] = [{**c, "part": part_id} for c in message["calls"]]
                elif kind == "start":
                    state["scenario"], state["first_call"] = message["scenario"], len(self.calls)
                    deadline = time.monotonic() + self.opts.timeout
                    self.say(f"  {message['scenario']}")
                elif kind == "scenario":
                    result = message["result"]
                    for key in ("runs", "measured"):
                        result[key] = [base + i for i in result.get(key, [])]
                    self.scenarios.append({**_brief(defs[result["name"]]), **result, "part": part_id})
                    record["completed"].append(result["name"])
                    state["scenario"] = None
                    self.write()
                elif kind == "loaded":
                    record["info"] = message["info"]
                    state["scenario"] = None
                elif kind == "load_failed":
                    record["error"] = str(message["error"])
                    self.say(f"  {part_id}: the runtime did not start: {message['error']}")
                elif kind == "done":
                    state["scenario"] = None

    def _outcome(self, record: dict[str, Any], code: int) -> None:
        """How the part ended (`code`: the child's exit status, negative for a signal); a run cut
        short and the scenario it belonged to are marked."""
        record["exit"] = code
        where = record["in"]
        if record["timed_out"]:
            record["outcome"], record["after_s"] = "timeout", self.opts.timeout
            mark: dict[str, Any] = {"timeout": True, "after_s": self.opts.timeout}
        elif code < 0:
            record["outcome"] = "died"
            record["signal"] = _signal_name(-code)
            mark = {"died": {"signal": -code, "name": record["signal"]}}
        elif code:
            record["outcome"] = "exited"
            mark = {"exited": code}
        elif record.get("error"):
            record["outcome"] = "init failed"
            return
        else:
            record["outcome"] = "ok"
            return
        if where is None:
            where = record["in"] = "between scenarios"
        self.say(f"  {record['id']}: {_describe(record)}")
        for call in self.calls[record["first_call_of_scenario"] :]:
            if call["fn"] == "run" and "rc" not in call:
                call.update(mark)
        if where not in ("rkllm_init", "between scenarios"):
            runs = [
                i
                for i, c in enumerate(self.calls[record["first_call_of_scenario"] :], record["first_call_of_scenario"])
                if c["fn"] == "run"
            ]
            sc = next(Scenario.from_json(s) for s in record["spec"]["scenarios"] if s["name"] == where)
            self.scenarios.append({**_brief(sc), "part": record["id"], "runs": runs, "replies": {}, **mark})

    # ---- the trace ------------------------------------------------------------------------------------

    def trace(self) -> dict[str, Any]:
        o = self.opts
        return {
            "format": TRACE_FORMAT,
            "format_version": TRACE_FORMAT_VERSION,
            "script_version": SCRIPT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rkmqtt": __version__,
            "host": host_facts(),
            "clocks": self.clocks,
            "runtime": self.runtime,
            "options": {
                "tokens": o.tokens,
                "max_context": o.max_context,
                "n_batch": o.n_batch,
                "repeats": o.repeats,
                "timeout": o.timeout,
                "system_tokens": o.system_tokens,
                "chat_template": o.chat_template,
                "tokenizer": o.tokenizer is not None,
                "scenarios_from": str(o.scenarios_from) if o.scenarios_from else None,
            },
            "parts": self.parts,
            "scenarios": self.scenarios,
            "calls": self.calls,
        }

    def write(self) -> str:
        """The trace and the summary, each written whole to a temporary file and renamed over the old."""
        from rkmqtt.engines.rkllm.probe_report import render_summary

        trace = self.trace()
        summary = render_summary(trace)
        _write_atomic(self.trace_path, dump_trace(trace))
        _write_atomic(self.summary_path, summary)
        return summary


def _brief(sc: Scenario) -> dict[str, Any]:
    """A scenario's definition in its record, less its texts (the part's `spec` has them whole)."""
    return {k: v for k, v in sc.to_json().items() if k not in ("prompts", "system", "token_inputs")}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe(record: dict[str, Any]) -> str:
    where = record.get("in")
    if record["outcome"] == "timeout":
        return f"no answer within {record.get('after_s', '?')} s in {where}: stopped with SIGKILL"
    if record["outcome"] == "died":
        return f"the runtime died ({record['signal']}) in {where}"
    if record["outcome"] == "exited":
        return f"the child exited with {record['exit']} in {where} (see runtime.log)"
    return str(record["outcome"])


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
            f"{path} is trace format {data.get('format_version')}; this rkmqtt reads format {TRACE_FORMAT_VERSION} "
            "(run `rkmqtt probe` again with this version)"
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
    p.add_argument("--repeats", type=int, default=3, help="measured runs of each speed scenario, after a warm-up")
    p.add_argument(
        "--system-tokens", type=int, default=1000, help="length of the fixed system prompt (default 1000 tokens)"
    )
    p.add_argument(
        "--chat-template",
        default=DEFAULT_CHAT_TEMPLATE,
        help="the model's chat template with {system} and {prompt}, \\n for a newline (default: ChatML)",
    )
    p.add_argument("--scenarios-from", type=Path, default=None, help="run the parts of a recorded trace again")


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
    if not 1 <= args.repeats <= 20:
        raise ConfigError(f"--repeats {args.repeats}: give 1 to 20")
    if not 16 <= args.system_tokens <= 100_000:
        raise ConfigError(f"--system-tokens {args.system_tokens}: give 16 to 100000")
    try:
        split_template(args.chat_template)
    except ValueError as e:
        raise ConfigError(f"--chat-template {args.chat_template!r}: {e}") from None
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
        repeats=args.repeats,
        system_tokens=args.system_tokens,
        chat_template=args.chat_template,
    )


def _parts(opts: Options, prober: Prober, recorded: dict[str, Any] | None) -> Iterator[PartSpec]:
    """The parts to run (one without scenarios is skipped: its `why` says why)."""
    if recorded is not None:
        for record in recorded.get("parts", []):
            if record.get("attempt") != 1:
                continue
            if "spec" in record:
                yield PartSpec.from_json(record["spec"])
            else:
                yield PartSpec(record["id"], int(record.get("n_batch", 1)), [], why=str(record.get("error", "")))
        return
    for make in plan(opts.plan()):
        yield make(prober.results(), prober.calls)


def run_probe(args: argparse.Namespace) -> int:
    """The `rkmqtt probe` command. Raises ConfigError/EngineError (exit 2) with one line."""
    from rkmqtt.engines.rkllm.library import locate_runtime

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
    prober = Prober(opts, runtime, sys.stdout)
    prober.say(
        f"probe: runtime {rt.version or '(no version string)'} (ABI {rt.abi.name}) from {rt.path}, "
        f"model {opts.model.name}; each part in a child process, its output in {prober.log_path}"
    )
    prober.write()
    for spec in _parts(opts, prober, recorded):
        if spec.scenarios:
            prober.run_part(spec)
        else:
            prober.skip_part(spec)
    summary = prober.write()
    print(summary)
    print(f"probe: wrote {prober.trace_path} and {prober.summary_path}; please share both (docs/benchmarks.md)")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep the file from whoever it is shared with
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
