"""The Ollama- and OpenAI-compatible HTTP API (setting `http_listen`).

HTTP requests enter the same scheduler as MQTT ones: the same fair queues, limits, error codes
and batches. One thread of its own, "rkmqtt-http", runs an asyncio event loop with aiohttp's
server (`server.py`); it never waits on the engine: it validates, submits to the scheduler's
inbox and awaits the replies the scheduler hands to the request's sink (`exchange.py`).

| module | what |
|---|---|
| `server.py` | the thread, the event loop, the routes, authentication, error responses |
| `exchange.py` | one request's trip through the scheduler: limits, `Request`, sink, cancel |
| `ollama.py`, `openai.py` | the two APIs' bodies and replies |
| `textscan.py` | stop sequences and `<tool_call>` blocks in the model's text |
"""
