"""The harness's command line (main thread): `python -m benchmarks`, or `./dev bench`.

    ./dev bench --suite targets                    a built-in suite (suites.py)
    ./dev bench --engines numpy,rkllm --n-batch 1,2,4,8 --devices 8 --direct 1,8 --http 8

The load and output options are `rkmqtt bench`'s; the outputs the same (table, JSON, Markdown, CSV, PNG).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.suites import SUITES
from benchmarks.sweep import BRIDGE_DEFAULTS, ENGINES, Scenario, Sweep
from rkmqtt.bench import session
from rkmqtt.bench.prompts import load_prompts
from rkmqtt.cli.bench import add_load_options, add_output_options, int_list, workload_of
from rkmqtt.cli.flags import add_settings_flags, flag_values
from rkmqtt.errors import ConfigError, RkmqttError, exit_status
from rkmqtt.settings import Settings, load_settings

_SWEPT = ("engine", "n_batch", "rkllm_library")  # the harness's own flags stand for these settings


def _engines(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"engines are a comma-separated list of {', '.join(ENGINES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="The benchmark harness: bridges it starts (a `rkmqtt run` child process per point, on a private "
        "Mosquitto) under simulated devices, swept over engines and n_batch, beside the engine driven directly and "
        "the HTTP API; latency, throughput, the bridge's own cost, a table, JSON and a PNG plot.",
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--suite",
        choices=tuple(SUITES),
        help="run a built-in set of scenarios instead: "
        + "; ".join(f"'{name}' = {(suite.__doc__ or '').split('.')[0].strip()}" for name, suite in SUITES.items()),
    )
    what.add_argument(
        "--engines",
        type=_engines,
        default=("numpy",),
        help="comma-separated: numpy, rkllm (the stand-in's RK3588 timing model, or the real runtime with "
        "--rkllm-library), rkllm-zero (the stand-in with zero delays) (default: numpy)",
    )
    what.add_argument(
        "--n-batch", type=int_list, default=(1, 2, 4, 8), help="n_batch values to sweep (default 1,2,4,8)"
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
    add_load_options(p)
    where = p.add_argument_group("bridges and engines")
    where.add_argument(
        "--broker-nodelay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the private Mosquitto sets set_tcp_nodelay true (default; Mosquitto's own default is false, which "
        "delays small packets by up to ~40 ms)",
    )
    where.add_argument("--rkllm-library", type=Path, default=None, help="a real librkllmrt.so for engine rkllm")
    where.add_argument("--rkllm-model", type=Path, default=None, help="the .rkllm model for --rkllm-library")
    where.add_argument("--workdir", type=Path, default=None, help="keep bridge logs and the stand-in here")
    add_output_options(p)
    add_settings_flags(p, [n for n in Settings.model_fields if n not in _SWEPT])
    p.epilog = (
        "Bridges the harness starts get these settings unless a flag gives them: "
        + ", ".join(f"{k}={v}" for k, v in BRIDGE_DEFAULTS.items())
        + ". Without --broker it starts a private Mosquitto."
    )
    return p


def _n_batch_list(flag: str, text: str, every: tuple[int, ...]) -> tuple[int, ...]:
    if text.strip() == "all":
        return every
    try:
        return int_list(text) if text.strip() else ()
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{flag}: {e}") from e


def _scenarios(args: argparse.Namespace, prompts: tuple[str, ...]) -> list[Scenario]:
    if args.suite is not None:
        return SUITES[args.suite](prompts, args.rkllm_library is not None)
    w = workload_of(args, prompts)
    nb = tuple(args.n_batch)
    direct = _n_batch_list("--direct", args.direct, nb)
    http = _n_batch_list("--http", args.http, nb)
    return [
        Scenario(
            e,
            e,
            w,
            nb,
            w.label(),
            direct_n_batch=direct,
            http_n_batch=http,
            broker_nodelay=args.broker_nodelay,
        )
        for e in args.engines
    ]


def run(args: argparse.Namespace, command: list[str]) -> int:
    if args.render is not None:
        return session.render(args)
    session.setup_logging(args.debug)
    user_flags = flag_values(args)
    load_settings(dict(user_flags), config_file=args.config)  # a wrong setting stops here, in one line
    scenarios = _scenarios(args, tuple(load_prompts(args.prompts)))
    sweep = Sweep(
        scenarios,
        user_flags,
        args.config,
        repeat=args.repeat,
        rkllm_library=args.rkllm_library,
        rkllm_model=args.rkllm_model,
        workdir=args.workdir,
    )
    return session.run_session(args, sweep, command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, ["python", "-m", "benchmarks", *argv])
    except RkmqttError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        return 130
