"""`rkmqtt probe` end to end against the stand-in runtime (in a subprocess, as a board owner runs
it): each part in a child process, a runtime that dies or hangs, the trace written after every
scenario; the probe's reading of each open question against both of the stand-in's behaviours;
and the replay of recorded traces (tests/fixtures/rkllm-traces/) through the binding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rkmqtt.engines.rkllm.board_state import peak_rss_mb, read_clocks, read_npu_memory
from rkmqtt.engines.rkllm.probe import load_trace
from rkmqtt.engines.rkllm.probe_readings import readings, waiting_behaviour
from rkmqtt.engines.rkllm.probe_report import binding_checks
from rkmqtt.engines.rkllm.probe_script import Plan, plan
from tests.rkllm_fixtures import Standin, standin_fixture  # noqa: F401
from tests.standin.build import build_standin

REPO = Path(__file__).resolve().parents[1]
TRACES = sorted((REPO / "tests/fixtures/rkllm-traces").glob("*.json"))
FAST = {
    "RKLLM_STANDIN_DECODE_MS": "2",
    "RKLLM_STANDIN_PREFILL_MS_PER_TOKEN": "0.2",
    "RKLLM_STANDIN_TOKEN_BYTES": "2",
    "RKLLM_STANDIN_BUILTIN_TEMPLATE": "96",
}
# The stand-in's other reading of every behaviour the probe asks about (tests/standin/rkllm_standin.c).
OTHER = {
    "RKLLM_STANDIN_WAITING_TEXT": "split",
    "RKLLM_STANDIN_AFTER_ABORT": "error",
    "RKLLM_STANDIN_FINISH_RESULTS": "one",
    "RKLLM_STANDIN_SLOT_END": "batch",
    "RKLLM_STANDIN_PAD_REQUIRED": "1",
    "RKLLM_STANDIN_UNEQUAL_PROMPTS": "garbled",
    "RKLLM_STANDIN_TOKEN_INPUT_BATCH": "0",
    "RKLLM_STANDIN_EMPTY_TEMPLATE": "builtin",
    "RKLLM_STANDIN_RUNNING_VALUE": "0",
    "RKLLM_STANDIN_KV_AFTER_RUN": "kept",
    "RKLLM_STANDIN_CLEAR_AFTER_ABORT": "required",
    "RKLLM_STANDIN_PROMPT_CACHE": "ignore",
    "RKLLM_STANDIN_CALLBACK_THREAD": "caller",
}
READING_DEFAULT = {
    "slot_end": "own",
    "fewer_inputs": "empty slots work",
    "unequal_prompts": "same",
    "token_input_n1": "works",
    "token_input_n2": "works",
    "template_off": "off",
    "is_running": "1 while running",
    "kv_after_run": "empty",
    "kv_after_abort": "kept",
    "callback_thread": "runtime thread",
    "runtime_timings": "printed",
    "prompt_cache_n1": "cuts",
    "prompt_cache_n2": "cuts",
    "runtime_system_prompt": "not reused",
    "finish_results": "n_batch results",
    "after_abort": "FINISH",
    "waiting_text": "repeat",
}
READING_OTHER = {
    **READING_DEFAULT,
    "slot_end": "together",
    "fewer_inputs": "padding needed",
    "unequal_prompts": "differ",
    "token_input_n2": "fails",
    "template_off": "unchanged",
    "is_running": "0 while running",
    "kv_after_run": "kept",
    "callback_thread": "caller",
    "prompt_cache_n1": "no cut",
    "prompt_cache_n2": "no cut",
    "finish_results": "died",
    "after_abort": "ERROR",
    "waiting_text": "split",
}
PARTS = [
    "n1",
    "n2",
    "n4",
    "cancel-prefill",
    "unpadded-n2",
    "tokens-n1",
    "tokens-n2",
    "host-n1",
    "host-n2",
    "cache-n1",
    "cache-n2",
    "timings-n1",
    "finish-slots-n2",
    "over-long",
]
CHECKS = {
    "chinese-n1",
    "emoji-n1",
    "chinese+emoji-n2",
    "cancel all during prefill",
    "cancel one slot of 2",
    "over-long prompt",
    "1 request at n_batch 2 (padding)",
    "empty slot at n_batch 2",
    "token input at n_batch 2",
}
SMALL = ("--tokens", 12, "--max-context", 512, "--system-tokens", 400, "--timeout", 60)


def probe(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    return subprocess.run(
        [sys.executable, "-m", "rkmqtt", "probe", *map(str, args)],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )


def runs(trace: dict[str, Any], part: str | None = None) -> list[dict[str, Any]]:
    return [c for c in trace["calls"] if c["fn"] == "run" and (part is None or c["part"] == part)]


def callbacks(run: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(e["state"], e["slots"], e.get("perf")) for e in run["events"] if "state" in e]


def scenario(trace: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in trace["scenarios"] if s["name"] == name)


def part(trace: dict[str, Any], part_id: str) -> dict[str, Any]:
    return next(p for p in trace["parts"] if p["id"] == part_id)


def codes(trace: dict[str, Any]) -> dict[str, str]:
    return {k: code for k, (code, _) in readings(trace).items()}


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_the_probe_runs_each_part_in_a_child_and_writes_a_trace_and_a_summary(
    standin: Standin, abi: str, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    proc = probe(
        "--rkllm-library", standin.lib(abi), "--model", standin.model, "--out", out, *SMALL,
        "--n-batch", "1,2,4", env=FAST,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = (out / "probe-summary.md").read_text()
    assert proc.stdout.startswith("probe: runtime") and summary in proc.stdout
    assert not [p.name for p in out.iterdir() if ".json." in p.name or ".md." in p.name]  # no temporary file left
    trace = load_trace(out / "probe-trace.json")
    assert [p["id"] for p in trace["parts"]] == PARTS and {p["outcome"] for p in trace["parts"]} == {"ok"}
    assert trace["runtime"]["abi"] == abi and trace["options"]["tokens"] == 12
    assert [c["n_batch"] for c in trace["calls"] if c["fn"] == "init"] == [1, 2, 4, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    # three measured runs after a warm-up, a different prompt per slot
    speed4 = scenario(trace, "speed-n4")
    assert len(speed4["runs"]) == 4 and speed4["measured"] == speed4["runs"][1:]
    assert len(set(trace["calls"][speed4["runs"][0]]["inputs"])) == 4
    steps = [e for e in trace["calls"][speed4["runs"][1]]["events"] if e.get("state") in (0, 1)]
    assert all(len(e["slots"]) == 4 for e in steps)
    # at FINISH only the first result is recorded, but in the part that asks for every one
    finish = [e for r in runs(trace, "n2") for e in r["events"] if e.get("state") == 2]
    assert finish and all(len(e["slots"]) == 1 for e in finish)
    all_slots = [e for r in runs(trace, "finish-slots-n2") for e in r["events"] if e.get("state") == 2]
    assert all_slots and all(len(e["slots"]) == 2 for e in all_slots)
    # the script's steps did what they are for; the binding answered each as it should
    assert scenario(trace, "over-long")["prepare"][0]["result"] == "too_long"
    assert binding_checks(trace) == dict.fromkeys(CHECKS, True)
    assert codes(trace) == READING_DEFAULT
    for n in (1, 2, 4):
        assert f"\n| {n} | " in summary
    assert "peak RSS of its process (MB)" in summary and "memory (MB)" not in summary.replace("process (MB)", "")
    log = (out / "runtime.log").read_text()
    assert "==== part timings-n1" in log and "stand-in timings: prefill" in log  # RKLLM_LOG_LEVEL=1 in that part only
    assert log.count("stand-in timings: prefill") == len(runs(trace, "timings-n1"))


def test_the_probe_reads_the_other_behaviours(standin: Standin, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    proc = probe(
        "--rkllm-library", standin.lib("1.2"), "--model", standin.model, "--out", out, *SMALL,
        "--n-batch", "1,2", "--repeats", "1", env={**FAST, **OTHER},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    trace = load_trace(out / "probe-trace.json")
    assert codes(trace) == READING_OTHER
    assert binding_checks(trace) == dict.fromkeys(CHECKS, True)
    # the part that reads past the one result FINISH passed died, and only that part
    assert [(p["id"], p["outcome"], p.get("signal")) for p in trace["parts"] if p["outcome"] != "ok"] == [
        ("finish-slots-n2", "died", "SIGSEGV")
    ]
    w = waiting_behaviour(trace["calls"][scenario(trace, "chinese+emoji-n2")["runs"][0]])
    assert w["waiting"] > 0 and w["split"] > 0 and w["repeat"] == 0


def test_a_runtime_that_dies_in_its_third_run_leaves_the_runs_before_it(standin: Standin, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    args = ("--rkllm-library", standin.lib("1.3"), "--model", standin.model, "--out", out, *SMALL, "--n-batch", "1,2")
    proc = probe(*args, env={**FAST, "RKLLM_STANDIN_CRASH_AT_RUN": "3"})
    assert proc.returncode == 0, proc.stderr
    trace = load_trace(out / "probe-trace.json")
    first = part(trace, "n1")
    assert (first["outcome"], first["signal"], first["in"]) == ("died", "SIGSEGV", "speed-n1")
    done, died = runs(trace, "n1")[:2], runs(trace, "n1")[2]
    assert [r["rc"] for r in done] == [0, 0] and all(callbacks(r)[-1][0] == 2 for r in done)
    assert died["died"] == {"signal": signal.SIGSEGV, "name": "SIGSEGV"} and "rc" not in died
    assert scenario(trace, "speed-n1")["died"]["name"] == "SIGSEGV"
    # the part's other scenarios ran in a fresh child; every part's death is in the summary
    assert scenario(trace, "chinese-n1")["part"] == "n1.2"
    summary = (out / "probe-summary.md").read_text()
    assert "**the runtime died (SIGSEGV)** in part `n1`, speed-n1; the trace holds its 2 run(s) before that" in summary
    assert "rkllm-standin: run: raising SIGSEGV" in part(trace, "n1")["log"][-1]


def test_the_trace_on_disk_survives_the_probe_itself_being_killed(standin: Standin, tmp_path: Path) -> None:
    """The trace is rewritten whole after every scenario and every death: kill -9 the probe as soon as
    the first death is on disk, and the file is a complete trace holding it."""
    out = tmp_path / "probe"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    args = ["--rkllm-library", standin.lib("1.3"), "--model", standin.model, "--out", out, *SMALL]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "probe", *map(str, args)],
        env={**clean, **FAST, "RKLLM_STANDIN_CRASH_AT_RUN": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        trace: dict[str, Any] = {}
        while not any(p.get("outcome") == "died" for p in trace.get("parts", [])):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
            if (out / "probe-trace.json").exists():
                trace = load_trace(out / "probe-trace.json")  # never a half-written file
    finally:
        proc.kill()
        proc.wait()
    trace = load_trace(out / "probe-trace.json")
    assert [r.get("rc") for r in runs(trace, "n1")[:2]] == [0, 0]
    assert part(trace, "n1")["outcome"] == "died"


def test_a_hang_is_stopped_at_the_time_limit_and_the_probe_goes_on(standin: Standin, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    proc = probe(
        "--rkllm-library", standin.lib("1.3"), "--model", standin.model, "--out", out, "--tokens", 12,
        "--max-context", 512, "--system-tokens", 400, "--n-batch", "1,2", "--repeats", "1", "--timeout", "2",
        env={**FAST, "RKLLM_STANDIN_HANG_AT_RUN": "6"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    trace = load_trace(out / "probe-trace.json")
    hung = [(p["id"], p["in"]) for p in trace["parts"] if p["outcome"] == "timeout"]
    assert hung == [("n1", "unequal-prompts-alone"), ("n2", "unequal-lengths-n2")]
    assert scenario(trace, "unequal-prompts-alone")["timeout"] is True
    assert part(trace, "over-long")["outcome"] == "ok"  # the last part still ran
    assert "**no answer within 2.0 s** (stopped) in part `n1`" in (out / "probe-summary.md").read_text()


def test_n_batch_8_and_the_over_long_prompt_come_last() -> None:
    p = Plan(tokens=64, max_context=2048, n_batch=[1, 2, 4, 8], repeats=3, system_tokens=1000,
             chat_template="{system}|{prompt}", tokenizer=None)  # fmt: skip
    made = [make([], []) for make in plan(p)]
    assert [m.id for m in made[-2:]] == ["n8", "over-long"]
    assert [m.id for m in made[:3]] == ["n1", "n2", "n4"]
    risky = {m.id for m in made if len(m.scenarios) == 1 and m.n_batch <= 2}
    assert {"unpadded-n2", "finish-slots-n2", "cache-n1", "cache-n2"} <= risky


@pytest.mark.parametrize("trace_path", TRACES, ids=lambda p: p.stem)
def test_a_recorded_trace_replays_through_the_binding(standin: Standin, trace_path: Path, tmp_path: Path) -> None:
    """The stand-in delivers the recorded callbacks (RKLLM_STANDIN_REPLAY, part by part) while the
    probe runs the recorded parts again: the binding must answer every request as it should, and
    the probe must read the same answers to its questions."""
    recorded = load_trace(trace_path)
    out = tmp_path / "replay"
    proc = probe(
        "--rkllm-library", standin.lib(recorded["runtime"]["abi"]), "--model", standin.model, "--out", out,
        "--scenarios-from", trace_path, "--max-context", recorded["options"]["max_context"],
        "--tokens", recorded["options"]["tokens"], "--timeout", 60,
        env={"RKLLM_STANDIN_REPLAY": str(trace_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = (out / "runtime.log").read_text()
    assert (
        "has no more" not in log and "did not call rkllm_abort" not in log
    )  # every call found, every abort where recorded
    replayed = load_trace(out / "probe-trace.json")
    # the runtime's side: each call replayed, part by part, callback for callback, deaths included
    assert [(c["fn"], c["part"]) for c in replayed["calls"]] == [(c["fn"], c["part"]) for c in recorded["calls"]]
    assert [(p["id"], p["outcome"], p.get("in")) for p in replayed["parts"]] == [
        (p["id"], p["outcome"], p.get("in")) for p in recorded["parts"]
    ]
    for got, want in zip(runs(replayed), runs(recorded), strict=True):
        assert (got.get("rc"), got.get("died")) == (want.get("rc"), want.get("died"))
        steps_got, steps_want = [(s, sl) for s, sl, _ in callbacks(got)], [(s, sl) for s, sl, _ in callbacks(want)]
        if "died" in want:  # what reached the probe before the death: all of it, or all but the last ones
            assert steps_want[: len(steps_got)] == steps_got
            continue
        assert steps_got == steps_want
        for (_, _, p_got), (_, _, p_want) in zip(callbacks(got), callbacks(want), strict=True):
            assert (p_got is None) == (p_want is None)
            for row_got, row_want in zip(p_got or [], p_want or [], strict=True):
                assert row_got == pytest.approx(row_want, rel=1e-5)  # through float32 and back
        assert any(e.get("abort") for e in got["events"]) == any(e.get("abort") for e in want["events"])
        assert got["callback_threads"] == want["callback_threads"]
    # the binding's side: every check holds, the same readings, and the same replies
    checks = binding_checks(replayed)
    assert checks == binding_checks(recorded) and all(checks.values())  # (a scenario that died has no check)
    assert codes(replayed) == codes(recorded)
    for want in recorded["scenarios"]:
        if not want.get("cancel_after_tokens") and want.get("cancel_all_at_ms") is None and want.get("replies"):
            got = scenario(replayed, want["name"])["replies"]
            strip = {"perf"}
            assert {k: {f: v for f, v in r.items() if f not in strip} for k, r in got.items()} == {
                k: {f: v for f, v in r.items() if f not in strip} for k, r in want["replies"].items()
            }, want["name"]


def test_the_fixtures_hold_both_readings_and_a_death() -> None:
    found = {p.stem: load_trace(p) for p in TRACES}
    assert codes(found["standin-1.3.0"]) == READING_DEFAULT
    assert codes(found["standin-1.2.3-other-readings"]) == READING_OTHER
    crash = found["standin-1.3.0-crash-run3"]
    assert part(crash, "n1")["outcome"] == "died" and [r.get("rc") for r in runs(crash, "n1")] == [0, 0, None]


def test_the_probe_refuses_bad_input_in_one_line(standin: Standin, tmp_path: Path) -> None:
    lib = build_standin("1.2", tmp_path / "b1" / "librkllmrt.so", "1.2.1b1")
    good = ["--rkllm-library", standin.lib("1.3"), "--model", standin.model]
    cases = [
        (["--rkllm-library", standin.lib("1.3"), "--model", tmp_path / "missing.rkllm"], "--model"),
        (["--rkllm-library", tmp_path / "missing.so", "--model", standin.model], "rkllm_library"),
        (["--rkllm-library", lib, "--model", standin.model], "runtime 1.2.1b1,"),
        ([*good, "--n-batch", "1,9"], "--n-batch"),
        ([*good, "--repeats", "0"], "--repeats"),
        ([*good, "--chat-template", "{prompt} only"], "--chat-template"),
        ([*good, "--scenarios-from", standin.model], "trace"),
    ]
    for args, needle in cases:
        proc = probe(*args, "--out", tmp_path / "out", env=FAST)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rkmqtt: ") and needle in lines[0], (args, proc.stderr)


def test_clocks_and_npu_memory_are_read_where_the_kernel_shows_them(tmp_path: Path) -> None:
    policy = tmp_path / "sys/devices/system/cpu/cpufreq/policy4"
    policy.mkdir(parents=True)
    (policy / "scaling_governor").write_text("performance\n")
    (policy / "scaling_cur_freq").write_text("2352000\n")
    (policy / "scaling_max_freq").mkdir()  # a file that cannot be read
    npu = tmp_path / "sys/class/devfreq/fdab0000.npu"
    npu.mkdir(parents=True)
    (npu / "governor").write_text("userspace\n")
    (npu / "cur_freq").write_text("1000000000\n")
    (tmp_path / "sys/class/devfreq/fb000000.gpu").mkdir()
    clocks = read_clocks(tmp_path)
    assert clocks["cpu"] == {
        "policy4": {"scaling_governor": "performance", "scaling_cur_freq": "2352000", "scaling_max_freq": "unreadable"}
    }
    assert clocks["devfreq"] == {"fdab0000.npu": {"governor": "userspace", "cur_freq": "1000000000"}}
    assert read_clocks(tmp_path / "empty") == {
        "cpu": "no cpufreq in sysfs",
        "devfreq": "no NPU devfreq device in sysfs",
    }
    assert read_npu_memory(tmp_path) == {"/sys/kernel/debug/rknpu": "unreadable"}
    mm = tmp_path / "sys/kernel/debug/rknpu/mm"
    mm.parent.mkdir(parents=True)
    mm.write_text("total: 1234 MB\n")
    assert read_npu_memory(tmp_path) == {"/sys/kernel/debug/rknpu/mm": "total: 1234 MB"}
    status = tmp_path / "status"
    status.write_text("Name: x\nVmHWM:\t  204800 kB\n")
    assert peak_rss_mb(status) == 200.0 and peak_rss_mb(tmp_path / "none") is None
