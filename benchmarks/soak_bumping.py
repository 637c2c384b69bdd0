"""Soak: the bridge's memory under a flood that keeps the queue full and bumps continuously (main
thread; the MQTT clients run on paho's threads). It prints the bridge's RSS and stats as it goes,
then the bumps, the RSS growth over the second half and whether the counters add up.

    .venv/bin/python benchmarks/soak_bumping.py [--minutes 10] [--engine numpy] [--every 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rkmqtt.mqtt.broker import Mosquitto  # noqa: E402
from rkmqtt.topics import Topics  # noqa: E402

PREFIX = "soak"
TOPICS = Topics(PREFIX, "soak")  # the bridge runs with --node-name soak
SENTENCE = "the quick brown fox jumps over the lazy dog. "  # 10 tokens of SmolLM2's tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--engine", default="numpy")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--quiet-devices", type=int, default=4, help="each sends a request a second")
    ap.add_argument("--prompt-tokens", type=int, default=600, help="about this many tokens per prompt")
    ap.add_argument("--quiet-expiry", type=float, default=0.5, help="expires_in of the quiet requests, seconds")
    ap.add_argument("--flood-per-s", type=float, default=50.0)
    ap.add_argument("--src", type=Path, help="run the bridge from this source tree (e.g. an older checkout's src/)")
    args = ap.parse_args()

    with Mosquitto() as broker:
        env = {**os.environ, "RKMQTT_LOG_LEVEL": "WARNING", "RKMQTT_STATE_DIR": str(broker.workdir / "state")}
        if args.src is not None:
            env["PYTHONPATH"] = str(args.src.resolve())
        cmd = [sys.executable, "-m", "rkmqtt", "run", "--broker", broker.url, "--topic-prefix", PREFIX,
               "--node-name", TOPICS.node, "--engine", args.engine, "--max-queue", "8", "--rate-limit", "0",
               "--no-discovery",
               "--stats-interval", "2", "--max-new-tokens", "32", "--default-new-tokens", "8"]  # fmt: skip
        log_path = broker.workdir / "bridge.log"
        print(f"bridge log: {log_path}")
        with log_path.open("wb") as log:
            bridge = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
            try:
                return soak(broker.url, bridge, args)
            finally:
                bridge.terminate()
                bridge.wait(60)


def soak(url: str, bridge: subprocess.Popen[bytes], args: argparse.Namespace) -> int:
    long_prompt = "Summarise this, please: " + SENTENCE * max(1, args.prompt_tokens // 10)
    port = int(url.rsplit(":", 1)[1])
    lock = threading.Lock()
    finals = bumps = 0
    stats: dict[str, Any] = {}
    online = threading.Event()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal finals, bumps, stats
        if msg.topic == TOPICS.status:
            if msg.payload == b"online":
                online.set()
        elif msg.topic == TOPICS.stats:
            with lock:
                stats = json.loads(msg.payload)
        elif not msg.topic.endswith("/stream"):
            bumped = "holds the most places" in json.loads(msg.payload).get("error", {}).get("message", "")
            with lock:
                finals += 1
                bumps += bumped

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-driver", protocol=mqtt.MQTTv5)
    c.max_queued_messages_set(0)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe([(f"{PREFIX}/reply/#", 1), (TOPICS.stats, 0), (TOPICS.status, 1)])
    c.loop_start()
    if not online.wait(300):
        print("the bridge did not come online within 300 s", file=sys.stderr)
        return 1
    proc = psutil.Process(bridge.pid)
    rss0 = proc.memory_info().rss
    print(f"bridge pid {bridge.pid}, RSS at start {rss0 / 2**20:.1f} MB; soaking for {args.minutes:g} min")
    print(f"{'s':>6} {'RSS MB':>8} {'total':>8} {'ok':>7} {'errors':>7} {'busy':>7} {'finals seen':>11}")
    start = time.monotonic()
    end = start + args.minutes * 60
    next_sample = start
    samples: list[tuple[float, float]] = []
    n = 0
    flood_gap = 1.0 / args.flood_per_s
    next_quiet = start
    while time.monotonic() < end:
        now = time.monotonic()
        n += 1
        c.publish(f"{PREFIX}/request/flood", json.dumps({"id": f"f{n}", "prompt": long_prompt, "stream": False}), 1)
        if now >= next_quiet:
            next_quiet += 1.0
            for q in range(args.quiet_devices):
                quiet = {"id": f"q{n}", "prompt": long_prompt, "expires_in": args.quiet_expiry}
                c.publish(f"{PREFIX}/request/quiet{q}", json.dumps(quiet), 1)
        if now >= next_sample:
            next_sample += args.every
            rss = proc.memory_info().rss / 2**20
            samples.append((now - start, rss))
            with lock:
                s, f = dict(stats), finals
            busy = s.get("errors_by_code", {}).get("busy", 0)
            print(f"{now - start:6.0f} {rss:8.1f} {s.get('requests_total', 0):8d} {s.get('completed', 0):7d} "
                  f"{s.get('errors', 0):7d} {busy:7d} {f:11d}", flush=True)  # fmt: skip
        time.sleep(flood_gap)
    settle_end = time.monotonic() + 300  # let the last requests finish and a stats message say so
    while time.monotonic() < settle_end:
        time.sleep(2.5)
        with lock:
            s, f = dict(stats), finals
        if s.get("active") == 0 and s.get("queue_depth") == 0 and s.get("requests_total") == f:
            break
    c.disconnect()
    c.loop_stop()
    half = [rss for t, rss in samples if t >= args.minutes * 30]
    growth = (half[-1] - half[0]) if len(half) > 1 else 0.0
    adds_up = s.get("requests_total") == s.get("completed", 0) + s.get("errors", 0) == f
    print(f"requests bumped out of the full queue: {bumps}")
    print(f"RSS over the second half: {half[0]:.1f} -> {half[-1]:.1f} MB ({growth:+.1f} MB)" if half else "no samples")
    verdict = "adds up" if adds_up else "DOES NOT ADD UP"
    print(f"requests {s.get('requests_total')}, ok {s.get('completed')}, errors {s.get('errors')} "
          f"({s.get('errors_by_code')}), finals received {f}: {verdict}")  # fmt: skip
    return 0 if adds_up else 1


if __name__ == "__main__":
    sys.exit(main())
