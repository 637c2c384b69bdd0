"""The RKLLM engine renders conversations on the host with the model's chat template (the runtime's own
switched off) and gives the runtime token ids where a tokenizer is at hand; the stand-in reads them back
as text, keeps its directives, logs what it read (RKLLM_STANDIN_INPUT_LOG) and plays a model that calls
a tool (@say64). A conversation longer than the context is trimmed."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rkmqtt.cli.check import run_checks
from rkmqtt.engines.base import ChatMessage, Prepared
from rkmqtt.engines.chat.source import builtin
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.errors import ConfigError, RequestRejected
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.protocol import ErrorCode
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    describe,
    drive,
    expected_text,
    make_engine,
    make_settings,
    read_input_log,
    request,
    standin_env_fixture,
    standin_fixture,
    vocab_model,
)

pytestmark = pytest.mark.usefixtures("standin_env")
TOOLS = ({"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object"}}},)


@pytest.fixture
def input_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "inputs.log"
    monkeypatch.setenv("RKLLM_STANDIN_INPUT_LOG", str(log))
    return log


def run(
    engine: RkllmEngine, key: str, messages: tuple[ChatMessage, ...], tools: tuple[dict[str, Any], ...] = ()
) -> str:
    engine.submit([engine.prepare(replace(request(key, messages=messages), tools=tools))])
    return drive(engine, [key])[key].text


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_token_ids_in_the_template_off_and_the_directives_kept(
    standin: Standin, tmp_path: Path, input_log: Path, abi: str
) -> None:
    model = vocab_model(tmp_path / "m")
    engine = make_engine(standin, abi, model=str(model), chat_template="qwen2.5", n_batch=1)
    try:
        info = engine.info()
        assert info["prompt_input"] == "token ids" and str(model.parent / "tokenizer.json") in info["prompt_length"]
        messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there @len=5"))
        rendered = builtin("qwen2.5").render(messages)
        prepared = engine.prepare(request("a", messages=messages))
        assert prepared.prompt_tokens == len(prepared.data[1])  # counted exactly, the ids the runtime gets
        engine.submit([prepared])
        out = drive(engine, ["a"])["a"]
        assert out.text == expected_text(rendered, 5)  # the stand-in echoes what it read: the decoded rendering
        d = describe(standin.lib(abi))
        assert (d["template_system"], d["template_prefix"], d["template_postfix"]) == ("", "", "")  # the runtime's off
        assert d["last_input_types"] == "1"
        ((head, text),) = read_input_log(input_log)
        assert (
            head
            == f"--- rkllm-standin input: run {d['process_runs']}, slot 0, tokens, {len(rendered.encode())} bytes ---"
        )
        assert text == rendered
    finally:
        engine.close()


def test_without_a_tokenizer_the_rendered_text_goes_in(standin: Standin, input_log: Path) -> None:
    engine = make_engine(standin, "1.3", chat_template="llama3", n_batch=2)
    try:
        assert engine.info()["prompt_input"] == "text" and engine.capabilities.tools
        messages = (ChatMessage("user", "A"), ChatMessage("assistant", "B"), ChatMessage("user", "C @len=3"))
        engine.submit([engine.prepare(request("t", messages=messages))])
        drive(engine, ["t"])
        (_, text), (_, pad) = read_input_log(input_log)
        assert text == builtin("llama3").render(messages) and pad == "Hi"  # the padded slot
        assert describe(standin.lib("1.3"))["last_input_types"] == "0,0"
    finally:
        engine.close()


@pytest.mark.parametrize("tokens", [True, False])
def test_say64_answers_its_text_once_then_done(standin: Standin, tmp_path: Path, tokens: bool) -> None:
    model = vocab_model(tmp_path / "m") if tokens else standin.model
    engine = make_engine(standin, "1.3", model=str(model), chat_template="qwen2.5", n_batch=1)
    try:
        call = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights"}}\n</tool_call>'
        user = ChatMessage("user", "Lights on, please! @say64=" + base64.b64encode(call.encode()).decode())
        engine.submit([engine.prepare(replace(request("a", messages=(user,)), tools=TOOLS))])
        out = drive(engine, ["a"])["a"]
        assert out.text == "" and out.final is not None
        assert out.final.tool_calls == (
            {"type": "function", "function": {"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights"}}},
        )  # type: ignore[union-attr]
        # the same conversation back with the tool's result: the model answers
        history = (user, ChatMessage("assistant", "", out.final.tool_calls), ChatMessage("tool", '{"success": true}'))  # type: ignore[union-attr]
        assert run(engine, "b", history, TOOLS) == "Done."
        # without tools the call stays text (nobody asked for calls)
        other = ChatMessage("user", "x @say64=" + base64.b64encode("plain é text".encode()).decode())
        assert run(engine, "c", (other,)) == "plain é text"
    finally:
        engine.close()


def test_a_conversation_longer_than_the_context_is_trimmed(standin: Standin, tmp_path: Path, input_log: Path) -> None:
    model = vocab_model(tmp_path / "m")
    engine = make_engine(standin, "1.3", model=str(model), chat_template="qwen2.5", n_batch=1, max_context=512)
    try:
        turns: list[ChatMessage] = [ChatMessage("system", "You are a voice assistant.")]
        for i in range(60):
            turns += [ChatMessage("user", f"question {i} " * 5), ChatMessage("assistant", f"answer {i} " * 5)]
        turns.append(ChatMessage("user", "the last question @len=4"))
        prepared = engine.prepare(request("long", messages=tuple(turns), max_new_tokens=64))
        assert prepared.prompt_tokens is not None and prepared.prompt_tokens <= 512 - 64
        engine.submit([prepared])
        assert drive(engine, ["long"])["long"].final is not None
        ((_, text),) = read_input_log(input_log)
        assert text.startswith("<|im_start|>system\nYou are a voice assistant.<|im_end|>\n<|im_start|>user\nquestion ")
        assert "question 0 " not in text and text.endswith(
            "the last question @len=4<|im_end|>\n<|im_start|>assistant\n"
        )
        # the request's own num_ctx is honoured below the engine's
        small = replace(request("small", messages=tuple(turns), max_new_tokens=64), context=256)
        assert engine.prepare(small).prompt_tokens <= 256 - 64  # type: ignore[operator]
        with pytest.raises(RequestRejected) as e:  # one turn that cannot fit alone
            engine.prepare(request("huge", "word " * 2000))
        assert e.value.code is ErrorCode.TOO_LONG and "max_context=512" in e.value.message
    finally:
        engine.close()


def test_the_settings_that_choose_the_template(standin: Standin, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat_template and rkllm_chat_template are both set"):
        make_engine(standin, "1.3", chat_template="qwen2.5", rkllm_chat_template="s|p|q")
    legacy = make_engine(standin, "1.3")
    try:
        assert legacy.info()["chat_template"].startswith("the runtime's built-in template")
        assert not legacy.capabilities.tools
    finally:
        legacy.close()
    # the model's own tokenizer_config.json beside it
    folder = tmp_path / "beside"
    model = vocab_model(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[-1].content }}|"}))
    engine = make_engine(standin, "1.3", model=str(model))
    try:
        assert "tokenizer_config.json" in engine.info()["chat_template"] and not engine.capabilities.tools
        prepared = engine.prepare(request("x", "hello @len=2"))
        assert isinstance(prepared, Prepared) and prepared.data[0] == "hello @len=2|"
    finally:
        engine.close()


def test_check_names_the_template_without_loading_the_model(
    standin: Standin, tmp_path: Path, mosquitto: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rkmqtt check` says which template renders conversations, found from the settings and the files
    beside the model with no model loaded; with --load-model, the loaded engine's, with its context; a
    template that cannot be found is a problem before anything is loaded."""
    model = vocab_model(tmp_path / "m")
    (model.parent / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ tools }}{{ messages }}"}))
    settings = make_settings(
        standin, "1.3", model=str(model), broker=mosquitto.url, topic_prefix=prefix, session_expiry=0
    )
    assert run_checks(settings) == 0
    out = capsys.readouterr().out
    assert "[note] engine: rkllm: model not loaded" in out and "loaded" not in out.split("model not loaded")[1]
    assert (
        f"[note] chat template: {model.parent / 'tokenizer_config.json'} (chat_template), rendered here "
        "(the runtime's own template off); tools reach the model\n"
    ) in out
    assert run_checks(settings.model_copy(update={"chat_template": "llama3"}), load_model=True) == 0
    out = capsys.readouterr().out
    assert "[ok  ] engine: rkllm loaded" in out
    assert "[note] chat template: built-in llama3, rendered here (the runtime's own template off); tools reach " in out
    assert out.split("tools reach the model")[1].startswith("; context 4096 tokens\n")
    assert run_checks(settings.model_copy(update={"rkllm_chat_template": "s|p|q"})) == 0
    assert (
        "[note] chat template: rkllm_chat_template (the runtime's, with the conversation flattened into one user "
        "turn); no place for tools (answered without them; strict_tools refuses them)\n"
    ) in capsys.readouterr().out
    both = settings.model_copy(update={"rkllm_chat_template": "s|p|q", "chat_template": "qwen2.5"})
    assert run_checks(both) == 1
    out = capsys.readouterr().out
    assert "[FAIL] chat template: settings chat_template and rkllm_chat_template are both set" in out
    missing = str(tmp_path / "nope.jinja")
    assert run_checks(settings.model_copy(update={"chat_template": missing})) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] chat template: setting chat_template={missing!r}: neither a built-in template" in out
    assert "1 problem(s) found" in out
