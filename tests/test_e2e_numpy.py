"""End to end, as a user runs it: `rkmqtt run` as a process with the real CPU engine and the
packaged SmolLM2 model, a real Mosquitto, `mosquitto_pub` for the prompt, SIGTERM to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from rkmqtt.broker import Mosquitto
from tests.mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[1]


def test_rkmqtt_run_answers_mosquitto_pub_with_the_real_model(mosquitto: Mosquitto, prefix: str) -> None:
    probe = Probe(mosquitto.url, [f"{prefix}/reply/#", f"{prefix}/status", f"{prefix}/info"])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "run", "--broker", mosquitto.url, "--topic-prefix", prefix,
         "--engine", "numpy", "--n-batch", "2", "--temperature", "0", "--no-discovery"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        probe.wait_for(lambda m: m.topic == f"{prefix}/status" and m.payload == b"online", timeout=120)
        info = probe.wait_for(lambda m: m.topic == f"{prefix}/info")[0].json()
        assert info["engine"] == "numpy" and info["batching"] == "continuous" and "SmolLM2" in info["model"]
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-t", f"{prefix}/request/kitchen",
                        "-m", "What is the capital of France?"], check=True, timeout=10)  # fmt: skip
        probe.publish(f"{prefix}/request/hall", {"id": "h1", "prompt": "Name one colour.", "max_new_tokens": 12})
        finals = probe.wait_for(lambda m: "/reply/" in m.topic and not m.topic.endswith("/stream"), count=2,
                                timeout=120)  # fmt: skip
        by_client = {m.topic.split("/")[2]: m.json() for m in finals}
        kitchen = by_client["kitchen"]
        assert kitchen["status"] == "ok" and "Paris" in kitchen["text"], kitchen
        chunks = probe.on(f"{prefix}/reply/kitchen/{kitchen['id']}/stream")
        assert "".join(json.loads(c.payload)["text"] for c in chunks) == kitchen["text"]
        assert by_client["hall"]["usage"]["completion_tokens"] <= 12
        assert max(kitchen["batch"]["size"], by_client["hall"]["batch"]["size"]) == 2  # they shared the engine
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert probe.wait_for(lambda m: m.topic == f"{prefix}/status" and m.payload == b"offline")
        assert "What is the capital" not in out, "prompts must not be logged at INFO"
    finally:
        if proc.poll() is None:
            proc.kill()
        probe.close()
