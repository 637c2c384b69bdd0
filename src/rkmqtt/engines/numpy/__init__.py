"""The numpy CPU engine: a Llama-family transformer read from a GGUF file, batched continuously
(scheduler thread; BLAS may use threads of its own inside a matrix product). Its modules and their
choices: docs/architecture.md, "Engines"."""

from __future__ import annotations

__all__: list[str] = []
