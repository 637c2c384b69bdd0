"""The one place that turns outcomes, stream chunks and refusals into MQTT messages: the wire
model, its JSON, the topic, QoS and Correlation Data (any thread; pure).

The scheduler thread uses it for what the core returns; the paho network thread for requests it
refuses before they reach the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from rkmqtt.mqtt.outbox import Outgoing
from rkmqtt.protocol import (
    BatchInfo,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    FinalReply,
    OkReply,
    StreamChunk,
    Timing,
    Usage,
)
from rkmqtt.sched.policy import Chunk
from rkmqtt.sched.request import Outcome, Request, Route
from rkmqtt.topics import Topics

FINAL_QOS = 1
STREAM_QOS = 0


@dataclass(frozen=True)
class Refusal:
    """A request refused before it became a `Request` (bad payload, limits, rate)."""

    id: str
    route: Route
    code: ErrorCode
    message: str


class Replies:
    def __init__(self, model_name: str, node: str | None = None) -> None:
        self.model_name = model_name
        self.node = node  # named in every final reply: which bridge answered

    # -- wire models ----------------------------------------------------------------------------
    def reply(self, outcome: Outcome) -> FinalReply:
        req = outcome.request
        if outcome.error is not None:
            code, message = outcome.error
            return ErrorReply(id=req.id, error=ErrorBody(code=code, message=message), node=self.node)
        reason = outcome.state.finish_reason
        assert reason is not None
        return OkReply(
            id=req.id,
            text=req.text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=req.prompt_tokens, completion_tokens=req.completion_tokens),
            timing=timing(req, outcome.finished),
            batch=BatchInfo(size=req.batch_size, slot=req.slot),
            model=self.model_name,
            warnings=list(outcome.warnings),
            node=self.node,
        )

    # -- MQTT messages ----------------------------------------------------------------------------
    def final(self, outcome: Outcome, route: Route | None = None) -> Outgoing:
        """The final reply of `outcome`, to its own route or (a retried id) to `route`."""
        route = route or outcome.request.route
        return _final(route, self.reply(outcome).model_dump_json().encode())

    def chunk(self, chunk: Chunk) -> Outgoing:
        route = chunk.request.route
        payload = StreamChunk(id=chunk.request.id, seq=chunk.seq, text=chunk.text).model_dump_json().encode()
        return Outgoing(Topics.stream_of(route.topic), payload, STREAM_QOS, False, route.correlation, droppable=True)

    def refusal(self, r: Refusal) -> Outgoing:
        reply = ErrorReply(id=r.id, error=ErrorBody(code=r.code, message=r.message), node=self.node)
        return _final(r.route, reply.model_dump_json().encode())


def _final(route: Route, payload: bytes) -> Outgoing:
    return Outgoing(route.topic, payload, FINAL_QOS, False, route.correlation)


def timing(req: Request, now: float) -> Timing:
    started = req.started if req.started is not None else now
    # Tokens per second from the first token to the last (prefill excluded); with one token there
    # is no interval, so the time since the batch started stands in.
    n = req.completion_tokens
    if req.first_token is not None and req.last_token is not None and n > 1:
        gen_s = (req.last_token - req.first_token) * n / (n - 1)
    else:
        gen_s = now - started
    prefill, decode = req.perf.get("prefill_ms"), req.perf.get("decode_ms")
    return Timing(
        queued_ms=round((started - req.arrival) * 1000, 2),
        ttft_ms=None if req.first_token is None else round((req.first_token - req.arrival) * 1000, 2),
        total_ms=round((now - req.arrival) * 1000, 2),
        tokens_per_s=round(n / gen_s, 2) if gen_s > 0 else 0.0,
        prefill_ms=None if prefill is None else round(prefill, 2),
        decode_ms=None if decode is None else round(decode, 2),
    )
