"""The `openai` engine: an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, another
rkmqtt) behind the bridge. The server batches and generates; the bridge keeps its MQTT front.

| module      | holds                                                                        |
|-------------|------------------------------------------------------------------------------|
| `config.py` | the settings it needs, the server's address as logs show it                  |
| `body.py`   | a `Generation` as a chat-completions request (messages, tools, sampling)     |
| `answer.py` | one streamed answer read into engine events (text, tool calls, usage)        |
| `errors.py` | the server's errors as the bridge's error codes, and connection causes       |
| `link.py`   | whether the server answers: one log line per change, retries while it is down |
| `worker.py` | the engine's own thread and event loop, where every request streams          |
| `engine.py` | the `Engine` the scheduler thread calls                                      |
| `check.py`  | `rkmqtt check`'s look at the server                                          |
"""

from __future__ import annotations
