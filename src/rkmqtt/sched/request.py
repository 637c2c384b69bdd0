"""The request lifecycle inside the bridge (pure data; any thread until submitted).

A `Request` is built by the paho network thread (or the HTTP server) from a validated wire payload,
handed to the scheduler thread through its inbox, and from then on touched only there: the
scheduling core (`core.py`) moves it through the states below, and every terminal transition goes
through its one `finish()`, which turns the request into an `Outcome`.

Names: `protocol.RequestPayload` is what arrives on the wire, `engines.base.Generation` is what an
engine sees, and `Request` is the bridge's mutable record of one accepted request; its one identity
is its `RequestKey` (client, id), which is also the key the engine knows it by.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from rkmqtt.engines.base import Generation, Prepared
from rkmqtt.protocol import ErrorCode, FinalReply, FinishReason


class RequestKey(NamedTuple):
    """Ids are unique per client, not globally."""

    client: str
    id: str

    def __str__(self) -> str:
        return f"{self.client}/{self.id}"


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


class ReplySink(Protocol):
    """Where the replies of a request that did not come over MQTT go (the HTTP API), instead of
    the outbox. Called on the scheduler thread: an implementation only hands the (immutable) data
    to its own thread, thread-safely, and never blocks."""

    def chunk(self, seq: int, text: str) -> None: ...

    def final(self, reply: FinalReply) -> None: ...


@dataclass(frozen=True)
class Route:
    """Where a request's replies go. The core only compares routes (a retried id from another
    reply target is told `duplicate_id`); `replies.py` turns them into topics and properties, or
    the scheduler hands them to the route's `sink`."""

    topic: str  # the final reply's topic; stream chunks go to `<topic>/stream` (with a sink: a label)
    correlation: bytes | None = None  # MQTT 5 Correlation Data, echoed on every reply
    stream: bool = True
    sink: ReplySink | None = None  # set: chunks and the final reply go here, not to MQTT


@dataclass
class Request:
    """One accepted request, mutable, owned by the scheduler thread once submitted."""

    key: RequestKey
    route: Route
    gen: Generation
    arrival: float  # monotonic seconds
    deadline: float | None = None  # monotonic; not started by then -> expired
    prepared: Prepared | None = None  # the engine's handle, from `prepare` until the request ends
    state: RequestState = RequestState.WAITING
    started: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    seq: int = 0
    parts: list[str] = field(default_factory=list)
    slot: int | None = None  # the engine's slot, once it says (not for a cancelled one)
    batch_size: int = 0  # the largest batch it ran in
    perf: dict[str, float] = field(default_factory=dict)
    journal_seq: int | None = None  # its row in the request journal, when there is one

    @property
    def client(self) -> str:
        return self.key.client

    @property
    def id(self) -> str:
        return self.key.id

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class Outcome:
    """How a request ended: made once, by the core's `finish()`, and answered once."""

    request: Request
    state: RequestState
    finished: float  # monotonic seconds
    error: tuple[ErrorCode, str] | None = None  # set exactly when state is FINISHED_ERROR
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None
