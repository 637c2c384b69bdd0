"""RkllmEngine behind the real bridge (Service, scheduler, paho) and a private Mosquitto, with the
C stand-in runtime: requests published over MQTT come back with their own text, a runtime failure
is answered engine_error and the bridge goes on."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.protocol import ErrorCode, ErrorReply, OkReply
from rkmqtt.service import Service
from tests.mqtt_probe import Probe
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    expected_text,
    make_settings,
    natural_length,
    standin_env_fixture,
    standin_fixture,
)

pytestmark = pytest.mark.usefixtures("standin_env")


def start_rkllm_bridge(start_bridge: Callable[..., Service], standin: Standin, abi: str, n_batch: int) -> Service:
    settings = make_settings(standin, abi, n_batch=n_batch)
    engine = RkllmEngine(settings, backoff_s=0.01, backoff_max_s=0.05)
    # (the fixture's `engine` argument is the instance; the bridge's own `engine` setting stays auto)
    return start_bridge(engine, n_batch=n_batch, model=settings.model, rkllm_library=settings.rkllm_library)


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_devices_get_their_own_replies_over_mqtt(
    standin: Standin, abi: str, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_rkllm_bridge(start_bridge, standin, abi, n_batch=4)
    probe = probe_factory([f"{prefix}/reply/#"])
    prompts = {f"dev{i}": f"device {i} says «héllo» €{i} @len={5 + 4 * i}" for i in range(6)}
    for client, text in prompts.items():
        probe.publish(f"{prefix}/request/{client}", {"id": f"r-{client}", "prompt": text})
    timed = 0
    for client, text in prompts.items():
        reply = OkReply.model_validate_json(json.dumps(probe.final(f"{prefix}/reply/{client}/r-{client}")))
        assert reply.text == expected_text(text, natural_length(text))
        assert reply.finish_reason == "stop" and reply.usage.completion_tokens == natural_length(text)
        assert 1 <= reply.batch.size <= 4 and 0 <= reply.batch.slot < 4
        timed += reply.timing.prefill_ms is not None and reply.timing.decode_ms is not None
    # The runtime's FINISH perf (for the whole batch) reaches the replies of the slots that end last.
    assert timed >= 1
    assert len(probe.finals_under(f"{prefix}/reply/")) == len(prompts)


def test_a_runtime_failure_is_answered_engine_error_and_the_bridge_goes_on(
    standin: Standin, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_rkllm_bridge(start_bridge, standin, "1.3", n_batch=2)
    probe = probe_factory([f"{prefix}/reply/#"])
    probe.publish(f"{prefix}/request/bad", {"id": "boom", "prompt": "boom @fail=1"})
    err = ErrorReply.model_validate_json(json.dumps(probe.final(f"{prefix}/reply/bad/boom")))
    assert err.error.code is ErrorCode.ENGINE_ERROR
    probe.publish(f"{prefix}/request/good", {"id": "after", "prompt": "fine again @len=6"})
    reply = OkReply.model_validate_json(json.dumps(probe.final(f"{prefix}/reply/good/after")))
    assert reply.text == expected_text("fine again @len=6", 6)
