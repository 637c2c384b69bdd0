"""Command-line flags for settings (main thread, at start-up): one `--<name-with-dashes>` per
setting, shared by `rkmqtt run`, `ask`, `check`, `health` and `bench`.

Values stay strings and pydantic checks them with the other layers (`load_settings`), so a flag
left out is `None` here and the environment, a file or the default decides.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from rkmqtt.settings import MODEL_DEFAULTED, Settings

# Settings that a client of the bridge needs (`ask`, `bench`): how to reach the broker and where the bridge listens.
CONNECTION_SETTINGS = (
    "broker",
    "username",
    "password",
    "password_file",
    "mqtt_version",
    "client_id",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_insecure",
    "keepalive",
    "topic_prefix",
)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    args = typing.get_args(annotation)
    return isinstance(annotation, types.UnionType) and bool in args


def _default_text(name: str) -> str:
    """ "(default: X)" for the help text; nothing for an empty default."""
    default = Settings.model_fields[name].default
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None or default == "":
        return ""
    shown = ("true" if default else "false") if isinstance(default, bool) else str(default)
    if name in MODEL_DEFAULTED:
        shown = f"the model's own, else {shown}"
    return f" (default: {shown})"


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per setting (or per name in `names`); the help says the setting's default."""
    group = parser.add_argument_group("settings (also RKMQTT_<NAME> or the --config file)")
    group.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="YAML file of settings (see config.yaml)"
    )
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = ((field.description or "") + _default_text(name)).replace("%", "%%")
        if _is_bool(field.annotation):
            group.add_argument(
                flag, dest=f"setting_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(flag, dest=f"setting_{name}", default=None, metavar="VALUE", help=help_text)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (those left out are not there)."""
    return {k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
