"""The bench: pure figures, then real short sweeps of the harness (`python -m benchmarks`) — the
stand-in RKLLM runtime with zero delays behind bridges it starts as child processes on a private
Mosquitto — and `rkmqtt bench` against a bridge that is already running."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from benchmarks.cli import main as harness
from benchmarks.suites import SUITES

from rkmqtt.bench.busy import LoadVerdict, others_wanting_cpu
from rkmqtt.bench.gain import batching_gain
from rkmqtt.bench.metrics import RequestRecord, RunMetrics, percentile, summarize
from rkmqtt.bench.prompts import BUILTIN_PROMPTS, load_prompts
from rkmqtt.bench.report import figure, markdown, single_round
from rkmqtt.bench.runner import Point
from rkmqtt.bench.workload import Workload
from rkmqtt.cli.main import main
from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.service import Service
from tests.fake_engine import FakeEngine

# -- pure logic -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, None), ([3.0], 99, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8)],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_summarize_rates_and_errors() -> None:
    recs = [
        RequestRecord(
            0, 0, "a", 0, sent=10.0, first_token=10.1, done=11.0, status="ok", completion_tokens=20, chunks=5
        ),
        RequestRecord(
            1, 0, "b", 1, sent=10.5, first_token=10.7, done=12.0, status="ok", completion_tokens=30, chunks=9, max_seq=9
        ),
        RequestRecord(2, 0, "c", 2, sent=10.5, done=10.6, status="error", error_code="busy"),
        RequestRecord(3, 0, "d", 3, sent=10.6, status="timeout", error_code="timeout"),
    ]
    m = summarize(recs)
    assert (m.requests, m.ok, m.errors) == (4, 2, 2)
    assert m.errors_by_code == {"busy": 1, "timeout": 1}
    assert m.error_share == 0.5
    assert m.span_s == 2.0  # first sent 10.0 to last final 12.0
    assert m.tokens_per_s == 25.0 and m.requests_per_s == 1.0
    assert m.latency_ms_p50 == pytest.approx(1250.0)
    assert m.ttft_ms_p50 == pytest.approx(150.0)
    assert m.stream_messages == 14 and m.stream_gaps == 1  # b saw seq 0..9 but only 9 chunks


def test_workload_prompts_and_open_arrivals() -> None:
    w = Workload("open", devices=3, requests=2000, max_new_tokens=8, prompts=BUILTIN_PROMPTS, rate=50.0, seed=1)
    arrivals = w.open_arrivals()
    assert [d for _, d in arrivals[:4]] == [0, 1, 2, 0]
    assert arrivals[-1][0] / len(arrivals) == pytest.approx(1 / 50.0, rel=0.1)  # Poisson at 50/s
    assert w.prompt_index(1, 0) == 1 and w.prompt_index(1, 1) == 4
    burst = Workload("burst", devices=4, requests=10, max_new_tokens=8, prompts=("x",))
    assert (burst.rounds, burst.total) == (3, 12)


def test_a_fresh_prompts_warm_up_sends_other_prompts_than_the_measured_round() -> None:
    """The single round of the `batching` suite: 8 devices ask new questions (no slot holds them
    from the warm-up); without `fresh_prompts` the warm-up sends the measured prompts."""
    (closed, round_) = SUITES["batching"](BUILTIN_PROMPTS, False)
    w = round_.workload
    assert (w.shape, w.devices, w.total, w.max_new_tokens, w.fresh_prompts) == ("burst", 8, 8, 48, True)
    assert (round_.n_batch, round_.direct_n_batch) == ((1, 8), (1, 8)) == (closed.n_batch, closed.direct_n_batch)
    measured = {w.prompt_index(d, 0) for d in range(8)}
    assert measured.isdisjoint(w.warmup_prompt_index(d, 0) for d in range(8)) and len(measured) == 8
    same = Workload("burst", devices=8, requests=8, max_new_tokens=8, prompts=BUILTIN_PROMPTS)
    assert [same.warmup_prompt_index(d, 0) for d in range(8)] == [same.prompt_index(d, 0) for d in range(8)]
    assert {s.name for s in SUITES["targets"](BUILTIN_PROMPTS, False)} >= {"cpu-8-devices", "cpu-8-at-once"}


def _run(tokens_per_s: float) -> RunMetrics:
    return dataclasses.replace(summarize([]), tokens_per_s=tokens_per_s)


def test_batching_gain_pairs_repeats_and_shows_the_bridges_share() -> None:
    """Gains are medians of per-repeat ratios (repeat k of n_batch 8 over repeat k of n_batch 1), through
    MQTT and for the engine alone; their quotient is what the bridge keeps of the engine's gain."""
    runs = {("mqtt", 1): [10, 20, 10], ("mqtt", 8): [25, 40, 30]}
    runs |= {("direct", 1): [10, 10, 10], ("direct", 8): [30, 30, 40]}
    points = []
    for (mode, nb), tps in runs.items():
        p = Point("cpu-8-at-once", "numpy", "numpy (CPU)", nb, mode, {})  # type: ignore[arg-type]
        p.runs = [_run(x) for x in tps]
        points.append(p)
    (g,) = batching_gain(points)
    assert (g["n_batch"], g["mqtt_pair_gains"], g["direct_pair_gains"]) == (8, [2.5, 2.0, 3.0], [3.0, 3.0, 4.0])
    assert (g["mqtt_gain"], g["direct_gain"]) == (2.5, 3.0)
    assert g["bridge_keeps"] == 0.75  # the median of 2.5/3, 2/3 and 3/4
    target = single_round(points)
    assert target.met is True and target.measured.startswith("2.50x (per repeat 2.50, 2.00, 3.00); engine alone 3.00x")
    assert "| cpu-8-at-once | 8 | 2.50x (2.50, 2.00, 3.00) | 3.00x (3.00, 3.00, 4.00) | 75 % |" in markdown(points)


def test_prompts_file(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# home\nTurn on the fan.\n\n  Open the blinds.  \n")
    assert load_prompts(f) == ["Turn on the fan.", "Open the blinds."]
    assert load_prompts(None) == list(BUILTIN_PROMPTS)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError):
        load_prompts(tmp_path / "empty.txt")


# -- real sweeps --------------------------------------------------------------------------------


def _points(data: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(p["scenario"], p["n_batch"], p["mode"]): p for p in data["points"]}


def _check_consistent(m: dict[str, Any]) -> None:
    assert m["ok"] == m["requests"] and m["error_share"] == 0 and m["errors_by_code"] == {}
    assert m["span_s"] > 0
    assert m["tokens_per_s"] == pytest.approx(m["completion_tokens"] / m["span_s"], rel=0.01)
    assert m["requests_per_s"] == pytest.approx(m["ok"] / m["span_s"], rel=0.01)
    assert m["latency_ms_p50"] <= m["latency_ms_p95"] <= m["latency_ms_p99"]
    assert 0 < m["ttft_ms_p50"] <= m["latency_ms_p95"]
    assert 0 < m["stream_messages"] <= m["completion_tokens"] and m["stream_gaps"] == 0


def test_sweep_with_zero_delay_standin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = harness(
        [
            *[
                "--engines",
                "rkllm-zero",
                "--n-batch",
                "1,3",
                "--devices",
                "3",
                "--requests",
                "18",
                "--tokens",
                "16",
                "--direct",
                "3",
            ],
            *["--out", str(out), "--workdir", str(tmp_path / "work"), "--no-progress"],
        ]
    )
    assert status == 0
    data = json.loads((out / "bench.json").read_text())
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "| rkllm-zero | rkllm stand-in, zero delay | 3 | direct |" in (out / "bench.md").read_text()
    points = _points(data)
    assert set(points) == {("rkllm-zero", 1, "mqtt"), ("rkllm-zero", 3, "mqtt"), ("rkllm-zero", 3, "direct")}
    for (_, nb, _), p in points.items():
        m = p["median"]
        _check_consistent(m)
        assert m["requests"] == 18
        assert 1 <= m["mean_batch_size"] <= nb
    assert points[("rkllm-zero", 1, "mqtt")]["median"]["mean_batch_size"] == 1
    # Each MQTT run says how much of a core the bench, the bridge and the broker used.
    for (_, _, mode), p in points.items():
        cpu = p["median"]["cpu"]
        if mode == "direct":
            assert cpu == {}
            continue
        assert set(cpu) == {"bench", "bridge", "broker"}, cpu
        # (clock-tick resolution: a short run may see 0 for the broker)
        assert all(0 <= v < data["machine"]["cpus"] + 0.5 for v in cpu.values()) and cpu["bench"] > 0, cpu
    assert "| CPU, share of one core | n_batch | bench | bridge | broker |" in (out / "bench.md").read_text()
    # Every request, one row each, with its own queueing delay, time to first token, latency, tokens.
    with (out / "bench.requests.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 18
    for (sc, nb, mode), p in points.items():
        mine = [r for r in rows if (r["scenario"], int(r["n_batch"]), r["mode"]) == (sc, nb, mode)]
        assert len(mine) == 18 and {r["status"] for r in mine} == {"ok"}
        assert len({r["id"] for r in mine}) == 18 and {r["repeat"] for r in mine} == {"1"}
        assert sum(int(r["completion_tokens"]) for r in mine) == p["median"]["completion_tokens"]
        for r in mine:
            assert 0 <= float(r["queued_ms"]) <= float(r["latency_ms"])
            assert 0 < float(r["ttft_ms"]) <= float(r["latency_ms"]) and 1 <= int(r["batch_size"]) <= nb
        lat = sorted(float(r["latency_ms"]) for r in mine)
        assert p["median"]["latency_ms_p50"] == pytest.approx((lat[8] + lat[9]) / 2, abs=0.2)
    assert points[("rkllm-zero", 3, "mqtt")]["bridge_info"]["n_batch"] == 3
    # The stand-in's text depends only on the prompt, and every mode sends the same prompts.
    tokens = {k: p["median"]["completion_tokens"] for k, p in points.items()}
    assert len(set(tokens.values())) == 1, tokens
    (cost,) = data["bridge_cost"]
    assert cost["n_batch"] == 3
    assert cost["ratio"] == pytest.approx(cost["mqtt_tokens_per_s"] / cost["direct_tokens_per_s"], rel=0.01)
    assert data["standin_timing_model"]["decode_ms"] == pytest.approx(59.88, abs=0.01)
    assert data["complete"] and data["machine"]["cpus"] and data["bridge_settings"]["rate_limit"] == "0"
    table = capsys.readouterr().out
    assert "rkllm stand-in, zero delay" in table and "bridge cost" in table and "CPU over the measured" in table
    # A saved report renders again without running anything.
    assert main(["bench", "--render", str(out / "bench.json"), "--png", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out == table


def test_open_loop_and_bursts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for shape, extra in (("open", ["--rate", "40"]), ("burst", [])):
        out = tmp_path / shape
        status = harness(
            [
                *[
                    "--engines",
                    "rkllm-zero",
                    "--n-batch",
                    "2",
                    "--devices",
                    "4",
                    "--requests",
                    "8",
                    "--tokens",
                    "8",
                ],
                *["--shape", shape, *extra, "--out", str(out), "--no-plot"],
            ]
        )
        assert status == 0
        # Not a terminal (pytest captures it): the progress is a plain line at each step.
        err = capsys.readouterr().err
        for line in (
            "bench: run 1/1: rkllm stand-in, zero delay n_batch 2 mqtt",
            "bench: run 1/1: starting 1 bridge (the model loads)",
            "bench: run 1/1: 1 warm-up round(s), then the measured requests",
            "bench: run 1/1 over after",
        ):
            assert line in err, err  # fmt: skip
        (point,) = json.loads((out / "bench.json").read_text())["points"]
        _check_consistent(point["median"])
        assert point["workload"]["shape"] == shape and point["median"]["requests"] == 8
        assert not (out / "bench.png").exists()


def test_one_round_at_once_reports_the_batching_gain_beside_the_engine_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One round of 4 devices at once, n_batch 1 and 4, through MQTT and for the engine alone: the
    report has both gains and what the bridge keeps (a small run of what `--suite batching` does);
    `rkmqtt bench --render` shows them again from the saved JSON. The engine-alone runs report their
    progress and the session its load verdict, as the bridge's runs do."""
    out = tmp_path / "out"
    args = ["--engines", "rkllm-zero", "--shape", "burst", "--devices", "4", "--requests", "4", "--tokens", "8"]
    args += ["--n-batch", "1,4", "--direct", "1,4", "--out", str(out), "--no-plot"]
    assert harness(args) == 0
    table, err = capsys.readouterr()
    for line in (
        "bench: run 1/4: ",
        "bench: run 4/4: loading the engine (no bridge)",
        "bench: run 4/4: the measured requests, straight to the engine",
        "bench: run 4/4 over after",
    ):
        assert line in err, err  # fmt: skip
    data = json.loads((out / "bench.json").read_text())
    assert data["load"]["verdict"] in (out / "bench.md").read_text().splitlines()[0]
    tps = {(p["n_batch"], p["mode"]): p["median"]["tokens_per_s"] for p in data["points"]}
    (g,) = data["batching_gain"]
    assert (g["scenario"], g["n_batch"]) == ("rkllm-zero", 4)
    assert g["mqtt_gain"] == pytest.approx(tps[4, "mqtt"] / tps[1, "mqtt"], rel=1e-3)
    assert g["direct_gain"] == pytest.approx(tps[4, "direct"] / tps[1, "direct"], rel=1e-3)
    assert g["bridge_keeps"] == pytest.approx(g["mqtt_gain"] / g["direct_gain"], rel=1e-3)
    assert "batching gain" in table and "| batching gain |" in (out / "bench.md").read_text()
    assert main(["bench", "--render", str(out / "bench.json"), "--no-plot"]) == 0
    assert capsys.readouterr().out == table


def test_the_persistence_suite_reports_writes_with_progress_and_the_load_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--suite persistence` at a small size (4 devices, 12 requests): its three brokers (saved on
    changes, every 30 s, off) each behind a bridge, every run with its progress; the broker saved on
    changes saves during the run, and the writes table (also in the Markdown and a `--render`) has the
    two with persistence; the session's load verdict heads the Markdown."""
    suite = SUITES["persistence"]

    def small(prompts: tuple[str, ...], rkllm_real: bool) -> list[Any]:
        w = Workload("closed", devices=4, requests=12, max_new_tokens=8, prompts=prompts)
        return [dataclasses.replace(s, workload=w) for s in suite(prompts, rkllm_real)]

    monkeypatch.setitem(SUITES, "persistence", small)
    out = tmp_path / "out"
    assert harness(["--suite", "persistence", "--out", str(out), "--no-plot"]) == 0
    table, err = capsys.readouterr()
    for n in (1, 2, 3):
        for line in (f"bench: run {n}/3: starting 1 bridge (the model loads)", f"bench: run {n}/3 over after"):
            assert line in err, err  # fmt: skip
    data = json.loads((out / "bench.json").read_text())
    runs = {p["scenario"]: p["runs"] for p in data["points"]}
    assert set(runs) == {"persistence-on-changes", "persistence-every-30-s", "persistence-off"}
    for name, (run,) in runs.items():
        assert run["ok"] == 12, (name, run)
        assert ("writes" in run["extra"]) == (name != "persistence-off"), (name, run["extra"])
    on_changes = runs["persistence-on-changes"][0]["extra"]["writes"]
    assert on_changes["broker_saves"] > 0 and on_changes["bridge_write_chars"] > 0, on_changes
    md = (out / "bench.md").read_text()
    assert data["load"]["verdict"] in md.splitlines()[0]
    writes = md.split("| writes per request |")[1].split("\n\n")[0]
    assert "| persistence-on-changes | 8 |" in writes and "| persistence-every-30-s | 8 |" in writes
    assert "persistence-off" not in writes
    assert "writes per request" in table
    assert main(["bench", "--render", str(out / "bench.json"), "--no-plot"]) == 0
    assert capsys.readouterr().out == table


def test_running_bridge_and_errors(
    tmp_path: Path, mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]
) -> None:
    """Against a bridge that is already running: its own engine and n_batch, and its refusals
    (a queue of 1 answers `busy`) counted by code."""
    start_bridge(FakeEngine(n_batch=2, step_s=0.002), rate_limit=0, max_queue=1)
    out = tmp_path / "out"
    status = main(
        [
            *["bench", "--broker", mosquitto.url, "--topic-prefix", prefix],
            *["--devices", "6", "--requests", "12", "--warmup", "0", "--no-progress", "--out"],
            str(out),
        ]
    )
    assert status == 0
    (point,) = json.loads((out / "bench.json").read_text())["points"]
    m = point["median"]
    assert point["n_batch"] == 2 and point["bridge_info"]["engine"] == "fake"
    assert set(m["cpu"]) == {"bench"}  # a running bridge's process is not ours to measure
    assert m["requests"] == 12 and m["ok"] + m["errors"] == 12
    assert m["errors"] > 0 and set(m["errors_by_code"]) == {"busy"}
    assert m["error_share"] == pytest.approx(m["errors"] / 12, abs=1e-4)


def test_without_matplotlib_the_bench_writes_the_rest_and_says_how_to_plot(
    tmp_path: Path,
    mosquitto: Mosquitto,
    prefix: str,
    start_bridge: Callable[..., Service],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`./dev run` installs rkmqtt without its `bench` extra (matplotlib): the bench still ends
    with status 0, writes JSON, Markdown and CSV, and says in one line how to get the plot."""
    start_bridge(FakeEngine(n_batch=2, step_s=0.002), rate_limit=0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    out = tmp_path / "out"
    status = main(
        [
            *["bench", "--broker", mosquitto.url, "--topic-prefix", prefix],
            *["--devices", "2", "--requests", "4", "--warmup", "0", "--no-progress", "--out", str(out)],
        ]
    )
    assert status == 0
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.requests.csv"}
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("plot:")]
    assert line == (
        f"plot: not drawn, matplotlib is not installed: {sys.executable} -m pip install matplotlib, "
        f"then rkmqtt bench --render {out / 'bench.json'}"
    )
    assert main(["bench", "--render", str(out / "bench.json")]) == 0
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (out / "bench.png").exists()


# -- a busy machine, the plot ---------------------------------------------------------------------

BUSY = "import sys\nwhile True: pass"


def test_a_bench_on_a_busy_machine_is_reported_not_meaningful(
    tmp_path: Path, mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Other processes that want more CPUs than there are (busy loops, one more than the cores):
    the report says the figures mean nothing, in the terminal, the JSON and the Markdown."""
    import os

    start_bridge(FakeEngine(n_batch=2, step_s=0.002), rate_limit=0)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range((os.cpu_count() or 1) + 2)]
    try:
        out = tmp_path / "out"
        status = main(["bench", "--broker", mosquitto.url, "--topic-prefix", prefix, "--devices", "2",
                       "--requests", "8", "--warmup", "0", "--no-plot", "--out", str(out)])  # fmt: skip
    finally:
        for h in hogs:
            h.kill()
            h.wait(10)
    assert status == 0
    load = json.loads((out / "bench.json").read_text())["load"]
    assert load["samples"] >= 1 and load["cores"] == os.cpu_count()
    assert load["others_mean"] > load["cores"] and load["meaningful"] is False
    assert load["verdict"].startswith("NOT MEANINGFUL: the machine was busy with other work")
    assert (out / "bench.md").read_text().startswith("**NOT MEANINGFUL: the machine was busy with other work")
    assert "NOT MEANINGFUL" in capsys.readouterr().err
    # The progress lines of `rkmqtt bench`: one run, its phase, its end.
    assert main(["bench", "--render", str(out / "bench.json"), "--no-plot"]) == 0
    assert "NOT MEANINGFUL" in capsys.readouterr().err


def test_the_load_verdict_and_what_it_counts() -> None:
    quiet = LoadVerdict(cores=2, loadavg_start=0.3, others_mean=0.4, others_max=2, samples=10)
    busy = dataclasses.replace(quiet, others_mean=2.6, others_max=4)
    assert quiet.meaningful is True and busy.meaningful is False
    assert LoadVerdict(2, None, None, None, 0).meaningful is None
    assert LoadVerdict.from_dict(busy.as_dict()) == busy
    assert markdown([], busy).startswith("**NOT MEANINGFUL") and not markdown([], quiet).startswith("**")
    # A thread that runs all the time is always counted, unless it is an rkmqtt process.
    hog = subprocess.Popen([sys.executable, "-c", BUSY])
    ours = subprocess.Popen([sys.executable, "-c", BUSY, "rkmqtt"])
    try:
        cache: dict[str, bool] = {}
        counts = [others_wanting_cpu(cache) for _ in range(5)]
        assert all(c is not None and c >= 1 for c in counts)
        assert cache[str(hog.pid)] is False and cache[str(ours.pid)] is True
    finally:
        for p in (hog, ours):
            p.kill()
            p.wait(10)


def _point(scenario: str, label: str, n_batch: int, mode: str, tokens_per_s: float, latency_ms: float) -> Point:
    p = Point(scenario, scenario, label, n_batch, mode, {})  # type: ignore[arg-type]
    recs = [RequestRecord(0, 0, "a", 0, sent=0.0, first_token=0.1, done=latency_ms / 1000, status="ok",
                          completion_tokens=int(tokens_per_s * latency_ms / 1000), chunks=1)]  # fmt: skip
    m: RunMetrics = summarize(recs)
    p.runs.append(m)
    return p


def test_the_plot_has_plain_tick_labels_and_a_legend_without_repetition() -> None:
    points = [_point("numpy", "numpy (CPU)", nb, mode, tps, lat)
              for nb, tps, lat in ((1, 27.0, 5500.0), (2, 38.0, 4100.0), (4, 57.0, 3000.0), (8, 127.0, 2100.0))
              for mode in ("mqtt", "direct")]  # fmt: skip
    points += [_point("cpu-8-devices", "numpy (CPU)", nb, "mqtt", 30.0 * nb, 900.0) for nb in (1, 8)]
    fig = figure(points, "test")
    fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels(which="both") + ax.get_xticklabels()]
    shown = [x for x in labels if x]
    assert shown and all(re.fullmatch(r"[0-9][0-9,.]*", x) for x in shown), shown  # no 4×10¹, no $10^{1}$
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["numpy (CPU)", "numpy (CPU) — engine alone", "cpu-8-devices: numpy (CPU)"]
