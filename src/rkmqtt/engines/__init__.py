"""Engines: the model runtimes behind the scheduler (see `base.py` for the interface).

Native and heavy code is imported lazily: building an engine is the first time numpy's model
code, the RKLLM ctypes binding or the OpenAI client is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rkmqtt.errors import ConfigError

if TYPE_CHECKING:
    from rkmqtt.engines.base import Engine
    from rkmqtt.settings import Settings


def resolve_engine_name(settings: Settings) -> str:
    """`auto` means rkllm on an RK3588/RK3576 board whose runtime library can be found, else numpy."""
    if settings.engine != "auto":
        return settings.engine
    from rkmqtt.engines.rkllm.platform import looks_like_rockchip_npu_board

    return "rkllm" if looks_like_rockchip_npu_board(settings) else "numpy"


def create_engine(settings: Settings) -> Engine:
    """Build (but do not load) the engine the settings name."""
    name = resolve_engine_name(settings)
    if name == "numpy":
        from rkmqtt.engines.numpy.engine import NumpyEngine

        numpy_engine: Engine = NumpyEngine.from_settings(settings)
        return numpy_engine
    if name == "rkllm":
        from rkmqtt.engines.rkllm.engine import RkllmEngine

        rkllm_engine: Engine = RkllmEngine.from_settings(settings)
        return rkllm_engine
    if name == "openai":
        from rkmqtt.engines.openai.engine import OpenAiEngine

        openai_engine: Engine = OpenAiEngine.from_settings(settings)
        return openai_engine
    module_name, _, class_name = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"setting engine={name!r}: cannot import {class_name} from {module_name} ({e})") from e
    factory = getattr(cls, "from_settings", None)
    engine: Engine = factory(settings) if factory else cls()
    return engine
