"""Batching's gain (main thread; pure, plus printing): for each scenario measured at `n_batch` 1 and
a larger one, the tokens/s of the larger over those of 1, through MQTT and for the engine alone (each
the median of per-repeat ratios), and their quotient: what the bridge keeps of the engine's own gain
(docs/benchmarks.md, "A single round")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from rkmqtt.bench.metrics import percentile
from rkmqtt.bench.runner import Point


def _gain(points: Sequence[Point], scenario: str, mode: str, n_batch: int) -> tuple[float | None, list[float]]:
    """(median of per-repeat gains, the gains) of `n_batch` over 1 for one scenario and mode."""
    by_n = {p.n_batch: p for p in points if p.scenario == scenario and p.mode == mode}
    one, big = by_n.get(1), by_n.get(n_batch)
    if one is None or big is None:
        return None, []
    pairs = [b.tokens_per_s / a.tokens_per_s for a, b in zip(one.runs, big.runs, strict=False) if a.tokens_per_s]
    m = percentile(pairs, 50)
    return (None if m is None else round(m, 4)), [round(x, 4) for x in pairs]


def batching_gain(points: Sequence[Point]) -> list[dict[str, Any]]:
    out = []
    for scenario in dict.fromkeys(p.scenario for p in points):
        ns = [p.n_batch for p in points if p.scenario == scenario and p.mode == "mqtt"]
        if 1 not in ns or max(ns) == 1:
            continue
        n = max(ns)
        mqtt, mqtt_pairs = _gain(points, scenario, "mqtt", n)
        direct, direct_pairs = _gain(points, scenario, "direct", n)
        share = [m / d for m, d in zip(mqtt_pairs, direct_pairs, strict=False) if d]
        kept = percentile(share, 50)
        out.append(
            {
                "scenario": scenario,
                "n_batch": n,
                "mqtt_gain": mqtt,
                "mqtt_pair_gains": mqtt_pairs,
                "direct_gain": direct,
                "direct_pair_gains": direct_pairs,
                "bridge_keeps": None if kept is None else round(kept, 4),
            }
        )
    return out


def _x(g: float | None, pairs: Sequence[float] = ()) -> str:
    if g is None:
        return "-"
    return f"{g:.2f}x" + (f" ({', '.join(f'{x:.2f}' for x in pairs)})" if len(pairs) > 1 else "")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def print_batching_gain(points: Sequence[Point], console: Console) -> None:
    rows = batching_gain(points)
    if not rows:
        return
    t = Table(title="batching gain: tokens/s at n_batch N over n_batch 1 (median of per-repeat ratios)")
    for col in ("scenario", "N", "through MQTT", "engine alone", "MQTT / engine"):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for r in rows:
        t.add_row(
            r["scenario"],
            str(r["n_batch"]),
            _x(r["mqtt_gain"], r["mqtt_pair_gains"]),
            _x(r["direct_gain"], r["direct_pair_gains"]),
            _pct(r["bridge_keeps"]),
        )
    console.print(t)


def markdown_lines(points: Sequence[Point]) -> list[str]:
    rows = batching_gain(points)
    if not rows:
        return []
    lines = [
        "",
        "| batching gain | N | n_batch N / 1 through MQTT (per repeat) | engine alone (per repeat) | MQTT / engine |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['n_batch']} | {_x(r['mqtt_gain'], r['mqtt_pair_gains'])} | "
            f"{_x(r['direct_gain'], r['direct_pair_gains'])} | {_pct(r['bridge_keeps'])} |"
        )
    return lines
