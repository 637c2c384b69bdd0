"""The openai engine against a small real server over a real socket (`ScriptedServer`: it answers
what each test tells it, and keeps what it was sent), behind an in-process bridge on a real
Mosquitto: what reaches the server, tool calls back over MQTT and both HTTP APIs, each HTTP error
mapped for its request only, silence, cancels, a server down at start, and `rkmqtt check`.
The engine against rkmqtt's own HTTP API serving the numpy engine: tests/test_upstream_e2e.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import openai
import pytest
from aiohttp import web

from rkmqtt.cli.check import run_checks
from rkmqtt.engines.base import ChatMessage
from rkmqtt.engines.openai.answer import Answer
from rkmqtt.engines.openai.body import chat_messages
from rkmqtt.engines.openai.engine import OpenAiEngine
from rkmqtt.engines.openai.errors import status_error
from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.protocol import ErrorCode
from rkmqtt.service import Service
from rkmqtt.settings import load_settings
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.upstream_server import Device, ScriptedServer, wait_online

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


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.close()


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


# -- through a bridge ---------------------------------------------------------------------------
def test_sampling_tools_and_the_conversation_reach_the_server(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    start_front(scripted.url)
    reply = device.ask(
        {
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "abc", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "abc"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "content": "rain"},
            ],
            "tools": TOOLS,
            "temperature": 0.3, "top_p": 0.8, "top_k": 5, "repeat_penalty": 1.2, "seed": 7, "max_new_tokens": 9,
        }
    )  # fmt: skip
    assert reply["status"] == "ok", reply
    assert (reply["text"], reply["finish_reason"], reply["tool_calls"]) == ("Hello there", "stop", [])
    assert reply["usage"] == {"prompt_tokens": 7, "completion_tokens": 2}
    assert reply["model"] == "scripted-model"
    chunks = [json.loads(m.payload) for m in device.probe.on(f"{device.prefix}/reply/dev/{reply['id']}/stream")]
    assert [c["text"] for c in chunks] == ["Hello", " there"]
    [body] = scripted.bodies
    assert body["model"] == "scripted-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (0.3, 0.8, 7, 9)
    assert (body["top_k"], body["repeat_penalty"], body["repetition_penalty"]) == (5, 1.2, 1.2)
    assert body["tools"] == TOOLS
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool"]
    first_call = body["messages"][2]["tool_calls"][0]
    assert first_call["id"] == "abc" and json.loads(first_call["function"]["arguments"]) == {"city": "Paris"}
    assert body["messages"][3]["tool_call_id"] == "abc"
    # A tool turn without an id answers the call before it, which got an id of its own.
    assert body["messages"][5]["tool_call_id"] == body["messages"][4]["tool_calls"][0]["id"]


def test_the_servers_tool_calls_reach_mqtt_and_both_http_apis(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    async def calls(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await ScriptedServer.sse(request, [
            chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "tool_calls"),
            {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}},
        ])  # fmt: skip

    scripted.handler = calls
    port = free_port()
    start_front(scripted.url, http_listen=f"127.0.0.1:{port}")
    expected = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    reply = device.ask({"prompt": "Weather in Paris?", "tools": TOOLS})
    assert reply["status"] == "ok" and reply["tool_calls"] == [expected], reply
    assert reply["text"] == "" and reply["usage"] == {"prompt_tokens": 30, "completion_tokens": 12}

    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
    msgs: Any = [{"role": "user", "content": "Weather in Paris?"}]
    done = oa.chat.completions.create(model="scripted-model", messages=msgs, tools=TOOLS)  # type: ignore[arg-type]
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    call: Any = choice.message.tool_calls[0]
    assert call.id == "call_9" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    streamed = list(
        oa.chat.completions.create(model="scripted-model", messages=msgs, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    )
    deltas = [c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert [d[0].id for d in deltas] == ["call_9"]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    ol = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=30)
    answer = ol.chat("scripted-model", messages=msgs, tools=TOOLS)
    assert answer.message.tool_calls is not None
    assert answer.message.tool_calls[0].function.name == "get_weather"
    assert dict(answer.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert len(scripted.bodies) == 4


def test_each_upstream_http_error_maps_to_its_code_for_that_request_only(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    start_front(scripted.url)
    cases = [
        (429, "slow down", {}, "rate_limited"),
        (503, "overloaded", {}, "busy"),
        (400, "This model's maximum context length is 2048 tokens, you asked for 9000", {}, "too_long"),
        (400, "unknown field 'foo'", {}, "invalid_request"),
        (413, "request entity too large", {}, "too_long"),
        (500, "out of memory", {}, "engine_error"),
        (401, "bad key", {}, "engine_error"),
        (503, "queue full", {"code": "busy"}, "busy"),  # the server is an rkmqtt: its own code is kept
        (429, "from 'http'", {"code": "rate_limited"}, "rate_limited"),
    ]
    for status, message, fields, code in cases:
        scripted.handler = ScriptedServer.error(status, message, **fields)
        reply = device.ask({"prompt": "hi"})
        assert reply["status"] == "error", (status, reply)
        assert reply["error"]["code"] == code, (status, reply)
        assert f"answered {status}" in reply["error"]["message"] and message in reply["error"]["message"]
        scripted.handler = scripted.answer_text
        assert device.ask({"prompt": "hi"})["text"] == "Hello there", "only that request failed"
    stats = device.stats(lambda s: s["errors"] == len(cases))
    assert stats["engine_ready"] is True and stats["engine_problem"] is None


def test_an_error_inside_the_stream_ends_that_request(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    async def broken(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await ScriptedServer.sse(
            request,
            [chunk({"content": "Hal"}), {"error": {"message": "the bridge is shutting down", "code": "shutting_down"}}],
        )

    scripted.handler = broken
    start_front(scripted.url)
    reply = device.ask({"prompt": "hi"})
    assert reply["error"]["code"] == "shutting_down" and "shutting down" in reply["error"]["message"]


def test_a_silent_server_fails_the_request_after_upstream_timeout_and_is_left(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    scripted.handler = ScriptedServer.stall
    start_front(scripted.url, upstream_timeout=1)
    reply = device.ask({"prompt": "hi"})
    assert reply["error"]["code"] == "engine_error" and "upstream_timeout" in reply["error"]["message"]
    _until(lambda: scripted.cancelled == 1, "the server saw the client leave")


def test_a_cancel_closes_the_upstream_response(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    scripted.handler = ScriptedServer.endless
    start_front(scripted.url)
    rid = device.send({"prompt": "count"})
    device.first_chunk(rid, 20)
    device.probe.publish(f"{device.prefix}/cancel/dev", rid)
    reply = device.final(rid)
    assert reply["finish_reason"] == "cancelled" and reply["text"].startswith("0 ")
    _until(lambda: scripted.cancelled == 1, "the server saw the client leave")


def test_no_more_than_n_batch_requests_are_in_flight_upstream(
    scripted: ScriptedServer, start_front: Callable[..., Service], device: Device
) -> None:
    in_flight, most = 0, 0

    async def slow(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.3)
            return await scripted.answer_text(request, body)
        finally:
            in_flight -= 1

    scripted.handler = slow
    start_front(scripted.url, n_batch=2)
    rids = [device.send({"prompt": f"hi {i}"}) for i in range(5)]
    assert all(device.final(rid)["text"] == "Hello there" for rid in rids)
    assert most == 2 and len(scripted.bodies) == 5


def test_an_http_client_that_leaves_closes_the_upstream_response(
    scripted: ScriptedServer, start_front: Callable[..., Service]
) -> None:
    scripted.handler = ScriptedServer.endless
    port = free_port()
    start_front(scripted.url, http_listen=f"127.0.0.1:{port}")
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
    msgs: Any = [{"role": "user", "content": "count"}]
    stream = oa.chat.completions.create(model="scripted-model", messages=msgs, stream=True)
    assert any(c.choices and c.choices[0].delta.content for c in stream)  # the first text came
    stream.close()  # the client leaves
    _until(lambda: scripted.cancelled == 1, "the server saw the bridge leave")


def test_a_server_down_at_start_is_waited_for_and_shown(
    start_front: Callable[..., Service], device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    """With upstream_model set, the bridge starts without its server: one line says so, the stats
    (Home Assistant's Engine connectivity) show it, requests wait within their expiry, and once
    the server answers, the waiting request is answered."""
    scripted = ScriptedServer()  # its port is chosen; nothing listens there yet
    caplog.set_level(logging.INFO, logger="rkmqtt.engines.openai")
    try:
        start_front(scripted.url, upstream_model="scripted-model")
        down = device.stats(lambda s: not s["engine_ready"])
        assert scripted.url in down["engine_problem"] and "Connection refused" in down["engine_problem"]
        waiting = device.send({"prompt": "hi"})
        expiring = device.send({"prompt": "hi", "expires_in": 1})
        assert device.final(expiring, 10)["error"]["code"] == "expired"
        time.sleep(1.5)
        assert not device.probe.on(f"{device.prefix}/reply/dev/{waiting}"), "it waits for the server"
        scripted.start()
        assert device.final(waiting, 30)["text"] == "Hello there"
        assert device.stats(lambda s: s["engine_ready"])["engine_problem"] is None
    finally:
        scripted.close()
    lines = [r for r in caplog.records if r.name.startswith("rkmqtt.engines.openai") and r.levelno >= logging.INFO]
    assert [r.levelname for r in lines] == ["WARNING", "INFO"], [r.getMessage() for r in lines]
    assert scripted.url in lines[0].getMessage() and "Connection refused" in lines[0].getMessage()
    assert "answers again" in lines[1].getMessage()


def test_a_server_down_at_start_without_upstream_model_stops_with_one_line(mosquitto: Mosquitto, prefix: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAiEngine.from_settings(bridge_settings(mosquitto.url, prefix, engine="openai", upstream_url=url))
    with pytest.raises(ConfigError) as e:
        engine.load()
    assert url in str(e.value) and "set upstream_model" in str(e.value) and "\n" not in str(e.value)


def test_check_tries_the_server_in_plain_words(
    scripted: ScriptedServer, mosquitto: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The upstream server is checked without --load-model (it loads nothing here: the model is the
    server's); --load-model also starts the engine, unless a check failed already."""
    settings = bridge_settings(mosquitto.url, prefix, engine="openai", upstream_url=scripted.url, session_expiry=0)
    assert run_checks(settings) == 0
    out = capsys.readouterr().out
    assert f"[ok  ] upstream: {scripted.url} answered" in out
    assert "[ok  ] upstream model: scripted-model (the first of those listed: scripted-model)" in out
    assert "[ok  ] upstream generation: one token ('Hello there')" in out
    assert scripted.bodies[-1]["max_tokens"] == 1
    assert "engine:" not in out, out
    assert run_checks(settings, load_model=True) == 0
    assert "[ok  ] engine: openai loaded scripted-model in" in capsys.readouterr().out

    scripted.handler = ScriptedServer.error(404, "model 'x' not found")
    assert run_checks(settings.model_copy(update={"upstream_model": "x"})) == 1
    out = capsys.readouterr().out
    assert "[FAIL] upstream model: x is not among those listed (scripted-model): set upstream_model" in out
    assert "[FAIL] upstream generation: the upstream server answered 404: model 'x' not found" in out

    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert run_checks(settings.model_copy(update={"upstream_url": dead}), load_model=True) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] upstream: cannot reach {dead} (Connection refused): start the server or fix upstream_url" in out
    assert "engine:" not in out and "1 problem(s) found" in out, out


def test_mqtt_tools_to_an_engine_that_takes_none(
    start_bridge: Callable[..., Service], device: Device, mosquitto: Mosquitto, prefix: str
) -> None:
    """Admission leaves them out (or refuses them with strict_tools), for both doors, as the HTTP API does."""
    svc = start_bridge(FakeEngine(tools=False))
    wait_online(mosquitto.url, prefix)
    answered = device.ask({"prompt": "call:get_weather", "tools": TOOLS})
    assert answered["status"] == "ok" and answered["text"] == "no tool get_weather" and answered["tool_calls"] == []
    svc.stop()
    start_bridge(FakeEngine(tools=False), strict_tools=True)
    wait_online(mosquitto.url, prefix)
    refused = device.ask({"prompt": "call:get_weather", "tools": TOOLS})
    assert refused["error"]["code"] == "invalid_request" and "takes no tools" in refused["error"]["message"]
    assert device.ask({"prompt": "no tools here"})["status"] == "ok"


# -- the pure parts -----------------------------------------------------------------------------
def test_settings_of_the_openai_engine() -> None:
    with pytest.raises(ConfigError, match="engine openai needs upstream_url"):
        load_settings({"engine": "openai"})
    with pytest.raises(ConfigError, match=r"upstream_url='ftp://x' .* http://host:port/v1"):
        load_settings({"engine": "openai", "upstream_url": "ftp://x"})
    with pytest.raises(ConfigError) as e:
        load_settings({"upstream_api_key": "sekrit", "upstream_url": "http://u:pw@h/v1", "n_batch": 0})
    assert "sekrit" not in str(e.value) and "pw" not in str(e.value)


def test_the_api_key_comes_from_its_file(tmp_path: Any) -> None:
    key = tmp_path / "key"
    key.write_text("k-123\n")
    s = load_settings({"engine": "openai", "upstream_url": "http://h:1/v1", "upstream_api_key_file": str(key)})
    assert s.upstream_key() == "k-123"
    assert load_settings({"upstream_api_key": "direct", "upstream_api_key_file": str(key)}).upstream_key() == "direct"
    with pytest.raises(ConfigError, match=r"upstream_api_key_file=.* cannot be read"):
        load_settings({"upstream_api_key_file": str(tmp_path / "missing")})


def test_status_errors_name_the_status_and_what_to_check() -> None:
    assert status_error(401, {"message": "bad key"}, "")[1].endswith("(check upstream_api_key)")
    assert status_error(404, "nope", "")[0] == ErrorCode.ENGINE_ERROR
    assert status_error(422, {"message": "prompt exceeds the context size"}, "")[0] == ErrorCode.TOO_LONG
    assert status_error(502, None, "Bad Gateway") == (
        ErrorCode.ENGINE_ERROR,
        "the upstream server answered 502: Bad Gateway",
    )


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _tc(index: int | None, id: str | None = None, name: str | None = None, arguments: Any = None) -> _Obj:
    return _Obj(index=index, id=id, function=_Obj(name=name, arguments=arguments))


def _delta_chunk(*calls: _Obj, finish: str | None = None) -> _Obj:
    delta = _Obj(content=None, tool_calls=list(calls))
    return _Obj(usage=None, model_extra={}, choices=[_Obj(index=0, finish_reason=finish, delta=delta)])


def test_tool_call_deltas_without_indexes_and_bad_arguments() -> None:
    a = Answer("k")
    a.feed(_delta_chunk(_tc(None, "a", "one", '{"x": 1}')))
    a.feed(_delta_chunk(_tc(None, "b", "two", {"y": 2})))  # a server that sends an object
    a.feed(_delta_chunk(_tc(None, "c", "three", "{not json"), finish="tool_calls"))
    end = a.finish()
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in end.tool_calls] == [
        ("a", "one", {"x": 1}),
        ("b", "two", {"y": 2}),
    ]
    assert end.warnings == ("left out a tool call of the model ('three'): its arguments are not a JSON object",)
    assert (end.reason, end.completion_tokens, end.prompt_tokens) == ("stop", 3, None)


def test_tool_turns_get_the_ids_of_the_calls_they_answer() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    msgs = chat_messages(
        [
            ChatMessage("assistant", "", (call, {**call, "id": "given"})),
            ChatMessage("tool", "r1"),
            ChatMessage("tool", "r2", tool_call_id="given"),
        ]
    )
    assert [c["id"] for c in msgs[0]["tool_calls"]] == ["call_0_0", "given"]
    assert (msgs[1]["tool_call_id"], msgs[2]["tool_call_id"]) == ("call_0_0", "given")
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == "{}"


def _until(pred: Callable[[], bool], what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out: {what}"
        time.sleep(0.05)
