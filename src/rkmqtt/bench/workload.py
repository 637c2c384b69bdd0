"""What one benchmark run sends (any thread; pure data): devices, requests, prompts and one of three
shapes, `closed` (each device sends again when answered), `open` (Poisson arrivals at `rate`) and
`burst` (all at once, in rounds). A request's prompt depends only on its device and its sequence
number, so every mode of a workload sends the same prompts."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Shape = Literal["closed", "open", "burst"]
SHAPES: tuple[Shape, ...] = ("closed", "open", "burst")


@dataclass(frozen=True)
class Workload:
    shape: Shape
    devices: int
    requests: int
    max_new_tokens: int
    prompts: tuple[str, ...] = field(repr=False)
    rate: float = 1.0  # open loop: requests per second
    warmup: int = 1  # rounds of one request per device, at once, before the measured run (not counted)
    seed: int = 0
    timeout_s: float = 300.0  # a request with no final reply by then counts as error "timeout"
    # The warm-up sends the prompts of the round after the last, not the first round's again, so no
    # slot's cache holds a measured prompt (devices asking new questions; needs more prompts than requests).
    fresh_prompts: bool = False

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {self.shape!r}")
        if self.devices < 1 or self.requests < 1 or self.max_new_tokens < 1:
            raise ValueError("devices, requests and max_new_tokens must be at least 1")
        if self.shape == "open" and self.rate <= 0:
            raise ValueError("an open-loop rate must be above 0 requests per second")
        if not self.prompts:
            raise ValueError("a workload needs at least one prompt")

    @property
    def total(self) -> int:
        """Requests sent in the measured run (a burst sends whole rounds)."""
        if self.shape == "burst":
            return self.rounds * self.devices
        return self.requests

    @property
    def rounds(self) -> int:
        return max(1, math.ceil(self.requests / self.devices))

    def prompt_index(self, device: int, seq: int) -> int:
        """The prompt of the `seq`-th request (from 0) of device `device` (from 0)."""
        return (device + seq * self.devices) % len(self.prompts)

    def warmup_prompt_index(self, device: int, seq: int) -> int:
        """The prompt of warm-up request `seq` (from 0) of device `device`."""
        return self.prompt_index(device, self.rounds + seq if self.fresh_prompts else seq)

    def open_arrivals(self) -> list[tuple[float, int]]:
        """Open loop: (seconds after the start, device) of every request; exponential gaps."""
        rng = random.Random(self.seed)
        t = 0.0
        out = []
        for j in range(self.requests):
            out.append((t, j % self.devices))
            t += rng.expovariate(self.rate)
        return out

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = len(self.prompts)
        d["total"] = self.total
        if self.shape != "open":
            d.pop("rate")
        return d

    def label(self) -> str:
        if self.shape == "open":
            return f"open loop {self.rate:g}/s over {self.devices} devices"
        if self.shape == "burst":
            return f"{self.devices} at once x {self.rounds}" + (", new prompts" if self.fresh_prompts else "")
        return f"closed loop, {self.devices} devices"


def device_name(index: int) -> str:
    """The client name of simulated device `index` in its request topic."""
    return f"dev{index:02d}"
