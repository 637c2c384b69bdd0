"""The Ollama- and OpenAI-compatible HTTP API (setting `http_listen`): the second door into the same
scheduler, on a thread of its own ("rkmqtt-http", asyncio) that never waits on the engine.
`server.py` serves, `exchange.py` admits and awaits, `ollama.py` and `openai.py` speak the APIs,
`textscan.py` cuts the text."""
