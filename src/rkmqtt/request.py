"""The request lifecycle inside the bridge (pure data).

A `Job` is built by the paho network thread from a validated wire `Request`, handed to the
scheduler through its inbox, and from then on touched only by the scheduler thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rkmqtt.engines.base import GenerationRequest
from rkmqtt.protocol import ErrorCode, FinishReason


class RequestState(enum.IntEnum):
    """Ordered: every state after RUNNING is a finished one."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_CANCELLED = 4
    FINISHED_ERROR = 5

    def is_finished(self) -> bool:
        return self >= RequestState.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestState, FinishReason] = {
    RequestState.FINISHED_STOPPED: "stop",
    RequestState.FINISHED_LENGTH: "length",
    RequestState.FINISHED_CANCELLED: "cancelled",
}


@dataclass
class Job:
    """One accepted request, mutable, owned by the scheduler once submitted."""

    client: str
    id: str
    reply_topic: str
    stream: bool
    correlation: bytes | None
    gen: GenerationRequest
    arrival: float  # monotonic seconds
    deadline: float | None = None  # monotonic; not started by then -> expired
    state: RequestState = RequestState.WAITING
    started: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    seq: int = 0
    parts: list[str] = field(default_factory=list)
    slot: int | None = None  # the engine's slot, once it says (not for a cancelled one)
    batch_size: int = 0
    error: tuple[ErrorCode, str] | None = None

    @property
    def key(self) -> str:
        return self.gen.key

    @property
    def stream_topic(self) -> str:
        return f"{self.reply_topic}/stream"

    @property
    def text(self) -> str:
        return "".join(self.parts)


def job_key(client: str, request_id: str) -> str:
    """The scheduler's identity of a request: ids are unique per client, not globally."""
    return f"{client}/{request_id}"
