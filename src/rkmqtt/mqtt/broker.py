"""A private Mosquitto child process (main thread): the embedded default of `rkmqtt run`, in a
session of its own so that it outlives the bridge's last replies, and the broker the tests and the
harness start on free ports."""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from rkmqtt.errors import ConfigError

_LOGGER = logging.getLogger(__name__)


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """Start, kill and restart a Mosquitto on 127.0.0.1:<port> with its own config and files."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        extra_config: str = "",
        persistence: bool = False,
        binary: str | None = None,
        own_session: bool = False,
        nodelay: bool = True,
        config: str | None = None,
        save_on_changes: bool = True,
        autosave_interval: int = 1,
    ) -> None:
        self.binary = binary or shutil.which("mosquitto") or _sbin("mosquitto")
        if self.binary is None:
            raise ConfigError(
                "the mosquitto binary is not installed: install it (Debian/Ubuntu: apt-get install mosquitto) "
                "or set broker to mqtt://host:port"
            )
        self.port = port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="rkmqtt-mosquitto-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_config = extra_config
        self.persistence = persistence
        self.own_session = own_session
        self.nodelay = nodelay
        self.config = config  # a whole mosquitto.conf to use as it is (it must listen on `port`)
        # With persistence: the database is saved in the loop turn after any change, so that a
        # kill -9 of the broker loses nothing it acknowledged; else once a second.
        self.save_on_changes = save_on_changes
        self.autosave_interval = autosave_interval  # changes (on changes) or seconds
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        if self.config is not None:
            conf.write_text(self.config)
            return conf
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true" if "password_file" not in self.extra_config else "allow_anonymous false",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            # On changes, autosave_interval counts changes: every loop turn that changed something
            # rewrites the whole database (what it costs: docs/benchmarks.md, "Broker persistence").
            f"autosave_interval {self.autosave_interval}",
            f"autosave_on_changes {'true' if self.save_on_changes else 'false'}",
            "max_queued_messages 100000",
            # Mosquitto's default Nagle delays small packets (a stream chunk) by up to ~40 ms.
            f"set_tcp_nodelay {'true' if self.nodelay else 'false'}",
            # Run as whoever started us: as root, mosquitto would otherwise switch to the
            # `mosquitto` user, which cannot read our files (and cannot in a user namespace).
            f"user {getpass.getuser()}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            self.extra_config,
        ]
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> Mosquitto:
        conf = self._write_config()
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "-c", str(conf)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=self.own_session,
            # (preexec_fn: the embedded broker starts before rkmqtt starts any thread)
            preexec_fn=_end_with_parent if self.own_session else None,
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                tail = (self.workdir / "mosquitto.log").read_text(errors="replace")[-500:]
                raise ConfigError(f"mosquitto on port {self.port} exited at start: {tail.strip()}")
            if port_answers("127.0.0.1", self.port, 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not start listening on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, as in a crash or a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux prctl
    PR_SET_PDEATHSIG), so that a broker in its own session does not outlive a killed rkmqtt."""
    # Not Linux: a killed rkmqtt leaves the broker running, as any daemon would.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def _sbin(name: str) -> str | None:
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None
