"""One benchmark session (main thread), whoever runs it (`rkmqtt bench`, the repository's harness):
a `Runner`'s points measured with a progress bar and saved after every run, then the table, the
JSON, Markdown and per-request CSV files and the PNG plot; or a saved report rendered again."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rkmqtt.bench.busy import LoadVerdict, LoadWatch
from rkmqtt.bench.report import (
    machine,
    markdown,
    points_from_json,
    print_table,
    report_dict,
    write_json,
    write_png,
    write_requests_csv,
)
from rkmqtt.bench.runner import Point, Runner
from rkmqtt.errors import ConfigError


class _RichProgress:
    """Two bars on a terminal, the runs and the current run's requests, with what the run does now
    (starting a bridge...); elsewhere (a pipe, a CI log) a plain line at each step."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self._runs: TaskID | None = None
        self._task: TaskID | None = None
        self._what = ""
        self._done = 0
        self._total = 0
        self._t0 = 0.0

    def plan(self, runs: int) -> None:
        self._total = runs
        self._runs = self.bar.add_task("runs", total=runs)

    def begin(self, description: str, total: int) -> None:
        self._what, self._t0 = description, time.monotonic()
        if self._task is None:
            self._task = self.bar.add_task(description, total=total)
        else:
            self.bar.reset(self._task, total=total, description=description)
        self._say(f"run {self._done + 1}/{self._total}: {description}")

    def phase(self, text: str) -> None:
        if self._task is not None:
            self.bar.update(self._task, description=f"{self._what}: {text}")
        self._say(f"run {self._done + 1}/{self._total}: {text}")

    def advance(self, n: int) -> None:
        if self._task is not None:
            self.bar.advance(self._task, n)

    def end(self) -> None:
        self._done += 1
        if self._runs is not None:
            self.bar.advance(self._runs, 1)
        self._say(f"run {self._done}/{self._total} over after {time.monotonic() - self._t0:.0f} s")

    def _say(self, line: str) -> None:
        if not self.live:
            self.console.print(f"bench: {line}", soft_wrap=True, markup=False, highlight=False)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_session(args: argparse.Namespace, runner: Runner, command: list[str]) -> int:
    """Measure `runner`'s points and write the outputs `args` names; 1 when a point has no run."""
    console = Console(stderr=True)
    progress = None if args.no_progress else _RichProgress(console)
    if progress is not None:
        runner.progress = progress
    json_file: Path = args.json or args.out / "bench.json"

    watch = LoadWatch()
    verdict: LoadVerdict | None = None

    def meta(done: bool) -> dict[str, Any]:
        return {
            "complete": done,
            "load": None if verdict is None else verdict.as_dict(),
            "machine": machine(),
            "command": command,
            "repeat": runner.repeat,
            "scenarios": [
                {"name": s.name, "engine": s.engine, "description": s.description, "workload": s.workload.describe()}
                for s in runner.scenarios
            ],
            **runner.meta(),
        }

    def checkpoint(points: list[Point]) -> None:  # an interrupted run keeps what it measured
        write_json(json_file, report_dict(points, meta(False)))
        write_requests_csv(json_file.with_suffix(".requests.csv"), points)

    watch.start()
    try:
        if progress is not None:
            with progress.bar:
                points = runner.run(checkpoint)
        else:
            points = runner.run(checkpoint)
    finally:
        runner.close()
        verdict = watch.stop()
    data = report_dict(points, meta(True))
    print_table(points, _out_console(), data["machine"]["cpus"])
    say_load(verdict, console)
    json_path = write_json(json_file, data)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(points, verdict))
    csv_path = write_requests_csv(json_path.with_suffix(".requests.csv"), points)
    console.print(f"JSON: {json_path}; Markdown: {md_path}; every request: {csv_path}", soft_wrap=True, markup=False)
    if not args.no_plot:
        _plot(args.png or args.out / "bench.png", points, f"rkmqtt bench on {data['machine']['cpu']}", json_path)
    for p in points:
        for f in p.failures:
            console.print(f"[red]{p.scenario} n_batch {p.n_batch} {p.mode}: {f}")
    return 1 if any(not p.runs for p in points) else 0


def render(args: argparse.Namespace) -> int:
    """Run nothing: print and plot a saved report (`--render`) again."""
    try:
        data = json.loads(args.render.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--render {args.render}: cannot read it ({e})") from e
    points = points_from_json(data)
    print_table(points, _out_console(), (data.get("machine") or {}).get("cpus"))
    verdict = LoadVerdict.from_dict(data.get("load"))
    say_load(verdict, Console(stderr=True))
    md = (args.json or args.render).with_suffix(".md")
    md.write_text(markdown(points, verdict))
    if not args.no_plot:
        cpu = (data.get("machine") or {}).get("cpu", "")
        _plot(args.png or args.render.with_suffix(".png"), points, f"rkmqtt bench on {cpu}", args.render)
    return 0


def say_load(verdict: LoadVerdict | None, console: Console) -> None:
    """Whether other work on the machine makes the figures meaningless, in one line."""
    if verdict is None:
        return
    colour = {True: "green", False: "bold red", None: "yellow"}[verdict.meaningful]
    console.print(verdict.text(), style=colour, soft_wrap=True, markup=False, highlight=False)


def _out_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=200)  # a file or a pipe: one row per line


def _plot(png: Path, points: list[Point], title: str, json_path: Path) -> None:
    """Draw the PNG, or say in one line how to get it: matplotlib is an extra (`rkmqtt[bench]`)
    that the plain install (`./dev run`) leaves out, and everything else is written already."""
    console = Console(stderr=True)
    try:
        write_png(png, points, title)
    except ImportError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        console.print(
            f"plot: not drawn, matplotlib is not installed: {sys.executable} -m pip install matplotlib, "
            f"then rkmqtt bench --render {json_path}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        return
    console.print(f"plot: {png}", soft_wrap=True, markup=False, highlight=False)
