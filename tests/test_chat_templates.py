"""The chat templates (engines/chat/): the built-ins render the formats their model families were
trained on (the expected strings below are those formats, written out), where a template comes from,
trimming a conversation to the context as Ollama does, and the model's calls taken out of its text."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from rkmqtt.engines.base import ChatMessage, ErrorEvent, FinishEvent, TokenEvent
from rkmqtt.engines.chat.fit import DoesNotFit, fit
from rkmqtt.engines.chat.source import BUILTINS, beside, builtin, find_template, find_tokenizer, from_setting
from rkmqtt.engines.chat.toolcalls import CallFilter
from rkmqtt.errors import ConfigError
from rkmqtt.protocol import ErrorCode

TOOL = {
    "type": "function",
    "function": {
        "name": "HassTurnOn",
        "description": "Turns on a device",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights"}}}
ASSIST = (
    ChatMessage("system", "You are a voice assistant."),
    ChatMessage("user", "Turn on the kitchen lights"),
    ChatMessage("assistant", "", (CALL,)),
    ChatMessage("tool", '{"success": true}'),
)
CHAT = (ChatMessage("user", "Hi"), ChatMessage("assistant", "<think>x</think>Hello"), ChatMessage("user", "Bye"))
TOOL_JSON = json.dumps(TOOL)
QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    f"function signatures within <tools></tools> XML tags:\n<tools>\n{TOOL_JSON}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
QWEN_ASSIST = (
    "<|im_start|>user\nTurn on the kitchen lights<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights"}}\n'
    "</tool_call><|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"success": true}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n"
)


def test_qwen25_tools_in_the_system_turn_calls_and_results_in_their_tags() -> None:
    t = builtin("qwen2.5")
    assert t.takes_tools and (t.bos_token, t.eos_token) == ("", "<|im_end|>")
    expected = "<|im_start|>system\nYou are a voice assistant." + QWEN_TOOLS + QWEN_ASSIST
    assert t.render(ASSIST, tools=(TOOL,)) == expected
    # without a system message, Qwen's own; without tools, a plain system turn
    assert t.render(CHAT) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>x</think>Hello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    # two results in a row share one user turn; an answer with text and a call keeps both
    turns = (
        ChatMessage("user", "Both"),
        ChatMessage("assistant", "On it.", (CALL, CALL)),
        ChatMessage("tool", "a"),
        ChatMessage("tool", "b"),
    )
    call = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights"}}\n</tool_call>'
    assert t.render(turns, add_generation_prompt=False).endswith(
        f"<|im_start|>assistant\nOn it.\n{call}\n{call}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response><|im_end|>\n"
    )


def test_qwen3_no_default_system_reasoning_dropped_and_thinking_off() -> None:
    t = builtin("qwen3")
    expected = "<|im_start|>system\nYou are a voice assistant." + QWEN_TOOLS + QWEN_ASSIST + "<think>\n\n</think>\n\n"
    assert t.render(ASSIST, tools=(TOOL,)) == expected
    assert t.render(CHAT) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_llama3_date_tools_in_the_first_user_turn_calls_as_json() -> None:
    t = builtin("llama3")
    today = dt.datetime.now().strftime("%d %b %Y")
    indented = json.dumps(TOOL, indent=4)
    assert t.render(ASSIST, tools=(TOOL,)) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\nYou are a voice assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
        "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
        f"{indented}\n\nTurn on the kitchen lights<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "HassTurnOn", "parameters": {"name": "Kitchen '
        'Lights"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"{\\"success\\": true}"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert t.render(CHAT[:1]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {today}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    with pytest.raises(ValueError, match="single tool-calls"):
        t.render((ChatMessage("user", "x"), ChatMessage("assistant", "", (CALL, CALL))))


def test_deepseek_r1_has_no_place_for_tools_and_opens_a_think_block() -> None:
    t = builtin("deepseek-r1")
    assert not t.takes_tools
    assert t.render(CHAT) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜><think>\n"
    )
    assert t.render(ASSIST[:2]) == (
        "<｜begin▁of▁sentence｜>You are a voice assistant.<｜User｜>Turn on the kitchen lights<｜Assistant｜><think>\n"
    )
    assert '<｜tool▁output▁begin｜>{"success": true}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>' in t.render(ASSIST)


def test_chatml_has_no_place_for_tools() -> None:
    t = builtin("chatml")
    assert not t.takes_tools
    assert t.render(ASSIST[:2], tools=(TOOL,)) == (
        "<|im_start|>system\nYou are a voice assistant.<|im_end|>\n<|im_start|>user\nTurn on the kitchen lights"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert set(BUILTINS) >= {"qwen2.5", "qwen3", "llama3", "deepseek-r1"}


# -- where the template comes from ------------------------------------------------------------------


def test_the_setting_names_a_builtin_or_a_file(tmp_path: Path) -> None:
    assert from_setting("qwen2.5").origin == "built-in qwen2.5"
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert from_setting(str(jinja)).render(CHAT[:1]) == "[user] Hi\n"
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "<{{ bos_token }}>{{ messages[0].content }}", "bos_token": "<s>"}))
    assert from_setting(str(config)).render(CHAT[:1]) == "<<s>>Hi"
    with pytest.raises(ConfigError, match=r"chat_template='qwen9': neither a built-in template \(qwen2.5, qwen3"):
        from_setting("qwen9")
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no chat_template"):
        from_setting(str(tmp_path / "none.json"))
    (tmp_path / "bad.jinja").write_text("{% for %}")
    with pytest.raises(Exception, match="does not compile"):
        from_setting(str(tmp_path / "bad.jinja"))


def test_the_tokenizer_files_beside_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model.rkllm"
    model.write_bytes(b"x")
    assert beside(model) is None and find_template(None, model) is None and find_tokenizer(None, model) is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "eos_token": {"content": "E"}}))
    found = beside(model)
    assert found is not None and found.render(CHAT) == "DE" and "tokenizer_config.json" in found.origin
    (tmp_path / "chat_template.jinja").write_text("J")  # where newer transformers save it: it wins
    assert find_template(None, model).render(CHAT) == "J"  # type: ignore[union-attr]
    assert find_template("llama3", model).origin == "built-in llama3"  # type: ignore[union-attr]  # the setting wins
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(None, model) == tmp_path / "tokenizer.json"
    assert find_tokenizer(tmp_path / "other.json", model) == tmp_path / "other.json"


# -- trimming ---------------------------------------------------------------------------------------


def chars(messages: tuple[ChatMessage, ...]) -> tuple[int, str]:
    text = "".join(f"[{m.role}]{m.content}" for m in messages)
    return len(text), text


def test_fit_keeps_the_system_messages_and_the_newest_turns() -> None:
    turns = [ChatMessage("user" if i % 2 == 0 else "assistant", f"{i:02d}" * 20) for i in range(40)]
    convo = (ChatMessage("system", "S" * 50), *turns)
    whole = fit(convo, 10_000, chars)
    assert whole.dropped == 0 and whole.messages == convo
    calls: list[int] = []

    def counted(messages: tuple[ChatMessage, ...]) -> tuple[int, str]:
        calls.append(len(messages))
        return chars(messages)

    part = fit(convo, 500, counted)
    assert part.tokens <= 500 and part.messages[0].role == "system" and part.messages[1].role == "user"
    assert part.messages[-1] == convo[-1] and part.rendered == chars(part.messages)[1]
    assert part.dropped == len(convo) - len(part.messages) and part.dropped % 2 == 0
    # the newest that fit: one more pair would not
    assert chars((convo[0], *convo[len(convo) - len(part.messages) - 1 :]))[0] > 500
    assert len(calls) <= 7  # bisection: a few renderings, not one per turn
    with pytest.raises(DoesNotFit) as e:
        fit(convo, 60, chars)
    assert e.value.tokens == chars((convo[0], convo[-2], convo[-1]))[0]


def test_fit_never_starts_at_an_answer_or_a_tool_result() -> None:
    convo = (
        ChatMessage("user", "u" * 100),
        ChatMessage("assistant", "", (CALL,)),
        ChatMessage("tool", "t" * 100),
        ChatMessage("user", "v"),
        ChatMessage("assistant", "", (CALL,)),
        ChatMessage("tool", "ok"),
    )
    part = fit(convo, 40, chars)
    assert [m.role for m in part.messages] == ["user", "assistant", "tool"] and part.messages[0].content == "v"
    with pytest.raises(DoesNotFit):
        fit((ChatMessage("assistant", "a" * 100),), 10, chars)


# -- tool calls out of the text -------------------------------------------------------------------------


def test_the_call_filter_takes_calls_out_of_a_watched_requests_text() -> None:
    f = CallFilter()
    f.watch("a")
    text = 'Sure. <tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen Lights"}}\n</tool_call>'
    events = [TokenEvent("a", text[i : i + 5]) for i in range(0, len(text), 5)] + [TokenEvent("b", "<tool_call>")]
    events.append(FinishEvent("a", "stop", None, len(events) - 1, tool_calls=({"id": "x", **CALL},)))
    out = f.events(events)
    mine = [e for e in out if isinstance(e, TokenEvent) and e.key == "a"]
    assert "".join(e.text for e in mine) == "Sure. " and sum(e.tokens for e in mine) == len(text) // 5 + 1
    assert [e.text for e in out if isinstance(e, TokenEvent) and e.key == "b"] == ["<tool_call>"]  # not watched
    (finish,) = [e for e in out if isinstance(e, FinishEvent)]
    assert finish.tool_calls == (CALL, {"id": "x", **CALL})  # the text's, then the engine's own
    f.watch("c")
    assert f.events([ErrorEvent("c", ErrorCode.ENGINE_ERROR, "x")])
    assert f.events([TokenEvent("c", "<tool_call>")])[0].text == "<tool_call>"  # forgotten after its end


def test_llama3_calls_are_the_whole_answer_as_json() -> None:
    """Llama 3 answers a call as bare JSON: held back while it may be one, text when it is not."""
    assert builtin("llama3").bare_json_calls and not builtin("qwen2.5").bare_json_calls
    f = CallFilter()
    answers = {
        "a": '{"name": "HassTurnOn", "parameters": {"name": "Kitchen Lights"}}',
        "b": "The lights are on.",
        "c": "{not a call}",
    }
    events: list[TokenEvent | FinishEvent] = []
    for key, text in answers.items():
        f.watch(key, bare_json=True)
        events += [TokenEvent(key, text[i : i + 4]) for i in range(0, len(text), 4)]
        events.append(FinishEvent(key, "stop", None, 1))
    out = f.events(list(events))
    shown = {k: "".join(e.text for e in out if isinstance(e, TokenEvent) and e.key == k) for k in answers}
    calls = {e.key: e.tool_calls for e in out if isinstance(e, FinishEvent)}
    assert shown == {"a": "", "b": "The lights are on.", "c": "{not a call}"}
    assert calls["a"] == (CALL,) and calls["b"] == calls["c"] == ()
    # "b" streamed as it came (its first piece was not "{"): only an answer that starts with "{" waits
    assert next(e.text for e in out if isinstance(e, TokenEvent) and e.key == "b") == "The "
