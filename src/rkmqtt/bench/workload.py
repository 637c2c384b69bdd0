"""What one benchmark run sends (any thread; pure data).

Three load shapes:

* `closed`: N devices, each sends its next request when the final reply of its last one arrives,
  until `requests` have been sent in all;
* `open`: requests arrive at `rate` per second with exponential gaps (a Poisson process), spread
  over the N devices in turn, whether or not earlier ones were answered;
* `burst`: all N devices send at the same moment, wait until every reply is in, and do it again,
  `requests / N` rounds ("N users at once").

Which prompt a request carries depends only on the device and its sequence number, so the
MQTT run and the direct-engine run of one workload send the same prompts. The warm-up sends the
first round's prompts again, unless `fresh_prompts`: then it sends those of the round after the
last, so that no slot's cache holds a measured prompt (8 devices asking new questions at once).
"""

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
    fresh_prompts: bool = False  # the warm-up sends other prompts (given twice as many as devices)

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
