"""The shipped broker files (deploy/mosquitto/: rkmqtt.conf, rkmqtt.acl, rkmqtt-bridges.acl) on a
private Mosquitto, with only what ties them to a machine changed: the ports (on loopback), the
files' paths, the log and pid files, and the user to run as. Password files are made here."""

from __future__ import annotations

import getpass
import re
import subprocess
from pathlib import Path

from rkmqtt.mqtt.broker import Mosquitto, free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
P = "rkmqtt"  # the shipped ACLs are written for the default topic prefix
BRIDGE_USER = "rkmqtt"
USERS = {"homeassistant": "ha-pw", "admin": "admin-pw", "alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
BRIDGES = {BRIDGE_USER: "bridge-pw"}
USERS_DEV = "dev{}"


def device_password(n: int) -> str:
    return f"dev{n}-pw"


def shipped_config(
    port: int, bridge_port: int, workdir: Path, acl: bool = True, swaps: dict[str, str] | None = None
) -> str:
    """The shipped conf for a broker in `workdir` (its password files already there). `acl=False`
    drops the ACL files (the control: logins alone); `swaps` changes more lines (pattern: line)."""
    text = (DEPLOY / "rkmqtt.conf").read_text()
    lines = {
        r"^listener 1883$": f"listener {port} 127.0.0.1",
        r"^listener 1884$": f"listener {bridge_port} 127.0.0.1",
        r"^password_file .*/rkmqtt\.passwd$": f"password_file {workdir / 'rkmqtt.passwd'}",
        r"^password_file .*/rkmqtt-bridges\.passwd$": f"password_file {workdir / 'rkmqtt-bridges.passwd'}",
        r"^acl_file .*/rkmqtt\.acl$": f"acl_file {DEPLOY / 'rkmqtt.acl'}" if acl else "",
        r"^acl_file .*/rkmqtt-bridges\.acl$": f"acl_file {DEPLOY / 'rkmqtt-bridges.acl'}" if acl else "",
        r"^persistence_location .*$": f"persistence_location {workdir}/",
        r"^log_dest .*$": "log_dest stderr",
        r"^pid_file .*$": "",
        **(swaps or {}),
    }
    for pattern, line in lines.items():
        text, n = re.subn(pattern, line, text, flags=re.M)
        assert n == 1, f"the shipped conf has no single line matching {pattern}"
    return text + f"user {getpass.getuser()}\n"


class ShippedBroker(Mosquitto):
    """A Mosquitto with the shipped conf: `url` is the devices' listener, `bridge_url` the bridges'."""

    def __init__(self, workdir: Path, acl: bool = True, swaps: dict[str, str] | None = None, devices: int = 0) -> None:
        """`devices`: users dev0, dev1, ... with the passwords `device_password(n)`, besides USERS."""
        workdir.mkdir(parents=True, exist_ok=True)
        device_users = {USERS_DEV.format(n): device_password(n) for n in range(devices)}
        for name, users in (("rkmqtt.passwd", {**USERS, **device_users}), ("rkmqtt-bridges.passwd", BRIDGES)):
            path = workdir / name
            path.write_text("")
            for user, pw in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(path), user, pw], check=True, timeout=30)
        port, self.bridge_port = free_port(), free_port()
        super().__init__(port=port, workdir=workdir, config=shipped_config(port, self.bridge_port, workdir, acl, swaps))
        secret = workdir / "bridge.secret"
        secret.write_text(BRIDGES[BRIDGE_USER] + "\n")
        self.bridge_secret = secret

    @property
    def bridge_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.bridge_port}"

    def bridge_flags(self) -> tuple[str, ...]:
        """`rkmqtt run` flags that log a bridge in on the bridges' listener."""
        return ("--broker", self.bridge_url, "--username", BRIDGE_USER, "--password-file", str(self.bridge_secret))
