"""The benchmark's outputs (main thread): a table on the terminal (rich), a JSON file for
machines, a PNG plot (matplotlib: throughput and latency against n_batch, one line per engine),
and the issue's targets checked against the figures.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rkmqtt import __version__
from rkmqtt.bench.busy import LoadVerdict
from rkmqtt.bench.gain import batching_gain, print_batching_gain
from rkmqtt.bench.gain import markdown_lines as gain_markdown_lines
from rkmqtt.bench.httpcost import http_cost, print_http_cost
from rkmqtt.bench.httpcost import markdown_lines as http_markdown_lines
from rkmqtt.bench.metrics import RequestRecord, RunMetrics, percentile
from rkmqtt.bench.runner import Point
from rkmqtt.bench.writes import print_writes, writes_markdown_lines


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rkmqtt": __version__,
        "loadavg": [round(x, 2) for x in load] if load else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _find(points: Sequence[Point], scenario: str, n_batch: int, mode: str = "mqtt") -> RunMetrics | None:
    for p in points:
        if p.scenario == scenario and p.n_batch == n_batch and p.mode == mode:
            return p.metrics
    return None


@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measured in this run

    def mark(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bridge_cost(points: Sequence[Point]) -> list[dict[str, Any]]:
    """tokens/s through MQTT over tokens/s of the engine alone, wherever both were measured.

    `ratio` is the median of the per-repeat ratios: repeat k through MQTT ran right before repeat k
    of the engine alone, so pairing them cancels most of a shared machine's drift. `ratio_of_medians`
    is the other estimate."""
    out = []
    for p in points:
        if p.mode != "direct" or p.metrics is None:
            continue
        mq_point = next(
            (q for q in points if q.scenario == p.scenario and q.n_batch == p.n_batch and q.mode == "mqtt"), None
        )
        if mq_point is None or mq_point.metrics is None:
            continue
        mq = mq_point.metrics
        pairs = [
            r for a, b in zip(mq_point.runs, p.runs, strict=False) if (r := _ratio(a.tokens_per_s, b.tokens_per_s))
        ]
        paired = percentile(pairs, 50)
        r = _ratio(mq.tokens_per_s, p.metrics.tokens_per_s)
        out.append(
            {
                "scenario": p.scenario,
                "engine": p.engine,
                "n_batch": p.n_batch,
                "mqtt_tokens_per_s": mq.tokens_per_s,
                "direct_tokens_per_s": p.metrics.tokens_per_s,
                "ratio": None if paired is None else round(paired, 4),
                "pair_ratios": [round(x, 4) for x in pairs],
                "ratio_of_medians": None if r is None else round(r, 4),
            }
        )
    return out


def targets(points: Sequence[Point]) -> list[Target]:
    """The issue's four targets (only the scenario names of the `targets` suite count)."""
    out: list[Target] = []
    a, b = _find(points, "cpu-8-devices", 1), _find(points, "cpu-8-devices", 8)
    if a and b:
        speedup = _ratio(b.tokens_per_s, a.tokens_per_s)
        ok = speedup is not None and speedup >= 2.5 and (b.latency_ms_p50 or 0) < (a.latency_ms_p50 or 0)
        measured = (
            f"{b.tokens_per_s:.1f} vs {a.tokens_per_s:.1f} tok/s = {speedup or 0:.2f}x; "
            f"median latency {b.latency_ms_p50:.0f} vs {a.latency_ms_p50:.0f} ms"
        )
    else:
        ok, measured = None, "-"
    out.append(Target("CPU engine, 8 devices: n_batch 8 vs 1", ">= 2.5x tokens/s, lower median latency", measured, ok))
    out.append(single_round(points))
    costs = {c["n_batch"]: c for c in bridge_cost(points) if c["scenario"] == "cpu-8-devices"}
    for nb in (1, 8):
        c = costs.get(nb)
        r = None if c is None else c["ratio"]
        measured = "-"
        if c is not None and r is not None:
            pairs = ", ".join(f"{100 * x:.0f}" for x in c["pair_ratios"])
            measured = (
                f"{100 * r:.1f} % (median of repeats: {pairs} %); medians {c['mqtt_tokens_per_s']:.1f} / "
                f"{c['direct_tokens_per_s']:.1f} tok/s"
            )
        out.append(
            Target(
                f"bridge cost, CPU engine, n_batch {nb}",
                ">= 95 % of the engine alone",
                measured,
                None if r is None else r >= 0.95,
            )
        )
    for sc, what in (("rk3588-4-users", "closed loop"), ("rk3588-4-at-once", "4 at once")):
        a, b = _find(points, sc, 1), _find(points, sc, 4)
        r = _ratio(b.latency_ms_mean, a.latency_ms_mean) if a and b else None
        out.append(
            Target(
                f"RK3588 model, 4 users ({what}): n_batch 4 vs 1",
                "mean latency <= 50 %",
                "-"
                if r is None or not a or not b
                else f"{b.latency_ms_mean:.0f} / {a.latency_ms_mean:.0f} ms = {100 * r:.1f} %",
                None if r is None else r <= 0.5,
            )
        )
    relay = [p.metrics for p in points if p.scenario == "relay-zero-cost" and p.mode == "mqtt" and p.metrics]
    top = max(relay, key=lambda m: m.stream_messages_per_s, default=None)
    measured = "-"
    if top is not None:
        measured = f"{top.stream_messages_per_s:.0f} per second (best n_batch)"
        if top.cpu:
            measured += "; CPU, share of one core: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in top.cpu.items())
    out.append(
        Target(
            "zero-cost engine: stream messages relayed",
            ">= 5000 per second",
            measured,
            None if top is None else top.stream_messages_per_s >= 5000,
        )
    )
    out.append(journal_cost(points))
    out.append(scale_out(points))
    return out


def single_round(points: Sequence[Point]) -> Target:
    """One round of 8 devices asking at once (scenario cpu-8-at-once): the gain of n_batch 8 over 1."""
    g = next((r for r in batching_gain(points) if r["scenario"] == "cpu-8-at-once" and r["n_batch"] == 8), None)
    measured = "-"
    if g is not None and g["mqtt_gain"] is not None:
        measured = f"{g['mqtt_gain']:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in g['mqtt_pair_gains'])})"
        if g["direct_gain"] is not None:
            measured += f"; engine alone {g['direct_gain']:.2f}x"
    return Target(
        "CPU engine, 8 devices at once, one round: n_batch 8 vs 1",
        ">= 2.5x tokens/s",
        measured,
        None if g is None or g["mqtt_gain"] is None else g["mqtt_gain"] >= 2.5,
    )


def scale_out(points: Sequence[Point]) -> Target:
    """Requests/s of 1, 2 and 3 bridges sharing one broker and prefix (scenarios scale-out-<n>)."""
    rates = {n: m.requests_per_s for n in (1, 2, 3) if (m := _find(points, f"scale-out-{n}", 4)) is not None}
    one = rates.get(1)
    measured = "-"
    if rates:
        measured = "; ".join(
            f"{n} bridge{'s' if n > 1 else ''}: {r:.2f} req/s" + (f" ({r / one:.2f}x)" if one and n > 1 else "")
            for n, r in sorted(rates.items())
        )
    ok = None if one is None or len(rates) < 2 else all(r >= 0.8 * n * one for n, r in rates.items())
    return Target(
        "scale-out: bridges sharing one broker (RK3588 model, n_batch 4)", ">= 0.8 x n x one bridge", measured, ok
    )


def journal_cost(points: Sequence[Point]) -> Target:
    """Requests/s and stream messages/s with the request journal, as a share of without (n_batch 8)."""
    on, off = _find(points, "relay-zero-cost", 8), _find(points, "relay-journal-off", 8)
    rq = _ratio(on.requests_per_s, off.requests_per_s) if on and off else None
    st = _ratio(on.stream_messages_per_s, off.stream_messages_per_s) if on and off else None
    measured = "-"
    if on and off and rq is not None and st is not None:
        measured = (
            f"requests {on.requests_per_s:.1f} vs {off.requests_per_s:.1f}/s = {100 * rq:.1f} %; stream messages "
            f"{on.stream_messages_per_s:.0f} vs {off.stream_messages_per_s:.0f}/s = {100 * st:.1f} %"
        )
    return Target(
        "request journal, zero-cost engine, n_batch 8: with vs without",
        ">= 90 % of requests/s and stream messages/s",
        measured,
        None if rq is None or st is None else min(rq, st) >= 0.9,
    )


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def print_table(points: Sequence[Point], console: Console, cpus: int | None = None) -> None:
    """`cpus`: the core count of the machine that measured (from the report, for `--render`)."""
    t = Table(title="rkmqtt bench (medians over repeats)", show_lines=False)
    for col in ("scenario", "engine", "n_batch", "mode", "req/s", "tok/s", "lat p50", "p95", "p99", "mean"):
        t.add_column(col, justify="left" if col in ("scenario", "engine", "mode") else "right")
    for col in ("TTFT p50", "queue p50", "batch", "errors", "stream msg/s"):
        t.add_column(col, justify="right")
    for p in points:
        m = p.metrics
        if m is None:
            t.add_row(p.scenario, p.label, str(p.n_batch), p.mode, *(["-"] * 10), "; ".join(p.failures)[:40], "-")
            continue
        errs = f"{100 * m.error_share:.1f}%"
        if m.errors_by_code:
            errs += " " + ",".join(f"{k}:{v}" for k, v in sorted(m.errors_by_code.items()))
        t.add_row(
            p.scenario,
            p.label,
            str(p.n_batch),
            p.mode,
            _f(m.requests_per_s, 2),
            _f(m.tokens_per_s, 1),
            _f(m.latency_ms_p50),
            _f(m.latency_ms_p95),
            _f(m.latency_ms_p99),
            _f(m.latency_ms_mean),
            _f(m.ttft_ms_p50),
            _f(m.queued_ms_p50),
            _f(m.mean_batch_size, 1),
            errs,
            _f(m.stream_messages_per_s),
        )
    console.print(t)
    console.print("latencies in ms; lat = publish to final reply, TTFT = publish to first stream chunk")
    rows = cpu_rows(points)
    if rows:
        c = Table(title=f"CPU over the measured part, share of one core ({cpus or '?'} cores)")
        for col in ("scenario", "n_batch", *CPU_NAMES, "stream msg/s"):
            c.add_column(col, justify="left" if col == "scenario" else "right")
        for p, m in rows:
            c.add_row(p.scenario, str(p.n_batch), *(_pct(m.cpu.get(n)) for n in CPU_NAMES), _f(m.stream_messages_per_s))
        console.print(c)
    costs = bridge_cost(points)
    if costs:
        c = Table(title="bridge cost: tokens/s through MQTT / engine alone (ratio: median of per-repeat ratios)")
        for col in ("scenario", "n_batch", "MQTT tok/s", "direct tok/s", "ratio"):
            c.add_column(col, justify="right")
        for row in costs:
            ratio = row["ratio"]
            c.add_row(
                row["scenario"],
                str(row["n_batch"]),
                _f(row["mqtt_tokens_per_s"], 1),
                _f(row["direct_tokens_per_s"], 1),
                "-" if ratio is None else f"{100 * ratio:.1f} %",
            )
        console.print(c)
    print_batching_gain(points, console)
    print_http_cost(points, console)
    print_writes(points, console)
    ts = [x for x in targets(points) if x.met is not None]
    if ts:
        tt = Table(title="targets (issue 6)")
        for col in ("target", "wanted", "measured", ""):
            tt.add_column(col)
        for x in ts:
            tt.add_row(x.name, x.wanted, x.measured, ("[green]" if x.met else "[red]") + x.mark())
        console.print(tt)


CPU_NAMES = ("bench", "bridge", "broker")


def cpu_rows(points: Sequence[Point]) -> list[tuple[Point, RunMetrics]]:
    """The MQTT runs that measured their processes' CPU."""
    return [(p, m) for p in points if p.mode == "mqtt" and (m := p.metrics) is not None and m.cpu]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def report_dict(points: Sequence[Point], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": 1,
        **meta,
        "points": [p.as_dict() for p in points],
        "bridge_cost": bridge_cost(points),
        "batching_gain": batching_gain(points),
        "http_cost": http_cost(points),
        "targets": [asdict(t) for t in targets(points)],
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


REQUEST_COLUMNS = ["scenario", "engine", "n_batch", "mode", "repeat", *RequestRecord.ROW_COLUMNS]


def write_requests_csv(path: Path, points: Sequence[Point]) -> Path:
    """Every request of every run, one row each: which point and repeat, then the request's own
    figures (queueing delay, time to first token, latency, tokens, status and error code)."""
    rows = [
        {"scenario": p.scenario, "engine": p.engine, "n_batch": p.n_batch, "mode": p.mode, **r}
        for p in points
        for r in p.requests
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REQUEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def series_name(scenario: str, label: str, mode: str) -> str:
    """A plot line's name: the scenario, then its engine's label, unless the label says it already
    ("numpy (CPU)", not "numpy: numpy (CPU)")."""
    name = label if label.split(" ")[0] == scenario or scenario == "running" else f"{scenario}: {label}"
    return name + {"direct": " — engine alone", "http": " — HTTP API"}.get(mode, "")


def plain_number(value: float) -> str:
    """A tick label without powers of ten: 0.5, 20, 300, 4,000."""
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _log_ticks(ax: Any) -> None:
    """Log-scale ticks as plain numbers (matplotlib's default is 4×10¹): powers of ten, and between
    them as many of the minor ticks as matplotlib finds room for."""
    from matplotlib.ticker import LogFormatter, NullFormatter

    class Plain(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return plain_number(x)

    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def figure(points: Sequence[Point], title: str = "rkmqtt bench") -> Any:
    """Throughput and median latency against n_batch; one line per scenario (engine and load),
    solid through MQTT, dashed for the engine called directly. Log scales: the engines differ
    by orders of magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=90)
    series: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if p.metrics is not None:
            series.setdefault((p.scenario, p.mode), []).append(p)
    colours: dict[str, Any] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (scenario, mode), pts in series.items():
        pts = sorted(pts, key=lambda p: p.n_batch)
        colour = colours.setdefault(scenario, cycle[len(colours) % len(cycle)])
        xs = [p.n_batch for p in pts]
        ms = [p.metrics for p in pts]
        name = series_name(scenario, pts[0].label, mode)
        style = dict(color=colour, marker="o" if mode == "mqtt" else "x", linestyle="-" if mode == "mqtt" else "--")
        ax_t.plot(xs, [m.tokens_per_s if m else 0 for m in ms], label=name, **style)
        if mode == "mqtt":
            ax_l.plot(xs, [m.latency_ms_p50 if m else None for m in ms], label=name, **style)
    for ax, ylabel in ((ax_t, "aggregate tokens/s"), (ax_l, "median latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n_batch")
        ax.set_ylabel(ylabel)
        nbs = sorted({p.n_batch for p in points})
        if nbs:
            ax.set_xticks(nbs, [str(n) for n in nbs])
        _log_ticks(ax)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("throughput")
    ax_l.set_title("latency (through MQTT)")
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    return fig


def write_png(path: Path, points: Sequence[Point], title: str = "rkmqtt bench") -> Path:
    """The plot of `figure` as a PNG."""
    fig = figure(points, title)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(points: Sequence[Point], load: LoadVerdict | None = None) -> str:
    """The figures as Markdown tables (for docs/benchmarks.md), after the machine's load verdict."""
    lines: list[str] = []
    if load is not None:
        lines += [f"**{load.text()}**" if load.meaningful is False else load.text(), ""]
    lines += [
        "| scenario | engine | n_batch | mode | req/s | tok/s | latency p50 / p95 / p99 / mean, ms | TTFT p50, ms "
        "| queue p50, ms | batch | errors | stream msg/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        m = p.metrics
        if m is None:
            lines.append(f"| {p.scenario} | {p.label} | {p.n_batch} | {p.mode} | failed: {'; '.join(p.failures)} |")
            continue
        errs = f"{100 * m.error_share:.1f} %"
        if m.errors_by_code:
            errs += " (" + ", ".join(f"{k} {v}" for k, v in sorted(m.errors_by_code.items())) + ")"
        lat = " / ".join(_f(x) for x in (m.latency_ms_p50, m.latency_ms_p95, m.latency_ms_p99, m.latency_ms_mean))
        lines.append(
            f"| {p.scenario} | {p.label} | {p.n_batch} | {p.mode} | {_f(m.requests_per_s, 2)} | "
            f"{_f(m.tokens_per_s, 1)} | {lat} | {_f(m.ttft_ms_p50)} | {_f(m.queued_ms_p50)} | "
            f"{_f(m.mean_batch_size, 1)} | {errs} | {_f(m.stream_messages_per_s)} |"
        )
    costs = bridge_cost(points)
    if costs:
        lines += [
            "",
            "| bridge cost | n_batch | through MQTT, tok/s | engine alone, tok/s | ratio (median of repeats) "
            "| per repeat |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for c in costs:
            r = c["ratio"]
            lines.append(
                f"| {c['scenario']} | {c['n_batch']} | {_f(c['mqtt_tokens_per_s'], 1)} | "
                f"{_f(c['direct_tokens_per_s'], 1)} | {'-' if r is None else f'{100 * r:.1f} %'} | "
                + ", ".join(f"{100 * x:.0f} %" for x in c["pair_ratios"])
                + " |"
            )
    lines += gain_markdown_lines(points)
    lines += http_markdown_lines(points)
    lines += writes_markdown_lines(points)
    rows = cpu_rows(points)
    if rows:
        lines += [
            "",
            "| CPU, share of one core | n_batch | " + " | ".join(CPU_NAMES) + " | stream msg/s |",
            "|---|---:|" + "---:|" * len(CPU_NAMES) + "---:|",
        ]
        for p, m in rows:
            lines.append(
                f"| {p.scenario} | {p.n_batch} | "
                + " | ".join(_pct(m.cpu.get(n)) for n in CPU_NAMES)
                + f" | {_f(m.stream_messages_per_s)} |"
            )
    ts = targets(points)
    if any(t.met is not None for t in ts):
        lines += ["", "| target | wanted | measured | |", "|---|---|---|---|"]
        lines += [f"| {t.name} | {t.wanted} | {t.measured} | {t.mark()} |" for t in ts if t.met is not None]
    return "\n".join(lines) + "\n"


def points_from_json(data: dict[str, Any]) -> list[Point]:
    """The points of a JSON report written by `write_json`, to render it again."""
    points = []
    for d in data.get("points", []):
        p = Point(d["scenario"], d["engine"], d["label"], d["n_batch"], d["mode"], d["workload"])
        p.runs = [RunMetrics(**r) for r in d.get("runs", [])]
        p.bridge_info = d.get("bridge_info", {})
        p.failures = d.get("failures", [])
        p.broker = d.get("broker", "")
        points.append(p)
    return points
