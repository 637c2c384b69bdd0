"""Per-client waiting queues served by start-time fair queuing (scheduler thread only; no locking):
a client that floods runs ahead of itself, not of the others (docs/architecture.md, "The
scheduling policy")."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from rkmqtt.sched.request import Request, RequestKey

_PRUNE_AT = 10_000  # clients whose last tag is remembered before the idle ones are forgotten


@dataclass(frozen=True)
class _Entry:
    tag: float  # virtual start time
    seq: int  # arrival order, for ties
    req: Request


class FairQueue:
    def __init__(self) -> None:
        self._queues: dict[str, deque[_Entry]] = {}
        self._next_tag: dict[str, float] = {}  # per client: the tag its next request gets, at least
        self._served: dict[str, int] = {}  # per client: when it was last served (a pick counter)
        self._picks = 0
        self._vt = 0.0  # virtual time: the tag of the request taken last
        self._seq = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Request]:
        for q in list(self._queues.values()):
            yield from (e.req for e in q)

    def push(self, req: Request) -> None:
        client = req.client
        tag = max(self._vt, self._next_tag.get(client, 0.0))
        self._next_tag[client] = tag + 1.0
        self._seq += 1
        self._queues.setdefault(client, deque()).append(_Entry(tag, self._seq, req))
        self._size += 1

    def count(self, client: str) -> int:
        q = self._queues.get(client)
        return len(q) if q else 0

    def newest_of_largest(self, more_than: int) -> Request | None:
        """The newest request of the client with the most waiting, if it has more than `more_than`."""
        if not self._queues:
            return None
        q = max(self._queues.values(), key=len)
        return q[-1].req if len(q) > more_than else None

    def oldest_arrival(self) -> float | None:
        return min((q[0].req.arrival for q in self._queues.values()), default=None)

    def remove(self, key: RequestKey) -> Request | None:
        q = self._queues.get(key.client)
        if not q:
            return None
        for i, entry in enumerate(q):
            if entry.req.key == key:
                del q[i]
                self._size -= 1
                if i == len(q):  # it was the newest: the client's next request takes its tag
                    self._next_tag[key.client] = entry.tag
                if not q:
                    del self._queues[key.client]
                return entry.req
        return None

    def take(self, n: int, key: Callable[[Request], Hashable] | None = None) -> list[Request]:
        """Up to `n` requests, lowest tag first. With `key`, only requests whose key equals the key
        of the first one taken (a static batch shares sampling parameters); a client whose head
        does not match keeps its place for the next batch."""
        taken: list[Request] = []
        batch_key: Hashable = None
        skipped: set[str] = set()
        while len(taken) < n:
            heads = [
                (q[0].tag, self._served.get(client, 0), q[0].seq, client)
                for client, q in self._queues.items()
                if client not in skipped
            ]
            if not heads:
                break
            client = min(heads)[3]
            q = self._queues[client]
            entry = q[0]
            if key is not None:
                k = key(entry.req)
                if not taken:
                    batch_key = k
                elif k != batch_key:
                    skipped.add(client)
                    continue
            q.popleft()
            self._size -= 1
            if not q:
                del self._queues[client]
            self._vt = max(self._vt, entry.tag)
            self._picks += 1
            self._served[client] = self._picks
            taken.append(entry.req)
        if len(self._next_tag) > _PRUNE_AT:  # an idle client behind the virtual time starts there anyway
            self._next_tag = {c: t for c, t in self._next_tag.items() if t > self._vt or c in self._queues}
            self._served = {c: n for c, n in self._served.items() if c in self._next_tag}
        return taken
