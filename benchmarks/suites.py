"""The harness's built-in suites (pure): named sets of scenarios measured side by side in one run.

A new suite is a function `(prompts, rkllm_real) -> list[Scenario]` and a line in `SUITES`; its
name is then a choice of `--suite`. docs/benchmarks.md has what each suite found.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.sweep import Scenario
from rkmqtt.bench.workload import Workload

Suite = Callable[[tuple[str, ...], bool], list[Scenario]]


def _rk3588(rkllm_real: bool) -> str:
    return "RKLLM " + ("runtime" if rkllm_real else "stand-in RK3588 timing model")


def _cpu_closed_loop(prompts: tuple[str, ...], n_batch: tuple[int, ...], http: tuple[int, ...] = ()) -> Scenario:
    return Scenario(
        "cpu-8-devices",
        "numpy",
        Workload("closed", devices=8, requests=32, max_new_tokens=32, prompts=prompts),
        n_batch=n_batch,
        direct_n_batch=(1, 8),
        http_n_batch=http,
        description="CPU engine, 8 devices in a closed loop",
    )


def _cpu_one_round(prompts: tuple[str, ...]) -> Scenario:
    """8 devices ask new questions at the same moment, once (the warm-up sent other prompts)."""
    return Scenario(
        "cpu-8-at-once",
        "numpy",
        Workload("burst", devices=8, requests=8, max_new_tokens=48, prompts=prompts, fresh_prompts=True),
        n_batch=(1, 8),
        direct_n_batch=(1, 8),
        description="CPU engine, 8 devices asking at the same moment, one round",
    )


def targets(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """The CPU engine with 8 devices (a closed loop and one round at once), the RK3588 model with 4
    users, and the zero-cost relay (with and without the request journal, and with Mosquitto's
    Nagle), with the engine-alone comparison."""
    relay = Workload("closed", devices=16, requests=1600, max_new_tokens=64, prompts=prompts)
    return [
        _cpu_closed_loop(prompts, (1, 2, 4, 8), http=(8,)),
        _cpu_one_round(prompts),
        Scenario(
            "rk3588-4-users",
            "rkllm",
            Workload("closed", devices=4, requests=12, max_new_tokens=64, prompts=prompts),
            n_batch=(1, 2, 4),
            description=f"{_rk3588(rkllm_real)}, 4 users, closed loop",
        ),
        Scenario(
            "rk3588-4-at-once",
            "rkllm",
            Workload("burst", devices=4, requests=12, max_new_tokens=64, prompts=prompts),
            n_batch=(1, 4),
            description=f"{_rk3588(rkllm_real)}, 4 requests at once, 3 rounds",
        ),
        Scenario(
            "relay-zero-cost",
            "rkllm-zero",
            relay,
            n_batch=(1, 4, 8),
            direct_n_batch=(8,),
            http_n_batch=(8,),
            description="stand-in with zero delays: what the bridge itself relays",
        ),
        Scenario(
            "relay-journal-off",
            "rkllm-zero",
            relay,
            n_batch=(8,),
            description="the same without the request journal",
            bridge_flags={"journal": False},
        ),
        Scenario(
            "relay-zero-cost-nagle",
            "rkllm-zero",
            relay,
            n_batch=(8,),
            description="the same, Mosquitto's default set_tcp_nodelay false",
            broker_nodelay=False,
        ),
    ]


def batching(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """The CPU engine's batching gain, n_batch 8 against 1, in a closed loop of 8 devices and in one
    round of 8 at once, each beside the engine alone (the report's batching gain table)."""
    return [_cpu_closed_loop(prompts, (1, 8)), _cpu_one_round(prompts)]


def journal(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """The request journal's cost: the zero-cost relay with the journal and without, side by side."""
    w = Workload("closed", devices=16, requests=1600, max_new_tokens=64, prompts=prompts)
    return [
        Scenario(
            "relay-zero-cost", "rkllm-zero", w, n_batch=(8,), description="stand-in with zero delays, with the journal"
        ),
        Scenario(
            "relay-journal-off",
            "rkllm-zero",
            w,
            n_batch=(8,),
            description="the same without the request journal",
            bridge_flags={"journal": False},
        ),
    ]


def scaleout(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """1, 2 and 3 bridges on one broker and prefix sharing the requests (each its own RK3588 model,
    n_batch 4), under a closed loop of 24 devices: requests/s against the number of bridges."""
    w = Workload("closed", devices=24, requests=96, max_new_tokens=32, prompts=prompts)
    return [
        Scenario(
            f"scale-out-{n}",
            "rkllm",
            w,
            n_batch=(4,),
            description=f"{n} bridge(s), {_rk3588(rkllm_real)}, shared requests",
            bridges=n,
        )
        for n in (1, 2, 3)
    ]


def persistence(prompts: tuple[str, ...], rkllm_real: bool) -> list[Scenario]:
    """The broker's persistence: saved after every change (the shipped conf and the embedded broker)
    against every 30 s (the old setting) and none, on the zero-cost relay with the journal: the relay
    rate, and what the bridge (its journal) and the broker write per request."""
    w = Workload("closed", devices=16, requests=800, max_new_tokens=64, prompts=prompts)
    return [
        Scenario(
            f"persistence-{name.replace(' ', '-')}",
            "rkllm-zero",
            w,
            n_batch=(8,),
            description=f"stand-in with zero delays, broker persistence {name}",
            broker_persistence="" if name == "off" else name,
        )
        for name in ("on changes", "every 30 s", "off")
    ]


SUITES: dict[str, Suite] = {
    "targets": targets,
    "batching": batching,
    "journal": journal,
    "scaleout": scaleout,
    "persistence": persistence,
}
