"""Home Assistant's Assist through its Ollama integration, replayed with the real `ollama` and `openai`
clients from requests captured from a real Home Assistant Core 2025.4.4 (tests/fixtures/homeassistant/:
the system prompt with the demo's entities, 18 tools, num_ctx 8192.0, keep_alive "-1.0s", stream), on
the numpy engine with the packaged SmolLM2-135M and on the RKLLM stand-in with the qwen2.5 template."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from rkmqtt.engines.numpy.engine import NumpyEngine
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.mqtt.broker import free_port
from rkmqtt.service import Service
from tests.mqtt_probe import Probe
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    make_settings,
    read_input_log,
    standin_env_fixture,
    standin_fixture,
    vocab_model,
)

FIXTURES = Path(__file__).parent / "fixtures" / "homeassistant"
CALL = {"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights", "domain": ["light"]}}


def captured(name: str) -> dict[str, Any]:
    """A captured request: its JSON body and the headers that are not per-request."""
    return dict(json.loads((FIXTURES / name).read_text(encoding="utf-8")))


def chat_args(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The captured body as the `ollama` client's chat() arguments (what Home Assistant passes it)."""
    return {
        "model": model,
        "messages": body["messages"],
        "tools": body["tools"] or None,
        "stream": body["stream"],
        "keep_alive": body["keep_alive"],
        "options": body["options"],
    }


def say(text: str) -> str:
    """A stand-in directive: the runtime answers `text` the first time its handle sees it, and "Done."
    after, as a model does once the tool it called has run (tests/standin/rkllm_standin.c)."""
    return "@say64=" + base64.b64encode(text.encode()).decode()


def tool_call_text(call: dict[str, Any] = CALL) -> str:
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


# -- the default engine and model --------------------------------------------------------------------


def test_assist_with_control_on_answers_200_with_text_on_the_default_model(
    start_bridge: Callable[..., Service],
) -> None:
    """SmolLM2-135M's template has no place for tools: the request is answered without them, as text."""
    port = free_port()
    svc = start_bridge(NumpyEngine(n_batch=1), http_listen=f"127.0.0.1:{port}", default_new_tokens=24)
    assert svc.engine is not None and svc.engine.info()["max_context"] == 8192  # the model's own (GGUF)
    req = captured("assist-control-on.json")
    body = req["json"]
    assert len(body["tools"]) == 18 and body["options"] == {"num_ctx": 8192.0} and body["keep_alive"] == "-1.0s"
    client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=300)
    model = client.list().models[0].model
    assert model == body["model"]  # the name Home Assistant picked from /api/tags
    parts = list(client.chat(**chat_args(body, model)))
    text = "".join(p.message.content or "" for p in parts)
    assert parts[-1].done and text.strip(), "an answer in words"
    assert not any(p.message.tool_calls for p in parts)
    # the prompt holds the system prompt (entities and all), not the tool definitions
    assert parts[-1].prompt_eval_count and 600 < parts[-1].prompt_eval_count < 2000
    # exactly as Home Assistant sends it, headers and all: a 200 NDJSON stream
    import urllib.request

    raw = urllib.request.Request(
        f"http://127.0.0.1:{port}{req['path']}", data=json.dumps(body).encode(), headers=req["headers"], method="POST"
    )
    with urllib.request.urlopen(raw, timeout=300) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in resp.read().splitlines()]
    assert lines[-1]["done"] and "".join(line["message"]["content"] for line in lines).strip()


def test_a_conversation_far_longer_than_the_context_is_answered(start_bridge: Callable[..., Service]) -> None:
    """50,000 characters of history with Home Assistant's system prompt: the oldest turns are left out
    (only what fits num_ctx is prefilled), the newest question answered."""
    port = free_port()
    start_bridge(NumpyEngine(n_batch=1), http_listen=f"127.0.0.1:{port}", default_new_tokens=8)
    body = copy.deepcopy(captured("assist-control-off.json")["json"])
    system, last = body["messages"][0], body["messages"][-1]
    history: list[dict[str, Any]] = []
    i = 0
    while sum(len(m["content"]) for m in history) < 50_000:
        history.append({"role": "user", "content": f"Question {i}: " + "tell me about the garden " * 20})
        history.append({"role": "assistant", "content": f"Answer {i}: " + "the garden is green " * 20})
        i += 1
    body["messages"] = [system, *history, last]
    assert len(json.dumps(body)) < 65_536  # within max_payload_bytes: never refused for its length alone
    body["options"] = {"num_ctx": 2048}  # what fits is prefilled: a CI-sized context
    client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=300)
    parts = list(client.chat(**chat_args(body, "SmolLM2-135M-Instruct.Q4_1")))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert parts[-1].prompt_eval_count is not None and parts[-1].prompt_eval_count <= 2048 - 8
    assert "".join(p.message.content or "" for p in parts)
    # one turn that cannot fit even alone is refused, and Home Assistant's client reads why
    body["messages"] = [system, {"role": "user", "content": "word " * 3000}]
    refused = list(client.chat(**chat_args(body, "SmolLM2-135M-Instruct.Q4_1")))
    said = "".join(p.message.content or "" for p in refused)
    assert said.startswith("Sorry, rkmqtt could not answer: the prompt is") and "(too_long)" in said


# -- the RKLLM engine with the qwen2.5 template --------------------------------------------------------


@pytest.fixture
def rkllm_bridge(
    standin: Standin,
    start_bridge: Callable[..., Service],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standin_env: None,
) -> tuple[int, Path, Service]:
    """A bridge on the stand-in runtime (ABI 1.3) with --chat-template qwen2.5 and the model's
    tokenizer.json beside it (token ids in), logging every input the runtime reads."""
    log = tmp_path / "inputs.log"
    monkeypatch.setenv("RKLLM_STANDIN_INPUT_LOG", str(log))
    ha = captured("assist-control-on.json")["json"]
    model = vocab_model(tmp_path / "model", corpus=[ha["messages"][0]["content"], json.dumps(ha["tools"])])
    settings = make_settings(standin, "1.3", model=str(model), chat_template="qwen2.5", n_batch=2)
    engine = RkllmEngine(settings, backoff_s=0.01, backoff_max_s=0.05)
    port = free_port()
    svc = start_bridge(
        engine,
        http_listen=f"127.0.0.1:{port}",
        model=settings.model,
        rkllm_library=settings.rkllm_library,
        chat_template="qwen2.5",
        n_batch=2,
        max_new_tokens=1024,
    )
    return port, log, svc


def assist_turn(text: str) -> dict[str, Any]:
    body = copy.deepcopy(captured("assist-control-on.json")["json"])
    body["messages"][-1]["content"] = text
    return body


def test_assist_on_rkllm_renders_system_tools_and_gets_a_hass_turn_on_back(
    rkllm_bridge: tuple[int, Path, Service],
) -> None:
    port, log, svc = rkllm_bridge
    assert svc.engine is not None and svc.engine.capabilities.tools
    info = svc.engine.info()
    assert info["chat_template"].startswith("built-in qwen2.5") and info["prompt_input"] == "token ids"
    client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=60)
    model = client.list().models[0].model
    assert model is not None and client.show(model).capabilities == ["completion", "tools"]
    user = "Turn on the kitchen lights " + say(tool_call_text())
    body = assist_turn(user)
    parts = list(client.chat(**chat_args(body, model)))
    calls = [c for p in parts for c in p.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [(CALL["name"], CALL["arguments"])]
    assert parts[-1].done and not "".join(p.message.content or "" for p in parts).strip()
    # what the runtime read: the whole conversation in Qwen's ChatML, the tools in <tools>, as token ids
    (head, text), *_ = [e for e in read_input_log(log) if "Turn on the kitchen lights" in e[1]]
    assert ", tokens," in head
    system = body["messages"][0]["content"]
    assert text.startswith(f"<|im_start|>system\n{system}\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(body["tools"][0]) in text and '"name": "GetLiveContext"' in text
    assert text.endswith(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    # Home Assistant runs the tool and sends the conversation back with its result: the model's answer
    follow = copy.deepcopy(body)
    follow["messages"] += [
        {"role": "assistant", "content": "", "tool_calls": [{"function": CALL}]},
        {"role": "tool", "content": json.dumps({"success": True, "targets": ["light.kitchen_lights"]})},
    ]
    parts = list(client.chat(**chat_args(follow, model)))
    assert "".join(p.message.content or "" for p in parts) == "Done." and parts[-1].done
    (_, again), *_ = [e for e in read_input_log(log) if "<tool_response>" in e[1]]
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "HassTurnOn", "arguments": ' in again
    assert again.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_the_call_comes_back_in_openai_shape_streamed_and_over_mqtt(
    rkllm_bridge: tuple[int, Path, Service], prefix: str, probe_factory: Callable[..., Probe]
) -> None:
    port, _, _ = rkllm_bridge
    body = assist_turn("Turn on the kitchen lights " + say(tool_call_text()))
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    model = oa.models.list().data[0].id
    chunks = list(oa.chat.completions.create(model=model, messages=body["messages"], tools=body["tools"], stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) == 1 and deltas[0].function is not None and deltas[0].id
    assert (
        deltas[0].function.name == "HassTurnOn" and json.loads(deltas[0].function.arguments or "") == CALL["arguments"]
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # an MQTT device that gives tools gets the calls in its final reply
    probe = probe_factory([f"{prefix}/reply/#"])
    bed = {"name": "HassTurnOff", "arguments": {"name": "Bed Light"}}
    ask = {"id": "lights", "messages": [{"role": "user", "content": "Bed light off " + say(tool_call_text(bed))}]}
    probe.publish(f"{prefix}/request/panel", {**ask, "tools": body["tools"][:2]})
    final = probe.final(f"{prefix}/reply/panel/lights")
    assert final["status"] == "ok" and final["text"] == ""
    assert final["tool_calls"] == [{"id": None, "type": "function", "function": bed}]
