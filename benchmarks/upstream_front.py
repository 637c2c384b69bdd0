"""The front's cost: MQTT devices through a bridge with engine openai against HTTP clients straight
to its server, the same load, side by side (main thread; docs/benchmarks.md, "The front's cost").

    .venv/bin/python benchmarks/upstream_front.py [--upstream rkmqtt|llamacpp|URL]
        [--devices 4] [--requests 32] [--max-new-tokens 64] [--repeats 3] [--out FILE.json]
    .venv/bin/python benchmarks/upstream_front.py --render FILE.json   # the figures of a saved run
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.bridgeproc import BridgeProcess  # noqa: E402
from rkmqtt.bench.cpuusage import CpuMeter  # noqa: E402
from rkmqtt.bench.httpload import send_measured, warm_up  # noqa: E402
from rkmqtt.bench.load import LoadGenerator  # noqa: E402
from rkmqtt.bench.metrics import RequestRecord, RunMetrics, summarize  # noqa: E402
from rkmqtt.bench.prompts import BUILTIN_PROMPTS  # noqa: E402
from rkmqtt.bench.workload import Workload  # noqa: E402
from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams  # noqa: E402
from rkmqtt.engines.numpy.gguf_file import default_model_path  # noqa: E402
from rkmqtt.engines.openai.body import request_body  # noqa: E402
from rkmqtt.mqtt.broker import Mosquitto, free_port, port_answers  # noqa: E402
from rkmqtt.settings import Settings, load_settings  # noqa: E402

TARGET_RATIO = 0.95
TARGET_ADDED_TTFT_MS = 20.0
PREFIX = "bench-front"
NODE = "bench-front"
# The bridges this starts read their flags only, not a config.yaml of the folder it runs in.
NO_CONFIG_FILE = {"RKMQTT_CONFIG": os.devnull}


# -- the server alone ---------------------------------------------------------------------------
class DirectLoad:
    """The workload as HTTP clients straight to the server's /v1/chat/completions (one asyncio
    event loop, aiohttp): each device times its first text delta and takes the usage at the end."""

    def __init__(self, url: str, model: str, workload: Workload, sampling: SamplingParams) -> None:
        self.url, self.model, self.workload, self.sampling = url.rstrip("/"), model, workload, sampling
        self.tag = uuid.uuid4().hex[:6]
        self._records: list[RequestRecord] = []
        self._seq = [0] * workload.devices

    def body(self, prompt: str) -> dict[str, Any]:
        """What the front's engine sends for this prompt (extra fields at the top level, as on the wire)."""
        gen = Generation("x", (ChatMessage("user", prompt),), self.workload.max_new_tokens, self.sampling)
        body = request_body(gen, self.model)
        body.update(body.pop("extra_body", {}))
        return body

    def run(self) -> list[RequestRecord]:
        return asyncio.run(self._main())

    async def _main(self) -> list[RequestRecord]:
        w = self.workload
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=w.timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            one = functools.partial(self._one, session)
            await warm_up(w, one)
            self._seq = [0] * w.devices  # the warm-up does not shift the measured prompts
            await send_measured(w, one)
        return sorted(self._records, key=lambda r: r.sent)

    async def _one(self, session: aiohttp.ClientSession, device: int, measured: bool) -> None:
        w = self.workload
        seq = self._seq[device]
        self._seq[device] += 1
        pidx = w.prompt_index(device, seq)
        rec = RequestRecord(device=device, seq=seq, id=f"{self.tag}.{device}.{seq}", prompt_index=pidx, sent=0.0)
        body = self.body(w.prompts[pidx])
        rec.sent = time.monotonic()
        try:
            async with session.post(f"{self.url}/chat/completions", json=body) as resp:
                if resp.status != 200:
                    rec.status, rec.error_code = "error", f"http_{resp.status}"
                else:
                    async for line in resp.content:
                        _take_sse(rec, line, time.monotonic())
            rec.done = time.monotonic()
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            rec.status, rec.error_code = "error", type(e).__name__
        if rec.status == "pending":
            rec.status = "ok" if rec.completion_tokens or rec.chunks else "error"
            rec.error_code = None if rec.status == "ok" else "no_answer"
        if not rec.completion_tokens:
            rec.completion_tokens = rec.chunks  # a server that sends no usage: a token a delta
        if measured:
            self._records.append(rec)


def _take_sse(rec: RequestRecord, line: bytes, now: float) -> None:
    text = line.strip()
    if not text.startswith(b"data:"):
        return  # blank lines and comments (": ping")
    data = text[5:].strip()
    if data == b"[DONE]":
        rec.status = "ok"
        return
    obj = json.loads(data)
    if "error" in obj:
        rec.status, rec.error_code = "error", "stream_error"
        return
    usage = obj.get("usage")
    if usage:
        rec.completion_tokens = int(usage.get("completion_tokens") or 0)
        rec.prompt_tokens = usage.get("prompt_tokens")
    for choice in obj.get("choices") or ():
        if (choice.get("delta") or {}).get("content"):
            rec.chunks += 1
            if rec.first_token is None:
                rec.first_token = now
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]


# -- the upstream server ------------------------------------------------------------------------
class Upstream:
    """The server under test: started here (rkmqtt, llamacpp) or already running (a URL)."""

    def __init__(self, kind: str, devices: int, broker: Mosquitto, workdir: Path, llamacpp_python: str) -> None:
        self.kind = kind
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "upstream.log"
        if kind.startswith("http"):
            self.url = kind.rstrip("/")
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        if kind == "rkmqtt":
            argv = [sys.executable, "-m", "rkmqtt", "run", "--engine", "numpy", "--broker", broker.url,
                    "--topic-prefix", "bench-up", "--node-name", "bench-up", "--no-discovery", "--no-journal",
                    "--n-batch", str(devices), "--rate-limit", "0", "--max-queue", "10000",
                    "--http-listen", f"127.0.0.1:{port}"]  # fmt: skip
        elif kind == "llamacpp":
            argv = [llamacpp_python, "-m", "llama_cpp.server", "--model", str(default_model_path()),
                    "--model_alias", "SmolLM2-135M-Instruct", "--host", "127.0.0.1", "--port", str(port),
                    "--n_ctx", "2048", "--interrupt_requests", "False"]  # fmt: skip
        else:
            raise SystemExit(
                f"--upstream must be rkmqtt, llamacpp or the server's URL (http://host:port/v1), not {kind!r}"
            )
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **NO_CONFIG_FILE}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + 300
        while not port_answers("127.0.0.1", port):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"the {kind} server did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)

    def model(self) -> str:
        import openai

        client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=3, timeout=60)
        return client.models.list().data[0].id

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# -- the run ------------------------------------------------------------------------------------
def _median(values: Sequence[float | None]) -> float | None:
    have = [v for v in values if v is not None]
    return statistics.median(have) if have else None


def figures(direct: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The front against the server alone. Headline: the median of per-repeat pairs (run k through the
    front over run k of the server alone: they ran back to back, which cancels most of a shared
    machine's drift, as the bench's batching gain does); the ratio of the medians is kept beside it."""
    d_tps, f_tps = _median([r["tokens_per_s"] for r in direct]), _median([r["tokens_per_s"] for r in front])
    d_ttft, f_ttft = _median([r["ttft_ms_p50"] for r in direct]), _median([r["ttft_ms_p50"] for r in front])
    pairs = list(zip(direct, front, strict=False))
    ratios = [f["tokens_per_s"] / d["tokens_per_s"] for d, f in pairs if d["tokens_per_s"] and f["tokens_per_s"]]
    added = [f["ttft_ms_p50"] - d["ttft_ms_p50"] for d, f in pairs if None not in (d["ttft_ms_p50"], f["ttft_ms_p50"])]
    ratio, add = _median(ratios), _median(added)
    return {
        "server_alone": {"tokens_per_s": d_tps, "ttft_ms_p50": d_ttft, "runs": list(direct)},
        "through_rkmqtt": {"tokens_per_s": f_tps, "ttft_ms_p50": f_ttft, "runs": list(front)},
        "ratio_tokens_per_s": None if ratio is None else round(ratio, 4),
        "ratio_per_repeat": [round(x, 4) for x in ratios],
        "added_ttft_ms_p50": None if add is None else round(add, 2),
        "added_ttft_ms_per_repeat": [round(x, 2) for x in added],
        "ratio_of_medians": round(f_tps / d_tps, 4) if d_tps and f_tps is not None else None,
        "added_ttft_of_medians_ms": round(f_ttft - d_ttft, 2) if f_ttft is not None and d_ttft is not None else None,
        "errors": sum(r["errors"] for r in (*direct, *front)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="rkmqtt-upstream-front-"))
    workload = Workload(
        "closed", args.devices, args.requests, args.max_new_tokens, BUILTIN_PROMPTS, warmup=1, timeout_s=600
    )
    broker = Mosquitto(workdir=workdir / "mosquitto").start()
    upstream = Upstream(args.upstream, args.devices, broker, workdir, args.llamacpp_python)
    front: BridgeProcess | None = None
    try:
        model = upstream.model()
        flags: dict[str, Any] = {
            "broker": broker.url, "topic_prefix": PREFIX, "node_name": NODE, "discovery": False,
            "engine": "openai", "upstream_url": upstream.url, "upstream_model": model, "n_batch": args.devices,
            "temperature": 0.0, "rate_limit": 0, "max_queue": 10_000, "max_new_tokens": max(1024, args.max_new_tokens),
            "state_dir": str(workdir / "state"),
        }  # fmt: skip
        settings: Settings = load_settings(flags)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **NO_CONFIG_FILE}
        front = BridgeProcess(settings, flags, env, workdir / "front.log").start()
        sampling = SamplingParams(0.0, settings.top_k, settings.top_p, settings.repeat_penalty)
        direct_runs: list[RunMetrics] = []
        front_runs: list[RunMetrics] = []
        cpu: list[dict[str, float]] = []
        for i in range(args.repeats):
            print(f"run {i + 1}/{args.repeats}: the server alone ...", flush=True)
            direct_runs.append(summarize(DirectLoad(upstream.url, model, workload, sampling).run()))
            print(f"run {i + 1}/{args.repeats}: through rkmqtt ...", flush=True)
            meter = CpuMeter(
                {k: v for k, v in (("bridge", front.pid), ("broker", broker.proc.pid if broker.proc else None)) if v}
            )
            gen = LoadGenerator(settings, workload, meter=meter)
            front_runs.append(summarize(gen.run()))
            cpu.append(gen.cpu)
        return report(args, model, upstream.url, direct_runs, front_runs, cpu)
    finally:
        if front is not None:
            front.stop()
        upstream.stop()
        broker.close()


def report(
    args: argparse.Namespace,
    model: str,
    url: str,
    direct: Sequence[RunMetrics],
    front: Sequence[RunMetrics],
    cpu: Sequence[dict[str, float]],
) -> dict[str, Any]:
    out = {
        "upstream": args.upstream,
        "url": url,
        "model": model,
        "workload": {"devices": args.devices, "requests": args.requests, "max_new_tokens": args.max_new_tokens},
        "repeats": args.repeats,
        **figures([r.as_dict() for r in direct], [r.as_dict() for r in front]),
        "front_cpu": {k: statistics.median(c[k] for c in cpu if k in c) for k in {k for c in cpu for k in c}},
    }
    show(out)
    return out


def show(out: dict[str, Any]) -> None:
    def mark(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    w, d, f = out["workload"], out["server_alone"], out["through_rkmqtt"]
    print()
    print(f"upstream {out['upstream']} ({out['url']}), model {out['model']}; {w['devices']} devices, closed loop, "
          f"{w['requests']} requests of up to {w['max_new_tokens']} tokens; {out['repeats']} repeats")  # fmt: skip
    print(f"{'medians':24}{'tokens/s':>10}{'TTFT p50 ms':>14}")
    print(f"{'the server alone':24}{d['tokens_per_s'] or 0:>10.1f}{d['ttft_ms_p50'] or 0:>14.1f}")
    print(f"{'through rkmqtt (MQTT)':24}{f['tokens_per_s'] or 0:>10.1f}{f['ttft_ms_p50'] or 0:>14.1f}")
    ratio, added = out["ratio_tokens_per_s"], out["added_ttft_ms_p50"]
    if ratio is not None and added is not None:
        print(f"ratio of tokens/s {ratio:.3f}, median of per-repeat ratios {out['ratio_per_repeat']} "
              f"({mark(ratio >= TARGET_RATIO)} the target >= {TARGET_RATIO:.2f}); ratio of the medians "
              f"{out['ratio_of_medians']}")  # fmt: skip
        print(f"added median TTFT {added:+.1f} ms, median of per-repeat differences {out['added_ttft_ms_per_repeat']} "
              f"({mark(added <= TARGET_ADDED_TTFT_MS)} the target <= {TARGET_ADDED_TTFT_MS:.0f} ms); difference "
              f"of the medians {out['added_ttft_of_medians_ms']:+.1f} ms")  # fmt: skip
    print(f"front CPU (share of one core): {out.get('front_cpu')}; errors: {out['errors']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--upstream", default="rkmqtt", help="rkmqtt, llamacpp, or the URL of a running server's /v1")
    p.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON", "python3"),
                   help="a python with llama-cpp-python[server] (--upstream llamacpp)")  # fmt: skip
    p.add_argument("--devices", type=int, default=4, help="simulated devices, and n_batch of the front")
    p.add_argument("--requests", type=int, default=32, help="measured requests per run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--render", type=Path, help="print the figures of a JSON written by --out, and run nothing")
    args = p.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        out = {**saved, **figures(saved["server_alone"]["runs"], saved["through_rkmqtt"]["runs"])}
        show(out)
        return 0 if out["errors"] == 0 else 1
    out = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
