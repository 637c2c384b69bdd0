"""The README's first question asked as the README asks it, N times each way, and the good answers
counted (main thread; the broker and the bridge are child processes; docs/sampling.md, "Reproduce").
An answer is good when its first sentence names Paris as the capital; exit 0 when both counts reach --need.

    .venv/bin/python benchmarks/readme_answers.py [--tries 20] [--need 19] [-- RKMQTT-RUN FLAGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rkmqtt.mqtt.broker import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[1]
RKMQTT = [sys.executable, "-m", "rkmqtt"]


def first_sentence(text: str) -> str:
    """The text up to the first sentence end (. ! ? followed by a space or the end) or line break."""
    m = re.search(r"[.!?](\s|$)|\n", text.strip())
    return text.strip()[: m.start() + 1] if m else text.strip()


def names_paris_as_capital(text: str) -> bool:
    sentence = first_sentence(text)
    return "Paris" in sentence and "capital" in sentence.lower()


def readme_examples(readme: str) -> tuple[str, str, str]:
    """(question of `rkmqtt ask`, the curl example's URL, its body) as README.md has them."""
    ask = re.search(r'rkmqtt ask "([^"]+)"', readme)
    curl = re.search(r"curl (http://127\.0\.0\.1:11434\S+) -d '([^']+)'", readme)
    if ask is None or curl is None:
        raise SystemExit('readme_answers: README.md has no `rkmqtt ask "..."` or no curl example on port 11434')
    return ask.group(1), curl.group(1), curl.group(2)


def wait_http(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"readme_answers: the bridge's HTTP API did not answer on port {port} within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--need", type=int, default=19, help="good answers wanted of each way (default 19)")
    parser.add_argument("bridge_flags", nargs="*", help="after --: extra flags for `rkmqtt run`")
    args = parser.parse_args()
    question, url, body = readme_examples((REPO / "README.md").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    env["PYTHONPATH"] = str(REPO / "src")
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="readme-answers-") as tmp:
        broker = Mosquitto(workdir=Path(tmp) / "mosquitto").start()
        port = free_port()
        bridge = subprocess.Popen(
            [*RKMQTT, "run", "--broker", broker.url, "--http-listen", f"127.0.0.1:{port}", "--no-discovery",
             "--state-dir", str(Path(tmp) / "state"), *args.bridge_flags],
            env=env, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "bridge.log", "w"),  # noqa: SIM115
        )  # fmt: skip
        try:
            wait_http(port, 180)
            curl_url = url.replace("127.0.0.1:11434", f"127.0.0.1:{port}")
            ways = {
                f'rkmqtt ask "{question}"': [*RKMQTT, "ask", "--broker", broker.url, question],
                "the README's curl example": ["curl", "-sS", curl_url, "-d", body],
            }
            for way, command in ways.items():
                good = 0
                for i in range(args.tries):
                    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
                    text = out.stdout if way.startswith("rkmqtt") else json.loads(out.stdout)["message"]["content"]
                    ok = names_paris_as_capital(text)
                    good += ok
                    print(f"{way} #{i + 1}: {'good' if ok else 'BAD '} {text.strip()!r}", flush=True)
                counts[way] = good
        finally:
            bridge.terminate()
            bridge.wait(60)
            broker.close()
    for way, good in counts.items():
        print(f"{way}: {good} of {args.tries} answers name Paris as the capital in their first sentence")
    return 0 if all(good >= args.need for good in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
