"""What to do once the broker grants a subscription (paho network thread: `acked`; any thread:
`then`). A subscribe made on another thread can be acknowledged before `subscribe` has returned its
mid, so a SUBACK nobody waits for yet is kept, a few at most."""

from __future__ import annotations

import threading
from collections.abc import Callable

from paho.mqtt.reasoncodes import ReasonCode

KEEP = 32  # SUBACKs kept for a `then` that has not come yet (most never come: nobody waits for them)


class Subacks:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # never held while calling paho or a callback
        self._waiting: dict[int, Callable[[list[ReasonCode]], None]] = {}
        self._early: dict[int, list[ReasonCode]] = {}

    def then(self, mid: int, fn: Callable[[list[ReasonCode]], None]) -> None:
        """Call `fn(reason codes)` when the SUBACK of `mid` comes (at once if it came already)."""
        with self._lock:
            codes = self._early.pop(mid, None)
            if codes is None:
                self._waiting[mid] = fn
                return
        fn(codes)

    def acked(self, mid: int, codes: list[ReasonCode]) -> None:
        with self._lock:
            fn = self._waiting.pop(mid, None)
            if fn is None:
                self._early[mid] = codes
                while len(self._early) > KEEP:
                    del self._early[next(iter(self._early))]
        if fn is not None:
            fn(codes)

    def clear(self) -> None:
        """The connection is gone: no SUBACK of it will come."""
        with self._lock:
            self._waiting.clear()
            self._early.clear()
