"""Benchmark of the numpy engine on SmolLM2-135M-Instruct, driven as the scheduler would, without MQTT
(main thread): decode throughput per n_batch, prefill, peak RSS, continuous against static batching
under staggered arrivals (docs/benchmarks.md, "The numpy engine alone"). It runs itself again
without OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unless --keep-openblas-env.

    .venv/bin/python benchmarks/numpy_engine.py [--repeats 3] [--quick] [--parts decode,rss,arrivals]
"""

from __future__ import annotations

import argparse
import os
import sys

_OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if "--keep-openblas-env" not in sys.argv and any(v in os.environ for v in _OPENBLAS_VARS):
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_VARS}
    env["RKMQTT_BENCH_UNSET"] = ",".join(v for v in _OPENBLAS_VARS if v in os.environ)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Hashable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from rkmqtt.engines.base import ChatMessage, FinishEvent, Generation, SamplingParams  # noqa: E402
from rkmqtt.engines.numpy.engine import NumpyEngine  # noqa: E402

GAPS = "1.0,0.5,0.25"  # mean seconds between arrivals (exponential): light, busy, overloaded on this VM

TOPICS = [
    "the history of the bicycle",
    "how rain forms",
    "a lighthouse keeper",
    "the rules of chess",
    "a journey to Mars",
    "how bread is made",
    "the life of bees",
    "a city at night",
    "the first computers",
    "a storm at sea",
    "ancient Rome",
    "how volcanoes work",
    "a day at the market",
    "the northern lights",
    "a robot learning to paint",
    "the water cycle",
]


def story(i: int, max_new: int) -> Generation:
    text = f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."
    return Generation(f"r{i}", (ChatMessage("user", text),), max_new, SamplingParams())


# -- decode throughput -----------------------------------------------------------------------------


def decode_throughput(engine: NumpyEngine, batch: int, new_tokens: int) -> float:
    """Aggregate tok/s: `batch` / the median time of the steps in which all `batch` slots
    decode (the median keeps other processes' bursts on a shared machine out of the figure)."""
    engine.submit([engine.prepare(story(i, new_tokens)) for i in range(batch)])
    steps: list[float] = []
    while engine.active():
        full = engine.decoding() == batch
        t = time.perf_counter()
        engine.poll(0.0)
        dt = time.perf_counter() - t
        if full and engine.active() == batch:  # nobody finished in this step
            steps.append(dt)
    if len(steps) < 5:
        raise RuntimeError(f"batch {batch}: only {len(steps)} full decode steps; raise --new-tokens")
    return batch / statistics.median(steps[2:])


def prefill_rate(engine: NumpyEngine, n_tokens: int) -> tuple[float, int]:
    words = "The quick brown fox jumps over the lazy dog near the river bank. "
    text = words * (n_tokens // 12)
    prepared = engine.prepare(Generation("p", (ChatMessage("user", text),), 1, SamplingParams()))
    n = prepared.prompt_tokens or 0
    # trim the text until the prompt is n_tokens long
    while n > n_tokens:
        text = text[: -max(1, (n - n_tokens) * 3)]
        prepared = engine.prepare(Generation("p", (ChatMessage("user", text),), 1, SamplingParams()))
        n = prepared.prompt_tokens or 0
    reuse, engine.reuse_prefix = engine.reuse_prefix, False  # a cold prompt: nothing reused from the last run
    try:
        engine.submit([prepared])
        t = time.perf_counter()
        while engine.active():
            engine.poll(0.0)
        return n / (time.perf_counter() - t), n
    finally:
        engine.reuse_prefix = reuse


# -- continuous against static ---------------------------------------------------------------------------


@dataclass
class Arrival:
    at: float
    req: Generation


def arrivals(n: int, interval: float, seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += float(rng.exponential(interval))
        out.append(Arrival(t, story(i, int(rng.integers(16, 97)))))
    return out


def serve(engine: NumpyEngine, schedule: list[Arrival], static: bool) -> list[float]:
    """Run the arrivals through the engine; return each request's latency (arrival to finish)."""
    start = time.perf_counter()
    waiting: list[Arrival] = []
    pending = list(schedule)
    arrived_at: dict[Hashable, float] = {}
    latencies: list[float] = []
    while pending or waiting or engine.active():
        now = time.perf_counter() - start
        while pending and pending[0].at <= now:
            a = pending.pop(0)
            waiting.append(a)
            arrived_at[a.req.key] = a.at
        can_submit = engine.free_slots() > 0 and (not static or engine.active() == 0)
        if waiting and can_submit:
            take = waiting[: engine.free_slots()]
            del waiting[: len(take)]
            engine.submit([engine.prepare(a.req) for a in take])
        if engine.active() == 0:
            if pending:
                time.sleep(max(0.0, pending[0].at - (time.perf_counter() - start)))
            continue
        for ev in engine.poll(0.0):
            if isinstance(ev, FinishEvent):
                latencies.append(time.perf_counter() - start - arrived_at[ev.key])
    return latencies


# -- peak RSS in a child process ---------------------------------------------------------------------


def rss_child(n_batch: int, max_context: int, threads: int) -> dict[str, Any]:
    """Fill every slot's context to the end; report peak RSS (VmHWM of this process: unlike
    ru_maxrss it does not carry the parent's RSS over the fork and exec)."""

    engine = NumpyEngine(n_batch=n_batch, max_context=max_context, threads=threads)
    engine.load()
    rss_loaded = engine.info()["rss_bytes"]
    words = "Tell me everything you know about the sea, the sky and the mountains. "
    reqs = []
    for i in range(n_batch):
        text = f"({i}) " + words * (max_context // 16)
        while True:
            try:
                reqs.append(engine.prepare(Generation(f"m{i}", (ChatMessage("user", text),), 10_000, SamplingParams())))
                break
            except Exception:
                text = text[: int(len(text) * 0.9)]
    engine.submit(reqs)
    totals: dict[Hashable, int] = {}
    while engine.active():
        for ev in engine.poll(0.0):
            if isinstance(ev, FinishEvent):
                totals[ev.key] = (ev.prompt_tokens or 0) + ev.completion_tokens
    info = engine.info()
    return {
        "peak_rss_bytes": _vm_hwm(),
        "kv_cache_dtype": info["kv_cache_dtype"],
        "rss_after_load_bytes": rss_loaded,
        "rss_at_end_bytes": info["rss_bytes"],
        "kv_cache_bytes": info["kv_cache_bytes"],
        "weights_bytes": info["weights_bytes"],
        "tokens_per_slot": sorted(totals.values()),
    }


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- report ------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")  # type: ignore[no-untyped-call,unused-ignore]
        blas = f"{cfg['Build Dependencies']['blas']['name']} {cfg['Build Dependencies']['blas']['version']}"
    except Exception:
        pass
    unset = os.environ.get("RKMQTT_BENCH_UNSET")
    env = f"; unset {unset}" if unset else ""
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), numpy {np.__version__}, {blas}{env}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per request in the decode runs")
    ap.add_argument("--quick", action="store_true", help="one repeat, no RSS run, a short arrival test")
    ap.add_argument("--keep-openblas-env", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="numpy_threads: BLAS threads (0: one per core)")
    ap.add_argument("--gaps", default=GAPS, help="mean seconds between arrivals, one arrival test each")
    ap.add_argument(
        "--parts", default="decode,rss,arrivals", help="which parts to run: decode (with prefill), rss, arrivals"
    )
    ap.add_argument(
        "--rss-child", nargs=3, type=int, metavar=("N_BATCH", "MAX_CONTEXT", "THREADS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child)))
        return
    repeats = 1 if args.quick else args.repeats
    parts = set(args.parts.split(","))
    print(f"machine: {machine()}")
    print(f"load average at start: {os.getloadavg()}")
    if "decode" in parts:
        decode_part(args.threads, repeats, args.new_tokens)
    if "rss" in parts and not args.quick:
        rss_part(args.threads)
    if "arrivals" in parts:
        arrivals_part(args.threads, repeats, 12 if args.quick else 24, [float(g) for g in args.gaps.split(",")])
    print(f"\nload average at end: {os.getloadavg()}")


def decode_part(threads: int, repeats: int, new_tokens: int) -> None:
    batches = [1, 2, 4, 8, 16]
    engine = NumpyEngine(n_batch=16, max_context=2048, threads=threads)
    engine.load()
    info = engine.info()
    print(f"model: {info['model_path']}; BLAS: {info['blas']}")
    decode_throughput(engine, 2, 8)  # warm up
    rates: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(repeats):
        for b in batches:
            rates[b].append(decode_throughput(engine, b, new_tokens))
    prefill = [prefill_rate(engine, 200) for _ in range(repeats)]
    engine.close()

    print()
    print(f"decode (engine only, greedy; median of {repeats})")
    print(f"{'n_batch':>8} {'aggregate tok/s':>16} {'per sequence tok/s':>19} {'vs n_batch 1':>13}   runs")
    base = statistics.median(rates[1])
    for b in batches:
        med = statistics.median(rates[b])
        runs = ", ".join(f"{r:.0f}" for r in rates[b])
        print(f"{b:>8} {med:>16.1f} {med / b:>19.1f} {med / base:>12.2f}x   [{runs}]")
    pre = statistics.median(r for r, _ in prefill)
    print(f"\nprefill: {prefill[0][1]}-token prompt, {pre:.0f} tokens/s (median of {repeats})")


def rss_part(threads: int) -> None:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", "8", "2048", str(threads), "--keep-openblas-env"],
        check=True,
        capture_output=True,
        text=True,
    )
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"\npeak RSS, n_batch 8, max_context 2048, every context filled to its end: "
        f"{rss['peak_rss_bytes'] / 1e9:.2f} GB (weights {rss['weights_bytes'] / 1e9:.2f} GB, "
        f"KV cache {rss['kv_cache_bytes'] / 1e9:.2f} GB {rss['kv_cache_dtype']}; "
        f"RSS after load {rss['rss_after_load_bytes'] / 1e9:.2f} GB, "
        f"at the end {rss['rss_at_end_bytes'] / 1e9:.2f} GB; tokens per slot {rss['tokens_per_slot']})"
    )


def arrivals_part(threads: int, repeats: int, n_req: int, gaps: list[float]) -> None:
    """The same arrival schedule served both ways, at each load (mean gap between arrivals)."""
    engine = NumpyEngine(n_batch=8, max_context=1024, threads=threads)
    engine.load()
    print(
        f"\nstaggered arrivals ({n_req} requests, Poisson, 16-96 new tokens, n_batch 8; "
        f"median of {repeats} runs of the mean latency, same schedules for both)"
    )
    for gap in gaps:
        cont: list[float] = []
        stat: list[float] = []
        for rep in range(repeats):
            schedule = arrivals(n_req, gap, seed=rep)
            for static in (False, True) if rep % 2 == 0 else (True, False):
                lat = serve(engine, schedule, static)
                (stat if static else cont).append(statistics.mean(lat))
        c, s = statistics.median(cont), statistics.median(stat)
        print(f"  mean gap {gap} s:")
        print(f"    continuous batching: {c:.2f} s   runs {[round(x, 2) for x in cont]}")
        print(f"    static batching:     {s:.2f} s   runs {[round(x, 2) for x in stat]}")
        print(f"    continuous is {100 * (1 - c / s):.0f}% lower")
    engine.close()


if __name__ == "__main__":
    main()
