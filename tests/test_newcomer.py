"""What a newcomer meets after the first request, with real processes: the config.yaml of the folder,
the start-up order (broker, HTTP port, model, ready), a peer that is not an MQTT broker, a journal
that another process holds, and "did you mean" for a request's fields."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from tests.bridge_process import BridgeProcess
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[1]
FAKE = ("--engine", "tests.fake_engine:FakeEngine")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any RKMQTT_ variable (the test's state directory included): the
    settings come from the folder's config.yaml and the flags only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run_in(folder: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "rkmqtt", "run", *args], cwd=folder, stdout=out,
                                stderr=out, env=env or clean_env())  # fmt: skip


def wait_for_text(log: Path, text: str, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while text not in (out := log.read_text(errors="replace")):
        if time.monotonic() > end:
            raise AssertionError(f"{text!r} not in the log:\n{out[-3000:]}")
        time.sleep(0.1)
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def http_port(start_bridge: Callable[..., Service]) -> int:
    """The HTTP port of a running bridge: the port a newcomer mistakes for the broker's."""
    port = free_port()
    start_bridge(FakeEngine(), http_listen=f"127.0.0.1:{port}")
    return port


def test_run_in_a_folder_with_a_config_yaml_uses_it_and_its_ready_line_works(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    folder = tmp_path / "house"
    folder.mkdir()
    state = tmp_path / "state-from-file"
    (folder / "config.yaml").write_text(
        f"broker: {mosquitto.url}\ntopic_prefix: {prefix}\nnode_name: from-file\nstate_dir: {state}\n"
        "engine: tests.fake_engine:FakeEngine\ndiscovery: false\n"
    )
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status"])
    log = tmp_path / "run.log"
    proc = run_in(folder, log)  # no flag at all: everything comes from ./config.yaml
    try:
        probe.wait_for(lambda m: m.topic == f"{prefix}/node/from-file/status" and m.payload == b"online", 60)
        out = wait_for_text(log, "ready: try")
        assert f"settings: config file {folder / 'config.yaml'}; state directory {state}" in out
        assert list(state.glob("journal-rkmqtt-from-file-*.sqlite3"))
        # The ready line names the command that reaches this bridge: it works as written.
        line = next(x for x in out.splitlines() if "ready: try" in x)
        command = shlex.split(line.split("ready: try", 1)[1].split("  (or", 1)[0])
        assert command[:2] == ["rkmqtt", "ask"] and command[3:] == ["--broker", mosquitto.url, "--topic-prefix", prefix]
        asked = subprocess.run([sys.executable, "-m", "rkmqtt", *command[1:]], capture_output=True, text=True,
                               timeout=60, cwd=tmp_path, env=clean_env())  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout == "What colour is the sky? \n"
    finally:
        stop(proc)
        probe.close()


def test_without_a_config_file_the_log_says_so(mosquitto: Mosquitto, prefix: str, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    proc = run_in(tmp_path, log, "--broker", mosquitto.url, "--topic-prefix", prefix, *FAKE,
                  env=clean_env(RKMQTT_STATE_DIR=str(tmp_path / "state")))  # fmt: skip
    try:
        out = wait_for_text(log, "ready: try")
        assert f"no config file (none given with --config, no config.yaml in {tmp_path})" in out
        assert f"state directory {tmp_path / 'state'}" in out
    finally:
        stop(proc)


def test_a_busy_http_port_is_refused_in_one_line_before_the_model_loads_and_before_online(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    """With the default engine and model: the refusal comes before their load, and the bridge never
    said online (nor offline: it never connected)."""
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status"])
    log = tmp_path / "run.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc = run_in(tmp_path, log, "--broker", mosquitto.url, "--topic-prefix", prefix,
                      "--http-listen", f"127.0.0.1:{port}")  # fmt: skip
        try:
            status = proc.wait(60)
        finally:
            stop(proc)
        took = time.monotonic() - t0
    out = log.read_text()
    assert status == 2, out
    lines = [x for x in out.splitlines() if x.startswith("rkmqtt:")]
    assert lines == [
        f"rkmqtt: setting http_listen='127.0.0.1:{port}': cannot listen there (Address already in use); "
        "choose a free port or an address of this machine"
    ], out
    assert "loading model" not in out and "connecting to" not in out, out
    time.sleep(0.5)
    assert probe.messages == []
    probe.close()
    print(f"refused {took:.1f} s after the start")


def test_an_unreachable_broker_is_said_at_once_before_the_model_loads(prefix: str, tmp_path: Path) -> None:
    broker = Mosquitto()  # not started yet: nothing listens on its port
    bridge = BridgeProcess(broker.url, prefix, tmp_path / "bridge.log", *FAKE).start()
    try:
        bridge.wait_for_log("loading model", timeout=60)
        out = bridge.output()
        assert out.index("connection refused") < out.index("loading model"), out
        broker.start()
        bridge.wait_for_log("is back after", timeout=30)
        bridge.wait_for_log("ready: try", timeout=30)
        assert bridge.output().count("connection refused") == 1
    finally:
        bridge.stop()
        broker.close()


def test_run_against_a_peer_that_is_not_a_broker_says_so(http_port: int, prefix: str, tmp_path: Path) -> None:
    bridge = BridgeProcess(f"mqtt://127.0.0.1:{http_port}", prefix, tmp_path / "bridge.log", *FAKE).start()
    try:
        bridge.wait_for_log("connecting to", timeout=60)
        time.sleep(3)  # the bridge's own attempts, several of them
        out = bridge.output()
        said = [x for x in out.splitlines() if "without an MQTT answer" in x]
        assert len(said) == 1 and f"127.0.0.1:{http_port}" in said[0] and "is it an MQTT broker" in said[0], out
        assert out.index("without an MQTT answer") < out.index("loading model")
        # After the model, where a user last looks, the bridge's own line says it is still not answering.
        assert "connecting to mqtt://127.0.0.1:" in out and "(it has not answered yet, see above; retrying" in out
    finally:
        bridge.stop()


@pytest.mark.parametrize("peer", ["http", "silent"])
def test_ask_against_a_port_that_is_not_a_broker_gives_up_in_one_line(
    peer: str, http_port: int, tmp_path: Path
) -> None:
    """rkmqtt's own HTTP port closes the connection at MQTT's CONNECT (a 400); a silent peer never
    answers: `ask` gives up on both within seconds, not after its 300 s --timeout (the test allows 60)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = http_port if peer == "http" else silent.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "rkmqtt", "ask", "hi", "--broker", f"mqtt://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env())  # fmt: skip
        took = time.monotonic() - t0
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rkmqtt: mqtt://127.0.0.1:{port}: "), out.stderr
    expected = "it closed the connection without an MQTT answer" if peer == "http" else "no MQTT answer to our CONNECT"
    assert expected in lines[0] and "is it an MQTT broker" in lines[0]
    print(f"{peer}: gave up after {took:.1f} s")


def test_a_second_bridge_on_the_same_journal_is_refused_naming_the_first(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    """Same node, prefix, broker and state directory on one machine: the journal is locked."""
    first = BridgeProcess(mosquitto.url, prefix, tmp_path / "first.log", *FAKE, "--node-name", "twin").start()
    second = BridgeProcess(mosquitto.url, prefix, tmp_path / "second.log", *FAKE, "--node-name", "twin")
    probe = Probe(mosquitto.url, [f"{prefix}/node/+/status"])
    try:
        probe.wait_for(lambda m: m.is_node("status") and m.payload == b"online", 60)
        second.start()
        assert second.wait(60) == 2
        lines = [x for x in second.output().splitlines() if x.startswith("rkmqtt:")]
        assert first.proc is not None
        assert len(lines) == 1 and f"is in use by another rkmqtt (pid {first.proc.pid})" in lines[0], second.output()
        assert first.proc.poll() is None  # the first goes on serving
    finally:
        first.stop()
        second.stop()
        probe.close()


def test_an_unknown_request_field_names_the_nearest_one(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    start_bridge(FakeEngine())
    probe = probe_factory([f"{prefix}/reply/dev/#"])
    probe.publish(f"{prefix}/request/dev", {"id": "m1", "prompt": "hi", "max_tokens": 5})
    final = probe.final(f"{prefix}/reply/dev/m1")
    assert final["error"] == {
        "code": "invalid_request",
        "message": "max_tokens: unknown field (did you mean max_new_tokens?)",
    }
    probe.publish(f"{prefix}/request/dev", {"id": "m2", "messages": [{"role": "user", "contents": "hi"}]})
    assert (
        "messages.0.contents: unknown field (did you mean content?)"
        in probe.final(f"{prefix}/reply/dev/m2")["error"]["message"]
    )


def test_the_start_up_order_and_ctrl_c_on_ask_with_the_real_model(
    mosquitto: Mosquitto, prefix: str, tmp_path: Path
) -> None:
    """The default engine and model: settings, model load (timed), ready line, in that order; then
    Ctrl-C on an `ask` whose answer is long ends its request on the bridge as cancelled."""
    log = tmp_path / "run.log"
    proc = run_in(tmp_path, log, "--broker", mosquitto.url, "--topic-prefix", prefix, "--n-batch", "1",
                  "--no-discovery", env=clean_env(RKMQTT_STATE_DIR=str(tmp_path / "state")))  # fmt: skip
    probe = Probe(mosquitto.url, [f"{prefix}/reply/#"])
    try:
        out = wait_for_text(log, "ready: try", timeout=180)
        marks = ["settings: no config file", "loading model SmolLM2", "model SmolLM2-135M-Instruct.Q4_1 loaded in",
                 "connecting to", "ready: try"]  # fmt: skip
        at = [out.index(m) for m in marks]
        assert at == sorted(at), out
        story = "Tell me a long story about a dragon who learns to cook, with every step of every recipe."
        ask = subprocess.Popen([sys.executable, "-m", "rkmqtt", "ask", story, "--tokens", "500", "--id", "story",
                                "--broker", mosquitto.url, "--topic-prefix", prefix], cwd=tmp_path, env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            probe.wait_for(lambda m: m.topic.endswith("/story/stream"), 120)
            ask.send_signal(signal.SIGINT)
            _, err = ask.communicate(timeout=60)
        finally:
            if ask.poll() is None:
                ask.kill()
        final = probe.final(f"{prefix}/reply/cli/story", timeout=60)
        assert final["finish_reason"] == "cancelled" and final["usage"]["completion_tokens"] < 500, final
        assert ask.returncode == 130, err
    finally:
        stop(proc)
        probe.close()
