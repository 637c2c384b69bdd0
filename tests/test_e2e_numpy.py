"""End to end, as a user runs it: `rkmqtt run` as a process with the real CPU engine and the
packaged SmolLM2 model, a real Mosquitto, `mosquitto_pub` for the prompt, SIGTERM to stop."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rkmqtt.engines.numpy.engine import NumpyEngine
from rkmqtt.engines.numpy.sampling_defaults import MODEL_SAMPLING, ModelSampling
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.service import Service
from rkmqtt.settings import MODEL_DEFAULTED, Settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe, Received

REPO = Path(__file__).resolve().parents[1]


def test_rkmqtt_run_answers_mosquitto_pub_with_the_real_model(mosquitto: Mosquitto, prefix: str) -> None:
    probe = Probe(mosquitto.url, [f"{prefix}/reply/#", f"{prefix}/node/+/status", f"{prefix}/node/+/info"])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "run", "--broker", mosquitto.url, "--topic-prefix", prefix,
         "--engine", "numpy", "--n-batch", "2", "--temperature", "0", "--no-discovery"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", timeout=120)
        info = probe.wait_for(lambda m: m.is_node("info"))[0].json()
        assert info["engine"] == "numpy" and info["batching"] == "continuous" and "SmolLM2" in info["model"]
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-t", f"{prefix}/request/kitchen",
                        "-m", "What is the capital of France?"], check=True, timeout=10)  # fmt: skip
        probe.publish(f"{prefix}/request/hall", {"id": "h1", "prompt": "Name one colour.", "max_new_tokens": 12})
        finals = probe.wait_for(lambda m: "/reply/" in m.topic and not m.topic.endswith("/stream"), count=2,
                                timeout=120)  # fmt: skip
        by_client = {m.topic.split("/")[2]: m.json() for m in finals}
        kitchen = by_client["kitchen"]
        assert kitchen["status"] == "ok" and "Paris" in kitchen["text"], kitchen
        chunks = probe.on(f"{prefix}/reply/kitchen/{kitchen['id']}/stream")
        assert "".join(json.loads(c.payload)["text"] for c in chunks) == kitchen["text"]
        assert by_client["hall"]["usage"]["completion_tokens"] <= 12
        assert max(kitchen["batch"]["size"], by_client["hall"]["batch"]["size"]) == 2  # they shared the engine
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert probe.wait_for(lambda m: m.is_node("status") and m.payload == b"offline")
        assert "What is the capital" not in out, "prompts must not be logged at INFO"
    finally:
        if proc.poll() is None:
            proc.kill()
        probe.close()


README = (REPO / "README.md").read_text()
QUESTION = "What is the capital of France?"


def first_sentence(text: str) -> str:
    """Up to the first . ! or ? that ends a sentence, or the first line break."""
    m = re.search(r"[.!?](\s|$)|\n", text.strip())
    return text.strip()[: m.start() + 1] if m else text.strip()


def test_the_readmes_first_question_at_the_default_settings(
    start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    """With no sampling setting anywhere (`temperature=None` drops the test fixture's 0), the bridge takes
    the packaged model's own defaults (greedy, repeat penalty 1.05: docs/sampling.md), and the README's
    first question, sent as `mosquitto_pub` sends it, is answered with a first sentence that names Paris
    as the capital: 8 at once (one batch) and then one alone, the same answer, the one the README shows.
    (At the old 0.2 and 1.1, 12 of 20 were; the rest began "L'Étoile…".)"""
    svc = start_bridge(NumpyEngine(n_batch=8, max_context=256), rate_limit=0, temperature=None)
    assert (svc.settings.temperature, svc.settings.repeat_penalty) == (0.0, 1.05)
    probe = probe_factory([f"{prefix}/reply/#"])

    def final(m: Received) -> bool:
        return m.topic.startswith(f"{prefix}/reply/kitchen/") and not m.topic.endswith("/stream")

    for _ in range(8):
        probe.publish(f"{prefix}/request/kitchen", QUESTION)
    probe.wait_for(final, 300, 8)
    probe.publish(f"{prefix}/request/kitchen", QUESTION)
    replies = [m.json() for m in probe.wait_for(final, 300, 9)]
    assert all(r["status"] == "ok" for r in replies), replies
    assert max(r["batch"]["size"] for r in replies) > 1, "the 8 shared a batch"
    texts = {r["text"] for r in replies}
    assert len(texts) == 1, texts
    answer = texts.pop()
    assert "Paris" in first_sentence(answer) and "capital" in first_sentence(answer), answer
    assert f'"text":"{answer}"' in README and f"# {answer}\n" in README, "the README shows another answer"


def test_a_setting_that_is_set_wins_over_the_models_default(
    start_bridge: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sampling setting on its own: set (flag, variable, file), it is kept; unset, the model's
    value; without one from the model, the setting's general default."""
    advice = {"temperature": 0.0, "repeat_penalty": 1.05}
    s = start_bridge(FakeEngine(advice=advice), temperature=None).settings
    assert (s.temperature, s.repeat_penalty) == (0.0, 1.05)
    s = start_bridge(FakeEngine(advice=advice), temperature=0.9).settings
    assert (s.temperature, s.repeat_penalty) == (0.9, 1.05)
    monkeypatch.setenv("RKMQTT_REPEAT_PENALTY", "1.2")
    s = start_bridge(FakeEngine(advice=advice), temperature=None).settings
    assert (s.temperature, s.repeat_penalty) == (0.0, 1.2)
    monkeypatch.delenv("RKMQTT_REPEAT_PENALTY")
    s = start_bridge(FakeEngine(), temperature=None).settings  # no advice from the engine
    assert (s.temperature, s.repeat_penalty) == (0.7, 1.1)


def test_the_model_table_covers_the_model_defaulted_settings_and_the_docs_quote_it() -> None:
    assert tuple(f.name for f in dataclasses.fields(ModelSampling)) == MODEL_DEFAULTED
    assert NumpyEngine().recommended_sampling == {"temperature": 0.0, "repeat_penalty": 1.05}  # the packaged model
    assert NumpyEngine(model="/models/qwen2.5-0.5b-instruct-q4_0.gguf").recommended_sampling == {}
    smol = MODEL_SAMPLING["smollm2-135m"]
    assert "SmolLM2-135M: 0, greedy" in (Settings.model_fields["temperature"].description or "")
    assert f"SmolLM2-135M: {smol.repeat_penalty:g}" in (Settings.model_fields["repeat_penalty"].description or "")
    assert smol.temperature == 0.0
