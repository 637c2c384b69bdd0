"""The HTTP API with the real numpy engine: `rkmqtt run` as a process with the packaged
SmolLM2 model (whose chat template takes no tools), and a small model whose template does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ollama
import openai
import pytest

from rkmqtt.engines.numpy.engine import NumpyEngine
from rkmqtt.mqtt.broker import Mosquitto, free_port, port_answers
from rkmqtt.service import Service
from tests.numpy_fixtures import TinySpec, write_tiny_gguf
from tests.test_http_units import TOOL_TEMPLATE, TOOLS

REPO = Path(__file__).resolve().parents[1]


def test_rkmqtt_run_serves_ollama_and_openai_clients_with_the_real_model(mosquitto: Mosquitto, prefix: str) -> None:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "run", "--broker", mosquitto.url, "--topic-prefix", prefix,
         "--engine", "numpy", "--n-batch", "2", "--temperature", "0", "--no-discovery",
         "--http-listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not port_answers("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < end, "rkmqtt run did not open the HTTP port"
            time.sleep(0.2)
        client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=120)
        model = client.list().models[0].model
        assert model is not None and "SmolLM2" in model
        assert client.show(model).capabilities == ["completion"]
        reply = client.chat(model, messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in (reply.message.content or "") and reply.done_reason == "stop"
        assert reply.prompt_eval_count and reply.eval_count and reply.eval_duration
        parts = list(client.generate(model, "Name three colours.", options={"num_predict": 8}, stream=True))
        assert parts[-1].done and parts[-1].eval_count == 8 and parts[-1].done_reason == "length"
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        chunks = list(
            oa.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.message.content, "greedy: the same answer over both APIs"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.eval_count
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model, messages=[{"role": "user", "content": "Weather?"}], tools=list(TOOLS))
        assert e.value.status_code == 400 and "takes no tools" in e.value.error
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "HTTP API (Ollama /api, OpenAI /v1) on http://127.0.0.1" in out
        assert "capital of France" not in out, "prompts must not be logged at INFO"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tools_reach_the_numpy_engines_template(
    start_bridge: Callable[..., Service], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = write_tiny_gguf(
        tmp_path_factory.mktemp("tools") / "tools.gguf", TinySpec(seed=5, context=512, chat_template=TOOL_TEMPLATE)
    )
    engine = NumpyEngine(model=str(path), n_batch=2, max_context=512)
    port = free_port()
    start_bridge(engine, http_listen=f"127.0.0.1:{port}")
    client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=120)
    assert client.show("tools").capabilities == ["completion", "tools"]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat("tools", messages=ask, options={"num_predict": 2})
    with_tools = client.chat("tools", messages=ask, tools=list(TOOLS), options={"num_predict": 2})
    # The definitions were rendered into the prompt (byte-level tokenizer: one token a byte or so).
    assert with_tools.prompt_eval_count and plain.prompt_eval_count
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 40
