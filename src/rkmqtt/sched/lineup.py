"""The scheduler's engines, one per loaded model, and their loading (scheduler thread; each load runs
on a thread "rkmqtt-load-<model>" of its own, which only calls the `ModelSource` and reports back
through the scheduler's inbox). `Residency` decides what to load and unload; the loop asks here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from rkmqtt.engines.base import Engine
from rkmqtt.errors import RkmqttError
from rkmqtt.sched.residency import Residency, ResidencyConfig

_LOGGER = logging.getLogger(__name__)


class ModelSource(Protocol):
    """Where engines come from: the served models by name (`rkmqtt.models.catalog`)."""

    def open(self, name: str) -> Engine:
        """The model's engine, loaded (a thread of its own: it may download first). Raises
        RkmqttError with one line saying why the model cannot be had."""


Loaded = Callable[[str, Engine | None, str | None], None]


class Lineup:
    def __init__(
        self,
        config: ResidencyConfig,
        source: ModelSource | None = None,
        engines: dict[str, Engine] | None = None,
        failed: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.engines: dict[str, Engine] = dict(engines or {})
        self.residency = Residency(config)
        now = clock()
        for name in self.engines:
            self.residency.adopt(name, now)
        for name, problem in (failed or {}).items():
            self.residency.load_done(name, now, problem)
        self._loads: dict[str, threading.Thread] = {}

    @classmethod
    def single(cls, name: str, engine: Engine) -> Lineup:
        """One engine, loaded for good (engine openai, a custom engine, the tests' fakes)."""
        return cls(ResidencyConfig(max_loaded=1, keep_alive_s=None), None, {name: engine})

    def can_load(self) -> bool:
        return self.source is not None

    def loading(self) -> list[str]:
        return [n for n, t in self._loads.items() if t.is_alive()]

    def start_load(self, name: str, done: Loaded) -> None:
        """Load `name` on a thread of its own; `done(name, engine, problem)` from that thread."""
        source = self.source
        assert source is not None

        def run() -> None:
            try:
                engine = source.open(name)
            except RkmqttError as e:
                _LOGGER.error("model %s cannot be loaded: %s", name, e)
                done(name, None, str(e))
                return
            except Exception as e:  # a bug in an engine's load must not leave its requests waiting
                _LOGGER.exception("model %s: loading failed", name)
                done(name, None, f"{type(e).__name__}: {e}")
                return
            done(name, engine, None)  # the source said it loaded, and in how long

        thread = threading.Thread(target=run, name=f"rkmqtt-load-{name}"[:60], daemon=True)
        self._loads = {n: t for n, t in self._loads.items() if t.is_alive()}
        self._loads[name] = thread
        thread.start()

    def unload(self, name: str) -> None:
        engine = self.engines.pop(name, None)
        self.residency.unloaded(name)
        if engine is None:
            return
        try:
            engine.close()
        except Exception:
            _LOGGER.exception("model %s: closing its engine failed", name)
        _LOGGER.info("model %s unloaded", name)

    def close(self) -> None:
        """Close every engine (main thread, once the scheduler has stopped)."""
        for name in list(self.engines):
            self.unload(name)
