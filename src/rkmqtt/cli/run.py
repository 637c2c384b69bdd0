"""`rkmqtt run` (main thread): the service, with the Supervisor's broker when it runs as a Home Assistant add-on."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from rkmqtt.addon import credentials_provider, is_addon, with_supervisor_broker
from rkmqtt.service import Service
from rkmqtt.settings import CONFIG_FILE_NAME, Settings
from rkmqtt.topics import Topics

_LOGGER = logging.getLogger(__name__)


def run(settings: Settings, config_file: Path | None = None) -> int:
    """Run the bridge until SIGTERM or SIGINT; the exit status. `config_file`: the YAML file the
    settings were read from, if any (named in the log)."""
    provider = None
    addon = is_addon()
    if addon and settings.broker is None:
        # As a Home Assistant add-on with no broker set: the Supervisor's, refreshed on rejection.
        settings = with_supervisor_broker(settings)
        provider = credentials_provider()
    if config_file is not None:
        where = f"config file {config_file.resolve()}"
    else:
        where = f"no config file (none given with --config, no {CONFIG_FILE_NAME} in {Path.cwd()})"
    _LOGGER.info(
        "settings: %s%s; state directory %s",
        where,
        ", the add-on's options" if addon else "",
        settings.effective_state_dir(),
    )
    return Service(settings, credentials_provider=provider).run_forever(on_ready=say_ready)


#: What the "ready" line suggests asking: a question the default model answers well.
FIRST_QUESTION = "What colour is the sky?"


def first_command(settings: Settings, program: str | None = None) -> str:
    """The `rkmqtt ask` line that reaches this bridge from this machine, with the flags it needs."""
    program = program if program is not None else sys.argv[0]
    words = [program if Path(program).name == "rkmqtt" else "rkmqtt", "ask", FIRST_QUESTION]
    addr = settings.broker_url
    if addr.tls or addr.host not in ("localhost", "127.0.0.1", "::1") or addr.port != 1883:
        words += ["--broker", f"{'mqtts' if addr.tls else 'mqtt'}://{addr.host}:{addr.port}"]
    if addr.username:
        words += ["--username", addr.username]
    if settings.topic_prefix != Settings.model_fields["topic_prefix"].default:
        words += ["--topic-prefix", settings.topic_prefix]
    line = shlex.join(words)
    return line + (" (with its password in RKMQTT_PASSWORD)" if addr.username else "")


def say_ready(service: Service) -> None:
    s = service.settings
    topic = Topics(s.topic_prefix).request("kitchen")
    _LOGGER.info("ready: try  %s  (or publish a prompt to %s)", first_command(s), topic)
