"""Which models are loaded (scheduler thread; pure, like the policy): load a model its requests need,
switch when no more fit — a loaded model stops taking new work, its running batch ends, then it is
unloaded —, and unload one idle past its keep_alive. Every method takes the time and returns `Moves`
(docs/architecture.md, "Several models")."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # takes nothing new; unloaded once its running requests end


@dataclass(frozen=True)
class ResidencyConfig:
    max_loaded: int
    keep_alive_s: float | None  # None: for ever
    retry_s: float = 30.0  # after a failed load, requests for the model are answered at once this long


@dataclass
class Moves:
    """What the loop must do: start loading these, unload these (their engines hold nothing running)."""

    load: list[str] = field(default_factory=list)
    unload: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.load or self.unload)


@dataclass
class _Resident:
    phase: Phase
    since: float
    last_used: float
    keep_alive_s: float | None


class Residency:
    def __init__(self, config: ResidencyConfig) -> None:
        self.config = config
        self._models: dict[str, _Resident] = {}
        self._failed: dict[str, tuple[float, str]] = {}

    # -- what the loop reads -----------------------------------------------------------------
    def phase(self, name: str) -> Phase | None:
        r = self._models.get(name)
        return None if r is None else r.phase

    def ready(self) -> list[str]:
        """Models that may start requests now."""
        return [n for n, r in self._models.items() if r.phase == Phase.READY]

    def loaded(self) -> list[str]:
        return [n for n, r in self._models.items() if r.phase != Phase.LOADING]

    def failure(self, name: str, now: float) -> str | None:
        """Why the model could not be loaded, while that is recent enough to answer with it."""
        failed = self._failed.get(name)
        if failed is None or now - failed[0] >= self.config.retry_s:
            return None
        return failed[1]

    def failures(self) -> dict[str, str]:
        return {n: msg for n, (_, msg) in self._failed.items()}

    # -- what happened -------------------------------------------------------------------------
    def adopt(self, name: str, now: float) -> None:
        """A model loaded before the loop started (the service's first)."""
        self._models[name] = _Resident(Phase.READY, now, now, self.config.keep_alive_s)
        self._failed.pop(name, None)

    def load_done(self, name: str, now: float, problem: str | None) -> None:
        if problem is None:
            self.adopt(name, now)
        else:
            self._models.pop(name, None)
            self._failed[name] = (now, problem)

    def used(self, name: str, now: float) -> None:
        """A request of the model started or ended: its keep_alive counts from now."""
        r = self._models.get(name)
        if r is not None:
            r.last_used = now

    def keep(self, name: str, keep_alive_s: float | None) -> None:
        """A request set the model's keep_alive (None: for ever), as Ollama's `keep_alive` does."""
        r = self._models.get(name)
        if r is not None:
            r.keep_alive_s = keep_alive_s

    def unloaded(self, name: str) -> None:
        self._models.pop(name, None)

    def preload(self, name: str, now: float) -> Moves:
        """Load `name` without a request for it (the service's first model), if there is room."""
        moves = Moves()
        if name not in self._models and len(self._models) < self.config.max_loaded:
            self._load([name], now, moves)
        return moves

    # -- deciding ------------------------------------------------------------------------------
    def decide(self, demand: Mapping[str, float], busy: Set[str], now: float) -> Moves:
        """`demand`: the oldest arrival among the waiting requests of each model that has some;
        `busy`: models with requests running. Loads go to the model waited for longest."""
        moves = Moves()
        for name, r in list(self._models.items()):
            if name in busy or r.phase == Phase.LOADING:
                continue
            idle_out = name not in demand and r.keep_alive_s is not None and now - r.last_used >= r.keep_alive_s
            if r.phase == Phase.DRAINING or idle_out:
                moves.unload.append(name)
                del self._models[name]
        wanted = sorted(
            (n for n in demand if n not in self._models and self.failure(n, now) is None), key=lambda n: demand[n]
        )
        self._load(wanted, now, moves)
        waiting = [n for n in wanted if n not in self._models]
        if waiting and not any(r.phase != Phase.READY for r in self._models.values()):
            self._switch(demand[waiting[0]], demand, busy, moves)
            self._load(waiting, now, moves)
        return moves

    def _load(self, wanted: list[str], now: float, moves: Moves) -> None:
        for name in wanted:
            if len(self._models) >= self.config.max_loaded:
                break
            if name in self._models:
                continue
            self._models[name] = _Resident(Phase.LOADING, now, now, self.config.keep_alive_s)
            self._failed.pop(name, None)
            moves.load.append(name)

    def _switch(self, oldest: float, demand: Mapping[str, float], busy: Set[str], moves: Moves) -> None:
        """No room for a model whose request is waiting: the loaded model least needed (its own oldest
        waiting request youngest, then used longest ago) stops taking work, once the other model's
        request is older than every one of its own; it is unloaded when its running requests end."""
        ready = [n for n, r in self._models.items() if r.phase == Phase.READY]
        if not ready:
            return
        victim = max(ready, key=lambda n: (demand.get(n, math.inf), -self._models[n].last_used))
        if demand.get(victim, math.inf) <= oldest:
            return  # its own waiting requests came first: they are served before the switch
        if victim in busy:
            self._models[victim].phase = Phase.DRAINING
        else:
            moves.unload.append(victim)
            del self._models[victim]

    def wake_at(self, now: float) -> float | None:
        """When an idle model's keep_alive runs out."""
        times = [
            r.last_used + r.keep_alive_s
            for r in self._models.values()
            if r.phase == Phase.READY and r.keep_alive_s is not None
        ]
        return min(times) if times else None
