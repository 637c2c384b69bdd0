"""The Ollama- and OpenAI-compatible HTTP API of a live bridge (the in-process service with
`http_listen` on a free port, a real Mosquitto, the fake engine), spoken to by the real `ollama`
and `openai` clients from PyPI, and by plain HTTP where a client would hide what is checked."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ollama
import openai
import pytest

from rkmqtt.errors import ConfigError
from rkmqtt.http.auth import is_local
from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe

MODEL = "fake-echo:latest"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@dataclass
class Live:
    svc: Service
    engine: FakeEngine
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ollama(self, token: str | None = None) -> ollama.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return ollama.Client(host=self.url, headers=headers, timeout=60)

    def openai(self, token: str = "no-token") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token, max_retries=0, timeout=60)

    def request(
        self, method: str, path: str, body: bytes | dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            raw, status, hdrs = e.read(), e.code, dict(e.headers)
        try:
            return status, hdrs, json.loads(raw)
        except ValueError:
            return status, hdrs, raw.decode()

    def counters(self) -> Any:
        assert self.svc.scheduler is not None
        return self.svc.scheduler.core.counters

    def wait(self, pred: Callable[[], bool], timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.02)


@pytest.fixture
def live(start_bridge: Callable[..., Service]) -> Iterator[Callable[..., Live]]:
    def make(engine: FakeEngine | None = None, **overrides: Any) -> Live:
        engine = engine or FakeEngine()
        port = free_port()
        svc = start_bridge(engine, http_listen=f"127.0.0.1:{port}", **overrides)
        return Live(svc, engine, port)

    yield make


def _settled(live: Live) -> None:
    """Every request answered: P/stats adds up over both APIs."""
    live.wait(lambda: live.svc.scheduler is not None and live.svc.scheduler.core.running == 0)
    live.wait(lambda: (c := live.counters()).received == c.completed + c.errors)


# -- the model ------------------------------------------------------------------------------------


def test_version_tags_show_ps_and_models(live: Callable[..., Live]) -> None:
    lv = live()
    status, _, body = lv.request("GET", "/api/version")
    assert status == 200 and body["version"]
    assert lv.request("GET", "/")[2].startswith("Ollama is running")
    client = lv.ollama()
    assert [m.model for m in client.list().models] == [MODEL]
    show = client.show("fake-echo")  # ":latest" may be left out
    assert show.capabilities == ["completion", "tools"]
    assert show.details is not None and show.details.family == "fake"
    assert [m.model for m in client.ps().models] == [MODEL]
    assert [m.id for m in lv.openai().models.list().data] == [MODEL]
    assert lv.openai().models.retrieve(MODEL).id == MODEL


# -- Ollama ---------------------------------------------------------------------------------------


def test_ollama_chat_streamed_and_not(live: Callable[..., Live]) -> None:
    lv = live()
    client = lv.ollama()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "hello there world"},
    ]
    reply = client.chat(MODEL, messages=messages, stream=False, keep_alive="5m")
    assert reply.message.role == "assistant" and reply.message.content == "hello there world "
    assert reply.done and reply.done_reason == "stop" and reply.eval_count == 3
    assert reply.prompt_eval_count == 9 and reply.total_duration and reply.total_duration > 0
    gen = lv.engine.prepared[-1]
    assert [(m.role, m.content) for m in gen.messages] == [(m["role"], m["content"]) for m in messages]
    assert str(gen.key).startswith("http/"), "unauthenticated requests are client http_client"

    parts = list(client.chat(MODEL, messages=messages, stream=True, keep_alive=-1))
    assert [p.done for p in parts] == [False, False, False, True]
    assert "".join(p.message.content or "" for p in parts) == "hello there world "
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 3
    _settled(lv)


def test_ollama_generate_with_options(live: Callable[..., Live]) -> None:
    lv = live()
    client = lv.ollama()
    options = {"num_predict": 2, "temperature": 0.3, "top_k": 5, "top_p": 0.8, "seed": 7, "repeat_penalty": 1.2}
    reply = client.generate(MODEL, "one two three", system="Be brief.", options=options, stream=False)
    assert reply.response == "one two " and reply.done_reason == "length" and reply.eval_count == 2
    gen = lv.engine.prepared[-1]
    assert [(m.role, m.content) for m in gen.messages] == [("system", "Be brief."), ("user", "one two three")]
    assert gen.max_new_tokens == 2 and gen.sampling_requested
    s = gen.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed, s.repeat_penalty) == (0.3, 5, 0.8, 7, 1.2)

    parts = list(client.generate(MODEL, "one two three", stream=True, options={"num_ctx": 4096}))
    assert "".join(p.response for p in parts) == "one two three " and parts[-1].done_reason == "stop"
    assert lv.engine.prepared[-1].max_new_tokens == lv.svc.settings.default_new_tokens
    assert not lv.engine.prepared[-1].sampling_requested, "num_ctx is accepted and has no effect"
    # Nothing to generate: Ollama's "load" answer, as clients use it to load a model.
    assert client.generate(MODEL, "").done_reason == "load"
    _settled(lv)


def test_stop_sequences_cut_the_text_and_free_the_slot(live: Callable[..., Live]) -> None:
    lv = live()
    client = lv.ollama()
    reply = client.chat(MODEL, messages=[{"role": "user", "content": "tokens:1000"}], options={"stop": ["t3 "]})
    assert reply.message.content == "t0 t1 t2 " and reply.done_reason == "stop"
    parts = list(
        client.generate(MODEL, "tokens:1000", options={"stop": ["XX", "t4"]}, stream=True)  # "t4" ends "t0 t1 t2 t3 "
    )
    assert "".join(p.response for p in parts) == "t0 t1 t2 t3 " and parts[-1].done_reason == "stop"
    r = lv.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tokens:1000"}], stop="t2 "
    )
    assert r.choices[0].message.content == "t0 t1 " and r.choices[0].finish_reason == "stop"
    # Each was cancelled in the engine once its stop sequence came, long before 1000 tokens.
    lv.wait(lambda: len(lv.engine.cancelled) == 3)
    assert lv.counters().tokens < 1500, "not run to the end (3000 tokens)"
    _settled(lv)


# -- OpenAI ---------------------------------------------------------------------------------------


def test_openai_chat_streamed_and_not(live: Callable[..., Live]) -> None:
    lv = live()
    client = lv.openai()
    messages: Any = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "alpha beta"}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50, temperature=0.5, seed=3)
    assert r.choices[0].message.content == "alpha beta " and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 2, 6)
    gen = lv.engine.prepared[-1]
    assert gen.messages[0].role == "system" and gen.max_new_tokens == 50
    assert (gen.sampling.temperature, gen.sampling.seed) == (0.5, 3)

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, max_tokens=1
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
    assert len({c.id for c in chunks}) == 1
    _settled(lv)


# -- tools ----------------------------------------------------------------------------------------


def test_tool_calls_come_back_as_tool_calls(live: Callable[..., Live]) -> None:
    lv = live()
    client = lv.ollama()
    ask = [{"role": "user", "content": "What is the weather in Paris? call:get_weather"}]
    reply = client.chat(MODEL, messages=ask, tools=TOOLS)
    assert reply.message.content == "Checking."
    calls = reply.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert lv.engine.prepared[-1].tools == tuple(TOOLS), "the tools reach the engine as the template takes them"

    parts = list(client.chat(MODEL, messages=ask, tools=TOOLS, stream=True))
    assert "<tool_call>" not in "".join(p.message.content or "" for p in parts)
    streamed = [c for p in parts for c in p.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("get_weather", {"city": "Paris"})]

    # The second round: the call and its result go back to the model.
    said = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [said]},
        {"role": "tool", "content": '{"temperature": 21}', "tool_name": "get_weather"},
    ]
    client.chat(MODEL, messages=history, tools=TOOLS)
    gen = lv.engine.prepared[-1]
    assert [m.role for m in gen.messages] == ["user", "assistant", "tool"]
    assert gen.messages[1].tool_calls == (
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    )

    oa = lv.openai()
    r = oa.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(oa.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, stream=True))  # type: ignore[arg-type]
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(d.function.name, json.loads(d.function.arguments or "")) for d in deltas if d.function] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # tool_choice none: the tools are not given to the model.
    oa.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, tool_choice="none")  # type: ignore[arg-type]
    assert lv.engine.prepared[-1].tools == ()
    _settled(lv)


def test_tools_the_model_takes_none_of_are_left_out(
    live: Callable[..., Live], caplog: pytest.LogCaptureFixture
) -> None:
    """Answered without them (Home Assistant's Assist with "Control Home Assistant" on, served by a model
    whose template has no place for tools), with one warning per client in the log, not one a request."""
    lv = live(FakeEngine(tools=False))
    assert lv.ollama().show(MODEL).capabilities == ["completion"]
    with caplog.at_level(logging.WARNING, logger="rkmqtt.sched.admission"):
        for _ in range(3):
            reply = lv.ollama().chat(MODEL, messages=[{"role": "user", "content": "hi there"}], tools=TOOLS)
            assert reply.message.content == "hi there " and not reply.message.tool_calls
        r = lv.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "yo"}], tools=TOOLS)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "yo "
    assert lv.engine.prepared[-1].tools == ()  # type: ignore[attr-defined]
    warned = [r for r in caplog.records if "no place for them" in r.getMessage()]
    assert len(warned) == 1 and "'http'" not in warned[0].getMessage() and warned[0].getMessage().startswith("http's")
    _settled(lv)


def test_strict_tools_refuses_tools_the_model_takes_none_of(live: Callable[..., Live]) -> None:
    lv = live(FakeEngine(tools=False), strict_tools=True)
    with pytest.raises(ollama.ResponseError) as e:
        lv.ollama().chat(MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert e.value.status_code == 400 and "takes no tools" in e.value.error
    with pytest.raises(openai.BadRequestError) as oe:
        lv.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS)  # type: ignore[arg-type]
    assert "takes no tools" in str(oe.value)
    lv.wait(lambda: lv.counters().by_code["invalid_request"] == 2)  # counted on the scheduler thread
    _settled(lv)


# -- bad input and limits -------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors_with_http_statuses(live: Callable[..., Live]) -> None:
    lv = live(
        max_payload_bytes=4096,
        max_new_tokens=100,
        default_new_tokens=50,
        max_prompt_chars=500,
        ollama_stream_errors="status",
    )
    chat = {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[str, bytes | dict[str, Any], int, str]] = [
        ("/api/chat", b"{not json", 400, "not valid JSON"),
        ("/api/chat", b"[1, 2]", 400, "JSON object"),
        ("/api/chat", {**chat, "messages": "hi"}, 400, "messages"),
        ("/api/chat", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ("/api/chat", {**chat, "options": {"temperature": "hot"}}, 400, "temperature"),
        ("/api/chat", {**chat, "model": "llama3:8b"}, 404, "not found"),
        ("/api/chat", {**chat, "model": ""}, 400, "model is required"),
        ("/api/chat", {**chat, "options": {"num_predict": 500}}, 400, "too_many_tokens"),
        ("/api/chat", {**chat, "messages": [{"role": "user", "content": "x" * 600}]}, 400, "too_long"),
        ("/api/chat", {**chat, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "text only"),
        ("/api/chat", {**chat, "format": "json"}, 400, "format"),
        ("/api/chat", {**chat, "think": True}, 400, "thinking"),
        ("/api/chat", b'{"model": "' + b"x" * 5000 + b'"}', 413, "payload_too_large"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "raw": True}, 400, "raw"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "context": [1, 2]}, 400, "context"),
        ("/api/show", {"model": "nope"}, 404, "not found"),
        # Refused by the engine (the context), through the scheduler like an MQTT request:
        ("/api/chat", {**chat, "messages": [{"role": "user", "content": "toolong"}]}, 400, "too_long"),
    ]
    for path, body, status, words in cases:
        got, _, reply = lv.request("POST", path, body)
        assert got == status and words in reply["error"], (path, body, got, reply)
        assert reply.get("code") in (None, "invalid_request", "too_many_tokens", "too_long", "payload_too_large")
    oa = lv.openai()
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.code == "invalid_request" and "n: only 1" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=101)
    assert e.value.code == "too_many_tokens"
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert lv.request("GET", "/api/nothing-here")[0] == 404
    assert lv.request("GET", "/api/chat")[0] == 405
    # An engine failure: 500 before the response began, an error line in a stream that had begun.
    got, _, reply = lv.request("POST", "/api/chat", {**chat, "messages": [{"role": "user", "content": "a explode"}]})
    assert got == 500 and reply["code"] == "engine_error"
    with pytest.raises(ollama.ResponseError) as oe:
        list(lv.ollama().chat(MODEL, messages=[{"role": "user", "content": "a explode"}], stream=True))
    assert "engine_error" in oe.value.error
    _settled(lv)
    expected = {"invalid_request": 16, "payload_too_large": 1, "too_many_tokens": 2, "too_long": 2, "engine_error": 2}
    lv.wait(lambda: all(lv.counters().by_code[k] == n for k, n in expected.items()))  # refusals: counted async
    c = lv.counters()
    assert c.by_code["invalid_request"] == 16 and c.by_code["payload_too_large"] == 1
    assert c.by_code["too_many_tokens"] == 2 and c.by_code["too_long"] == 2 and c.by_code["engine_error"] == 2


def test_rate_limit_429_and_full_queue_503(live: Callable[..., Live]) -> None:
    """With http_wait_s 0 the limits refuse at once (tests/test_http_waits.py: what waiting does)."""
    lv = live(FakeEngine(n_batch=1, step_s=0.02), rate_limit=1, rate_burst=3, max_queue=1, http_wait_s=0)
    chat = {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "tokens:100"}]}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(lv.request, "POST", "/api/chat", chat)
        lv.wait(lambda: lv.svc.scheduler is not None and lv.svc.scheduler.active == 1)
        second = pool.submit(lv.request, "POST", "/api/chat", chat)
        lv.wait(lambda: lv.svc.scheduler is not None and lv.svc.scheduler.queue_depth == 1)
        status, headers, body = lv.request("POST", "/api/chat", chat)
        assert status == 503 and body["code"] == "busy" and headers.get("Retry-After") == "1"
        status, headers, body = lv.request("POST", "/api/chat", chat)
        assert status == 429 and body["code"] == "rate_limited" and headers.get("Retry-After") == "60"
        assert first.result()[0] == 200 and second.result()[0] == 200
    with pytest.raises(openai.RateLimitError):
        lv.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    _settled(lv)


# -- clients, authentication ------------------------------------------------------------------------


def test_tokens_name_the_client_and_are_required(live: Callable[..., Live]) -> None:
    lv = live(http_tokens="alice:alice-token-1,bob:bob-token-22")
    with pytest.raises(ollama.ResponseError) as e:
        lv.ollama().list()
    assert e.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as e:
        lv.ollama("wrong-token-3").chat(MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    status, headers, _ = lv.request("GET", "/api/tags")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert lv.request("GET", "/")[0] == 200  # the liveness probe needs no token
    assert lv.ollama("alice-token-1").chat(MODEL, messages=[{"role": "user", "content": "hi"}]).message.content == "hi "
    assert lv.engine.prepared[-1].key.client == "alice"  # type: ignore[attr-defined]
    with pytest.raises(openai.AuthenticationError):
        lv.openai("nope-nope-nope").models.list()
    lv.openai("bob-token-22").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert lv.engine.prepared[-1].key.client == "bob"  # type: ignore[attr-defined]
    _settled(lv)


def test_a_warning_when_listening_beyond_localhost_without_tokens(
    mosquitto: Mosquitto, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5") and not is_local("board.local")
    for tokens, warned in ((None, True), ("ha:a-long-token", False)):
        caplog.clear()
        port = free_port()
        settings = bridge_settings(mosquitto.url, prefix, http_listen=f"0.0.0.0:{port}", http_tokens=tokens)
        svc = Service(settings, engine=FakeEngine())
        with caplog.at_level(logging.WARNING, logger="rkmqtt.http.server"):
            svc.start()
        try:
            text = " ".join(r.getMessage() for r in caplog.records)
            assert ("without authentication" in text) == warned, text
        finally:
            svc.stop(grace_s=1)


def test_a_port_in_use_is_one_clear_line(mosquitto: Mosquitto, prefix: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = Service(bridge_settings(mosquitto.url, prefix, http_listen=f"127.0.0.1:{port}"), engine=FakeEngine())
        try:
            with pytest.raises(ConfigError, match=r"http_listen='127.0.0.1:\d+': cannot listen there"):
                svc.start()
        finally:
            svc.stop(grace_s=1)


# -- a client that goes away ------------------------------------------------------------------------


def test_a_client_that_disconnects_cancels_its_request(live: Callable[..., Live]) -> None:
    lv = live(FakeEngine(n_batch=2, step_s=0.02))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "tokens:2000"}]})
    # Streamed: read the first piece, then hang up.
    conn = http.client.HTTPConnection("127.0.0.1", lv.port, timeout=30)
    conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.readline())["message"]["content"] == "t0 "
    conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    conn.close()
    lv.wait(lambda: len(lv.engine.cancelled) == 1)
    # Not streamed: hang up while it runs, before any byte of the response.
    quiet = json.dumps({"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "tokens:2000"}]})
    sock = socket.create_connection(("127.0.0.1", lv.port), timeout=30)
    sock.sendall(
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(quiet)}"
        f"\r\n\r\n{quiet}".encode()
    )
    lv.wait(lambda: len(lv.engine.batches) == 2)
    sock.close()
    lv.wait(lambda: len(lv.engine.cancelled) == 2)
    # A waiting request (not started yet) that loses its client is answered `cancelled`, not run.
    slow = FakeEngine(n_batch=1, step_s=0.02)
    lv2 = live(slow)
    busy = http.client.HTTPConnection("127.0.0.1", lv2.port, timeout=30)
    busy.request("POST", "/api/generate", json.dumps({"model": MODEL, "prompt": "tokens:2000"}))
    assert busy.getresponse().status == 200
    sock = socket.create_connection(("127.0.0.1", lv2.port), timeout=30)
    sock.sendall(
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(quiet)}"
        f"\r\n\r\n{quiet}".encode()
    )
    lv2.wait(lambda: lv2.svc.scheduler is not None and lv2.svc.scheduler.queue_depth == 1)
    sock.close()
    lv2.wait(lambda: lv2.counters().by_code["cancelled"] == 1)
    busy.close()
    lv2.wait(lambda: len(slow.cancelled) == 1)
    assert len(slow.batches) == 1, "the cancelled waiting request never ran"
    _settled(lv)
    _settled(lv2)


# -- both APIs in one batch ---------------------------------------------------------------------------


def test_four_http_and_four_mqtt_requests_run_in_one_batch(
    live: Callable[..., Live], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    engine = FakeEngine(n_batch=8, continuous=False, step_s=0.02)
    # A long collection window: the batch starts when all 8 are waiting, whatever the machine's load.
    lv = live(engine, batch_window_ms=10_000)
    probe = probe_factory([f"{prefix}/reply/#"])
    results: list[Any] = []

    def ask_http(i: int) -> None:
        if i % 2:
            r = lv.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"web {i}"}])
            results.append(r.choices[0].message.content)
        else:
            results.append(lv.ollama().chat(MODEL, messages=[{"role": "user", "content": f"web {i}"}]).message.content)

    threads = [threading.Thread(target=ask_http, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(4):
        probe.publish(f"{prefix}/request/dev{i}", {"id": f"m{i}", "prompt": f"mqtt {i}"})
    finals = [probe.final(f"{prefix}/reply/dev{i}/m{i}", timeout=60) for i in range(4)]
    for t in threads:
        t.join(60)
    assert sorted(results) == [f"web {i} " for i in range(4)]
    assert [f["status"] for f in finals] == ["ok"] * 4
    assert [f["batch"]["size"] for f in finals] == [8] * 4, finals
    assert len(engine.batches) == 1 and len(engine.batches[0]) == 8
    assert sum(k.startswith("http/") for k in engine.batches[0]) == 4
    _settled(lv)


# -- shutdown -------------------------------------------------------------------------------------------


def test_on_shutdown_running_http_requests_finish_and_waiting_ones_get_503(live: Callable[..., Live]) -> None:
    lv = live(FakeEngine(n_batch=1, step_s=0.02))
    chat = {"model": MODEL, "stream": False, "messages": [{"role": "user", "content": "tokens:60"}]}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(lv.request, "POST", "/api/chat", chat)
        lv.wait(lambda: lv.svc.scheduler is not None and lv.svc.scheduler.active == 1)
        waiting = pool.submit(lv.request, "POST", "/api/chat", chat)
        lv.wait(lambda: lv.svc.scheduler is not None and lv.svc.scheduler.queue_depth == 1)
        lv.svc.stop(grace_s=30)
        status, _, body = running.result(timeout=60)
        assert status == 200 and body["message"]["content"] == "".join(f"t{i} " for i in range(60))
        status, _, body = waiting.result(timeout=60)
        assert status == 503 and body["code"] == "shutting_down"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", lv.port), timeout=5).close()
