"""The rules a Home Assistant add-on's `config.yaml` must pass, as this project checks its own
add-on (tests only; read by tests/test_addon.py).

Home Assistant add-on repositories run the add-on linter in CI. What it enforces, and what this
module checks: the required keys; for each key its type, its allowed values and that it is not
set to its default value; no key it does not know; and its rules beyond types: no `watchdog` (a
Docker HEALTHCHECK instead), no `full_access` together with `devices`, no `:` in a `devices`
entry, and only the architectures Home Assistant still supports.

The keys are those an add-on like ours uses or must not use. A key missing from `KEYS` is
refused as unknown: to use a new one, add its rule here first, with the type and default that
Home Assistant's add-on documentation gives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

#: Architectures Home Assistant builds add-ons for today (armhf, armv7 and i386 are retired).
SUPPORTED_ARCH = frozenset({"aarch64", "amd64"})
RETIRED_ARCH = frozenset({"armhf", "armv7", "i386"})

REQUIRED = ("name", "version", "slug", "description", "arch")

_NO_DEFAULT = object()

#: Folders an add-on may map, and the string form `folder[:rw|:ro]`.
MAP_FOLDERS = frozenset(
    {"addon_config", "addons", "all_addon_configs", "backup", "config", "data", "homeassistant_config"}
    | {"media", "share", "ssl"}
)
_MAP_STRING = re.compile(
    r"^(addon_config|all_addon_configs|config|homeassistant_config|ssl|addons|backup|share|media)(:(rw|ro))?$"
)

PRIVILEGES = frozenset(
    {"BPF", "DAC_READ_SEARCH", "IPC_LOCK", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_ADMIN", "SYS_MODULE"}
    | {"SYS_NICE", "SYS_PTRACE", "SYS_RAWIO", "SYS_RESOURCE", "SYS_TIME"}
)


@dataclass(frozen=True)
class Key:
    """The rule of one key: `kind` is str, bool, int, list (of strings), mapping, map (the
    `map` key's own form) or str|bool; `choices` are the allowed values (of the string, or of
    each list item); `pattern` is what each string item must match."""

    kind: str
    default: Any = _NO_DEFAULT
    choices: frozenset[str] = field(default_factory=frozenset)
    pattern: str | None = None


KEYS: dict[str, Key] = {
    # identity
    "name": Key("str"),
    "version": Key("str"),
    "slug": Key("str"),
    "description": Key("str"),
    "url": Key("str"),
    "image": Key("str"),
    "arch": Key("list", choices=SUPPORTED_ARCH | RETIRED_ARCH),
    "stage": Key("str", "stable", frozenset({"stable", "experimental", "deprecated"})),
    # start-up
    "startup": Key("str", "application", frozenset({"application", "initialize", "once", "services", "system"})),
    "boot": Key("str", "auto", frozenset({"auto", "manual", "manual_only"})),
    "init": Key("bool", True),
    "timeout": Key("int", 10),
    "watchdog": Key("str"),
    # what it talks to
    "services": Key("list", pattern=r"^(mqtt|mysql):(provide|want|need)$"),
    "homeassistant_api": Key("bool", False),
    "hassio_api": Key("bool", False),
    "hassio_role": Key("str", "default", frozenset({"admin", "backup", "default", "homeassistant", "manager"})),
    "host_network": Key("bool", False),
    "ports": Key("mapping"),
    "ports_description": Key("mapping"),
    "ingress": Key("bool", False),
    "webui": Key("str"),
    "panel_icon": Key("str", "mdi:puzzle"),
    # hardware and privileges
    "video": Key("bool", False),
    "devices": Key("list"),
    "udev": Key("bool", False),
    "gpio": Key("bool", False),
    "usb": Key("bool", False),
    "uart": Key("bool", False),
    "full_access": Key("bool", False),
    "privileged": Key("list", choices=PRIVILEGES),
    "apparmor": Key("str|bool", True),
    # storage and backups
    "map": Key("map"),
    "backup": Key("str", "hot", frozenset({"hot", "cold"})),
    "backup_exclude": Key("list"),
    "environment": Key("mapping"),
    # options
    "options": Key("mapping", {}),
    "schema": Key("mapping", {}),
}

_KIND_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "mapping": (dict,),
    "map": (list,),
    "str|bool": (str, bool),
}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _KIND_TYPES[kind])


def _check_map(value: list[Any]) -> list[str]:
    problems = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not _MAP_STRING.fullmatch(item):
                problems.append(f"map/{i}: {item!r} is not folder[:rw|:ro]")
        elif isinstance(item, dict):
            if item.get("type") not in MAP_FOLDERS:
                problems.append(f"map/{i}: type {item.get('type')!r} is not one of {sorted(MAP_FOLDERS)}")
            if "read_only" in item and not isinstance(item["read_only"], bool):
                problems.append(f"map/{i}: read_only must be true or false")
            if "path" in item and not isinstance(item["path"], str):
                problems.append(f"map/{i}: path must be a string")
            problems += [f"map/{i}: unknown key {k!r}" for k in sorted(set(item) - {"type", "read_only", "path"})]
        else:
            problems.append(f"map/{i}: must be a string or a mapping with a type")
    if len({type(item) for item in value}) > 1:
        problems.append("map: entries must all be strings or all be mappings")
    return problems


def _check_key(name: str, value: Any, rule: Key) -> list[str]:
    if not _is_kind(value, rule.kind):
        return [f"{name}: must be of type {rule.kind}, not {type(value).__name__}"]
    problems = []
    if rule.default is not _NO_DEFAULT and value == rule.default and type(value) is type(rule.default):
        problems.append(f"{name}: set to its default value {value!r}; leave it out")
    items = value if rule.kind == "list" else [value] if rule.kind == "str" else []
    for i, item in enumerate(items):
        where = f"{name}/{i}" if rule.kind == "list" else name
        if not isinstance(item, str):
            problems.append(f"{where}: must be a string")
        elif rule.choices and item not in rule.choices:
            problems.append(f"{where}: {item!r} is not one of {sorted(rule.choices)}")
        elif rule.pattern and not re.fullmatch(rule.pattern, item):
            problems.append(f"{where}: {item!r} does not match {rule.pattern}")
    if rule.kind == "map":
        problems += _check_map(value)
    return problems


def lint_config(document: Any) -> list[str]:
    """Every problem the add-on linter's rules find in a parsed `config.yaml`; [] when it passes."""
    if not isinstance(document, dict):
        return ["config.yaml: must be a mapping of key: value"]
    problems = [f"{key}: required" for key in REQUIRED if key not in document]
    for key, value in document.items():
        rule = KEYS.get(key)
        if rule is None:
            problems.append(f"{key}: unknown key (tests/addon_rules.py has no rule for it)")
            continue
        problems += _check_key(key, value, rule)
    # The linter's rules beyond types.
    if "watchdog" in document:
        problems.append("watchdog: use a Docker HEALTHCHECK instead")
    if document.get("full_access") and document.get("devices"):
        problems.append("full_access: not together with devices")
    devices = document.get("devices")
    if isinstance(devices, list):
        problems += [f"devices: {d!r} has ':' (give the device path only)" for d in devices if ":" in str(d)]
    arch = document.get("arch")
    if isinstance(arch, list):
        problems += [f"arch: {a} is no longer supported" for a in arch if a in RETIRED_ARCH]
    return problems
