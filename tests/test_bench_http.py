"""The harness's `--http`: the same load through the bridge's Ollama HTTP API beside MQTT, with the
zero-delay RKLLM stand-in, and HTTP's cost against MQTT's in the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from benchmarks.cli import main


def test_http_beside_mqtt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["--engines", "rkllm-zero", "--n-batch", "1,2", "--http", "2", "--devices", "3"]
    args += ["--requests", "30", "--tokens", "16", "--repeat", "2", "--out", str(out), "--no-plot", "--no-progress"]
    assert main(args) == 0
    data = json.loads((out / "bench.json").read_text())
    points = {(p["n_batch"], p["mode"]): p for p in data["points"]}
    assert set(points) == {(1, "mqtt"), (2, "mqtt"), (2, "http")}
    mqtt, http = points[(2, "mqtt")]["median"], points[(2, "http")]["median"]
    assert http["requests"] == http["ok"] == 60 and http["errors"] == 0  # counts are summed over repeats
    assert http["completion_tokens"] > 0 and mqtt["completion_tokens"] > 0
    assert 0 < http["ttft_ms_p50"] <= http["latency_ms_p50"] and http["stream_messages"] > 0
    assert set(http["cpu"]) == {"bench", "bridge", "broker"}
    (cost,) = data["http_cost"]
    assert cost["n_batch"] == 2 and len(cost["pair_ratios"]) == 2
    runs = zip(points[(2, "mqtt")]["runs"], points[(2, "http")]["runs"], strict=True)
    ratios = [h["tokens_per_s"] / m["tokens_per_s"] for m, h in runs]
    assert cost["pair_ratios"] == pytest.approx(ratios, rel=0.001)
    assert cost["ttft_added_ms_p50"] == pytest.approx(http["ttft_ms_p50"] - mqtt["ttft_ms_p50"], abs=0.02)
    assert cost["mqtt_bridge_us_per_token"] > 0 and cost["http_bridge_us_per_token"] > 0
    with (out / "bench.requests.csv").open(newline="") as f:
        every = list(csv.DictReader(f))
    rows = [r for r in every if r["mode"] == "http"]
    # The stand-in's text depends only on the prompt: a prompt gives the same tokens both ways. (Which
    # prompts a closed loop sends depends on which device finishes first, so totals may differ.)
    tokens: dict[str, set[str]] = {}
    for r in every:
        tokens.setdefault(r["prompt_index"], set()).add(r["completion_tokens"])
    assert all(len(t) == 1 for t in tokens.values()), tokens
    assert len(rows) == 60 and {r["status"] for r in rows} == {"ok"} and {r["repeat"] for r in rows} == {"1", "2"}
    assert all(0 < float(r["ttft_ms"]) <= float(r["latency_ms"]) for r in rows)
    assert "| HTTP vs MQTT | n_batch | MQTT tok/s | HTTP tok/s |" in (out / "bench.md").read_text()
    assert "HTTP (Ollama /api/chat, streamed) against MQTT" in capsys.readouterr().out


def test_http_with_bursts_and_an_open_loop(tmp_path: Path) -> None:
    for shape, extra in (("burst", []), ("open", ["--rate", "40"])):
        out = tmp_path / shape
        args = ["--engines", "rkllm-zero", "--n-batch", "2", "--http", "all", "--devices", "4"]
        args += ["--requests", "8", "--tokens", "8", "--shape", shape, *extra, "--out", str(out)]
        assert main([*args, "--no-plot", "--no-progress"]) == 0
        points = {p["mode"]: p["median"] for p in json.loads((out / "bench.json").read_text())["points"]}
        assert set(points) == {"mqtt", "http"} and points["http"]["ok"] == 8, points


def test_a_bad_http_list_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--engines", "rkllm-zero", "--http", "two", "--no-progress"]) == 2
    assert "--http: not a comma-separated list of numbers: 'two'" in capsys.readouterr().err
