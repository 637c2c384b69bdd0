"""The `rkmqtt` command (main thread): the parser, and the dispatch to `run`, `ask`, `check`, `health`,
`forget-node`, `bench` and `probe`, each imported when it runs. Every setting is also a flag
(`--<name-with-dashes>`); a wrong one ends the command with exit status 2 and one line saying what
to fix."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from rkmqtt import __version__
from rkmqtt.cli.bench import add_bench_parser
from rkmqtt.cli.flags import CONNECTION_SETTINGS, add_settings_flags, flag_values
from rkmqtt.errors import RkmqttError, exit_status
from rkmqtt.settings import Settings, find_config_file, load_settings, unknown_environment
from rkmqtt.suggest import did_you_mean

_LOGGER = logging.getLogger("rkmqtt")

DESCRIPTION = (
    "rkmqtt serves a language model over MQTT: devices publish prompts, the bridge batches them onto an "
    "RK3588 NPU (RKLLM) or a CPU engine and streams each answer back on the device's reply topic."
)
EPILOG = (
    "Every setting is also a flag (--<name-with-dashes>), an environment variable (RKMQTT_<NAME>) and a key "
    "of the YAML file of settings (--config FILE, else config.yaml in the current folder); `rkmqtt run --help` "
    "lists them with their defaults."
)
SETTINGS_USAGE = "[--config FILE] [--<setting> VALUE ...]"


def settings_from_args(args: argparse.Namespace) -> Settings:
    from rkmqtt.addon import addon_layers

    return load_settings(flag_values(args), config_file=find_config_file(args.config), file_layers=addon_layers())


def unrecognized(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """argparse's "unrecognized arguments", with the nearest flag of `parser` for a mistyped one."""
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and (hint := did_you_mean(name, flags)):
            hints.append(f"{name}{hint}")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f"; {', '.join(hints)}" if hints else "")


def password_on_command_line(args: argparse.Namespace) -> bool:
    """True when `--password` or a password inside `--broker` was given: every user of the machine
    can read a command line (`ps`, /proc)."""
    if getattr(args, "setting_password", None) is not None:
        return True
    broker = getattr(args, "setting_broker", None)
    if not broker:
        return False
    try:
        return urlsplit(broker if "://" in broker else f"mqtt://{broker}").password is not None
    except ValueError:
        return False


def warn_password_on_command_line(args: argparse.Namespace) -> None:
    if password_on_command_line(args):
        _LOGGER.warning(
            "a broker password on the command line is visible to every user of this machine (ps): "
            "use password_file or the RKMQTT_PASSWORD environment variable instead"
        )


def setup_logging(level: str, debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        logging.getLogger("paho").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (whose usage a mistake in that command shows)."""
    parser = argparse.ArgumentParser(prog="rkmqtt", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"rkmqtt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the bridge service",
        description="Run the bridge until SIGTERM or Ctrl-C: running requests get grace_period seconds to finish.",
        usage=f"rkmqtt run {SETTINGS_USAGE} [--debug]",
    )
    run.add_argument("--debug", action="store_true", help="log everything, prompts and completions included")
    add_settings_flags(run)

    ask = sub.add_parser(
        "ask",
        help="send one prompt and stream the reply",
        description="Send one prompt to the bridge on the broker and print its answer as it streams.",
        usage=f"rkmqtt ask PROMPT [--system TEXT] [--tokens N] [--temp T] [--json] [--broker URL] {SETTINGS_USAGE}",
    )
    ask.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    ask.add_argument("--system", help="a system prompt")
    ask.add_argument("--client", default="cli", help="client name in the request topic (default: cli)")
    ask.add_argument("--id", dest="request_id", help="request id (default: made up)")
    ask.add_argument("--tokens", type=int, dest="max_new_tokens_req", help="max_new_tokens of this request")
    ask.add_argument("--temp", type=float, dest="temperature_req", help="temperature of this request (0: greedy)")
    ask.add_argument("--seed", type=int, help="sampling seed")
    ask.add_argument("--json", action="store_true", help="print the raw final reply as JSON instead of streaming")
    ask.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the final reply (default: 300)")
    ask.add_argument("--debug", action="store_true", help="log the MQTT traffic")
    add_settings_flags(ask, CONNECTION_SETTINGS)

    check = sub.add_parser(
        "check",
        help="check settings, broker, the bridges online, engine and NPU, in plain words",
        description="Check the settings, the broker, which bridges are online on it and (on a board) the NPU, and "
        "say what to fix. The model is loaded only with --load-model, or when --engine or --model is given; "
        "engine openai's upstream server (it holds the model) is always checked, with one token.",
        usage=f"rkmqtt check [--load-model] {SETTINGS_USAGE}",
    )
    check.add_argument(
        "--load-model", action="store_true", help="also load the engine's model to check it (seconds, and its memory)"
    )
    check.add_argument("--debug", action="store_true", help="log everything")
    add_settings_flags(check)

    health = sub.add_parser(
        "health",
        help="exit 0 if the running service is healthy (reads health_file)",
        description="Exit 0 when the service that writes health_file is connected and its engine is not stuck "
        "(a container's HEALTHCHECK).",
        usage="rkmqtt health [--health-file FILE] [--max-age S] [--max-stall S]",
    )
    health.add_argument(
        "--max-age", type=float, default=30.0, help="seconds after which the file is stale (default: 30)"
    )
    health.add_argument(
        "--max-stall", type=float, default=120.0, help="seconds the engine may go without output (default: 120)"
    )
    add_settings_flags(health, ("health_file",))

    forget = sub.add_parser(
        "forget-node",
        help="retire a node that is gone for good: its session, status, info and Home Assistant device",
        description="End the persistent session of a node that will not come back (the broker queues requests "
        "for it until then) and clear its retained status, info and Home Assistant device. Refused while the node "
        "is online.",
        usage=f"rkmqtt forget-node NODE [--broker URL] {SETTINGS_USAGE}",
    )
    forget.add_argument("node", help="the node's node_name")
    forget.add_argument("--session", help="its MQTT client id, when it had its own client_id (default: rkmqtt-NODE)")
    add_settings_flags(forget, (*CONNECTION_SETTINGS, "discovery_prefix"))

    add_bench_parser(sub)
    from rkmqtt.engines.rkllm.probe import add_probe_parser

    add_probe_parser(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _build()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would answer with the top-level usage; the command's own is the useful one
        commands[args.command].error(unrecognized(commands[args.command], unknown))
    try:
        if args.command == "bench":
            from rkmqtt.cli.bench import run_bench

            warn_password_on_command_line(args)
            status: int = run_bench(args)
            return status
        if args.command == "probe":
            from rkmqtt.engines.rkllm.probe import run_probe

            return run_probe(args)
        settings = settings_from_args(args)
        setup_logging(settings.log_level, getattr(args, "debug", False))
        warn_password_on_command_line(args)
        for line in unknown_environment():
            _LOGGER.warning("%s", line)
        if args.command == "run":
            from rkmqtt.cli.run import run

            return run(settings, find_config_file(args.config))
        if args.command == "ask":
            from rkmqtt.cli.ask import ask

            return ask(settings, args)
        if args.command == "check":
            from rkmqtt.cli.check import run_checks

            load = args.load_model or args.setting_engine is not None or args.setting_model is not None
            return run_checks(settings, load, find_config_file(args.config))
        if args.command == "forget-node":
            from rkmqtt.cli.forget import forget_node

            return forget_node(settings, args.node, args.session)
        if args.command == "health":
            from rkmqtt.cli.health import check_health

            return check_health(settings, args.max_age, args.max_stall)
    except RkmqttError as e:
        print(f"rkmqtt: {e}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
