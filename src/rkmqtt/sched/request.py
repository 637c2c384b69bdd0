"""The request lifecycle (pure data): a `Request` from admission to its one `Outcome`, the `Route`
its replies take and the transport's `ReplySink` that delivers them.

Built on a door's thread (paho's, the HTTP event loop) by `admission.py`; once submitted, touched
only on the scheduler thread. Its one identity, `RequestKey` (client, id), is also the engine's key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from rkmqtt.engines.base import Generation, Prepared
from rkmqtt.protocol import ErrorCode, FinishReason


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


@dataclass(frozen=True)
class Chunk:
    """A piece of a streaming request's text, numbered from 0."""

    request: Request
    seq: int
    text: str


class ReplySink(Protocol):
    """A transport's way out for replies (MQTT's outbox, one HTTP exchange's queue). Called on the
    scheduler thread: an implementation hands the data to its own thread and never blocks."""

    def chunk(self, chunk: Chunk) -> None: ...

    def final(self, outcome: Outcome) -> None:
        """The request's one final reply."""

    def repeat(self, outcome: Outcome, retry: Request) -> None:
        """A finished id retried: its final reply again, on the retry's route."""

    def ignored(self, retry: Request) -> None:
        """A retry of an id in flight, on the same route: nothing to answer."""


class Route(Protocol):
    """Where a request's replies go, in its transport's terms, and the sink that delivers them.

    Each transport has its own route type. Equal routes are the same reply target: the core answers
    a retried id that comes from another target `duplicate_id`, and ignores one from the same."""

    @property
    def sink(self) -> ReplySink: ...

    @property
    def stream(self) -> bool:
        """Whether the text is wanted as it comes (chunks), not only in the final reply."""


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
    tool_calls: tuple[dict[str, Any], ...] = ()  # the engine's structured calls (`FinishEvent.tool_calls`)

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
    """How a request ended: made once, by the core's `_finish()`, and answered once."""

    request: Request
    state: RequestState
    finished: float  # monotonic seconds
    error: tuple[ErrorCode, str] | None = None  # set exactly when state is FINISHED_ERROR
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None
