"""Several models in one bridge: a real Mosquitto, the numpy engine on the packaged SmolLM2 under two
names (one of them pulled from a local Hugging Face endpoint by `hf://`), the RKLLM stand-in for a
switch that waits for the running batch and for an idle unload, `/api/pull` read by the real `ollama`
client, and a model that cannot be had leaving the bridge online, saying why."""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from rkmqtt.engines.numpy.gguf_file import DEFAULT_MODEL_FILE, default_model_path
from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from tests.conftest import bridge_settings
from tests.hf_endpoint import SMOLLM_REPO, HfEndpoint
from tests.mqtt_probe import Probe
from tests.rkllm_fixtures import (  # noqa: F401
    Standin,
    expected_text,
    standin_env_fixture,
    standin_fixture,
)

SMOLLM_REF = f"hf://{SMOLLM_REPO}/{DEFAULT_MODEL_FILE}"


@pytest.fixture
def start_bridge(mosquitto: Mosquitto, prefix: str) -> Iterator[Callable[..., Service]]:
    """start_bridge(**settings) -> a running in-process Service that builds its own engines."""
    services: list[Service] = []

    def start(**overrides: Any) -> Service:
        svc = Service(bridge_settings(mosquitto.url, prefix, **overrides))
        services.append(svc)
        svc.start()
        assert svc.bridge is not None and svc.bridge.wait_connected(15), "bridge did not connect"
        return svc

    yield start
    for svc in services:
        svc.stop(grace_s=1)


def stats(probe: Probe, svc: Service, pred: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
    assert svc.bridge is not None
    topic = svc.bridge.topics.stats
    found = probe.wait_for(lambda m: m.topic == topic and pred(m.json()), timeout)
    return found[-1].json()  # type: ignore[no-any-return]


def ask(probe: Probe, prefix: str, client: str, rid: str, **fields: Any) -> None:
    probe.publish(f"{prefix}/request/{client}", {"id": rid, "max_new_tokens": 8, **fields})


def test_two_models_in_one_bridge_each_answer_the_requests_that_name_them(
    hub: HfEndpoint,
    tmp_path: Path,
    prefix: str,
    start_bridge: Callable[..., Service],
    probe_factory: Callable[..., Probe],
) -> None:
    models = {"smol": str(default_model_path()), "pulled": SMOLLM_REF}
    svc = start_bridge(
        engine="numpy", models=json.dumps(models), max_loaded_models=2, models_dir=str(tmp_path), n_batch=2
    )
    assert svc.info is not None and svc.info.models == ["smol", "pulled"] and svc.info.model == "smol"
    probe = probe_factory([f"{prefix}/reply/#", f"{prefix}/node/#"])
    for i in range(2):
        ask(probe, prefix, "kitchen", f"p{i}", prompt="What is the capital of France?", model="pulled")
        ask(probe, prefix, "hall", f"s{i}", prompt="Name a colour.", model="smol")
    ask(probe, prefix, "hall", "d", prompt="Name a colour.")  # no model: the first
    for rid, client, model in (("p0", "kitchen", "pulled"), ("p1", "kitchen", "pulled"), ("s0", "hall", "smol"),
                               ("s1", "hall", "smol"), ("d", "hall", "smol")):  # fmt: skip
        reply = probe.final(f"{prefix}/reply/{client}/{rid}", timeout=180)
        assert reply["status"] == "ok" and reply["model"] == model and reply["text"], reply
    # The reference was pulled into models_dir the first time it was asked for, and both are loaded.
    assert (tmp_path / "hf" / SMOLLM_REPO / DEFAULT_MODEL_FILE).is_file()
    assert stats(probe, svc, lambda s: s["loaded"] == ["pulled", "smol"])["engine_ready"]
    pulls = [m.json() for m in probe.on(f"{prefix}/node/{svc.info.node}/pull")]
    assert pulls[-1]["status"] == "done" and any(p["status"] == "downloading" for p in pulls)
    ask(probe, prefix, "hall", "x", prompt="hi", model="nonesuch")
    refused = probe.final(f"{prefix}/reply/hall/x")
    assert refused["error"]["code"] == "invalid_request"
    assert "model 'nonesuch' is not served here: this bridge serves 'smol', 'pulled'" in refused["error"]["message"]


def test_api_pull_streams_progress_to_the_real_ollama_client(
    hub: HfEndpoint, tmp_path: Path, start_bridge: Callable[..., Service]
) -> None:
    port = free_port()
    start_bridge(engine="numpy", models_dir=str(tmp_path), http_listen=f"127.0.0.1:{port}", max_loaded_models=2)
    client = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=300)
    hub.delay_s = 0.01  # a chunk at a time, so that progress has steps to show
    parts = list(client.pull(SMOLLM_REF, stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    downloading = [p for p in parts if p.digest]
    assert len(downloading) >= 10 and downloading[-1].completed == downloading[-1].total == 98_362_432
    assert downloading[0].digest is not None and downloading[0].digest.startswith("sha256:")
    assert all(a.completed <= b.completed for a, b in itertools.pairwise(downloading))
    assert "verifying sha256 digest" in statuses
    # Listed, answered by name, then deleted; a second pull (not streamed, as Home Assistant's) is at once.
    assert client.pull(SMOLLM_REF).status == "success"
    names = [m.model for m in client.list().models]
    assert "SmolLM2-135M-Instruct.Q4_1:latest" in names
    answer = client.chat(model=SMOLLM_REF, messages=[{"role": "user", "content": "Hi!"}], options={"num_predict": 4})
    assert answer.message.content
    # What Home Assistant's Ollama integration does with a model it does not list: pull it by the name
    # the user typed (Ollama's hf.co form), then chat with it by that name.
    repo = f"hf.co/{SMOLLM_REPO}:Q4_1"
    assert client.pull(repo).status == "success"
    answer = client.chat(model=repo, messages=[{"role": "user", "content": "Hi!"}], options={"num_predict": 4})
    assert answer.message.content and answer.model == "SmolLM2-135M-Instruct.Q4_1:latest"
    client.delete("SmolLM2-135M-Instruct.Q4_1")
    assert not (tmp_path / "hf" / SMOLLM_REPO / DEFAULT_MODEL_FILE).exists()
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2:latest")
    assert e.value.status_code == 404 and "give hf://owner/repo[/file]" in e.value.error


def test_a_model_that_cannot_be_had_leaves_the_bridge_online_saying_why(
    tmp_path: Path, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody answers there
    svc = start_bridge(engine="numpy", model=SMOLLM_REF, models_dir=str(tmp_path))
    probe = probe_factory([f"{prefix}/reply/#", f"{prefix}/node/#"])
    assert svc.bridge is not None
    assert probe.wait_for(lambda m: m.topic == svc.bridge.topics.status)[0].payload == b"online"  # type: ignore[union-attr]
    down = stats(probe, svc, lambda s: not s["engine_ready"] and "cannot be loaded" in (s["engine_problem"] or ""))
    assert "cannot reach http://127.0.0.1:" in down["engine_problem"]
    ask(probe, prefix, "hall", "r1", prompt="hi")
    reply = probe.final(f"{prefix}/reply/hall/r1")
    assert reply["error"]["code"] == "engine_error" and "check the network" in reply["error"]["message"]


@pytest.mark.usefixtures("standin_env")
def test_rkllm_switches_models_between_batches_and_unloads_an_idle_one(
    standin: Standin,
    tmp_path: Path,
    prefix: str,
    start_bridge: Callable[..., Service],
    probe_factory: Callable[..., Probe],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RKLLM_STANDIN_ZERO_DELAY")
    monkeypatch.setenv("RKLLM_STANDIN_DECODE_MS", "25")
    monkeypatch.setenv("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", "0")
    files = {}
    for name in ("qwen", "llama"):
        files[name] = tmp_path / f"{name}_w8a8_RK3588.rkllm"
        files[name].write_bytes(b"stand-in " + name.encode())
    svc = start_bridge(
        engine="rkllm",
        rkllm_library=str(standin.lib("1.2")),
        models=json.dumps({n: str(p) for n, p in files.items()}),
        max_loaded_models=1,
        keep_alive="2s",
        n_batch=2,
        max_new_tokens=1024,
    )
    probe = probe_factory([f"{prefix}/reply/#", f"{prefix}/node/#"])
    long = "a long one @len=40"
    probe.publish(f"{prefix}/request/a", {"id": "q1", "prompt": long, "model": "qwen"})
    probe.wait_for(lambda m: m.topic == f"{prefix}/reply/a/q1/stream")  # qwen's batch is running
    probe.publish(f"{prefix}/request/b", {"id": "l1", "prompt": "short @len=5", "model": "llama"})
    probe.publish(f"{prefix}/request/a", {"id": "q2", "prompt": "again @len=5", "model": "qwen"})
    q1 = probe.final(f"{prefix}/reply/a/q1", timeout=60)
    # The running batch was not cut by the switch: all 40 tokens, finished by the model itself.
    assert q1["status"] == "ok" and q1["finish_reason"] == "stop" and q1["usage"]["completion_tokens"] == 40
    assert q1["text"] == expected_text(long, 40)
    l1 = probe.final(f"{prefix}/reply/b/l1", timeout=60)
    q2 = probe.final(f"{prefix}/reply/a/q2", timeout=60)
    assert (l1["model"], q2["model"]) == ("llama", "qwen")
    assert l1["batch"]["size"] == 1 and q2["batch"]["size"] == 1  # batches never mix models
    # llama's request came before qwen's second: it ran first, in between the two switches.
    finals = [m.topic.rsplit("/", 1)[-1] for m in probe.finals_under(f"{prefix}/reply/")]
    assert finals == ["q1", "l1", "q2"]
    loaded = [tuple(m.json()["loaded"]) for m in probe.on(svc.bridge.topics.stats)]  # type: ignore[union-attr]
    assert ("qwen",) in loaded and ("llama",) in loaded
    # keep_alive 2s: idle, the model is unloaded.
    stats(probe, svc, lambda s: s["loaded"] == [], timeout=15)
    # A request's keep_alive sets its model's: -1 keeps it loaded past the setting's 2 s, 0 unloads it at once.
    probe.publish(f"{prefix}/request/b", {"id": "l2", "prompt": "x @len=3", "model": "llama", "keep_alive": "-1"})
    assert probe.final(f"{prefix}/reply/b/l2", timeout=60)["model"] == "llama"
    time.sleep(3.5)
    assert stats(probe, svc, lambda s: s["completed"] == 4)["loaded"] == ["llama"]
    probe.publish(f"{prefix}/request/b", {"id": "l3", "prompt": "y @len=3", "model": "llama", "keep_alive": 0})
    assert probe.final(f"{prefix}/reply/b/l3", timeout=60)["model"] == "llama"
    stats(probe, svc, lambda s: s["loaded"] == [] and s["completed"] == 5, timeout=15)


def test_each_model_takes_its_own_sampling_defaults(tmp_path: Path) -> None:
    """Where no setting gives temperature or repeat_penalty, a request takes its model's own: the
    packaged SmolLM2's (greedy, 1.05) by its file name before it is loaded, its engine's once loaded;
    a model without a row takes the settings' defaults. A setting that is set wins for every model."""
    from rkmqtt.engines.base import ChatMessage
    from rkmqtt.models.catalog import Catalog
    from rkmqtt.mqtt.outbox import Outbox
    from rkmqtt.mqtt.replies import MqttRoute, Replies
    from rkmqtt.mqtt.sink import MqttSink
    from rkmqtt.sched.admission import Admission, Ask
    from rkmqtt.sched.finals import Finals
    from rkmqtt.sched.request import Request, RequestKey
    from rkmqtt.settings import load_settings

    models = {"smol": str(default_model_path()), "qwen": str(tmp_path / "qwen2.5-0.5b-instruct-q8_0.gguf")}
    route = MqttRoute("p/reply/dev/1", MqttSink(Outbox(100), Replies(Finals("m"))))

    def sampling(flags: dict[str, Any], model: str) -> tuple[float, float]:
        s = load_settings({"engine": "numpy", "models": json.dumps(models), "models_dir": str(tmp_path), **flags})
        adm = Admission(s, lambda code: None, models=Catalog.for_settings(s, "numpy"))
        req = adm.admit(RequestKey("dev", "1"), Ask((ChatMessage("user", "hi"),), model=model), route, 0.0)
        assert isinstance(req, Request) and req.model == model
        return req.gen.sampling.temperature, req.gen.sampling.repeat_penalty

    assert sampling({}, "smol") == (0.0, 1.05)
    assert sampling({}, "qwen") == (0.7, 1.1)  # no row of its own: the settings' defaults
    assert sampling({"temperature": 0.5}, "smol") == (0.5, 1.05)
    assert sampling({"repeat_penalty": 1.2}, "smol") == (0.0, 1.2)
    # Loaded, the engine's own advice is the model's (the same row, read from the loaded file's name).
    s = load_settings({"engine": "numpy", "models": json.dumps(models), "models_dir": str(tmp_path)})
    catalog = Catalog.for_settings(s, "numpy")
    engine = catalog.open("smol")
    try:
        assert (
            catalog.choose("smol").sampling
            == engine.recommended_sampling
            == {"temperature": 0.0, "repeat_penalty": 1.05}
        )
        assert catalog.choose("smol").tools is False  # learned at its load
    finally:
        engine.close()


@pytest.mark.parametrize("strict", [False, True])
def test_tools_for_a_model_found_at_its_load_to_take_none(
    strict: bool, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    """A request with tools for a model not loaded yet cannot be judged by admission: once the model
    loads and its template has no place for tools, the loop does what admission would (strict_tools:
    refused; else answered without them)."""
    path = str(default_model_path())
    start_bridge(engine="numpy", models=json.dumps({"first": path, "later": path}), max_loaded_models=2,
                 strict_tools=strict)  # fmt: skip
    probe = probe_factory([f"{prefix}/reply/#"])
    tool = {"type": "function", "function": {"name": "turn_on", "parameters": {"type": "object"}}}
    ask(probe, prefix, "hall", "t1", prompt="Turn the light on.", model="later", tools=[tool])
    reply = probe.final(f"{prefix}/reply/hall/t1", timeout=120)
    if strict:
        assert reply["error"]["code"] == "invalid_request", reply
        assert reply["error"]["message"].startswith("later takes no tools")
    else:
        assert reply["status"] == "ok" and reply["model"] == "later" and reply["text"], reply


def test_run_with_a_reference_not_here_yet_pulls_it_then_says_ready_and_answers(
    hub: HfEndpoint, mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    """`rkmqtt run --model hf://…` whose file is not here: the start-up says so and pulls it (progress
    in the log) while the bridge goes online; the model's load lines follow the download, and only
    then the ready line, whose command is answered by the pulled model."""
    from tests.test_newcomer import clean_env, run_in, stop, wait_for_text

    log = tmp_path / "run.log"
    env = clean_env(RKMQTT_STATE_DIR=str(tmp_path / "state"))
    proc = run_in(tmp_path, log, "--model", SMOLLM_REF, "--models-dir", str(tmp_path / "models"), "--broker",
                  mosquitto.url, "--topic-prefix", prefix, "--no-discovery", env=env)  # fmt: skip
    try:
        out = wait_for_text(log, "ready: try", timeout=240)
        marks = ["is not here yet: pulling", f"downloading {DEFAULT_MODEL_FILE}", "verifying",
                 "loading model SmolLM2-135M-Instruct.Q4_1", "model SmolLM2-135M-Instruct.Q4_1 loaded in",
                 "ready: try"]  # fmt: skip
        at = [out.index(m) for m in marks]
        assert at == sorted(at), out
        line = next(x for x in out.splitlines() if "ready: try" in x)
        command = shlex.split(line.split("ready: try", 1)[1].split("  (or", 1)[0])
        asked = subprocess.run([sys.executable, "-m", "rkmqtt", *command[1:], "--json"], capture_output=True,
                               text=True, timeout=120, cwd=tmp_path, env=env)  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        reply = json.loads(asked.stdout)
        assert reply["status"] == "ok" and reply["model"] == "SmolLM2-135M-Instruct.Q4_1" and reply["text"]
    finally:
        stop(proc)
