"""The HTTP API's pure parts: stop sequences and tool calls in streamed text, its settings, and
tool definitions reaching a chat template that takes them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rkmqtt.engines.base import ChatMessage
from rkmqtt.engines.chat.source import builtin
from rkmqtt.engines.chat.template import ChatTemplate
from rkmqtt.engines.chat.toolcalls import ToolCall, ToolCallScanner, parse_call, split_tool_calls
from rkmqtt.errors import ConfigError
from rkmqtt.http.auth import Auth
from rkmqtt.http.common import ModelCard
from rkmqtt.http.textscan import StopScanner, cut_at_stop
from rkmqtt.protocol import Info, Limits
from rkmqtt.settings import load_settings

# A Qwen2.5-like template: tool definitions in the system turn, calls and results in Hermes tags.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(len(text), c) for c in cuts})
    out, last = [], 0
    for p in [*points, len(text)]:
        out.append(text[last:p])
        last = p
    return out


# -- stop sequences -------------------------------------------------------------------------------


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert cut_at_stop("one two", ["x"]) == ("one two", False)
    assert cut_at_stop("abc", []) == ("abc", False)


@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_streamed_stop_scanning_equals_cutting_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    scanner = StopScanner(stops)
    shown = "".join(scanner.feed(p) for p in _pieces(text, cuts)) + scanner.flush()
    assert (shown, scanner.hit) == cut_at_stop(text, stops)


def test_text_that_may_start_a_stop_is_held_back_until_clear() -> None:
    s = StopScanner(["STOP"])
    assert s.feed("hello ST") == "hello "
    assert s.feed("ART") == "START"
    assert s.feed("ST") == ""
    assert s.feed("OP and more") == "" and s.hit
    assert s.feed("later") == "" and s.flush() == ""


# -- tool calls -----------------------------------------------------------------------------------


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_are_taken_out_of_the_text() -> None:
    content, calls = split_tool_calls(f"Let me look.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}")
    assert content.strip() == "Let me look."
    assert calls == [ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Oslo"})]
    # Arguments as a JSON string, and a block the model did not close before it ended.
    assert split_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}') == ("", [ToolCall("f", {"a": 1})])
    assert split_tool_calls('<tool_call>{"name": "f"}</tool_call>') == ("", [ToolCall("f", {})])


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call> tail",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "<tool_call>{unfinished",
        "a < b and <tool but no call",
    ],
)
def test_what_is_not_a_tool_call_stays_text(text: str) -> None:
    assert split_tool_calls(text) == (text, [])


@given(cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_tool_call_scanning_equals_the_whole_text(cuts: list[int]) -> None:
    text = f"Sure. {CALL} and <tool_call>oops</tool_call> done <tool_"
    scanner = ToolCallScanner()
    content = "".join(scanner.feed(p) for p in _pieces(text, cuts)) + scanner.finish()
    assert (content, scanner.calls) == split_tool_calls(text)
    assert scanner.calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert content == "Sure.  and <tool_call>oops</tool_call> done <tool_"


def test_parse_call() -> None:
    assert parse_call('{"name": "x", "parameters": {"k": 2}}') == ToolCall("x", {"k": 2})
    assert parse_call("[]") is None and parse_call('{"name": ""}') is None


# -- settings and tokens --------------------------------------------------------------------------


def test_http_settings() -> None:
    s = load_settings({"http_listen": "0.0.0.0:11434", "http_tokens": "ha:home-assistant-1, web:open-webui-2"})
    assert s.http_address == ("0.0.0.0", 11434)
    assert s.http_token_names() == {"home-assistant-1": "ha", "open-webui-2": "web"}
    assert load_settings({"http_listen": "[::1]:8080"}).http_address == ("::1", 8080)
    assert load_settings({"http_listen": ""}).http_address is None
    assert load_settings({}).http_address is None and load_settings({}).http_token_names() == {}


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"http_listen": "11434"}, "must be host:port"),
        ({"http_listen": "localhost:99999"}, "port that is not a number from 1 to 65535"),
        ({"http_listen": "::1:80"}, "in brackets"),
        ({"http_tokens": "ha"}, "entry 1 must be name:token"),
        ({"http_tokens": "ha:long-enough-1,bad name:long-enough-2"}, "entry 2 must be name:token"),
        ({"http_tokens": "ha:short"}, "8 or more characters"),
        ({"http_tokens": "a:same-token-1,b:same-token-1"}, "is also 'a''s"),
        ({"http_client": "has space"}, "http_client"),
    ],
)
def test_bad_http_settings_are_one_line_without_the_secret(flags: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(flags)
    assert words in str(e.value) and "\n" not in str(e.value)
    for value in flags.values():
        if "token" in value:
            assert "same-token" not in str(e.value) and "long-enough" not in str(e.value)


def test_auth_names_the_client_by_token() -> None:
    auth = Auth({"secret-token-1": "alice"}, "http")
    assert auth.required
    assert auth.client("Bearer secret-token-1") == "alice" and auth.client("bearer  secret-token-1 ") == "alice"
    assert auth.client("Bearer secret-token-2") is None and auth.client("") is None
    assert auth.client("Basic secret-token-1") is None
    open_auth = Auth({}, "http")
    assert not open_auth.required and open_auth.client("") == "http"


# -- tools reach a template that takes them ---------------------------------------------------------


TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},)


def test_tools_reach_a_template_that_takes_them() -> None:
    t = ChatTemplate(TOOL_TEMPLATE)
    assert t.takes_tools
    called = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    text = t.render(
        [
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", (called,)),
            ChatMessage("tool", '{"temperature": 21}'),
        ],
        tools=TOOLS,
    )
    assert json.dumps(TOOLS[0]) in text  # transformers' tojson: json.dumps as it is (not Jinja's, for HTML)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert '<|im_start|>tool\n{"temperature": 21}' in text
    assert "Tools:" not in t.render([ChatMessage("user", "hi")]), "no tools given, none rendered"


def test_templates_without_tools_say_so() -> None:
    assert not builtin("chatml").takes_tools  # what a model without a template gets
    smollm2 = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    assert not ChatTemplate(smollm2).takes_tools


@pytest.mark.parametrize(("model", "name"), [("SmolLM2-135M", "SmolLM2-135M:latest"), ("qwen2.5:1.5b", "qwen2.5:1.5b")])
def test_a_model_card_names_its_model_in_ollamas_name_tag_form(model: str, name: str) -> None:
    """An upstream's model that already has a tag (another rkmqtt: "m:latest") keeps it, not "m:latest:latest"."""
    info = Info(
        version="0",
        node="n",
        engine="openai",
        model=model,
        n_batch=1,
        batching="continuous",
        limits=Limits(**load_settings({}).limits()),
    )
    card = ModelCard.from_info(info, tools=False)
    assert card.name == name and card.matches(name) and card.matches(model)
