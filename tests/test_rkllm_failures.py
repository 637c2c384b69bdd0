"""RkllmEngine's failure paths, injected through the stand-in: each is answered engine_error; one
failed run keeps the model, a second in a row reloads it (destroy + init again with backoff), and
the engine goes on serving. The ends of a run that are not failures (an ERROR after our own abort,
a NULL FINISH) and the synchronisation of abort, run end and destroy are here too."""

from __future__ import annotations

import time

import pytest

from rkmqtt.engines.base import ErrorEvent, FinishEvent
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.errors import EngineError
from rkmqtt.protocol import ErrorCode
from tests.rkllm_fixtures import (  # noqa: F401
    Outcome,
    Standin,
    describe,
    drive,
    expected_text,
    make_engine,
    request,
    standin_env_fixture,
    standin_fixture,
    submit,
    wait_idle,
)

pytestmark = pytest.mark.usefixtures("standin_env")

ABIS = ["1.2", "1.3"]

# prompt words of the stand-in: @error=K -> RKLLM_RUN_ERROR after K tokens; @fail=K -> rkllm_run
# returns -1 at step K; @initfail=N -> the next N rkllm_init calls fail.
FAILURES = {
    "error-state": "boom @error=3 @len=20",
    "run-returns-minus-1": "boom @fail=2 @len=20",
    "run-fails-at-once": "boom @fail=0",
    "init-fails-twice-on-recovery": "boom @fail=2 @initfail=2 @len=20",
}


def assert_serves(engine: RkllmEngine, standin: Standin) -> None:
    submit(engine, [request("after-1", "after one @len=4"), request("after-2", "after two @len=6")])
    out = drive(engine, ["after-1", "after-2"])
    assert out["after-1"].text == expected_text("after one @len=4", 4)
    assert out["after-2"].text == expected_text("after two @len=6", 6)


def run_failing_batch(engine: RkllmEngine, prompt: str) -> dict[str, Outcome]:
    """A batch of three: one ends at once, one carries the failure, one is a batch-mate."""
    reqs = [request("early", "ends first @len=1"), request("bad", prompt), request("mate", "a batch-mate @len=20")]
    submit(engine, reqs)
    return drive(engine, [r.key for r in reqs])


def assert_answered_engine_error(out: dict[str, Outcome], failure: str) -> None:
    for key in ("bad", "mate"):
        final = out[key].final
        assert isinstance(final, ErrorEvent), (key, final)
        assert final.code is ErrorCode.ENGINE_ERROR and "\n" not in final.message
        assert not out[key].after_final
    early = out["early"].final
    if failure == "run-fails-at-once":
        assert isinstance(early, ErrorEvent)  # nothing was generated at all
    else:
        assert isinstance(early, FinishEvent) and out["early"].text == expected_text("ends first @len=1", 1)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("failure", [f for f in FAILURES if "@initfail" not in FAILURES[f]])
def test_one_failed_run_is_answered_engine_error_and_keeps_the_model(standin: Standin, abi: str, failure: str) -> None:
    engine = make_engine(standin, abi, n_batch=4)
    try:
        before = describe(standin.lib(abi))
        assert_answered_engine_error(run_failing_batch(engine, FAILURES[failure]), failure)
        after = describe(standin.lib(abi))
        assert (after["init_calls"], after["destroy_calls"]) == (before["init_calls"], before["destroy_calls"])
        assert engine.info()["recoveries"] == 0 and engine.info()["failed_runs"] == 1
        assert engine.free_slots() == 4
        assert_serves(engine, standin)
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_second_failed_run_in_a_row_reloads_the_model(standin: Standin, abi: str, failure: str) -> None:
    engine = make_engine(standin, abi, n_batch=4)
    try:
        before = describe(standin.lib(abi))
        prompt = FAILURES[failure]
        assert_answered_engine_error(run_failing_batch(engine, prompt.replace(" @initfail=2", "")), failure)
        assert_answered_engine_error(run_failing_batch(engine, prompt), failure)
        after = describe(standin.lib(abi))
        extra_inits = 3 if failure == "init-fails-twice-on-recovery" else 1
        assert int(after["init_calls"]) - int(before["init_calls"]) == extra_inits
        assert int(after["destroy_calls"]) - int(before["destroy_calls"]) == 1
        assert after["pending_init_failures"] == "0"
        assert engine.info()["recoveries"] == 1 and engine.info()["failed_runs"] == 2 and engine.free_slots() == 4
        assert_serves(engine, standin)
        # The count starts again: one more failure keeps the model.
        assert_answered_engine_error(run_failing_batch(engine, "boom @fail=2 @len=20"), "run-returns-minus-1")
        assert engine.info()["recoveries"] == 1
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_an_over_long_prompt_that_reaches_the_runtime_costs_one_batch_not_the_model(standin: Standin, abi: str) -> None:
    """prepare() refuses it (test_rkllm_admission.py); submitted anyway, the runtime stops the run."""
    engine = make_engine(standin, abi, n_batch=2, max_context=256)
    try:
        before = describe(standin.lib(abi))
        long_prompt = "x" * 2000  # 500 of the stand-in's tokens
        submit(engine, [request("long", long_prompt), request("mate", "short @len=3")])
        out = drive(engine, ["long", "mate"])
        assert all(isinstance(o.final, ErrorEvent) for o in out.values())
        assert describe(standin.lib(abi))["init_calls"] == before["init_calls"]
        assert engine.info()["recoveries"] == 0
        assert_serves(engine, standin)
    finally:
        engine.close()


def test_init_failure_at_load_says_what_to_check(standin: Standin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_INIT_FAIL", "1")
    with pytest.raises(EngineError) as e:
        make_engine(standin, "1.3")
    msg = str(e.value)
    assert e.value.returncode == -1 and "\n" not in msg
    for hint in ("driver", "0.9.8", "rkllm-toolkit 1.3.0", "model and runtime versions must match", "memory"):
        assert hint in msg


def test_close_while_recovery_keeps_failing_returns_promptly(standin: Standin, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(standin, "1.2", n_batch=2)
    monkeypatch.setenv("RKLLM_STANDIN_INIT_FAIL", "1")  # every re-init fails from now on
    submit(engine, [request("bad-1", "boom @fail=0")])
    drive(engine, ["bad-1"])
    submit(engine, [request("bad", "boom @fail=0")])  # the second failed run in a row: reload
    out = drive_until_final(engine, "bad")
    assert isinstance(out, ErrorEvent) and out.code is ErrorCode.ENGINE_ERROR
    time.sleep(0.2)  # a few backoff rounds
    assert engine.free_slots() == 0  # still recovering: requests wait in the scheduler's queue
    t0 = time.monotonic()
    before = describe(standin.lib("1.2"))
    engine.close()
    assert time.monotonic() - t0 < 2.0
    after = describe(standin.lib("1.2"))
    assert (after["idle_aborts"], after["invalid_handle_calls"]) == (
        before["idle_aborts"],
        before["invalid_handle_calls"],
    )


def drive_until_final(engine: object, key: str, timeout: float = 5.0) -> FinishEvent | ErrorEvent:
    from rkmqtt.engines.rkllm.engine import RkllmEngine

    assert isinstance(engine, RkllmEngine)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in engine.poll(0.05):
            if ev.key == key and isinstance(ev, FinishEvent | ErrorEvent):
                return ev
    raise AssertionError("no final event")


# ---- the ends of a run that are not failures ---------------------------------------------------


@pytest.mark.parametrize("abi", ABIS)
def test_an_error_after_our_own_abort_is_not_a_failure(
    standin: Standin, abi: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request cancelled -> rkllm_abort; the runtime then ends the run with RKLLM_RUN_ERROR and -1."""
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "5")
    monkeypatch.setenv("RKLLM_STANDIN_AFTER_ABORT", "error")
    engine = make_engine(standin, abi, n_batch=2)
    try:
        before = describe(standin.lib(abi))
        submit(engine, [request(k, f"{k} would run for 5 s @len=1000", max_new_tokens=1000) for k in ("a", "b")])
        out = drive(engine, ["a", "b"], cancel={"a": 1, "b": 1})
        assert all(o.final is None and not o.after_final for o in out.values())
        after = describe(standin.lib(abi))
        assert int(after["aborts"]) == int(before["aborts"]) + 1
        assert engine.info()["recoveries"] == 0 and after["destroy_calls"] == before["destroy_calls"]
        assert engine.info()["failed_runs"] == 0
        assert_serves(engine, standin)
    finally:
        engine.close()


def test_a_padded_1_2_batch_that_ends_by_length_is_aborted_without_a_failure(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ABI 1.2 fixes max_new_tokens at init (1024 here): the padding slot runs on after the real
    request's own limit, the engine aborts, the runtime answers with ERROR and -1."""
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "50")  # the padding slot has >= 8 steps (400 ms) left
    monkeypatch.setenv("RKLLM_STANDIN_AFTER_ABORT", "error")
    engine = make_engine(standin, "1.2", n_batch=2)
    try:
        before = describe(standin.lib("1.2"))
        submit(engine, [request("r", "one request @len=50", max_new_tokens=2)])
        out = drive(engine, ["r"])
        final = out["r"].final
        assert isinstance(final, FinishEvent) and (final.reason, final.completion_tokens) == ("length", 2)
        assert out["r"].text == expected_text("one request @len=50", 2)
        after = describe(standin.lib("1.2"))
        assert int(after["aborts"]) == int(before["aborts"]) + 1
        assert engine.info()["recoveries"] == 0 and after["destroy_calls"] == before["destroy_calls"]
        assert engine.info()["failed_runs"] == 0
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_a_null_finish_result_still_answers_every_request(
    standin: Standin, abi: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime ends the last slots without a token_id -1 step and hands FINISH a NULL result:
    every request still gets its final event (no perf), and the run is no failure."""
    monkeypatch.setenv("RKLLM_STANDIN_NULL_FINISH", "1")
    monkeypatch.setenv("RKLLM_STANDIN_EOS_STEP", "0")
    engine = make_engine(standin, abi, n_batch=3)
    try:
        prompts = {"a": "first @len=3", "b": "second @len=6", "c": "third @len=6"}
        submit(engine, [request(k, p) for k, p in prompts.items()])
        out = drive(engine, list(prompts), timeout=5.0)
        for k, p in prompts.items():
            final = out[k].final
            assert isinstance(final, FinishEvent), (k, final)
            n = int(p.split("=")[1])
            assert (final.reason, final.completion_tokens, final.perf) == ("stop", n, {})
            assert out[k].text == expected_text(p, n)
        assert engine.info()["failed_runs"] == 0
    finally:
        engine.close()


def test_without_an_eos_step_the_last_slots_get_the_finish_perf(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_EOS_STEP", "0")
    engine = make_engine(standin, "1.3", n_batch=2)
    try:
        submit(engine, [request("s", "short @len=2"), request("l", "long @len=7")])
        out = drive(engine, ["s", "l"])
        last = out["l"].final
        # the FINISH perf is its first result's (slot 0 produced 2 tokens)
        assert isinstance(last, FinishEvent) and last.completion_tokens == 7 and last.perf["generate_tokens"] == 2
    finally:
        engine.close()


# ---- abort, the end of a run and destroy ------------------------------------------------------------


@pytest.mark.parametrize("abi", ABIS)
def test_an_abort_never_reaches_an_idle_handle(standin: Standin, abi: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel right after submit: the worker may not have called rkllm_run yet, or the runtime may
    not have begun its run. The abort waits for the run (or the run is skipped): the stand-in never
    sees rkllm_abort outside an rkllm_run call (before the fix: most of these were)."""
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "5")
    engine = make_engine(standin, abi, n_batch=2)
    try:
        before = describe(standin.lib(abi))
        for i in range(30):
            submit(engine, [request(f"c{i}", f"cancelled at once {i} @len=1000", max_new_tokens=1000)])
            engine.cancel(f"c{i}")
            assert wait_idle(engine, timeout=5.0) == []
        after = describe(standin.lib(abi))
        assert after["idle_aborts"] == before["idle_aborts"]
        assert int(after["runs"]) - int(before["runs"]) <= 30  # those cancelled before their run began: not run
        assert engine.info()["failed_runs"] == 0
        assert_serves(engine, standin)
    finally:
        engine.close()


@pytest.mark.parametrize("abi", ABIS)
def test_no_call_reaches_a_destroyed_handle(standin: Standin, abi: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs that fail twice in a row (so recovery destroys the handle and makes a new one) while the
    scheduler cancels every request at all sorts of moments around the failure, and close() at the end."""
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "0")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "1")
    before = describe(standin.lib(abi))
    engine = make_engine(standin, abi, n_batch=2)
    try:
        for i in range(24):
            submit(engine, [request(f"f{i}", f"boom @fail={i % 4} @len=50"), request(f"m{i}", "mate @len=50")])
            time.sleep((i % 6) * 0.001)
            engine.cancel(f"f{i}")
            engine.cancel(f"m{i}")
            wait_idle(engine, timeout=5.0)
    finally:
        engine.close()
    assert describe(standin.lib(abi))["invalid_handle_calls"] == before["invalid_handle_calls"]
