"""What the processes of one bench run write (main thread): bytes through write(2), bytes that
reached the storage layer, write calls, and the broker's database saves (each one whole-file rewrite
and one fsync in Mosquitto 2.0, counted from its log), per request; and their table and Markdown.

Why: broker persistence and the request journal cost writes per request, which an SD card pays for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from rkmqtt.bench.metrics import percentile
from rkmqtt.bench.runner import Point

SAVE_LINE = b"Saving in-memory database"
# (a run's figure, its column)
COLUMNS = (
    ("bridge_write_chars", "bridge B/req"),
    ("bridge_write_bytes", "bridge to disk B/req"),
    ("broker_write_chars", "broker B/req"),
    ("broker_write_bytes", "broker to disk B/req"),
    ("broker_saves", "broker saves/req"),
)


class WriteMeter:
    """`start()` and `stop()` around the measured part; `stop()` returns totals by figure name
    (`<process>_write_chars`, `_write_bytes`, `_write_count`; `broker_saves` when the broker's log
    is given and it logs at `information`)."""

    def __init__(self, pids: dict[str, list[int]], broker_log: Path | None = None) -> None:
        self._procs = {name: [psutil.Process(p) for p in some] for name, some in pids.items()}
        self._broker_log = broker_log
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, procs in self._procs.items():
            for field in ("write_chars", "write_bytes", "write_count"):
                try:
                    out[f"{name}_{field}"] = float(sum(getattr(p.io_counters(), field, 0) for p in procs))
                except (psutil.Error, AttributeError):
                    continue
        if self._broker_log is not None:
            with contextlib.suppress(OSError):
                out["broker_saves"] = float(self._broker_log.read_bytes().count(SAVE_LINE))
        return out

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        return {k: v - self._before[k] for k, v in after.items() if k in self._before}


def per_request(totals: dict[str, float], requests: int) -> dict[str, float]:
    return {k: round(v / requests, 2) for k, v in totals.items()} if requests else {}


def write_rows(points: Sequence[Point]) -> list[tuple[Point, dict[str, float]]]:
    """The points that measured writes, with the median over their runs of each figure."""
    rows = []
    for p in points:
        runs = [r.extra["writes"] for r in p.runs if r.extra.get("writes")]
        if runs:
            keys = {k for r in runs for k in r}
            rows.append((p, {k: percentile([r[k] for r in runs if k in r], 50) or 0.0 for k in keys}))
    return rows


def _cell(figures: dict[str, Any], key: str) -> str:
    v = figures.get(key)
    return "-" if v is None else f"{v:,.1f}"


def print_writes(points: Sequence[Point], console: Console) -> None:
    rows = write_rows(points)
    if not rows:
        return
    t = Table(title="writes per request (through write(2), to disk; broker saves: whole database, one fsync each)")
    for col in ("scenario", "n_batch", "req/s", *(c[1] for c in COLUMNS)):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for p, figures in rows:
        m = p.metrics
        rate = "-" if m is None else f"{m.requests_per_s:,.1f}"
        t.add_row(p.scenario, str(p.n_batch), rate, *(_cell(figures, c[0]) for c in COLUMNS))
    console.print(t)


def writes_markdown_lines(points: Sequence[Point]) -> list[str]:
    rows = write_rows(points)
    if not rows:
        return []
    lines = [
        "",
        "| writes per request | n_batch | req/s | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|---:|---:|" + "---:|" * len(COLUMNS),
    ]
    for p, figures in rows:
        m = p.metrics
        rate = "-" if m is None else f"{m.requests_per_s:,.1f}"
        lines.append(
            f"| {p.scenario} | {p.n_batch} | {rate} | " + " | ".join(_cell(figures, c[0]) for c in COLUMNS) + " |"
        )
    return lines
