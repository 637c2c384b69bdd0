"""The HTTP door waits where a limit meant for one device is in the way (the rate budget of the shared
`http` client, a full queue), up to `http_wait_s`; and what must still fail reaches a Home Assistant
user as text (`ollama_stream_errors`), other Ollama clients as an HTTP status."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ollama
import pytest

from rkmqtt.mqtt.broker import free_port
from rkmqtt.service import Service
from tests.fake_engine import FakeEngine

MODEL = "fake-echo"
HA_AGENT = "ollama-python/0.4.7 (x86_64 linux) Python/3.13.0"  # what Home Assistant's integration sends


def chat(port: int, body: dict[str, Any], agent: str = "curl/8") -> tuple[int, list[dict[str, Any]]]:
    """POST /api/chat; the status and the NDJSON lines (or the one JSON body)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/chat",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": agent},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read())]


def ask(text: str, stream: bool = True) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}


def test_a_spent_rate_budget_is_waited_out(start_bridge: Callable[..., Service]) -> None:
    port = free_port()
    start_bridge(FakeEngine(), http_listen=f"127.0.0.1:{port}", rate_limit=120, rate_burst=1)
    t0 = time.monotonic()
    results = [chat(port, ask("one two", stream=False)) for _ in range(3)]
    assert [status for status, _ in results] == [200, 200, 200]
    assert time.monotonic() - t0 >= 0.9  # two waits of half a second: 120 a minute


def test_a_full_queue_is_waited_out(start_bridge: Callable[..., Service]) -> None:
    port = free_port()
    svc = start_bridge(FakeEngine(n_batch=1, step_s=0.01), http_listen=f"127.0.0.1:{port}", max_queue=1, rate_limit=0)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, port, ask("tokens:20", stream=False)) for _ in range(6)]
        results = [f.result() for f in futures]
    assert [status for status, _ in results] == [200] * 6
    assert all(lines[-1]["message"]["content"].startswith("t0 t1") for _, lines in results)
    assert svc.scheduler is not None


def test_the_wait_ends_at_http_wait_s(start_bridge: Callable[..., Service]) -> None:
    port = free_port()
    start_bridge(FakeEngine(), http_listen=f"127.0.0.1:{port}", rate_limit=1, rate_burst=1, http_wait_s=0.5)
    assert chat(port, ask("one", stream=False))[0] == 200
    t0 = time.monotonic()
    status, (body,) = chat(port, ask("two", stream=False))
    assert status == 429 and body["code"] == "rate_limited"
    assert time.monotonic() - t0 < 5  # the budget comes back in a minute: no use waiting for it


@pytest.mark.parametrize("how", ["auto", "text"])
def test_a_failed_streamed_chat_reaches_home_assistant_as_text(start_bridge: Callable[..., Service], how: str) -> None:
    """Home Assistant's integration raises on an HTTP error or an error line while it reads the stream
    ("Unexpected error during intent recognition"); it shows the assistant's text."""
    port = free_port()
    start_bridge(FakeEngine(), http_listen=f"127.0.0.1:{port}", ollama_stream_errors=how, http_wait_s=0)
    client = ollama.Client(host=f"http://127.0.0.1:{port}")  # the client Home Assistant uses
    for text, code in (("toolong", "too_long"), ("a explode", "engine_error")):
        parts = list(client.chat(MODEL, messages=[{"role": "user", "content": text}], stream=True))
        said = "".join(p.message.content or "" for p in parts)
        assert parts[-1].done and "Sorry, rkmqtt could not answer:" in said and f"({code})." in said
    wrong = list(client.chat("llama3.2:latest", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "not found: this bridge serves 'fake-echo:latest'" in (wrong[0].message.content or "")
    # not streamed: Home Assistant (and every client) reads the status
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(MODEL, messages=[{"role": "user", "content": "toolong"}], stream=False)
    assert e.value.status_code == 400
    if how == "text":  # any client, not only Ollama's Python one
        status, lines = chat(port, ask("toolong"), agent="curl/8")
        assert status == 200 and "(too_long)" in lines[0]["message"]["content"]


def test_other_clients_get_ollamas_statuses(start_bridge: Callable[..., Service]) -> None:
    port = free_port()
    start_bridge(FakeEngine(), http_listen=f"127.0.0.1:{port}", http_wait_s=0)
    status, (body,) = chat(port, ask("toolong"))
    assert status == 400 and body["code"] == "too_long"
    status, lines = chat(port, ask("a explode"))  # failed after its first text: an error line
    assert status == 200 and lines[0]["message"]["content"] == "a " and lines[-1]["code"] == "engine_error"
    # with ollama_stream_errors status, Ollama's Python client too
    port2 = free_port()
    start_bridge(FakeEngine(), http_listen=f"127.0.0.1:{port2}", ollama_stream_errors="status")
    with pytest.raises(ollama.ResponseError) as e:
        list(
            ollama.Client(host=f"http://127.0.0.1:{port2}").chat(
                MODEL, messages=[{"role": "user", "content": "toolong"}], stream=True
            )
        )
    assert e.value.status_code == 400 and "too_long" in e.value.error
