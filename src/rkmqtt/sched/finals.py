"""An `Outcome` as the wire's final reply, `OkReply` or `ErrorReply`: text, usage, timing, batch
(any thread; pure). The same reply for every transport: MQTT publishes it, HTTP translates it."""

from __future__ import annotations

from rkmqtt.protocol import (
    BatchInfo,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    FinalReply,
    OkReply,
    Timing,
    ToolCall,
    Usage,
)
from rkmqtt.sched.request import Outcome, Request


class Finals:
    def __init__(self, model_name: str, node: str | None = None) -> None:
        self.model_name = model_name
        self.node = node  # named in every final reply: which bridge answered

    def reply(self, outcome: Outcome) -> FinalReply:
        req = outcome.request
        if outcome.error is not None:
            return self.error(req.id, *outcome.error)
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
            tool_calls=[ToolCall.model_validate(c, strict=False) for c in req.tool_calls],
        )

    def error(self, request_id: str, code: ErrorCode, message: str) -> ErrorReply:
        return ErrorReply(id=request_id, error=ErrorBody(code=code, message=message), node=self.node)


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
