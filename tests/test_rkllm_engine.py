"""RkllmEngine through the Engine interface, against the C stand-in runtime, in both ABIs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rkmqtt.engines.base import ChatMessage, ErrorEvent, FinishEvent, SamplingParams
from rkmqtt.engines.rkllm.prompt import DUMMY_PROMPT, parse_chat_template, render_prompt
from rkmqtt.errors import ConfigError
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    describe,
    drive,
    expected_text,
    make_engine,
    natural_length,
    request,
    standin_env_fixture,
    standin_fixture,
    submit,
    wait_idle,
)

pytestmark = pytest.mark.usefixtures("standin_env")

ABIS = ["1.2", "1.3"]


def slot_prompt(i: int) -> str:
    # Distinct words per slot, multibyte characters, a different length per slot.
    return f"slot{i} «{'abcdefgh'[i]}» ünïcødé €{i} ✓ @len={4 + 3 * i}"


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("n_batch", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_slot_gets_its_own_text(standin: Standin, abi: str, n_batch: int) -> None:
    """Full batches of 1..8 and, with n_batch 8, partial (padded) batches of 1..8 requests."""
    for engine_batch in sorted({n_batch, 8}):
        engine = make_engine(standin, abi, n_batch=engine_batch)
        try:
            reqs = [request(f"r{i}", slot_prompt(i)) for i in range(n_batch)]
            submit(engine, reqs)
            out = drive(engine, [r.key for r in reqs])
            for i, r in enumerate(reqs):
                o = out[r.key]
                prompt = slot_prompt(i)
                n = natural_length(prompt)
                assert o.text == expected_text(prompt, n), (engine_batch, i)
                assert isinstance(o.final, FinishEvent)
                assert (o.final.reason, o.final.completion_tokens, o.final.slot) == ("stop", n, i)
                assert o.tokens == n and not o.after_final
            assert engine.free_slots() == engine_batch and engine.active() == 0
            info = describe(standin.lib(abi))
            assert info["n_batch"] == str(engine_batch)
            sent = [int(b) for b in info["last_prompt_bytes"].split(",")]
            assert sent[n_batch:] == [len(DUMMY_PROMPT)] * (engine_batch - n_batch)  # padding
        finally:
            engine.close()


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("waiting_text", ["repeat", "split"])
@pytest.mark.parametrize("token_bytes", [1, 2, 3])
def test_split_utf8_characters_come_out_once_and_whole(
    standin: Standin, abi: str, waiting_text: str, token_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Characters of 2, 3 and 4 bytes cut across tokens (WAITING steps), in both readings of WAITING
    text: `repeat` (the default: the next text repeats the held bytes, as Rockchip's consumers imply)
    and `split` (the next text continues them). A slot whose own text is complete in a batch-mate's
    WAITING step keeps it too."""
    monkeypatch.setenv("RKLLM_STANDIN_WAITING_TEXT", waiting_text)
    monkeypatch.setenv("RKLLM_STANDIN_TOKEN_BYTES", str(token_bytes))
    prompt = "é€😀ж€é😀 中文 @len=30"
    data = (prompt + " ").encode()
    if token_bytes > 1:
        assert any((data[k] & 0xC0) == 0x80 for k in range(token_bytes, len(data), token_bytes))  # really split
    mate = "plain ascii mate @len=12"
    engine = make_engine(standin, abi, n_batch=2)
    try:
        submit(engine, [request("u", prompt), request("v", mate)])
        out = drive(engine, ["u", "v"])
        n = natural_length(prompt, token_bytes)
        assert out["u"].text == expected_text(prompt, n, token_bytes)
        assert "\ufffd" not in out["u"].text and out["u"].tokens == n
        assert out["v"].text == expected_text(mate, 12, token_bytes)
    finally:
        engine.close()


@pytest.mark.parametrize("waiting_text", ["repeat", "split"])
def test_split_characters_in_every_slot_of_a_full_batch(
    standin: Standin, waiting_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_WAITING_TEXT", waiting_text)
    monkeypatch.setenv("RKLLM_STANDIN_TOKEN_BYTES", "2")
    engine = make_engine(standin, "1.3", n_batch=4)
    try:
        prompts = {f"s{i}": f"{'ж' * i}slot {i} 😀€ 中文字 @len={9 + 5 * i}" for i in range(4)}
        submit(engine, [request(k, p) for k, p in prompts.items()])
        out = drive(engine, list(prompts))
        for k, p in prompts.items():
            assert out[k].text == expected_text(p, natural_length(p, 2), 2)
    finally:
        engine.close()


@pytest.mark.parametrize("waiting_text", ["repeat", "split"])
def test_a_cut_inside_a_character_is_flushed_at_the_end(
    standin: Standin, waiting_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_WAITING_TEXT", waiting_text)
    engine = make_engine(standin, "1.3", n_batch=1)
    try:
        submit(engine, [request("c", "ab€€€ @len=40", max_new_tokens=1)])  # token 0 = "ab" + 1st byte of €
        out = drive(engine, ["c"])
        assert out["c"].text == "ab\ufffd"
        assert isinstance(out["c"].final, FinishEvent) and out["c"].final.reason == "length"
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_each_slot_is_cut_at_its_own_max_new_tokens(standin: Standin, abi: str) -> None:
    engine = make_engine(standin, abi, n_batch=4)
    try:
        aborts = int(describe(standin.lib(abi))["aborts"])
        limits = {"a": 3, "b": 7, "c": 12}
        prompts = {k: f"{k}{k}{k} long reply @len=50" for k in limits}
        submit(engine, [request(k, prompts[k], max_new_tokens=n) for k, n in limits.items()])
        out = drive(engine, list(limits))
        for k, n in limits.items():
            assert out[k].text == expected_text(prompts[k], n)
            final = out[k].final
            assert isinstance(final, FinishEvent)
            assert (final.reason, final.completion_tokens) == ("length", n)
        info = describe(standin.lib(abi))
        if abi == "1.3":
            assert info["last_infer_max_new_tokens"] == "12"  # the batch's largest, per run
        # 1.2 fixes max_new_tokens at init (1024 here) and the padding slot runs on: the engine asks
        # for an abort once no real slot is left, unless the zero-delay runtime already ran the padding
        # slot to its end before poll() acted on it (a race a loaded machine shows); 1.3's runtime
        # stops every slot at 12 by itself and is never aborted.
        assert int(info["aborts"]) - aborts in ((0, 1) if abi == "1.2" else (0,))
        assert info["max_new_tokens"] == "1024"
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_perf_of_finish_goes_into_the_last_replies(standin: Standin, abi: str) -> None:
    engine = make_engine(standin, abi, n_batch=2)
    try:
        p_short, p_long = "short one @len=3", "the longer prompt of the two @len=9"
        submit(engine, [request("s", p_short), request("l", p_long)])
        out = drive(engine, ["s", "l"])
        early, last = out["s"].final, out["l"].final
        assert isinstance(early, FinishEvent) and isinstance(last, FinishEvent)
        assert early.perf == {} and early.prompt_tokens is None  # answered before FINISH
        # Only result[0] is read at FINISH (docs/rkllm-runtime.md): its perf goes to the slots that end
        # there, and whose prompt its prefill_tokens counts is unknown above n_batch 1.
        assert last.prompt_tokens is None
        assert last.perf["generate_tokens"] == 3 and set(last.perf) >= {"prefill_time_ms", "memory_usage_mb"}
    finally:
        engine.close()
    engine = make_engine(standin, abi, n_batch=1)
    try:
        submit(engine, [request("l", p_long)])
        last = drive(engine, ["l"])["l"].final
        assert isinstance(last, FinishEvent) and last.prompt_tokens == -(-len(p_long.encode()) // 4)
        assert last.perf["generate_tokens"] == 9
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_without_padding_unused_slots_are_empty(standin: Standin, abi: str) -> None:
    engine = make_engine(standin, abi, n_batch=4, rkllm_pad_batch=False)
    try:
        submit(engine, [request("x", "only one @len=5")])
        out = drive(engine, ["x"])
        assert out["x"].text == expected_text("only one @len=5", 5)
        assert describe(standin.lib(abi))["last_prompt_bytes"] == f"{len('only one @len=5')},0,0,0"
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_cancelling_one_slot_leaves_its_batch_mates_intact(
    standin: Standin, abi: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "2")
    engine = make_engine(standin, abi, n_batch=3)
    try:
        aborts = int(describe(standin.lib(abi))["aborts"])
        prompts = {k: f"{k} keeps going @len=40" for k in ("a", "b", "c")}
        submit(engine, [request(k, p) for k, p in prompts.items()])
        out = drive(engine, list(prompts), cancel={"b": 3})
        assert out["b"].final is None and not out["b"].after_final  # nothing after the cancel
        for k in ("a", "c"):
            assert out[k].text == expected_text(prompts[k], 40)
            final = out[k].final
            assert isinstance(final, FinishEvent) and final.completion_tokens == 40
        assert int(describe(standin.lib(abi))["aborts"]) == aborts  # batch-mates were running: no abort
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_abort_when_every_slot_is_cancelled(standin: Standin, abi: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "5")
    engine = make_engine(standin, abi, n_batch=4)
    try:
        aborts = int(describe(standin.lib(abi))["aborts"])
        keys = ["a", "b", "c"]
        submit(engine, [request(k, f"{k} would run for 5 s @len=1000", max_new_tokens=1000) for k in keys])
        t0 = time.monotonic()
        out = drive(engine, keys, cancel={k: 1 for k in keys})
        assert time.monotonic() - t0 < 2.0  # 1000 steps x 5 ms would be 5 s
        assert all(o.final is None and not o.after_final for o in out.values())
        assert int(describe(standin.lib(abi))["aborts"]) == aborts + 1
        # The engine serves the next batch normally.
        submit(engine, [request("next", "after the abort @len=4")])
        assert drive(engine, ["next"])["next"].text == expected_text("after the abort @len=4", 4)
    finally:
        engine.close()


def test_cancel_during_prefill_aborts_at_once(standin: Standin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "1000")  # a 3 s prefill
    engine = make_engine(standin, "1.3", n_batch=2)
    try:
        submit(engine, [request("p", "twelve bytes")])
        time.sleep(0.05)
        t0 = time.monotonic()
        engine.cancel("p")
        assert engine.active() == 0
        assert wait_idle(engine, timeout=2.0) == []
        assert time.monotonic() - t0 < 1.0
    finally:
        engine.close()


def test_sampling_per_run_on_1_3(standin: Standin) -> None:
    engine = make_engine(standin, "1.3", n_batch=2)
    try:
        assert engine.capabilities.per_request_sampling
        hot_sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.8)
        hot = request("h", "hot @len=2", sampling=hot_sampling, sampling_requested=True)
        greedy = request("g", "greedy @len=2", sampling=SamplingParams(temperature=0.0))
        assert engine.batch_key(hot) != engine.batch_key(greedy)
        assert engine.batch_key(hot) == engine.batch_key(request("h2", sampling=hot.sampling))
        with pytest.raises(ValueError, match="batch_key"):
            submit(engine, [hot, greedy])
        submit(engine, [hot])
        out = drive(engine, ["h"])
        assert isinstance(out["h"].final, FinishEvent) and out["h"].final.warnings == ()
        info = describe(standin.lib("1.3"))
        assert (info["last_sampling_given"], info["last_top_k"], info["last_top_p"], info["last_temperature"]) == (
            "1",
            "20",
            "0.8",
            "0.9",
        )
        submit(engine, [greedy])
        drive(engine, ["g"])
        assert describe(standin.lib("1.3"))["last_top_k"] == "1"  # greedy is top_k 1
    finally:
        engine.close()


def test_sampling_fixed_at_init_on_1_2_is_reported(standin: Standin) -> None:
    engine = make_engine(standin, "1.2", n_batch=2, temperature=0.5, top_k=30, top_p=0.7, repeat_penalty=1.2)
    try:
        assert not engine.capabilities.per_request_sampling
        asked = request("a", "asked @len=2", sampling=SamplingParams(temperature=1.5), sampling_requested=True)
        plain = request("p", "plain @len=2")
        assert engine.batch_key(asked) == engine.batch_key(plain)
        submit(engine, [asked, plain])
        out = drive(engine, ["a", "p"])
        fa, fp = out["a"].final, out["p"].final
        assert isinstance(fa, FinishEvent) and isinstance(fp, FinishEvent)
        assert len(fa.warnings) == 1 and "fixes sampling at start-up" in fa.warnings[0]
        assert fp.warnings == ()
        info = describe(standin.lib("1.2"))
        fixed = (info["top_k"], info["top_p"], info["temperature"], info["repeat_penalty"])
        assert fixed == ("30", "0.7", "0.5", "1.2")
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_settings_reach_rkllm_init(standin: Standin, abi: str) -> None:
    engine = make_engine(
        standin,
        abi,
        n_batch=3,
        max_context=4096,
        rkllm_cpus="0,1,2",
        rkllm_n_keep=64,
        rkllm_base_domain_id=1,
        rkllm_embed_flash=True,
        rkllm_skip_special_token=False,
    )
    try:
        info = describe(standin.lib(abi))
        assert info["model_path"] == str(standin.model)
        assert (info["n_batch"], info["max_context_len"], info["n_keep"]) == ("3", "4096", "64")
        assert (info["enabled_cpus_mask"], info["enabled_cpus_num"]) == ("7", "3")
        assert (info["base_domain_id"], info["embed_flash"], info["skip_special_token"]) == ("1", "1", "0")
        submit(engine, [request("k", "keep_history is 0 @len=1")])
        drive(engine, ["k"])
        info = describe(standin.lib(abi))
        assert (info["last_keep_history"], info["last_roles"]) == ("0", "user,user,user")
    finally:
        engine.close()
    fresh = make_engine(standin, abi)
    try:
        info = describe(standin.lib(abi))
        assert (info["enabled_cpus_mask"], info["enabled_cpus_num"]) == (str(0xF0), "4")  # CPU4-CPU7 by default
    finally:
        fresh.close()


@pytest.mark.parametrize("abi", ABIS)
def test_chat_template_setting_is_given_to_the_runtime(standin: Standin, abi: str) -> None:
    engine = make_engine(standin, abi, n_batch=1, rkllm_chat_template="You are terse.|<user> |\\n<bot>")
    try:
        info = describe(standin.lib(abi))
        assert (info["template_system"], info["template_prefix"]) == ("You are terse.", "<user> ")
        assert engine.info()["chat_template"].startswith("rkllm_chat_template (the runtime's")
        submit(engine, [request("t", "hello @len=2")])
        final = drive(engine, ["t"])["t"].final
        assert isinstance(final, FinishEvent)
        # The stand-in counts the template's text in the prompt, as the runtime tokenizes it too.
        total = len("You are terse.") + len("<user> ") + len("\n<bot>") + len("hello @len=2")
        assert final.prompt_tokens == -(-total // 4)
    finally:
        engine.close()


def test_chat_template_setting_parsing() -> None:
    assert parse_chat_template("S|P|Q") == ("S", "P", "Q")
    assert parse_chat_template("a\\|b|\\n|x\\ty") == ("a|b", "\n", "x\ty")
    assert parse_chat_template("||") == ("", "", "")
    with pytest.raises(ConfigError, match="system\\|prefix\\|postfix"):
        parse_chat_template("only|two")


def test_rendering_of_messages() -> None:
    user = ChatMessage("user", "What is 2+2?")
    assert render_prompt((user,)) == "What is 2+2?"
    assert render_prompt((ChatMessage("system", "Be brief."), user)) == "Be brief.\n\nWhat is 2+2?"
    convo = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "What is 2+2?"),
    )
    assert render_prompt(convo) == ("Be brief.\n\nConversation so far:\nUser: Hi\nAssistant: Hello!\n\nWhat is 2+2?")
    ends_with_assistant = (ChatMessage("user", "Say a word"), ChatMessage("assistant", "Banana"))
    assert render_prompt(ends_with_assistant) == "Conversation so far:\nUser: Say a word\nAssistant: Banana"


@pytest.mark.parametrize("abi", ABIS)
def test_multi_turn_messages_reach_the_runtime_rendered(standin: Standin, abi: str) -> None:
    msgs = (
        ChatMessage("system", "Sys ✓"),
        ChatMessage("user", "first"),
        ChatMessage("assistant", "ok"),
        ChatMessage("user", "second @len=12"),
    )
    engine = make_engine(standin, abi, n_batch=2)
    try:
        submit(engine, [request("m", messages=msgs), request("p", "plain @len=3")])
        out = drive(engine, ["m", "p"])
        assert out["m"].text == expected_text(render_prompt(msgs), 12)
    finally:
        engine.close()


def test_many_batches_in_a_row(standin: Standin) -> None:
    engine = make_engine(standin, "1.3", n_batch=4)
    try:
        for b in range(25):
            keys = [f"b{b}s{i}" for i in range((b % 4) + 1)]
            submit(engine, [request(k, f"{k} @len={1 + i}") for i, k in enumerate(keys)])
            out = drive(engine, keys)
            for i, k in enumerate(keys):
                assert out[k].text == expected_text(f"{k} @len={1 + i}", 1 + i)
        assert engine.info()["batches"] == 25 and engine.info()["recoveries"] == 0
    finally:
        engine.close()


def test_submit_is_refused_while_busy(standin: Standin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "5")
    engine = make_engine(standin, "1.3", n_batch=2)
    try:
        submit(engine, [request("x", "x @len=20")])
        assert engine.free_slots() == 0 and engine.active() == 1
        from rkmqtt.errors import EngineError

        with pytest.raises(EngineError):
            submit(engine, [request("y", "y")])
        out = drive(engine, ["x"])
        assert isinstance(out["x"].final, FinishEvent)
        assert not isinstance(out["x"].final, ErrorEvent)
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_a_model_path_that_is_not_utf_8_reaches_the_runtime(standin: Standin, abi: str, tmp_path: Path) -> None:
    """Linux file names are bytes: the path is passed with os.fsencode, not str.encode."""
    raw = os.fsencode(tmp_path) + b"/mod\xe8le-latin1.rkllm"
    with open(raw, "wb") as f:
        f.write(b"stand-in model file\n")
    engine = make_engine(standin, abi, model=os.fsdecode(raw))
    try:
        assert os.fsencode(describe(standin.lib(abi))["model_path"]) == raw
        submit(engine, [request("m", "model path ok @len=2")])
        assert isinstance(drive(engine, ["m"])["m"].final, FinishEvent)
    finally:
        engine.close()
