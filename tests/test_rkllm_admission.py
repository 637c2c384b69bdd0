"""An over-long prompt is refused `too_long` before admission (RkllmEngine.prepare), so it never
stops the run of its whole batch: counted with the model's tokenizer.json (setting rkllm_tokenizer),
or bounded at one token per UTF-8 byte; it must leave room for the answer, min(max_new_tokens,
max_context / 4) tokens (here 128 of 512)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from rkmqtt.engines.base import ChatMessage
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.engines.rkllm.length import TEMPLATE_ALLOWANCE
from rkmqtt.errors import ConfigError, RequestRejected
from rkmqtt.protocol import ErrorCode, ErrorReply, OkReply
from rkmqtt.service import Service
from tests.mqtt_probe import Probe
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    describe,
    expected_text,
    make_engine,
    make_settings,
    request,
    standin_env_fixture,
    standin_fixture,
)

pytestmark = pytest.mark.usefixtures("standin_env")

WORDS = [f"w{i}" for i in range(50)]
ROOM = 128  # request()'s max_new_tokens 256, a quarter of max_context 512


def word_tokenizer(path: Path) -> Path:
    """A real tokenizer.json (Hugging Face format): one token per whitespace-separated word."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))  # ~3.9 bytes a word with its space


def test_without_a_tokenizer_the_bound_is_one_token_per_byte(standin: Standin) -> None:
    engine = make_engine(standin, "1.3", max_context=512)
    try:
        fits = "a" * (512 - ROOM - TEMPLATE_ALLOWANCE - 1)  # bytes + 1 + allowance = 384, with room for 128
        assert engine.prepare(request("ok", fits)).prompt_tokens is None
        with pytest.raises(RequestRejected) as e:
            engine.prepare(request("long", fits + "a"))
        assert e.value.code is ErrorCode.TOO_LONG
        msg = e.value.message
        assert "\n" not in msg and "up to 385 tokens" in msg and "max_context=512" in msg and "rkllm_tokenizer" in msg
        assert f"room for {ROOM} reply tokens" in msg
        # multibyte characters count their bytes
        with pytest.raises(RequestRejected):
            engine.prepare(request("cjk", "中" * 150))
        # every message of the request counts, as rendered into the one prompt
        msgs = (ChatMessage("system", "s" * 300), ChatMessage("user", "u" * 300))
        with pytest.raises(RequestRejected):
            engine.prepare(request("multi", messages=msgs))
    finally:
        engine.close()


def test_with_the_tokenizer_file_the_prompt_is_counted(standin: Standin, tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    engine = make_engine(standin, "1.3", max_context=512, rkllm_tokenizer=str(tokenizer))
    try:
        prompt = words(300)  # ~1,100 bytes: the bound would refuse it; 300 tokens + 64 do fit
        assert len(prompt.encode()) > 1000
        assert engine.prepare(request("ok", prompt)).prompt_tokens is None  # the built-in template's share is a guess
        with pytest.raises(RequestRejected) as e:
            engine.prepare(request("long", words(512 - ROOM - TEMPLATE_ALLOWANCE + 1)))
        assert "is 385 tokens (counted with the model's tokenizer" in e.value.message
        assert engine.info()["prompt_length"] == f"counted ({tokenizer})"
    finally:
        engine.close()


def test_with_a_configured_template_the_count_is_exact_and_returned(standin: Standin, tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    engine = make_engine(
        standin, "1.3", max_context=512, rkllm_tokenizer=str(tokenizer), rkllm_chat_template="w1 w2|w3|w4"
    )
    try:
        assert engine.prepare(request("ok", words(100))).prompt_tokens == 100 + 4
        with pytest.raises(RequestRejected):
            engine.prepare(request("long", words(508)))
    finally:
        engine.close()


def test_a_bad_tokenizer_file_is_a_setting_error(standin: Standin, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rkllm_tokenizer=.*no such file"):
        make_engine(standin, "1.3", rkllm_tokenizer=str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match=r"not a Hugging Face tokenizer\.json") as e:
        make_engine(standin, "1.3", rkllm_tokenizer=str(bad))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_over_mqtt_the_long_prompt_is_refused_and_its_batch_mate_answered(
    standin: Standin, abi: str, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    settings = make_settings(standin, abi, n_batch=2, max_context=256)
    engine = RkllmEngine(settings, backoff_s=0.01, backoff_max_s=0.05)
    start_bridge(engine, n_batch=2, max_context=256, model=settings.model, rkllm_library=settings.rkllm_library)
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/big", {"id": "long", "prompt": "x" * 2000})
    probe.publish(f"{prefix}/request/small", {"id": "short", "prompt": "short one @len=5"})
    err = ErrorReply.model_validate_json(json.dumps(probe.final(f"{prefix}/reply/big/long")))
    assert err.error.code is ErrorCode.TOO_LONG and "max_context=256" in err.error.message
    ok = OkReply.model_validate_json(json.dumps(probe.final(f"{prefix}/reply/small/short")))
    assert ok.text == expected_text("short one @len=5", 5)
    info = describe(standin.lib(abi))  # the bridge's engine made the last handle
    assert (info["max_context_len"], info["runs"]) == ("256", "1")  # only the short request's batch ran
    assert engine.info()["failed_runs"] == 0
