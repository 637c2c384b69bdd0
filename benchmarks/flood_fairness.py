"""Quiet devices' latency with and without a flood, side by side in one run (main thread; the MQTT
clients run on paho's threads). Three quiet devices send one request a second for `--rounds`
seconds, first alone and then while a fourth device sends 5,000 requests in about a second; the
bridge is `rkmqtt run` with the stand-in RKLLM runtime (decode 20 ms a step, n_batch 4, rate limit
120 a minute). It prints p50 and p95 of both rounds, their ratio, and whether other work loaded the
machine meanwhile (the bench's load verdict); tests/test_durability.py only checks that no quiet
request is lost (a latency bound fails on a loaded machine).

    .venv/bin/python -m benchmarks.flood_fairness [--rounds 8] [--flood 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks import standin
from rkmqtt.bench.busy import LoadWatch
from rkmqtt.mqtt.broker import Mosquitto

PREFIX = "flood"
STANDIN_ENV = {"RKLLM_STANDIN_DECODE_MS": "20", "RKLLM_STANDIN_PREFILL_MS_PER_TOKEN": "0.5"}


class Device:
    """One quiet device: publishes and records when each final reply came."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.got: dict[str, float] = {}
        self.online = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-bench", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{PREFIX}/reply/{name}/+", 1), (f"{PREFIX}/node/+/status", 1)])
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if m.topic.endswith("/status"):
            if m.payload == b"online":
                self.online.set()
        else:
            self.got.setdefault(m.topic.rsplit("/", 1)[1], time.monotonic())

    def send(self, rid: str) -> float:
        payload = {"id": rid, "prompt": f"quiet {rid} @len=25", "stream": False}
        self.client.publish(f"{PREFIX}/request/{self.name}", json.dumps(payload), 1)
        return time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def quiet_round(devices: list[Device], tag: str, rounds: int) -> tuple[list[float], int]:
    """Latencies of the answered quiet requests, and how many were not answered within 60 s."""
    sent: dict[tuple[int, str], float] = {}
    for k in range(rounds):
        for i, dev in enumerate(devices):
            sent[(i, f"{tag}{k}")] = dev.send(f"{tag}{k}")
        time.sleep(1.0)
    end = time.monotonic() + 60
    while time.monotonic() < end and any(rid not in devices[i].got for i, rid in sent):
        time.sleep(0.1)
    latencies = [devices[i].got[rid] - t0 for (i, rid), t0 in sent.items() if rid in devices[i].got]
    return latencies, len(sent) - len(latencies)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="seconds of quiet requests per round")
    ap.add_argument("--flood", type=int, default=5000, help="requests of the flooding device")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rkmqtt-flood-") as tmp, Mosquitto(workdir=Path(tmp) / "broker") as broker:
        lib, model = standin.build_library(Path(tmp) / "standin"), standin.model_file(Path(tmp) / "standin")
        env = {
            **os.environ,
            **STANDIN_ENV,
            "RKMQTT_LOG_LEVEL": "WARNING",
            "RKMQTT_STATE_DIR": f"{tmp}/state",
            "RKMQTT_CONFIG": os.devnull,  # its flags only, not a config.yaml of the folder
        }
        cmd = [sys.executable, "-m", "rkmqtt", "run", "--broker", broker.url, "--topic-prefix", PREFIX,
               "--node-name", "flood", "--engine", "rkllm", "--rkllm-library", str(lib), "--model", str(model),
               "--n-batch", "4", "--rate-limit", "120", "--no-discovery"]  # fmt: skip
        with (Path(tmp) / "bridge.log").open("wb") as log:
            bridge = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        devices = [Device(broker.port, f"quiet{i}") for i in range(3)]
        watch = LoadWatch()
        try:
            if not devices[0].online.wait(120):
                raise SystemExit(f"the bridge did not come online; its log is in {tmp}/bridge.log")
            watch.start()
            base, base_lost = quiet_round(devices, "b", args.rounds)
            flooder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
            flooder.max_inflight_messages_set(1000)
            flooder.connect("127.0.0.1", broker.port)
            flooder.loop_start()

            def flood() -> None:
                for n in range(args.flood):
                    payload = json.dumps({"id": f"f{n}", "prompt": "flood @len=3"})
                    flooder.publish(f"{PREFIX}/request/flood", payload, 1)
                    if n % 500 == 499:
                        time.sleep(0.1)  # 5,000 in about a second

            thread = threading.Thread(target=flood)
            thread.start()
            loaded, loaded_lost = quiet_round(devices, "l", args.rounds)
            thread.join(60)
            flooder.disconnect()
            flooder.loop_stop()
        finally:
            verdict = watch.stop()
            for d in devices:
                d.close()
            bridge.terminate()
            bridge.wait(60)

    def p(xs: list[float], q: int) -> float:
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else float("nan")

    print("| quiet devices (3, one request a second) | answered | lost | p50 s | p95 s |")
    print("|---|---|---|---|---|")
    for label, xs, lost in (("alone", base, base_lost), (f"beside a flood of {args.flood:,}", loaded, loaded_lost)):
        print(f"| {label} | {len(xs)} | {lost} | {p(xs, 50):.2f} | {p(xs, 95):.2f} |")
    print(f"\np95 with the flood / p95 alone: {p(loaded, 95) / p(base, 95):.2f}")
    print(verdict.text())
    return 0 if base_lost == loaded_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
