"""Per-client waiting queues served round-robin (scheduler thread only; no locking).

Fairness rule: a client that floods requests cannot delay another client's single request
by more than one batch. Each `take()` serves at most one request per client per round,
starting from the client that has waited longest for service; clients just served move to
the back of the rotation.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator

from rkmqtt.request import Job


class FairQueue:
    def __init__(self) -> None:
        # Order of the keys is the round-robin order: first = next to be served.
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Job]:
        for q in self._queues.values():
            yield from q

    def push(self, job: Job) -> None:
        q = self._queues.get(job.client)
        if q is None:
            q = self._queues[job.client] = deque()
        q.append(job)
        self._size += 1

    def count(self, client: str) -> int:
        q = self._queues.get(client)
        return len(q) if q else 0

    def pop_newest_of_largest(self, more_than: int) -> Job | None:
        """Remove and return the newest job of the client with the most waiting jobs, if it has
        more than `more_than`; None otherwise."""
        if not self._queues:
            return None
        client, q = max(self._queues.items(), key=lambda kv: len(kv[1]))
        if len(q) <= more_than:
            return None
        job = q.pop()
        self._size -= 1
        if not q:
            del self._queues[client]
        return job

    def oldest_arrival(self) -> float | None:
        return min((q[0].arrival for q in self._queues.values()), default=None)

    def remove(self, client: str, request_id: str) -> Job | None:
        q = self._queues.get(client)
        if not q:
            return None
        for job in q:
            if job.id == request_id:
                q.remove(job)
                self._size -= 1
                if not q:
                    del self._queues[client]
                return job
        return None

    def remove_where(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Remove and return every waiting job for which `pred` holds (expiry, shutdown)."""
        out: list[Job] = []
        for client in list(self._queues):
            q = self._queues[client]
            keep = deque(j for j in q if not pred(j))
            out.extend(j for j in q if pred(j))
            if keep:
                self._queues[client] = keep
            else:
                del self._queues[client]
        self._size -= len(out)
        return out

    def take(self, n: int, key: Callable[[Job], Hashable] | None = None) -> list[Job]:
        """Up to `n` jobs, one per client per round. With `key`, only jobs whose key equals the
        key of the first job taken (a static batch shares sampling parameters); a client whose
        head does not match keeps its place at the front for the next batch."""
        taken: list[Job] = []
        batch_key: Hashable = None
        served: list[str] = []
        while len(taken) < n:
            progress = False
            for client in list(self._queues):
                if len(taken) >= n:
                    break
                q = self._queues[client]
                head = q[0]
                if key is not None:
                    k = key(head)
                    if not taken:
                        batch_key = k
                    elif k != batch_key:
                        continue
                taken.append(q.popleft())
                self._size -= 1
                progress = True
                if client not in served:
                    served.append(client)
                if not q:
                    del self._queues[client]
            if not progress:
                break
        for client in served:
            if client in self._queues:
                self._queues.move_to_end(client)
        return taken
