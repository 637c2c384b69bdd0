"""Log lines bounded per second (any thread): lines of one kind about one client — refusals, cancels
of unknown ids, bad cancels — pass a few per window; the rest are counted and summarised in one line
when the window ends ("… and 4,998 more refusals of client kitchen in the last 10 s"). Summaries are
written by the next call or by a timer thread; no lock of ours is held while logging."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 10.0
PER_WINDOW = 5  # lines of one kind and client written per window before the rest are counted
MAX_CLIENTS = 32  # clients tracked per kind and window; beyond, they count together as "other clients"


@dataclass
class _Window:
    logger: logging.Logger
    level: int
    start: float
    lines: int = 0
    held: int = 0


class LogBudget:
    def __init__(
        self,
        window_s: float = WINDOW_S,
        per_window: int = PER_WINDOW,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.per_window = per_window
        self.max_clients = max_clients
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str | None], _Window] = {}
        self._timer: threading.Timer | None = None

    def allow(self, logger: logging.Logger, level: int, kind: str, client: str | None = None) -> bool:
        """Whether to write this line now; False means it was counted for the window's summary."""
        now = self.clock()
        with self._lock:
            due = self._take_due(now)
            key = (kind, client)
            w = self._windows.get(key)
            if w is None:
                clients = sum(1 for k, _ in self._windows if k == kind)
                if client is not None and clients >= self.max_clients:
                    key = (kind, None)
                    w = self._windows.get(key)
                if w is None:
                    w = self._windows[key] = _Window(logger, level, now)
            w.lines += 1
            allowed = w.lines <= self.per_window
            if not allowed:
                w.held += 1
                self._arm(w.start + self.window_s - now)
        self._write(due, now)
        return allowed

    def flush(self) -> None:
        """Write every pending summary now (at shutdown)."""
        now = self.clock()
        with self._lock:
            due = self._take_due(now, every=True)
        self._write(due, now)

    def _take_due(self, now: float, every: bool = False) -> list[tuple[str, str | None, _Window]]:
        due = []
        for key, w in list(self._windows.items()):
            if every or now - w.start >= self.window_s:
                del self._windows[key]
                if w.held:
                    due.append((key[0], key[1], w))
        return due

    def _arm(self, delay: float) -> None:
        if self._timer is not None and self._timer.is_alive():
            return
        self._timer = threading.Timer(max(0.0, delay) + 0.01, self._on_timer)
        self._timer.name = "rkmqtt-logbudget"
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        now = self.clock()
        with self._lock:
            self._timer = None
            due = self._take_due(now)
            pending = [w.start + self.window_s - now for w in self._windows.values() if w.held]
            if pending:
                self._arm(min(pending))
        self._write(due, now)

    def _write(self, due: list[tuple[str, str | None, _Window]], now: float) -> None:
        for kind, client, w in due:
            who = f"client {client}" if client is not None else "other clients"
            seconds = max(1.0, min(now - w.start, self.window_s))
            w.logger.log(w.level, "… and %s more %s of %s in the last %.0f s", f"{w.held:,}", kind, who, seconds)


#: The budget of the running process: one for every module, so that one kind has one count.
BUDGET = LogBudget()


def limited(logger: logging.Logger, level: int, kind: str, client: str | None = None) -> bool:
    """`BUDGET.allow(...)`: whether to write a line of `kind` about `client` now."""
    return BUDGET.allow(logger, level, kind, client)
