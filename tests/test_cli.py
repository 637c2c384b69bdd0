"""The `rkmqtt` command as a user runs it: ask, check, health, and wrong settings."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.service import Service
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[1]


def rkmqtt(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "rkmqtt", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)  # fmt: skip


def test_ask_streams_and_prints_timing(mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]) -> None:
    start_bridge(FakeEngine())
    out = rkmqtt("ask", "what time is it", "--broker", mosquitto.url, "--topic-prefix", prefix)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "what time is it \n"
    assert "[stop; 4 tokens;" in out.stderr and "first token" in out.stderr


def test_ask_json_and_error_exit(mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]) -> None:
    start_bridge(FakeEngine(), max_new_tokens=50, default_new_tokens=10)
    out = rkmqtt("ask", "one two three", "--json", "--id", "j1", "--broker", mosquitto.url, "--topic-prefix", prefix)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["id"] == "j1" and reply["text"] == "one two three "
    bad = rkmqtt("ask", "hi", "--tokens", "500", "--broker", mosquitto.url, "--topic-prefix", prefix)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("rkmqtt: too_many_tokens: max_new_tokens is 500")


def test_ask_without_a_bridge_says_so_at_once(mosquitto: Mosquitto, prefix: str) -> None:
    """No retained status: no bridge ever ran with this prefix. `ask` says so without waiting out
    its 300 s --timeout (the subprocess gets 60 s)."""
    out = rkmqtt("ask", "hi", "--broker", mosquitto.url, "--topic-prefix", prefix)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"rkmqtt: no rkmqtt bridge has run on this broker with topic_prefix {prefix!r} "
        f"(nothing on {prefix}/node/+/status): "
        "start `rkmqtt run`, or check --broker and --topic-prefix"
    )


def test_ask_with_the_bridge_offline_says_so_at_once(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]
) -> None:
    start_bridge(FakeEngine()).stop(grace_s=0)  # its retained status is now `offline`
    out = rkmqtt("ask", "hi", "--broker", mosquitto.url, "--topic-prefix", prefix)
    assert out.returncode == 1
    assert f"rkmqtt: every rkmqtt bridge with topic_prefix {prefix!r} is offline ({prefix}/node/+/status)" in out.stderr


def test_ask_stops_waiting_when_the_bridge_goes_offline(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    """A bridge that vanishes mid-answer never replies: its Last Will turns the status offline, and
    `ask` gives up a few seconds later (this answer would take 150 s)."""
    svc = start_bridge(FakeEngine(step_s=0.5))
    probe = probe_factory([f"{prefix}/reply/#"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "ask", "tokens:300", "--broker", mosquitto.url, "--topic-prefix", prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        probe.wait_for(lambda m: m.topic.endswith("/stream"), 60)  # it is answering
        assert svc.bridge is not None
        probe.publish(svc.bridge.topics.status, "offline")  # what the broker publishes for its Last Will
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("rkmqtt: the bridge went offline: is `rkmqtt run` running")


def test_ctrl_c_on_ask_cancels_its_request(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe]
) -> None:
    """Ctrl-C (SIGINT) while the answer streams: `ask` cancels the request, the bridge's final reply
    says `cancelled` long before the 300 tokens are out, and `ask` exits 130."""
    svc = start_bridge(FakeEngine(step_s=0.1))
    probe = probe_factory([f"{prefix}/reply/#"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkmqtt", "ask", "tokens:300", "--id", "long", "--broker", mosquitto.url,
         "--topic-prefix", prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        probe.wait_for(lambda m: m.topic.endswith("/long/stream"), 60)  # it is answering
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = probe.final(f"{prefix}/reply/cli/long")
    assert final["status"] == "ok" and final["finish_reason"] == "cancelled", final
    assert final["usage"]["completion_tokens"] < 300
    assert proc.returncode == 130, err
    assert "cancelling request long" in err and "[cancelled by Ctrl-C after" in err
    assert svc.scheduler is not None and svc.scheduler.active == 0


def test_typos_get_a_did_you_mean(tmp_path: Path) -> None:
    """A flag, a key of the YAML file, an environment variable."""
    flag = rkmqtt("run", "--n-bach", "8")
    assert flag.returncode == 2
    assert flag.stderr.strip().splitlines()[-1] == (
        "rkmqtt run: error: unrecognized arguments: --n-bach 8; --n-bach (did you mean --n-batch?)"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_bach: 8\n")
    yaml_key = rkmqtt("run", "--config", str(cfg))
    assert yaml_key.returncode == 2
    assert yaml_key.stderr.strip() == (
        f"rkmqtt: config file {cfg}: unknown setting 'n_bach' (did you mean n_batch?); see config.yaml for the names"
    )
    health = tmp_path / "health.json"
    env_var = rkmqtt("health", "--health-file", str(health), env={"RKMQTT_N_BACH": "8", "RKMQTT_VENV": ".venv"})
    assert (
        "environment variable RKMQTT_N_BACH is not a setting and is ignored (did you mean RKMQTT_N_BATCH?)"
        in env_var.stderr
    )
    assert "RKMQTT_VENV" not in env_var.stderr  # ./dev's own


def test_wrong_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = rkmqtt("run", "--n-batch", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "rkmqtt: setting n_batch='0' (--n-batch) is not allowed: Input should be greater than or equal to 1"
    )
    out = rkmqtt("run", env={"RKMQTT_BROKER": "http://example"})
    assert out.returncode == 2 and "RKMQTT_BROKER" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_batch: 4\nmax_qeue: 3\n")
    out = rkmqtt("run", "--config", str(cfg))
    assert out.returncode == 2 and "unknown setting 'max_qeue'" in out.stderr
    cfg.write_text("engine: rkllm\nn_batch: 12\n")
    out = rkmqtt("check", "--config", str(cfg))
    assert out.returncode == 2 and "n_batch=12 is not allowed with engine rkllm: use 1 to 8" in out.stderr


def test_check_reports_broker_and_engine(mosquitto: Mosquitto) -> None:
    """--engine given: the engine is what the user asks about, so its model is loaded."""
    out = rkmqtt("check", "--broker", mosquitto.url, "--engine", "tests.fake_engine:FakeEngine")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[ok  ] broker: mqtt://127.0.0.1:" in out.stdout
    assert "[ok  ] engine: tests.fake_engine:FakeEngine loaded fake-echo" in out.stdout
    assert "[ok  ] broker sessions: kept while a client is away" in out.stdout
    assert "[note] broker settings: not visible from a client" in out.stdout
    mosquitto.kill()
    out = rkmqtt("check", "--broker", mosquitto.url, "--engine", "tests.fake_engine:FakeEngine")
    assert out.returncode == 1 and "[FAIL] broker: mqtt://127.0.0.1:" in out.stdout
    assert "connection refused" in out.stdout


def test_check_says_when_no_bridge_is_online_and_loads_no_model(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service]
) -> None:
    args = ("check", "--broker", mosquitto.url, "--topic-prefix", prefix)
    none = rkmqtt(*args, env={"RKMQTT_ENGINE": "tests.fake_engine:FakeEngine"})
    assert none.returncode == 0, none.stdout + none.stderr
    assert (f"[note] bridges: none has run on this broker with topic_prefix {prefix!r}: start `rkmqtt run`"
            in none.stdout)  # fmt: skip
    assert "[note] engine: tests.fake_engine:FakeEngine: model not loaded (rkmqtt check --load-model" in none.stdout
    assert (
        none.stdout.strip().splitlines()[-1] == "no problem found, but no bridge is online: start one with `rkmqtt run`"
    )
    assert "all good" not in none.stdout
    svc = start_bridge(FakeEngine())
    one = rkmqtt(*args, env={"RKMQTT_ENGINE": "tests.fake_engine:FakeEngine"})
    assert one.returncode == 0, one.stdout
    line = next(x for x in one.stdout.splitlines() if x.startswith("[ok  ] bridges: "))
    assert line.startswith(
        f"[ok  ] bridges: 1 online with topic_prefix {prefix!r}: node-{prefix} (fake, fake-echo, n_batch 4"
    )
    assert one.stdout.strip().splitlines()[-1] == "all good"
    loaded = rkmqtt(*args, "--load-model", env={"RKMQTT_ENGINE": "tests.fake_engine:FakeEngine"})
    assert "[ok  ] engine: tests.fake_engine:FakeEngine loaded fake-echo" in loaded.stdout
    svc.stop(grace_s=0)
    gone = rkmqtt(*args, env={"RKMQTT_ENGINE": "tests.fake_engine:FakeEngine"})
    assert f"[note] bridges: none online with topic_prefix {prefix!r} (offline: node-{prefix})" in gone.stdout


def test_check_says_when_the_acl_hides_the_node_info(
    tmp_path: Path, prefix: str, start_bridge: Callable[..., Service]
) -> None:
    """A device's user may read the bridges' status but not their info: check still counts them."""
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("")
    for user in ("bridge", "dev"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-pw"], check=True, timeout=30)
    acl.write_text(f"user bridge\ntopic readwrite #\n\nuser dev\ntopic read {prefix}/node/+/status\n")
    extra = f"password_file {passwd}\nacl_file {acl}\n"
    with Mosquitto(workdir=tmp_path / "broker", extra_config=extra) as broker:
        settings = bridge_settings(broker.url, prefix, username="bridge", password="bridge-pw")
        svc = Service(settings, engine=FakeEngine())
        svc.start()
        try:
            assert svc.bridge is not None and svc.bridge.wait_connected(15)
            out = rkmqtt("check", "--broker", broker.url, "--topic-prefix", prefix, "--username", "dev",
                         "--session-expiry", "0", env={"RKMQTT_PASSWORD": "dev-pw"})  # fmt: skip
        finally:
            svc.stop(grace_s=0)
    assert f"[ok  ] bridges: 1 online with topic_prefix {prefix!r}: node-{prefix}\n" in out.stdout, out.stdout
    assert f"[note] node info: cannot read node info of node-{prefix} (the broker's ACL, most likely)" in out.stdout


def test_health_follows_the_service(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], tmp_path: Path
) -> None:
    health = tmp_path / "health.json"
    assert rkmqtt("health", "--health-file", str(health)).returncode == 1  # no file yet
    svc = start_bridge(FakeEngine(), health_file=str(health))
    deadline = time.monotonic() + 10
    while not health.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    out = rkmqtt("health", "--health-file", str(health))
    assert out.returncode == 0, out.stderr
    mosquitto.kill()
    time.sleep(2.5)
    out = rkmqtt("health", "--health-file", str(health))
    assert out.returncode == 1 and "not connected" in out.stderr
    svc.stop(grace_s=0)


def test_help_is_for_users() -> None:
    top = rkmqtt("--help")
    assert top.returncode == 0
    assert "serves a language model over MQTT" in top.stdout
    assert "main thread" not in top.stdout and "wiring" not in top.stdout  # the module's docstring is for developers
    run = rkmqtt("run", "--help").stdout
    # every setting's default is in its help (values wrap with the text, so compare without spaces)
    flat = "".join(run.split())
    assert "(default:4)" in flat and "(default:rkmqtt)" in flat and "(default:30.0)" in flat  # n-batch, prefix, grace
    assert "(default:themodel'sown,else0.7)" in flat
    assert "(default: None)" not in run


def test_a_wrong_flag_shows_the_commands_usage() -> None:
    """`./dev run --bogus` runs `rkmqtt run --bogus`: the answer is run's usage, not the top level's."""
    out = rkmqtt("run", "--bogus")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert (
        lines[0].startswith("usage: rkmqtt run ") and lines[-1] == "rkmqtt run: error: unrecognized arguments: --bogus"
    )
    out = rkmqtt("ask", "hi", "--bogus", "1")
    assert out.returncode == 2 and out.stderr.startswith("usage: rkmqtt ask ")


def test_the_package_has_no_import_cycle() -> None:
    """Every import between rkmqtt's modules, those inside functions included, forms no cycle (the
    command line and the bench's command line once imported each other)."""
    src = REPO / "src"
    names = {".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (src / "rkmqtt").rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in names and t != name}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert "rkmqtt.cli.bench" in graph["rkmqtt.cli.main"] and "rkmqtt.bench.attach" in graph["rkmqtt.cli.bench"]


def test_health_says_unhealthy_at_once_after_a_clean_stop(
    mosquitto: Mosquitto, prefix: str, start_bridge: Callable[..., Service], tmp_path: Path
) -> None:
    """The file is fresh (written within the last second), but the service is gone: a container
    must not read "healthy" for the file's max age (30 s)."""
    health = tmp_path / "health.json"
    svc = start_bridge(FakeEngine(), health_file=str(health))
    deadline = time.monotonic() + 10
    while rkmqtt("health", "--health-file", str(health)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rkmqtt("health", "--health-file", str(health)).returncode == 0
    svc.stop(grace_s=0)
    out = rkmqtt("health", "--health-file", str(health))
    assert out.returncode == 1 and out.stderr.strip() == "unhealthy: the service has stopped"


def test_check_skips_the_session_check_when_sessions_are_off(mosquitto: Mosquitto) -> None:
    out = rkmqtt(
        "check", "--broker", mosquitto.url, "--engine", "tests.fake_engine:FakeEngine", "--session-expiry", "0"
    )
    assert out.returncode == 0 and "[note] broker sessions: session_expiry is 0: not checked" in out.stdout


def test_password_from_a_file_or_the_environment_and_a_warning_for_one_on_the_command_line(
    tmp_path: Path, prefix: str
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user, pw in (("bridge", "bridge pw"), ("dev", "dev-pw")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True, timeout=30)
    (tmp_path / "bridge.secret").write_text("bridge pw\n")  # as `echo` writes it: the newline is not part of it
    (tmp_path / "dev.secret").write_text("dev-pw")
    with Mosquitto(workdir=tmp_path / "broker", extra_config=f"password_file {passwd}\n") as broker:
        settings = bridge_settings(broker.url, prefix, username="bridge", password_file=str(tmp_path / "bridge.secret"))
        svc = Service(settings, engine=FakeEngine())
        svc.start()
        try:
            assert svc.bridge is not None and svc.bridge.wait_connected(15), "password_file was not used"
            common = ("--client", "dev", "--topic-prefix", prefix, "--timeout", "20")
            from_file = rkmqtt("ask", "from a file", "--broker", broker.url, "--username", "dev",
                               "--password-file", str(tmp_path / "dev.secret"), *common)  # fmt: skip
            from_env = rkmqtt("ask", "from the environment", "--broker", broker.url, "--username", "dev", *common,
                              env={"RKMQTT_PASSWORD": "dev-pw"})  # fmt: skip
            in_url = rkmqtt("ask", "in the url", "--broker", broker.url.replace("mqtt://", "mqtt://dev:dev-pw@"),
                            *common)  # fmt: skip
            as_flag = rkmqtt("ask", "as a flag", "--broker", broker.url, "--username", "dev", "--password", "dev-pw",
                             *common)  # fmt: skip
        finally:
            svc.stop(grace_s=0)
    for out, text in ((from_file, "from a file"), (from_env, "from the environment"), (in_url, "in the url"),
                      (as_flag, "as a flag")):  # fmt: skip
        assert out.returncode == 0 and out.stdout == f"{text} \n", out.stderr
    assert "visible to every user" not in from_file.stderr + from_env.stderr
    for out in (in_url, as_flag):
        assert out.stderr.count("visible to every user of this machine") == 1, out.stderr
        assert "dev-pw" not in out.stderr
    missing = rkmqtt("ask", "x", "--password-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "password_file" in missing.stderr and len(missing.stderr.splitlines()) == 1
