"""The stand-in RKLLM runtime for the harness (main thread): built from tests/standin/, a model file
for it to open, its timing model (the C source's defaults, shaped on an RK3588 running Qwen2.5-1.5B
w8a8; docs/benchmarks.md) and the environment that sets it, or turns every delay off (zero-cost)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.standin.build import build_standin

from rkmqtt.errors import ConfigError

ENV_PREFIX = "RKLLM_STANDIN_"
# Defaults of the C source, shaped on Rockchip's RK3588 figures for Qwen2.5-1.5B w8a8:
# 378 ms to the first token for a 128-token prompt, 16.7 tokens/s at batch 1.
TIMING_DEFAULTS: dict[str, float] = {
    "PREFILL_MS_PER_TOKEN": 378.0 / 128.0,
    "DECODE_MS": 1000.0 / 16.7,
    "BATCH_ALPHA": 0.10,
    "TOKEN_BYTES": 3.0,
}
MODEL_NAME = "qwen2.5-1.5b-w8a8-standin.rkllm"


def build_library(out_dir: Path) -> Path:
    """Compile the stand-in (ABI 1.3) into `out_dir/librkllmrt.so` with the tests' builder."""
    try:
        return build_standin("1.3", out_dir / "librkllmrt.so")
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"building the stand-in RKLLM runtime failed: {e}") from e


def model_file(out_dir: Path) -> Path:
    """A file for the stand-in to open as its model (it reads nothing from it)."""
    path = out_dir / MODEL_NAME
    path.write_bytes(b"stand-in model file for rkmqtt bench\n")
    return path


def timing_model(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The stand-in's timing figures as the given environment sets them (defaults elsewhere)."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for name, default in TIMING_DEFAULTS.items():
        raw = env.get(ENV_PREFIX + name)
        try:
            out[name.lower()] = round(float(raw), 4) if raw else round(default, 4)
        except ValueError:
            out[name.lower()] = round(default, 4)
    out["zero_delay"] = env.get(ENV_PREFIX + "ZERO_DELAY", "") not in ("", "0")
    return out


def environment(zero_delay: bool, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the stand-in's delays on or off and no
    injected failures."""
    env = dict(os.environ if base is None else base)
    env.pop(ENV_PREFIX + "INIT_FAIL", None)
    if zero_delay:
        env[ENV_PREFIX + "ZERO_DELAY"] = "1"
    else:
        env.pop(ENV_PREFIX + "ZERO_DELAY", None)
    return env
