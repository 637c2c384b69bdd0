"""`rkmqtt run` as a real process for tests that kill it, restart it and read its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class BridgeProcess:
    """One `rkmqtt run`; its output goes to `log` (appended across restarts)."""

    def __init__(self, url: str, prefix: str, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "rkmqtt", "run", "--broker", url, "--topic-prefix", prefix,
                    "--no-discovery", *args]  # fmt: skip
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RKMQTT_LOG_LEVEL": "INFO", **(env or {})}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=out, cwd=REPO)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > end:
                raise AssertionError(f"{text!r} not in the bridge's log:\n{self.output()[-3000:]}")
            time.sleep(0.1)
