"""`rkmqtt bench` (main thread): argument parsing and wiring only.

    rkmqtt bench --suite targets                 the issue's four targets, side by side
    rkmqtt bench --engines numpy,rkllm --n-batch 1,2,4,8 --devices 8 --direct 1,8
    rkmqtt bench --bridge running --broker mqtt://board:1883 --devices 4

Outputs: a table on the terminal, `<out>/bench.json` and `<out>/bench.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from rkmqtt.bench import standin
from rkmqtt.bench.prompts import load_prompts
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
from rkmqtt.bench.sweep import (
    BRIDGE_DEFAULTS,
    ENGINES,
    Point,
    Scenario,
    Sweep,
    batching_suite,
    journal_suite,
    scaleout_suite,
    targets_suite,
)
from rkmqtt.bench.workload import SHAPES, Workload
from rkmqtt.errors import ConfigError
from rkmqtt.flags import add_settings_flags
from rkmqtt.settings import Settings, load_settings

_SWEPT = ("engine", "n_batch", "rkllm_library")  # the bench's own flags stand for these settings


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give numbers of 1 or more: {text!r}")
    return values


def _engines(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"engines are a comma-separated list of {', '.join(ENGINES)}")
    return names


def add_bench_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="load generator and benchmark report",
        description="Simulated devices against a bridge over a real broker: latency and throughput per n_batch "
        "and engine, the bridge's own cost, a table, JSON and a PNG plot.",
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--suite",
        choices=("targets", "batching", "journal", "scaleout"),
        help="run a built-in set of scenarios instead: 'targets' = the CPU engine with 8 devices (a closed loop "
        "and one round at once), the RK3588 model with 4 users, and the zero-cost relay (with and without the "
        "request journal), with the engine-alone comparison; 'batching' = only the CPU engine's two, n_batch 1 "
        "and 8, each beside the engine alone; 'journal' = only the relay with and without the journal; "
        "'scaleout' = 1, 2 and 3 bridges sharing one broker (the RK3588 model, 24 devices)",
    )
    what.add_argument(
        "--engines",
        type=_engines,
        default=("numpy",),
        help="comma-separated: numpy, rkllm (the stand-in's RK3588 timing model, or the real runtime with "
        "--rkllm-library), rkllm-zero (the stand-in with zero delays) (default: numpy)",
    )
    what.add_argument(
        "--n-batch", type=_int_list, default=(1, 2, 4, 8), help="n_batch values to sweep (default 1,2,4,8)"
    )
    what.add_argument(
        "--direct",
        default="",
        metavar="N,N|all",
        help="also drive the engine directly (no MQTT) at these n_batch values, for the bridge's cost",
    )
    what.add_argument(
        "--http",
        default="",
        metavar="N,N|all",
        help="also run the same load through the bridge's Ollama HTTP API at these n_batch values, beside MQTT",
    )
    what.add_argument("--repeat", type=int, default=1, help="run every point this many times; report medians")
    load = p.add_argument_group("load")
    load.add_argument("--shape", choices=SHAPES, default="closed", help="closed loop, open loop (Poisson), or bursts")
    load.add_argument("--devices", type=int, default=8, help="simulated devices, each its own MQTT client (default 8)")
    load.add_argument("--requests", type=int, default=None, help="requests per run (default 4 per device)")
    load.add_argument("--rate", type=float, default=1.0, help="open loop: requests per second (default 1)")
    load.add_argument("--tokens", type=int, default=48, help="max_new_tokens of every request (default 48)")
    load.add_argument("--prompts", type=Path, default=None, help="file of prompts, one a line (default: built-in)")
    load.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="rounds of one request per device at once before each run, not counted (default 1)",
    )
    load.add_argument("--timeout", type=float, default=300.0, help="seconds without any reply before giving up")
    load.add_argument("--seed", type=int, default=0, help="seed of the open loop's arrivals")
    where = p.add_argument_group("bridge and engines")
    where.add_argument(
        "--bridge",
        choices=("start", "running"),
        default="start",
        help="start a bridge per point as a child process (default), or measure the one running under "
        "--topic-prefix on --broker (no sweep: its own engine and n_batch)",
    )
    where.add_argument(
        "--broker-nodelay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the private Mosquitto sets set_tcp_nodelay true (default; Mosquitto's own default is false, which "
        "delays small packets ~40 ms under load)",
    )
    where.add_argument("--rkllm-library", type=Path, default=None, help="a real librkllmrt.so for engine rkllm")
    where.add_argument("--rkllm-model", type=Path, default=None, help="the .rkllm model for --rkllm-library")
    where.add_argument("--workdir", type=Path, default=None, help="keep bridge logs and the stand-in here")
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        help="directory of bench.json, bench.md, bench.requests.csv (one row per request) and bench.png",
    )
    out.add_argument(
        "--json",
        type=Path,
        default=None,
        help="JSON file (default <out>/bench.json); the .md and .requests.csv go beside it",
    )
    out.add_argument("--png", type=Path, default=None, help="PNG plot (default <out>/bench.png)")
    out.add_argument("--no-plot", action="store_true", help="write no PNG")
    out.add_argument(
        "--render", type=Path, default=None, metavar="JSON", help="run nothing: print and plot a saved bench.json again"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--debug", action="store_true")
    add_settings_flags(p, [n for n in Settings.model_fields if n not in _SWEPT])
    p.set_defaults(
        _bench_defaults=", ".join(f"{k}={v}" for k, v in BRIDGE_DEFAULTS.items()),
    )
    p.epilog = (
        "Bridges the bench starts get these settings unless a flag gives them: "
        + ", ".join(f"{k}={v}" for k, v in BRIDGE_DEFAULTS.items())
        + ". Without --broker the bench starts a private Mosquitto."
    )


class _RichProgress:
    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID | None = None

    def begin(self, description: str, total: int) -> None:
        if self._task is not None:
            self.bar.stop_task(self._task)
        self._task = self.bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self.bar.advance(self._task, n)


def _scenarios(args: argparse.Namespace, prompts: tuple[str, ...]) -> list[Scenario]:
    if args.suite == "targets":
        return targets_suite(prompts, rkllm_real=args.rkllm_library is not None)
    if args.suite == "batching":
        return batching_suite(prompts)
    if args.suite == "journal":
        return journal_suite(prompts)
    if args.suite == "scaleout":
        return scaleout_suite(prompts, rkllm_real=args.rkllm_library is not None)
    try:
        w = Workload(
            args.shape,
            devices=args.devices,
            requests=args.requests or 4 * args.devices,
            max_new_tokens=args.tokens,
            prompts=prompts,
            rate=args.rate,
            warmup=args.warmup,
            seed=args.seed,
            timeout_s=args.timeout,
        )
    except ValueError as e:
        raise ConfigError(f"bench: {e}") from e
    if args.bridge == "running":
        return [Scenario("running", "running", w, (0,))]
    if args.direct.strip() == "all":
        direct = tuple(args.n_batch)
    elif args.direct.strip():
        try:
            direct = _int_list(args.direct)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--direct: {e}") from e
    else:
        direct = ()
    http = _n_batch_list("--http", args.http, tuple(args.n_batch))
    return [
        Scenario(e, e, w, tuple(args.n_batch), direct, w.label(), broker_nodelay=args.broker_nodelay, http_n_batch=http)
        for e in args.engines
    ]


def _n_batch_list(flag: str, text: str, every: tuple[int, ...]) -> tuple[int, ...]:
    if text.strip() == "all":
        return every
    try:
        return _int_list(text) if text.strip() else ()
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{flag}: {e}") from e


def _out_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=200)  # a file or a pipe: one row per line


def _render(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.render.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--render {args.render}: cannot read it ({e})") from e
    points = points_from_json(data)
    print_table(points, _out_console(), (data.get("machine") or {}).get("cpus"))
    md = (args.json or args.render).with_suffix(".md")
    md.write_text(markdown(points))
    if not args.no_plot:
        cpu = (data.get("machine") or {}).get("cpu", "")
        _plot(args.png or args.render.with_suffix(".png"), points, f"rkmqtt bench on {cpu}", args.render)
    return 0


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


def run_bench(args: argparse.Namespace) -> int:
    if args.render is not None:
        return _render(args)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    user_flags = {
        k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_") and v is not None
    }
    load_settings(dict(user_flags), config_file=args.config)  # a wrong setting stops here, in one line
    prompts = tuple(load_prompts(args.prompts))
    scenarios = _scenarios(args, prompts)
    console = Console(stderr=True)
    progress = None if args.no_progress else _RichProgress(console)
    sweep = Sweep(
        scenarios,
        user_flags,
        args.config,
        repeat=args.repeat,
        rkllm_library=args.rkllm_library,
        rkllm_model=args.rkllm_model,
        attach=args.bridge == "running",
        workdir=args.workdir,
        progress=progress,
    )
    uses_standin = args.rkllm_library is None and any(s.engine.startswith("rkllm") for s in scenarios)
    json_file: Path = args.json or args.out / "bench.json"

    def meta(done: bool) -> dict[str, Any]:
        return {
            "complete": done,
            "machine": machine(),
            "command": ["rkmqtt", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("rkmqtt") else sys.argv,
            "broker": sweep.broker_note,
            "bridge": "running bridge" if args.bridge == "running" else "child process `rkmqtt run` per point",
            "bridge_settings": {**BRIDGE_DEFAULTS, **{k: v for k, v in user_flags.items() if k != "password"}},
            "repeat": max(1, args.repeat),
            "scenarios": [
                {"name": s.name, "engine": s.engine, "description": s.description, "workload": s.workload.describe()}
                for s in scenarios
            ],
            "standin_timing_model": standin.timing_model(standin.environment(False)) if uses_standin else None,
        }

    def checkpoint(points: list[Point]) -> None:  # an interrupted sweep keeps what it measured
        write_json(json_file, report_dict(points, meta(False)))
        write_requests_csv(json_file.with_suffix(".requests.csv"), points)

    try:
        if progress is not None:
            with progress.bar:
                points = sweep.run(checkpoint)
        else:
            points = sweep.run(checkpoint)
    finally:
        sweep.close()
    data = report_dict(points, meta(True))
    print_table(points, _out_console(), data["machine"]["cpus"])
    json_path = write_json(json_file, data)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(points))
    csv_path = write_requests_csv(json_path.with_suffix(".requests.csv"), points)
    console.print(f"JSON: {json_path}; Markdown: {md_path}; every request: {csv_path}", soft_wrap=True, markup=False)
    if not args.no_plot:
        _plot(args.png or args.out / "bench.png", points, f"rkmqtt bench on {data['machine']['cpu']}", json_path)
    failed = [p for p in points if not p.runs]
    for p in points:
        for f in p.failures:
            console.print(f"[red]{p.scenario} n_batch {p.n_batch} {p.mode}: {f}")
    return 1 if failed else 0
