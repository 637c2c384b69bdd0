"""RkllmEngine's failure paths, injected through the stand-in: each is answered engine_error and
followed by recovery (destroy + init again with backoff), and the engine goes on serving."""

from __future__ import annotations

import time

import pytest

from rkmqtt.engines.base import ErrorEvent, FinishEvent
from rkmqtt.errors import EngineError
from rkmqtt.protocol import ErrorCode
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    describe,
    drive,
    expected_text,
    make_engine,
    request,
    standin_env_fixture,
    standin_fixture,
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


def assert_serves(engine: object, standin: Standin) -> None:
    from rkmqtt.engines.rkllm.engine import RkllmEngine

    assert isinstance(engine, RkllmEngine)
    engine.submit([request("after-1", "after one @len=4"), request("after-2", "after two @len=6")])
    out = drive(engine, ["after-1", "after-2"])
    assert out["after-1"].text == expected_text("after one @len=4", 4)
    assert out["after-2"].text == expected_text("after two @len=6", 6)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_failure_is_answered_engine_error_then_recovered(standin: Standin, abi: str, failure: str) -> None:
    engine = make_engine(standin, abi, n_batch=4)
    try:
        before = describe(standin.lib(abi))
        reqs = [
            request("early", "ends first @len=1"),
            request("bad", FAILURES[failure]),
            request("mate", "a batch-mate @len=20"),
        ]
        engine.submit(reqs)
        out = drive(engine, [r.key for r in reqs])
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
        after = describe(standin.lib(abi))
        extra_inits = 3 if failure == "init-fails-twice-on-recovery" else 1
        assert int(after["init_calls"]) - int(before["init_calls"]) == extra_inits
        assert int(after["destroy_calls"]) - int(before["destroy_calls"]) == 1
        assert engine.info()["recoveries"] == 1 and engine.free_slots() == 4
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
    engine.submit([request("bad", "boom @fail=0")])
    out = drive_until_final(engine, "bad")
    assert isinstance(out, ErrorEvent) and out.code is ErrorCode.ENGINE_ERROR
    time.sleep(0.2)  # a few backoff rounds
    assert engine.free_slots() == 0  # still recovering: requests wait in the scheduler's queue
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 2.0


def drive_until_final(engine: object, key: str, timeout: float = 5.0) -> FinishEvent | ErrorEvent:
    from rkmqtt.engines.rkllm.engine import RkllmEngine

    assert isinstance(engine, RkllmEngine)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in engine.poll(0.05):
            if ev.key == key and isinstance(ev, FinishEvent | ErrorEvent):
                return ev
    raise AssertionError("no final event")
