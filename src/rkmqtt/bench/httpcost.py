"""HTTP's cost against MQTT's (main thread; pure, plus printing): for every point measured both ways
with the same workload, tokens/s, time to first token and latency side by side, the ratio as the
median of per-repeat ratios, and the bridge's CPU time per token (docs/benchmarks.md, "HTTP against
MQTT")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from rkmqtt.bench.metrics import percentile
from rkmqtt.bench.runner import Point


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def bridge_us_per_token(point: Point) -> float | None:
    """The bridge process's CPU time per completion token, µs (median over repeats): what serving
    a token costs the bridge itself, whichever way it leaves."""
    per_run = [
        r.cpu["bridge"] * r.span_s / r.completion_tokens * 1e6
        for r in point.runs
        if r.cpu.get("bridge") is not None and r.completion_tokens
    ]
    m = percentile(per_run, 50)
    return None if m is None else round(m, 1)


def http_cost(points: Sequence[Point]) -> list[dict[str, Any]]:
    out = []
    for p in points:
        h = p.metrics
        if p.mode != "http" or h is None:
            continue
        q = next((x for x in points if (x.scenario, x.n_batch, x.mode) == (p.scenario, p.n_batch, "mqtt")), None)
        m = q.metrics if q is not None else None
        if q is None or m is None:
            continue
        pairs = [b.tokens_per_s / a.tokens_per_s for a, b in zip(q.runs, p.runs, strict=False) if a.tokens_per_s]
        ratio = percentile(pairs, 50)
        out.append(
            {
                "scenario": p.scenario,
                "engine": p.engine,
                "n_batch": p.n_batch,
                "mqtt_tokens_per_s": m.tokens_per_s,
                "http_tokens_per_s": h.tokens_per_s,
                "ratio": None if ratio is None else round(ratio, 4),
                "pair_ratios": [round(x, 4) for x in pairs],
                "mqtt_ttft_ms_p50": m.ttft_ms_p50,
                "http_ttft_ms_p50": h.ttft_ms_p50,
                "ttft_added_ms_p50": _sub(h.ttft_ms_p50, m.ttft_ms_p50),
                "mqtt_latency_ms_p50": m.latency_ms_p50,
                "http_latency_ms_p50": h.latency_ms_p50,
                "mqtt_bridge_cpu": m.cpu.get("bridge"),
                "http_bridge_cpu": h.cpu.get("bridge"),
                "mqtt_bridge_us_per_token": bridge_us_per_token(q),
                "http_bridge_us_per_token": bridge_us_per_token(p),
                "errors": {"mqtt": m.errors, "http": h.errors},
            }
        )
    return out


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _cells(c: dict[str, Any]) -> list[str]:
    r = c["ratio"]
    return [
        c["scenario"],
        str(c["n_batch"]),
        _f(c["mqtt_tokens_per_s"], 1),
        _f(c["http_tokens_per_s"], 1),
        "-" if r is None else f"{100 * r:.1f} %",
        _f(c["mqtt_ttft_ms_p50"]),
        _f(c["http_ttft_ms_p50"]),
        _f(c["mqtt_latency_ms_p50"]),
        _f(c["http_latency_ms_p50"]),
        f"{_pct(c['mqtt_bridge_cpu'])} / {_pct(c['http_bridge_cpu'])}",
        f"{_f(c['mqtt_bridge_us_per_token'])} / {_f(c['http_bridge_us_per_token'])}",
    ]


_COLUMNS = (
    "scenario",
    "n_batch",
    "MQTT tok/s",
    "HTTP tok/s",
    "HTTP / MQTT",
    "TTFT p50 MQTT",
    "TTFT p50 HTTP",
    "lat p50 MQTT",
    "lat p50 HTTP",
    "bridge CPU MQTT / HTTP",
    "bridge µs/token MQTT / HTTP",
)


def print_http_cost(points: Sequence[Point], console: Console) -> None:
    costs = http_cost(points)
    if not costs:
        return
    t = Table(title="HTTP (Ollama /api/chat, streamed) against MQTT, same load (ratio: median of per-repeat ratios)")
    for col in _COLUMNS:
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for c in costs:
        t.add_row(*_cells(c))
    console.print(t)


def markdown_lines(points: Sequence[Point]) -> list[str]:
    costs = http_cost(points)
    if not costs:
        return []
    lines = ["", "| HTTP vs MQTT | " + " | ".join(_COLUMNS[1:]) + " |", "|---|" + "---:|" * (len(_COLUMNS) - 1)]
    lines += ["| " + " | ".join(_cells(c)) + " |" for c in costs]
    return lines
