"""The binding fixes of issue 24 and the engine's new calls, each through the stand-in runtime:

* at FINISH and ERROR only `result[0]` is read (the stand-in can pass a single RKLLMResult there,
  flush against an inaccessible page, so an over-read dies with SIGSEGV: run in a child process);
* after a run it aborted, the engine clears the KV cache before the handle serves again (the
  stand-in can refuse a run after an abort without a clear), and loads the prompt cache again;
* token ids as input (RKLLM_INPUT_TOKEN), rkllm_is_running of either polarity, the KV cache sizes;
* the prompt cache of the fixed system prompt (setting rkllm_prompt_cache), off by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rkmqtt.engines.base import ChatMessage, ErrorEvent, FinishEvent
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.engines.rkllm.trace import TraceRecorder
from rkmqtt.errors import ConfigError
from rkmqtt.protocol import ErrorCode
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    describe,
    drive,
    expected_text,
    make_engine,
    make_settings,
    request,
    standin_env_fixture,
    standin_fixture,
    submit,
)

pytestmark = pytest.mark.usefixtures("standin_env")

ABIS = ["1.2", "1.3"]
REPO = Path(__file__).resolve().parents[1]

# A batch of 4 that ends with FINISH, then one that ends with ERROR (@error), through an engine with a
# recorder (which reads callbacks too); prints each request's final event.
CHILD = """
import json, sys
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.engines.rkllm.trace import TraceRecorder
from rkmqtt.settings import Settings
from tests.rkllm_fixtures import drive, request, submit
lib, model, all_slots = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
settings = Settings(engine="rkllm", model=model, rkllm_library=lib, n_batch=4, max_new_tokens=1024)
engine = RkllmEngine(settings, recorder=TraceRecorder(all_finish_slots=all_slots))
engine.load()
finals = {}
for batch in (["a @len=3", "b @len=5", "c @len=2"], ["d @len=9 @error=2", "e @len=9"]):
    submit(engine, [request(p.split()[0], p) for p in batch])
    out = drive(engine, [p.split()[0] for p in batch])
    finals.update({k: type(o.final).__name__ for k, o in out.items()})
engine.close()
print(json.dumps(finals))
"""


def run_child(standin: Standin, abi: str, finish_results: str, all_slots: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    env.update(RKLLM_STANDIN_ZERO_DELAY="1", RKLLM_STANDIN_FINISH_RESULTS=finish_results)
    args = [str(standin.lib(abi)), str(standin.model), "1" if all_slots else "0"]
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("finish_results", ["one", "all"])
def test_finish_and_error_read_only_the_first_result(standin: Standin, abi: str, finish_results: str) -> None:
    proc = run_child(standin, abi, finish_results, all_slots=False)
    assert proc.returncode == 0, proc.stderr
    finals = json.loads(proc.stdout)
    assert finals == {"a": "FinishEvent", "b": "FinishEvent", "c": "FinishEvent", "d": "ErrorEvent", "e": "ErrorEvent"}


def test_the_guard_page_catches_a_binding_that_reads_every_finish_slot(standin: Standin) -> None:
    """What the fix prevents: reading result[i] for every slot at FINISH, when the runtime passed one."""
    proc = run_child(standin, "1.3", "one", all_slots=True)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)
    assert run_child(standin, "1.3", "all", all_slots=True).returncode == 0


# ---- the KV cache after an abort --------------------------------------------------------------------


def cancel_everything(engine: RkllmEngine, keys: list[str]) -> None:
    submit(engine, [request(k, f"{k} would run for 5 s @len=1000", max_new_tokens=1000) for k in keys])
    out = drive(engine, keys, cancel=dict.fromkeys(keys, 1))
    assert all(o.final is None for o in out.values())


@pytest.fixture
def slow_decode(standin_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "5")


@pytest.mark.usefixtures("slow_decode")
@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("after_abort", ["finish", "error"])
def test_the_kv_cache_is_cleared_after_an_abort(
    standin: Standin, abi: str, after_abort: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_CLEAR_AFTER_ABORT", "required")
    monkeypatch.setenv("RKLLM_STANDIN_AFTER_ABORT", after_abort)
    recorder = TraceRecorder()
    engine = RkllmEngine(make_settings(standin, abi, n_batch=2, rkllm_pad_batch=False), recorder=recorder)
    engine.load()
    try:
        aborts = int(describe(standin.lib(abi))["aborts"])
        cancel_everything(engine, ["a", "b"])
        submit(engine, [request("next", "after the abort @len=4")])
        out = drive(engine, ["next"])
        assert out["next"].text == expected_text("after the abort @len=4", 4)
        info = describe(standin.lib(abi))
        assert (info["kv_clears"], info["refused_runs"], int(info["aborts"])) == ("1", "0", aborts + 1)
        assert engine.info()["failed_runs"] == 0 and engine.info()["recoveries"] == 0
        fns = [c["fn"] for c in recorder.calls]
        # recorded in order: the aborted run, what its cache held, the clear, then the next run
        first_run = fns.index("run")
        assert fns[first_run : first_run + 4] == ["run", "kv_cache_size", "clear_kv_cache", "run"]
        assert recorder.calls[first_run + 1]["when"] == "after an abort"
    finally:
        engine.close()


@pytest.mark.usefixtures("slow_decode")
def test_without_the_clear_such_a_runtime_refuses_the_next_run(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the clear prevents, shown by taking it away."""
    monkeypatch.setenv("RKLLM_STANDIN_CLEAR_AFTER_ABORT", "required")
    engine = make_engine(standin, "1.3", n_batch=2, rkllm_pad_batch=False)
    monkeypatch.setattr(engine, "_clear_after_abort", lambda: None)
    try:
        cancel_everything(engine, ["a", "b"])
        submit(engine, [request("next", "after the abort @len=4")])
        final = drive(engine, ["next"])["next"].final
        assert isinstance(final, ErrorEvent) and final.code is ErrorCode.ENGINE_ERROR
        assert describe(standin.lib("1.3"))["refused_runs"] == "1"
    finally:
        engine.close()


# ---- token input, is_running, the KV cache sizes -------------------------------------------------------


@pytest.mark.parametrize("abi", ABIS)
def test_token_ids_go_to_the_runtime_as_token_input(standin: Standin, abi: str) -> None:
    engine = make_engine(standin, abi, n_batch=2)
    try:
        reqs = [request("t", "ignored"), request("p", "a prompt @len=4")]
        engine.submit([engine.prepare(r) for r in reqs], token_inputs={"t": [101, 2023, 7]})
        out = drive(engine, ["t", "p"])
        assert describe(standin.lib(abi))["last_input_types"] == "1,0"
        # the stand-in answers a token input with its ids in decimal, repeated
        assert out["t"].text.startswith(" 101 2023 7  101")
        assert out["p"].text == expected_text("a prompt @len=4", 4)
    finally:
        engine.close()


def test_a_runtime_that_refuses_token_input_in_a_batch_costs_one_batch(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_TOKEN_INPUT_BATCH", "0")
    engine = make_engine(standin, "1.3", n_batch=2)
    try:
        engine.submit([engine.prepare(request("t", "x"))], token_inputs={"t": [5, 6]})
        final = drive(engine, ["t"])["t"].final
        assert isinstance(final, ErrorEvent) and final.code is ErrorCode.ENGINE_ERROR
        assert engine.info()["recoveries"] == 0
    finally:
        engine.close()


@pytest.mark.parametrize("running_value", ["1", "0"])
def test_is_running_of_either_polarity(standin: Standin, running_value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1.2 header says 0 while running, the 1.3.0 header 1: the binding works with either (it
    compares with the idle value), cancelling during prefill included."""
    monkeypatch.setenv("RKLLM_STANDIN_RUNNING_VALUE", running_value)
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "1000")  # a 3 s prefill
    engine = make_engine(standin, "1.3", n_batch=1)
    try:
        assert engine.runtime_is_running() == 1 - int(running_value)
        submit(engine, [request("p", "twelve bytes")])
        deadline = time.monotonic() + 2.0
        while engine.runtime_is_running() != int(running_value):
            assert time.monotonic() < deadline
        t0 = time.monotonic()
        engine.cancel("p")
        while engine.free_slots() == 0:
            assert engine.poll(0.05) == []
        assert time.monotonic() - t0 < 1.0
        assert describe(standin.lib("1.3"))["idle_aborts"] == "0"
    finally:
        engine.close()


@pytest.mark.parametrize("kv_after_run", ["cleared", "kept"])
def test_kv_cache_sizes_after_a_run(standin: Standin, kv_after_run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_KV_AFTER_RUN", kv_after_run)
    engine = make_engine(standin, "1.3", n_batch=2, rkllm_pad_batch=False)
    try:
        assert engine.kv_cache_sizes() == [0, 0]
        submit(engine, [request("a", "abcdefgh @len=5")])  # 15 bytes: 4 tokens
        drive(engine, ["a"])
        assert engine.kv_cache_sizes() == ([4 + 5, 0] if kv_after_run == "kept" else [0, 0])
    finally:
        engine.close()


# ---- the prompt cache -----------------------------------------------------------------------------------

SYSTEM = "You are the voice assistant of a house. The devices are: " + "lamp, " * 40
TEMPLATE = SYSTEM + "|<user>|</user><bot>"


@pytest.mark.parametrize("abi", ABIS)
def test_the_prompt_cache_is_made_once_and_loaded_at_every_init(standin: Standin, abi: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "system.bin"
    engine = make_engine(standin, abi, n_batch=2, rkllm_chat_template=TEMPLATE, rkllm_prompt_cache=cache)
    try:
        info = describe(standin.lib(abi))
        assert cache.is_file() and (info["prompt_cache_saves"], info["prompt_cache_loads"]) == ("1", "1")
        # the runtime's template is off: the engine renders it, the cached system prompt first
        assert (info["template_system"], info["template_prefix"], info["template_postfix"]) == ("", "", "")
        msgs = (ChatMessage("system", SYSTEM), ChatMessage("user", "lights on @len=3"))
        submit(engine, [request("q", messages=msgs)])
        out = drive(engine, ["q"])
        sent = SYSTEM + "<user>" + "lights on @len=3" + "</user><bot>"  # the system message is not repeated
        assert out["q"].text == expected_text(sent, 3)
        assert describe(standin.lib(abi))["last_prompt_bytes"].split(",")[0] == str(len(sent))
    finally:
        engine.close()
    again = make_engine(standin, abi, n_batch=2, rkllm_chat_template=TEMPLATE, rkllm_prompt_cache=cache)
    try:
        info = describe(standin.lib(abi))
        assert (info["prompt_cache_saves"], info["prompt_cache_loads"], info["runs"]) == ("0", "1", "0")
    finally:
        again.close()


@pytest.mark.usefixtures("slow_decode")
def test_the_prompt_cache_is_loaded_again_after_the_clear(standin: Standin, tmp_path: Path) -> None:
    engine = make_engine(standin, "1.3", n_batch=2, rkllm_chat_template=TEMPLATE, rkllm_prompt_cache=tmp_path / "c.bin")
    try:
        cancel_everything(engine, ["a"])
        info = describe(standin.lib("1.3"))
        assert (info["kv_clears"], info["prompt_cache_loads"], info["prompt_cache_loaded"]) == ("1", "2", "1")
    finally:
        engine.close()


def test_the_prompt_cache_is_off_by_default_and_needs_a_template(standin: Standin, tmp_path: Path) -> None:
    engine = make_engine(standin, "1.3", n_batch=1, rkllm_chat_template=TEMPLATE)
    try:
        assert engine.info()["prompt_cache"] is None
        assert describe(standin.lib("1.3"))["prompt_cache_loads"] == "0"
    finally:
        engine.close()
    with pytest.raises(ConfigError, match="rkllm_prompt_cache needs rkllm_chat_template"):
        RkllmEngine(make_settings(standin, "1.3", rkllm_prompt_cache=tmp_path / "c.bin"))


def test_a_prompt_cache_file_the_runtime_cannot_load_is_one_line(standin: Standin, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a cache")
    engine = RkllmEngine(make_settings(standin, "1.3", rkllm_chat_template=TEMPLATE, rkllm_prompt_cache=bad))
    with pytest.raises(Exception, match="rkllm_load_prompt_cache failed") as e:
        engine.load()
    assert "\n" not in str(e.value)


def test_finish_event_of_a_prompt_cache_run_never_reaches_the_scheduler(standin: Standin, tmp_path: Path) -> None:
    engine = make_engine(standin, "1.3", n_batch=1, rkllm_chat_template=TEMPLATE, rkllm_prompt_cache=tmp_path / "c")
    try:
        assert engine.poll(0.05) == []
        submit(engine, [request("x", "hi @len=2")])
        out = drive(engine, ["x"])
        assert isinstance(out["x"].final, FinishEvent)
    finally:
        engine.close()
