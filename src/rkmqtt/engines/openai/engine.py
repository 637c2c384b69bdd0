"""The openai engine as the scheduler sees it (the scheduler thread; `load` and `close` on main).
Nothing here touches the network: requests go to the worker's thread, whose events wait in a queue
for `poll()`; no free slots while the server is down (docs/architecture.md, "The openai engine")."""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from rkmqtt.engines.base import Capabilities, Engine, EngineEvent, ErrorEvent, FinishEvent, Prepared
from rkmqtt.errors import ConfigError
from rkmqtt.settings import Settings

from .body import request_body
from .config import PROBE_TIMEOUT_S, UpstreamConfig
from .link import UpstreamDown
from .worker import Worker

_LOGGER = logging.getLogger(__name__)


class OpenAiEngine(Engine):
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._events: queue.SimpleQueue[tuple[int, EngineEvent]] = queue.SimpleQueue()
        self._active: dict[Hashable, int] = {}  # key -> ticket of the submission holding a slot
        self._tickets = itertools.count(1)
        self._wake: Callable[[], None] | None = None
        self._wake_due = False  # a wake is on its way: no need for another
        self._model = config.model or ""
        self._listed: list[str] = []
        self.worker = Worker(config, self._emit, self._changed)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAiEngine:
        return cls(UpstreamConfig.from_settings(settings))

    @property
    def capabilities(self) -> Capabilities:
        # Tools go to the server, which renders them with its model's template (or refuses them).
        return Capabilities("openai", True, self.config.n_batch, per_request_sampling=True, tools=True)

    @property
    def model_name(self) -> str:
        return self._model

    def load(self) -> None:
        """Start the engine's thread and learn the model. A server that does not answer is waited
        for in the background when upstream_model names the model; without it, rkmqtt cannot say
        what it serves, and stops with one line."""
        self.worker.start_thread()
        url = self.config.shown_url
        try:
            self._listed = self.worker.call(self.worker.probe(), PROBE_TIMEOUT_S * 2 + 5)
        except UpstreamDown as e:
            if not self.config.model:
                self.worker.stop()
                raise ConfigError(
                    f"the upstream server {url} is unavailable ({e}) and upstream_model is empty: start the server "
                    "first, or set upstream_model so that rkmqtt starts without it and waits for it"
                ) from None
            self.worker.link.down(str(e))
        else:
            if not self.config.model:
                if not self._listed:
                    self.worker.stop()
                    raise ConfigError(f"the upstream server {url} lists no model: set upstream_model")
                self._model = self._listed[0]
            elif self._listed and self.config.model not in self._listed:
                _LOGGER.warning(
                    "upstream_model %r is not among the models %s lists (%s): requests may fail",
                    self.config.model,
                    url,
                    ", ".join(self._listed[:10]),
                )
        self.worker.watch()

    def info(self) -> dict[str, Any]:
        return {"upstream_url": self.config.shown_url, "upstream_models": self._listed[:20]}

    def set_wake(self, wake: Callable[[], None]) -> bool:
        self._wake = wake
        return True

    def problem(self) -> str | None:
        return self.worker.link.problem

    def free_slots(self) -> int:
        if self.worker.link.problem is not None:
            return 0
        return max(0, self.config.n_batch - len(self._active))

    def submit(self, batch: Sequence[Prepared]) -> None:
        for p in batch:
            ticket = next(self._tickets)
            self._active[p.key] = ticket
            self.worker.start(ticket, p.key, request_body(p.gen, self._model))

    def poll(self, timeout: float) -> list[EngineEvent]:
        self._wake_due = False  # before draining: an event queued after this wakes the loop again
        out: list[EngineEvent] = []
        try:
            item = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
            while True:
                ticket, event = item
                key = event.key
                if self._active.get(key) == ticket:
                    if isinstance(event, (FinishEvent, ErrorEvent)):
                        del self._active[key]
                    out.append(event)
                item = self._events.get_nowait()
        except queue.Empty:
            pass
        return out

    def cancel(self, key: Hashable) -> None:
        ticket = self._active.pop(key, None)
        if ticket is not None:
            self.worker.cancel(ticket)

    def close(self) -> None:
        self.worker.stop()

    # -- the engine's thread ------------------------------------------------------------------
    def _emit(self, ticket: int, event: EngineEvent) -> None:
        self._events.put((ticket, event))
        if not self._wake_due:
            self._wake_due = True
            self._changed()

    def _changed(self) -> None:
        wake = self._wake
        if wake is not None:
            wake()
