"""`rkmqtt probe` end to end against the stand-in runtime (in a subprocess, as a board owner runs
it), and the replay of recorded traces (tests/fixtures/rkllm-traces/) through the binding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rkmqtt.engines.rkllm.probe import load_trace
from rkmqtt.engines.rkllm.probe_report import binding_checks, waiting_behaviour
from tests.rkllm_fixtures import Standin, standin_fixture  # noqa: F401
from tests.standin.build import build_standin

REPO = Path(__file__).resolve().parents[1]
TRACES = sorted((REPO / "tests/fixtures/rkllm-traces").glob("*.json"))
FAST = {"RKLLM_STANDIN_DECODE_MS": "2", "RKLLM_STANDIN_PREFILL_MS_PER_TOKEN": "0.2", "RKLLM_STANDIN_TOKEN_BYTES": "2"}
SCRIPT = [
    "speed-n1",
    "chinese-n1",
    "emoji-n1",
    "cancel-all-prefill",
    "over-long",
    "after-over-long",
    "speed-n2",
    "chinese+emoji-n2",
    "cancel-one-slot",
    "padding",
    "speed-n4",
]
CHECKS = {
    "chinese-n1",
    "emoji-n1",
    "chinese+emoji-n2",
    "cancel all during prefill",
    "cancel one slot of 2",
    "over-long prompt",
    "1 request at n_batch 2 (padding)",
}


def probe(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_STANDIN_")}
    return subprocess.run(
        [sys.executable, "-m", "rkmqtt", "probe", *map(str, args)],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )


def runs(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in trace["calls"] if c["fn"] == "run"]


def callbacks(run: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(e["state"], e["slots"], e.get("perf")) for e in run["events"] if "state" in e]


def without_perf(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "perf"}


def scenario(trace: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in trace["scenarios"] if s["name"] == name)


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_the_probe_runs_its_script_and_writes_a_trace_and_a_summary(standin: Standin, abi: str, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    proc = probe(
        "--rkllm-library", standin.lib(abi), "--model", standin.model, "--out", out,
        "--tokens", 12, "--n-batch", "1,2,4", "--max-context", 512, env=FAST,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = (out / "probe-summary.md").read_text()
    assert proc.stdout.startswith("probe: runtime") and summary in proc.stdout
    trace = load_trace(out / "probe-trace.json")
    assert [s["name"] for s in trace["scenarios"]] == SCRIPT
    assert trace["runtime"]["abi"] == abi and trace["options"]["tokens"] == 12
    assert [c["n_batch"] for c in trace["calls"] if c["fn"] == "init"] == [1, 2, 4]
    # every callback recorded: the speed runs of n_batch 4 have 4 slots a step, 12 tokens each
    speed4 = trace["calls"][scenario(trace, "speed-n4")["runs"][0]]
    steps = [e for e in speed4["events"] if e.get("state") in (0, 1)]
    assert all(len(e["slots"]) == 4 for e in steps) and sum(t >= 0 for e in steps for t, _ in e["slots"]) == 48
    assert all(isinstance(bytes.fromhex(h), bytes) for e in steps for _, h in e["slots"] if h is not None)
    # the script's steps did what they are for
    assert scenario(trace, "over-long")["prepare"][0]["result"] == "too_long"
    cancel_all = trace["calls"][scenario(trace, "cancel-all-prefill")["runs"][0]]
    assert any(e.get("abort") for e in cancel_all["events"])
    assert binding_checks(trace) == dict.fromkeys(CHECKS, True)
    for n in (1, 2, 4):
        assert f"\n| {n} | " in summary
    assert "rkllm-runtime version" in (out / "runtime.log").read_text()  # what the runtime printed
    # the stand-in's default: the text after a WAITING step repeats the held bytes
    w = waiting_behaviour(trace["calls"][scenario(trace, "chinese-n1")["runs"][0]])
    assert w["waiting"] > 0 and w["repeat"] > 0 and w["split"] == 0


def test_the_summary_tells_the_split_reading(standin: Standin, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    proc = probe(
        "--rkllm-library", standin.lib("1.3"), "--model", standin.model, "--out", out,
        "--tokens", 12, "--n-batch", "1,2", "--max-context", 512,
        env={**FAST, "RKLLM_STANDIN_WAITING_TEXT": "split"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    trace = load_trace(out / "probe-trace.json")
    w = waiting_behaviour(trace["calls"][scenario(trace, "chinese+emoji-n2")["runs"][0]])
    assert w["waiting"] > 0 and w["split"] > 0 and w["repeat"] == 0
    assert "repeated its bytes 0×" in (out / "probe-summary.md").read_text()
    assert all(binding_checks(trace).values())


@pytest.mark.parametrize("trace_path", TRACES, ids=lambda p: p.stem)
def test_a_recorded_trace_replays_through_the_binding(standin: Standin, trace_path: Path, tmp_path: Path) -> None:
    """The stand-in delivers the recorded callbacks (RKLLM_STANDIN_REPLAY) while the probe runs the
    recorded scenarios again: the binding must answer every request as it should."""
    recorded = load_trace(trace_path)
    out = tmp_path / "replay"
    proc = probe(
        "--rkllm-library", standin.lib(recorded["runtime"]["abi"]), "--model", standin.model, "--out", out,
        "--scenarios-from", trace_path, "--max-context", recorded["options"]["max_context"],
        "--tokens", recorded["options"]["tokens"],
        env={"RKLLM_STANDIN_REPLAY": str(trace_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "replay:" not in (out / "runtime.log").read_text()  # the stand-in found every call it was asked for
    replayed = load_trace(out / "probe-trace.json")
    # the runtime's side: each call replayed, callback for callback
    assert [c["fn"] for c in replayed["calls"]] == [c["fn"] for c in recorded["calls"]]
    for got, want in zip(runs(replayed), runs(recorded), strict=True):
        assert got["rc"] == want["rc"]
        assert [(s, sl) for s, sl, _ in callbacks(got)] == [(s, sl) for s, sl, _ in callbacks(want)]
        for (_, _, p_got), (_, _, p_want) in zip(callbacks(got), callbacks(want), strict=True):
            assert (p_got is None) == (p_want is None)
            for row_got, row_want in zip(p_got or [], p_want or [], strict=True):
                assert row_got == pytest.approx(row_want, rel=1e-5)  # through float32 and back
        assert any(e.get("abort") for e in got["events"]) == any(e.get("abort") for e in want["events"])
    # the binding's side: every check holds, and where the recording's binding was right, the same replies
    assert binding_checks(replayed) == dict.fromkeys(CHECKS, True)
    if all(binding_checks(recorded).values()):
        for want in recorded["scenarios"]:
            if not want["cancel_after_tokens"] and want["cancel_all_at_ms"] is None:
                got = scenario(replayed, want["name"])["replies"]
                assert {k: without_perf(r) for k, r in got.items()} == {
                    k: without_perf(r) for k, r in want["replies"].items()
                }, want["name"]
                for key, reply in want["replies"].items():  # perf went through float32 and 3 decimals
                    assert got[key].get("perf", {}) == pytest.approx(reply.get("perf", {}), rel=1e-5, abs=1e-3)


def test_the_probe_refuses_bad_input_in_one_line(standin: Standin, tmp_path: Path) -> None:
    lib = build_standin("1.2", tmp_path / "b1" / "librkllmrt.so", "1.2.1b1")
    cases = [
        (["--rkllm-library", standin.lib("1.3"), "--model", tmp_path / "missing.rkllm"], "--model"),
        (["--rkllm-library", tmp_path / "missing.so", "--model", standin.model], "rkllm_library"),
        (["--rkllm-library", lib, "--model", standin.model], "runtime 1.2.1b1,"),
        (["--rkllm-library", standin.lib("1.3"), "--model", standin.model, "--n-batch", "1,9"], "--n-batch"),
        (["--rkllm-library", standin.lib("1.3"), "--model", standin.model, "--scenarios-from", standin.model], "trace"),
    ]
    for args, needle in cases:
        proc = probe(*args, "--out", tmp_path / "out", env=FAST)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rkmqtt: ") and needle in lines[0], (args, proc.stderr)
