"""The `openai` engine: an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, another
rkmqtt) behind the bridge. `engine.py` is what the scheduler calls, `worker.py` and `link.py` run on
its own event-loop thread; `body.py`, `answer.py` and `errors.py` translate (pure), `config.py` and
`check.py` serve the settings and `rkmqtt check` (docs/architecture.md, "The openai engine").
"""

from __future__ import annotations
