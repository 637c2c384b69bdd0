"""`rkmqtt bench` (main thread): its parser, whose option groups the repository's harness shares,
and the wiring, which imports the load generator only when it runs.

    rkmqtt bench --broker mqtt://board:1883 --devices 4 [--http-url http://board:11434]
    rkmqtt bench --render bench-out/bench.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rkmqtt.bench.workload import SHAPES, Workload
from rkmqtt.cli.flags import CONNECTION_SETTINGS, add_settings_flags, flag_values
from rkmqtt.errors import ConfigError


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give numbers of 1 or more: {text!r}")
    return values


def add_load_options(p: argparse.ArgumentParser) -> None:
    """What the simulated devices send, and how often the run is repeated."""
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
    load.add_argument("--repeat", type=int, default=1, help="run every point this many times; report medians")


def workload_of(args: argparse.Namespace, prompts: tuple[str, ...]) -> Workload:
    """The workload the load options describe; ConfigError with one line when they do not fit."""
    try:
        return Workload(
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


def add_output_options(p: argparse.ArgumentParser) -> None:
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


def add_bench_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="load generator and benchmark report against a running bridge",
        description="Simulated devices against the bridge that runs under --topic-prefix on --broker (and, with "
        "--http-url, its Ollama HTTP API): latency and throughput, a table, JSON and a PNG plot. The sweeps over "
        "engines and n_batch, which start their own bridges, are the repository's harness: ./dev bench.",
    )
    add_load_options(p)
    http = p.add_argument_group("HTTP")
    http.add_argument(
        "--http-url",
        default=None,
        metavar="URL",
        help="also send the same load to the bridge's HTTP API here (its http_listen, e.g. http://board:11434)",
    )
    http.add_argument(
        "--http-token",
        default=None,
        metavar="TOKEN",
        help="bearer token for --http-url when the bridge sets http_tokens (every device uses it: one client)",
    )
    add_output_options(p)
    add_settings_flags(p, CONNECTION_SETTINGS)


def run_bench(args: argparse.Namespace) -> int:
    """`rkmqtt bench`: measure the running bridge (or render a saved report)."""
    from rkmqtt.bench import session

    if args.render is not None:
        return session.render(args)
    session.setup_logging(args.debug)
    from rkmqtt.bench.attach import RunningBridge
    from rkmqtt.bench.prompts import load_prompts
    from rkmqtt.settings import find_config_file, load_settings

    settings = load_settings(flag_values(args), config_file=find_config_file(args.config))  # a wrong one stops here
    workload = workload_of(args, tuple(load_prompts(args.prompts)))
    runner = RunningBridge(settings, workload, args.repeat, args.http_url, args.http_token)
    command = ["rkmqtt", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("rkmqtt") else sys.argv
    return session.run_session(args, runner, command)
