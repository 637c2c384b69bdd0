"""The bridge under test as a `rkmqtt run` child process (main thread): started with the point's
settings, online once its retained status says so, stopped with SIGTERM, its retained status and
info cleared after. A child process, not `Service` here, so that the simulated devices' work is not
counted as the bridge's (docs/benchmarks.md, "How the bench works")."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rkmqtt.bench.attach import InfoWatcher
from rkmqtt.bench.mqttclient import BenchClient
from rkmqtt.errors import RkmqttError
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics

SettingValue = str | int | float | bool


def as_flags(settings: Mapping[str, SettingValue]) -> list[str]:
    """`rkmqtt run` flags for settings: `--name value`, `--name` / `--no-name` for booleans."""
    out: list[str] = []
    for name, value in settings.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


class BridgeProcess:
    """`python -m rkmqtt run <flags>` with `env`, logging to `log_path`."""

    def __init__(self, settings: Settings, flags: Mapping[str, SettingValue], env: dict[str, str], log_path: Path):
        self.settings = settings
        self.argv = [sys.executable, "-m", "rkmqtt", "run", *as_flags(flags)]
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 180.0) -> BridgeProcess:
        watcher = InfoWatcher(self.settings, self.settings.effective_node_name())
        watcher.client.start()
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            end = time.monotonic() + timeout
            while not watcher.online():
                if self.proc.poll() is not None:
                    raise RkmqttError(
                        f"the bridge exited with status {self.proc.returncode} at start:\n{self.log_tail()}"
                    )
                if time.monotonic() > end:
                    self.stop()
                    raise RkmqttError(f"the bridge was not online within {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.05)
            assert watcher.info is not None
            self.info = watcher.info
        finally:
            watcher.client.stop()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._clear_retained()
        return proc.returncode

    def _clear_retained(self) -> None:
        topics = Topics(self.settings.topic_prefix, self.settings.effective_node_name())
        try:
            c = BenchClient(self.settings, f"rkmqtt-bench-clear-{uuid.uuid4().hex[:6]}", [], lambda m: None).start(5)
        except RkmqttError:
            return
        try:
            for t in (topics.status, topics.info):
                c.client.publish(t, b"", qos=1, retain=True).wait_for_publish(3)
        finally:
            c.stop()
