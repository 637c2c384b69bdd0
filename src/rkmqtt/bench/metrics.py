"""Per-request records and per-run figures (any thread; pure): latency from publishing to the final
reply, time to first token, the bridge's own queueing delay; a run's rates over its span, from the
first request sent to the last final reply (docs/benchmarks.md, "What is measured")."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass
class RequestRecord:
    device: int
    seq: int
    id: str
    prompt_index: int
    sent: float
    first_token: float | None = None
    done: float | None = None
    status: str = "pending"  # ok | error | timeout | pending
    error_code: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    queued_ms: float | None = None
    server_ttft_ms: float | None = None
    server_total_ms: float | None = None
    batch_size: int | None = None
    finish_reason: str | None = None
    chunks: int = 0  # stream messages received
    max_seq: int = -1  # highest stream sequence number seen (gaps: max_seq + 1 - chunks)

    @property
    def latency_ms(self) -> float | None:
        return None if self.done is None else (self.done - self.sent) * 1000.0

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.sent) * 1000.0

    @property
    def stream_gaps(self) -> int:
        return max(0, self.max_seq + 1 - self.chunks)

    ROW_COLUMNS: ClassVar[tuple[str, ...]] = (
        "device",
        "seq",
        "id",
        "prompt_index",
        "status",
        "error_code",
        "sent_ms",
        "queued_ms",
        "ttft_ms",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "batch_size",
        "finish_reason",
        "stream_messages",
        "stream_gaps",
    )

    def row(self, start: float) -> dict[str, Any]:
        """This request as one row of the per-request file (`ROW_COLUMNS`); `sent_ms` counts from
        `start`."""
        return {
            "device": self.device,
            "seq": self.seq,
            "id": self.id,
            "prompt_index": self.prompt_index,
            "status": self.status,
            "error_code": self.error_code,
            "sent_ms": _r((self.sent - start) * 1000.0, 1),
            "queued_ms": _r(self.queued_ms, 1),
            "ttft_ms": _r(self.ttft_ms, 1),
            "latency_ms": _r(self.latency_ms, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "batch_size": self.batch_size,
            "finish_reason": self.finish_reason,
            "stream_messages": self.chunks,
            "stream_gaps": self.stream_gaps,
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class RunMetrics:
    """The figures of one run (one engine, one n_batch, one mode)."""

    requests: int
    ok: int
    errors: int
    error_share: float
    errors_by_code: dict[str, int]
    span_s: float
    requests_per_s: float
    tokens_per_s: float
    completion_tokens: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    latency_ms_mean: float | None
    ttft_ms_p50: float | None
    ttft_ms_p95: float | None
    queued_ms_p50: float | None
    queued_ms_mean: float | None
    mean_batch_size: float | None
    stream_messages: int
    stream_messages_per_s: float
    stream_gaps: int
    extra: dict[str, Any] = field(default_factory=dict)
    # share of one core per process over the measured part: bench, bridge, broker (when known)
    cpu: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: Sequence[RequestRecord]) -> RunMetrics:
    """The run's figures from its requests' records (warm-up requests excluded by the caller)."""
    ok = [r for r in records if r.status == "ok"]
    bad = [r for r in records if r.status != "ok"]
    codes = Counter(r.error_code or r.status for r in bad)
    starts = [r.sent for r in records]
    ends = [r.done for r in records if r.done is not None]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    tokens = sum(r.completion_tokens for r in ok)
    lat = [x for r in ok if (x := r.latency_ms) is not None]
    ttft = [x for r in ok if (x := r.ttft_ms) is not None]
    queued = [r.queued_ms for r in ok if r.queued_ms is not None]
    sizes = [float(r.batch_size) for r in ok if r.batch_size is not None]
    chunks = sum(r.chunks for r in records)
    return RunMetrics(
        requests=len(records),
        ok=len(ok),
        errors=len(bad),
        error_share=round(len(bad) / len(records), 4) if records else 0.0,
        errors_by_code=dict(codes),
        span_s=round(span, 6),
        requests_per_s=round(len(ok) / span, 3) if span > 0 else 0.0,
        tokens_per_s=round(tokens / span, 2) if span > 0 else 0.0,
        completion_tokens=tokens,
        latency_ms_p50=_r(percentile(lat, 50)),
        latency_ms_p95=_r(percentile(lat, 95)),
        latency_ms_p99=_r(percentile(lat, 99)),
        latency_ms_mean=_r(_mean(lat)),
        ttft_ms_p50=_r(percentile(ttft, 50)),
        ttft_ms_p95=_r(percentile(ttft, 95)),
        queued_ms_p50=_r(percentile(queued, 50)),
        queued_ms_mean=_r(_mean(queued)),
        mean_batch_size=_r(_mean(sizes)),
        stream_messages=chunks,
        stream_messages_per_s=round(chunks / span, 1) if span > 0 else 0.0,
        stream_gaps=sum(r.stream_gaps for r in records),
    )


def median_of_runs(runs: Sequence[RunMetrics]) -> RunMetrics:
    """One figure per field: the median over repeated runs of the same point (counts: summed)."""
    if len(runs) == 1:
        return runs[0]

    def med(name: str) -> float | None:
        vals = [float(v) for r in runs if (v := getattr(r, name)) is not None]
        m = percentile(vals, 50)
        return None if m is None else round(m, 3)

    codes: Counter[str] = Counter()
    for r in runs:
        codes.update(r.errors_by_code)
    requests = sum(r.requests for r in runs)
    errors = sum(r.errors for r in runs)
    return RunMetrics(
        requests=requests,
        ok=sum(r.ok for r in runs),
        errors=errors,
        error_share=round(errors / requests, 4) if requests else 0.0,
        errors_by_code=dict(codes),
        span_s=med("span_s") or 0.0,
        requests_per_s=med("requests_per_s") or 0.0,
        tokens_per_s=med("tokens_per_s") or 0.0,
        completion_tokens=sum(r.completion_tokens for r in runs),
        latency_ms_p50=med("latency_ms_p50"),
        latency_ms_p95=med("latency_ms_p95"),
        latency_ms_p99=med("latency_ms_p99"),
        latency_ms_mean=med("latency_ms_mean"),
        ttft_ms_p50=med("ttft_ms_p50"),
        ttft_ms_p95=med("ttft_ms_p95"),
        queued_ms_p50=med("queued_ms_p50"),
        queued_ms_mean=med("queued_ms_mean"),
        mean_batch_size=med("mean_batch_size"),
        stream_messages=sum(r.stream_messages for r in runs),
        stream_messages_per_s=med("stream_messages_per_s") or 0.0,
        stream_gaps=sum(r.stream_gaps for r in runs),
        extra={"repeats": len(runs)},
        cpu=_median_cpu(runs),
    )


def _median_cpu(runs: Sequence[RunMetrics]) -> dict[str, float]:
    names = sorted({n for r in runs for n in r.cpu})
    out: dict[str, float] = {}
    for n in names:
        m = percentile([r.cpu[n] for r in runs if n in r.cpu], 50)
        if m is not None:
            out[n] = round(m, 3)
    return out
