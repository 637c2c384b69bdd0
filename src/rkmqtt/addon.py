"""Running as a Home Assistant add-on (main thread at start-up; the credentials provider is called by
the bridge's connect loop before a reconnect after a rejection): `/data/options.json` as a settings
layer, and the Supervisor's broker and credentials when no broker is set (docs/architecture.md,
"Settings and the add-on")."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from tenacity import (
    RetryError,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from rkmqtt.errors import ConfigError
from rkmqtt.settings import Settings

_LOGGER = logging.getLogger(__name__)

OPTIONS_PATH = Path("/data/options.json")
SUPERVISOR_URL = "http://supervisor"
TOKEN_ENV = "SUPERVISOR_TOKEN"

#: The settings the add-on's options page exposes (option name == setting name).
ADDON_OPTIONS: tuple[str, ...] = (
    "model",
    "keep_alive",
    "engine",
    "n_batch",
    "max_context",
    "chat_template",
    "rkllm_library",
    "topic_prefix",
    "max_queue",
    "max_new_tokens",
    "default_new_tokens",
    "max_prompt_chars",
    "rate_limit",
    "broker",
    "username",
    "password",
    "node_name",
    "discovery_prefix",
    "http_tokens",
    "log_level",
)

#: (user name, password) for the bridge's next connect (`rkmqtt.mqtt.bridge.CredentialsProvider`).
Credentials = tuple[str | None, str | None]


class SupervisorError(ConfigError):
    """The Supervisor could not be asked, or refused, for the MQTT service."""


def addon_layers(options_path: Path = OPTIONS_PATH) -> list[tuple[dict[str, Any], str]]:
    """The add-on's options as one settings layer, or `[]` when the file does not exist.

    Empty values (an optional field left blank) are left out, so that lower layers and the
    defaults apply. An option this version does not know is logged and ignored: the Supervisor
    validates options against the add-on's own schema, so this only happens across versions.
    """
    try:
        text = options_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"add-on options {options_path}: cannot read it ({e.strerror})") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"add-on options {options_path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"add-on options {options_path}: must be a JSON object of option: value")
    layer: dict[str, Any] = {}
    for name, value in data.items():
        if name not in ADDON_OPTIONS:
            _LOGGER.warning("add-on option %r is not known to this version of rkmqtt; ignored", name)
            continue
        if value is None or (isinstance(value, str) and value.strip() == ""):
            continue
        layer[name] = value
    # The Supervisor keeps /data across restarts and updates: the request journal lives there.
    layer["state_dir"] = str(options_path.parent)
    return [(layer, f"add-on option in {options_path}")]


def supervisor_token() -> str | None:
    """The add-on's token for the Supervisor API; None when not running as an add-on."""
    return os.environ.get(TOKEN_ENV) or None


def is_addon() -> bool:
    return supervisor_token() is not None


class _Transient(Exception):
    """A failure worth retrying: the Supervisor is not up yet or answered 5xx."""


def _get_json(url: str, token: str, timeout: float) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise _Transient(f"cannot reach {url}: {getattr(e, 'reason', e)}") from e
    if status >= 500:
        raise _Transient(f"{url} answered HTTP {status}")
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def _fetch(url: str, token: str, timeout: float, attempts: int) -> tuple[int, Any]:
    fetch = retry(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=4),
        reraise=False,
    )(_get_json)
    try:
        return fetch(url, token, timeout)
    except RetryError as e:
        cause = e.last_attempt.exception()
        raise SupervisorError(f"Supervisor MQTT service: {cause} (tried {attempts} times)") from cause


def supervisor_broker(
    base_url: str = SUPERVISOR_URL,
    token: str | None = None,
    timeout: float = 5,
    attempts: int = 4,
) -> dict[str, Any] | None:
    """Settings values (`broker`, `username`, `password`) for the broker the Supervisor offers.

    None when not running as an add-on (no token) or when the Supervisor has no MQTT service
    (no broker add-on installed). Raises `SupervisorError` when the Supervisor refuses the
    token, answers nonsense, or cannot be reached after `attempts` tries.
    """
    token = token or supervisor_token()
    if not token:
        return None
    url = f"{base_url.rstrip('/')}/services/mqtt"
    status, body = _fetch(url, token, timeout, attempts)
    if status in (401, 403):
        raise SupervisorError(f"Supervisor MQTT service: HTTP {status}, the add-on's token was refused")
    if status in (400, 404) or (isinstance(body, dict) and body.get("result") == "error"):
        message = body.get("message") if isinstance(body, dict) else None
        _LOGGER.info("Supervisor has no MQTT service (HTTP %s%s)", status, f": {message}" if message else "")
        return None
    if status != 200 or not isinstance(body, dict) or body.get("result") != "ok":
        raise SupervisorError(f"Supervisor MQTT service: unexpected answer (HTTP {status})")
    data = body.get("data")
    if not isinstance(data, dict) or not data.get("host"):
        return None
    return _settings_from_service(data)


def _settings_from_service(data: dict[str, Any]) -> dict[str, Any]:
    ssl = data.get("ssl") in (True, "true", "True", 1)
    try:
        port = int(data.get("port") or (8883 if ssl else 1883))
    except (TypeError, ValueError) as e:
        raise SupervisorError(f"Supervisor MQTT service: port {data.get('port')!r} is not a number") from e
    host = str(data["host"])
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    values: dict[str, Any] = {"broker": f"{'mqtts' if ssl else 'mqtt'}://{host}:{port}"}
    for key in ("username", "password"):
        if data.get(key):
            values[key] = str(data[key])
    return values


def credentials_provider(
    base_url: str = SUPERVISOR_URL,
    token: str | None = None,
    timeout: float = 5,
    attempts: int = 2,
) -> Callable[[], Credentials | None]:
    """A callable returning (user, password) fresh from the Supervisor on each call, or None
    when the Supervisor cannot tell (the caller then keeps what it had). The bridge calls it
    after the broker refused its credentials; it reconnects to the same host and port."""

    last_broker: dict[str, str] = {}

    def provide() -> Credentials | None:
        try:
            values = supervisor_broker(base_url, token, timeout, attempts)
        except SupervisorError as e:
            _LOGGER.warning("%s; keeping the current broker credentials", e)
            return None
        if values is None:
            return None
        if values["broker"] != last_broker.get("url", values["broker"]):
            _LOGGER.warning(
                "the Supervisor now offers the broker %s; restart the add-on to connect there", values["broker"]
            )
        last_broker["url"] = values["broker"]
        return values.get("username"), values.get("password")

    return provide


def with_supervisor_broker(
    settings: Settings, base_url: str = SUPERVISOR_URL, token: str | None = None, timeout: float = 5
) -> Settings:
    """`settings` with the Supervisor's broker and credentials when running as an add-on and no
    broker is configured anywhere; `settings` itself otherwise."""
    if settings.broker is not None or not (token or supervisor_token()):
        return settings
    values = supervisor_broker(base_url, token, timeout)
    if values is None:
        _LOGGER.warning(
            "no broker configured and the Supervisor offers no MQTT service: install the Mosquitto "
            "broker add-on or set the add-on's 'broker' option"
        )
        return settings
    password = values.get("password")
    return settings.model_copy(
        update={
            "broker": values["broker"],
            "username": values.get("username"),
            "password": SecretStr(password) if password is not None else None,
        }
    )
