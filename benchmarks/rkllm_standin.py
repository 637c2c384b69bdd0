"""Benchmark: RKLLM batching with the stand-in runtime's RK3588 timing model, n_batch 1 against 4,
through the bridge's scheduler and RKLLM engine without MQTT (main thread; the scenario and the
model's prediction: docs/benchmarks.md, "The stand-in against its own model").

    .venv/bin/python benchmarks/rkllm_standin.py [--alpha 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.standin.build import build_standin  # noqa: E402

from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams  # noqa: E402
from rkmqtt.engines.rkllm.engine import RkllmEngine  # noqa: E402
from rkmqtt.mqtt.outbox import Outbox  # noqa: E402
from rkmqtt.mqtt.replies import MqttRoute, Replies  # noqa: E402
from rkmqtt.mqtt.sink import MqttSink  # noqa: E402
from rkmqtt.protocol import OkReply  # noqa: E402
from rkmqtt.sched.finals import Finals  # noqa: E402
from rkmqtt.sched.loop import Scheduler, SchedulerConfig  # noqa: E402
from rkmqtt.sched.policy import CoreConfig  # noqa: E402
from rkmqtt.sched.request import Request, RequestKey  # noqa: E402
from rkmqtt.settings import Settings  # noqa: E402

USERS = 4
PROMPT_TOKENS = 100
REPLY_TOKENS = 33
PREFILL_MS_PER_TOKEN = 3.0
DECODE_MS = 2000.0 / REPLY_TOKENS


@dataclass
class Row:
    n_batch: int
    model_latency_s: float
    latency_s: float
    model_throughput: float
    throughput: float
    model_ttft_s: float
    ttft_s: float
    latency_dev_pct: float
    throughput_dev_pct: float


def model_figures(n_batch: int, alpha: float) -> tuple[float, float, float]:
    """(average latency s, throughput req/s, average time to first token s) the timing model allows."""
    prefill = PROMPT_TOKENS * PREFILL_MS_PER_TOKEN / 1000
    ends: list[float] = []
    ttfts: list[float] = []
    t = 0.0
    for start in range(0, USERS, n_batch):
        b = min(n_batch, USERS - start)
        # padding fills a partial batch (rkllm_pad_batch): the dummy prompt is 1 token; not used here
        batch_prefill = prefill * b
        decode = REPLY_TOKENS * DECODE_MS * (1 + alpha * (b - 1)) / 1000
        ttfts += [t + batch_prefill] * b
        t += batch_prefill + decode
        ends += [t] * b
    return statistics.mean(ends), USERS / max(ends), statistics.mean(ttfts)


def prompt_for(user: int) -> str:
    head = f"user{user} asks @len={REPLY_TOKENS} "
    text = (head + "lorem ipsum dolor sit amet " * 20)[: PROMPT_TOKENS * 4]
    assert len(text.encode()) == PROMPT_TOKENS * 4
    return text


def run_once(lib: Path, model: Path, n_batch: int) -> tuple[float, float, float]:
    settings = Settings(engine="rkllm", model=str(model), rkllm_library=str(lib), n_batch=n_batch, max_new_tokens=1024)
    engine = RkllmEngine(settings)
    engine.load()
    outbox = Outbox(100_000)
    config = SchedulerConfig(
        core=CoreConfig(
            n_batch=n_batch,
            continuous=False,
            max_queue=64,
            batch_window_s=settings.batch_window_ms / 1000,
            dedup_window_s=60,
        ),
        stats_interval_s=3600,
    )
    sink = MqttSink(outbox, Replies(Finals(engine.model_name)))
    scheduler = Scheduler(engine, config)
    scheduler.start()
    t0 = time.monotonic()
    for u in range(USERS):
        key = RequestKey(f"user{u}", f"q{u}")
        gen = Generation(
            key=key,
            messages=(ChatMessage("user", prompt_for(u)),),
            max_new_tokens=256,
            sampling=SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repeat_penalty=1.1),
        )
        scheduler.submit(Request(key, MqttRoute(f"bench/reply/{key}", sink, stream=False), gen, arrival=t0))
    replies: list[OkReply] = []
    last = t0
    deadline = t0 + 60
    while len(replies) < USERS and time.monotonic() < deadline:
        msg = outbox.get(0.5)
        if msg is None or msg.droppable:
            continue
        data = json.loads(msg.payload)
        if data.get("status") != "ok":
            raise SystemExit(f"request failed: {data}")
        replies.append(OkReply.model_validate(data))
        last = time.monotonic()
    scheduler.shutdown(0)
    scheduler.join(5)
    engine.close()
    if len(replies) < USERS:
        raise SystemExit("timed out waiting for replies")
    for r in replies:
        assert r.usage.completion_tokens == REPLY_TOKENS, r
        assert r.text.startswith(f"user{r.id[1:]} asks"), r.text[:40]  # its own text
    latency = statistics.mean(r.timing.total_ms for r in replies) / 1000
    ttft = statistics.mean(r.timing.ttft_ms or 0.0 for r in replies) / 1000
    return latency, USERS / (last - t0), ttft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.10, help="assumed decode cost growth per extra slot")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (the mean is shown)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    os.environ.update(
        {
            "RKLLM_STANDIN_PREFILL_MS_PER_TOKEN": str(PREFILL_MS_PER_TOKEN),
            "RKLLM_STANDIN_DECODE_MS": repr(DECODE_MS),
            "RKLLM_STANDIN_BATCH_ALPHA": str(args.alpha),
            "RKLLM_STANDIN_TOKEN_BYTES": "3",
        }
    )
    os.environ.pop("RKLLM_STANDIN_ZERO_DELAY", None)
    with tempfile.TemporaryDirectory(prefix="rkllm-bench-") as tmp:
        lib = build_standin("1.3", Path(tmp) / "librkllmrt.so")
        model = Path(tmp) / "qwen2.5-1.5b-w8a8.rkllm"
        model.write_bytes(b"stand-in model\n")
        rows: list[Row] = []
        for n_batch in (1, 4):
            runs = [run_once(lib, model, n_batch) for _ in range(args.repeat)]
            lat = statistics.mean(r[0] for r in runs)
            thr = statistics.mean(r[1] for r in runs)
            ttft = statistics.mean(r[2] for r in runs)
            m_lat, m_thr, m_ttft = model_figures(n_batch, args.alpha)
            rows.append(
                Row(
                    n_batch,
                    m_lat,
                    lat,
                    m_thr,
                    thr,
                    m_ttft,
                    ttft,
                    100 * (lat - m_lat) / m_lat,
                    100 * (thr - m_thr) / m_thr,
                )
            )

    print(
        f"RKLLM stand-in, ABI 1.3, {USERS} users at once; prefill {PREFILL_MS_PER_TOKEN} ms/token x "
        f"{PROMPT_TOKENS} tokens, decode {DECODE_MS:.1f} ms x (1 + {args.alpha} x (b - 1)) per step, "
        f"{REPLY_TOKENS} tokens per reply; {args.repeat} run(s) each"
    )
    print()
    print(
        "| n_batch | avg latency (model) | avg latency (measured) | dev | throughput (model) "
        "| throughput (measured) | dev | avg TTFT (model) | avg TTFT (measured) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.n_batch} | {r.model_latency_s:.3f} s | {r.latency_s:.3f} s | {r.latency_dev_pct:+.1f} % "
            f"| {r.model_throughput:.3f} req/s | {r.throughput:.3f} req/s | {r.throughput_dev_pct:+.1f} % "
            f"| {r.model_ttft_s:.3f} s | {r.ttft_s:.3f} s |"
        )
    ok = all(abs(r.latency_dev_pct) <= 5 and abs(r.throughput_dev_pct) <= 5 for r in rows)
    print()
    print(f"within 5 % of the timing model: {'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
