"""The Home Assistant add-on: its files against the add-on linter's rules (tests/addon_rules.py), its
options against the settings (both ways), options.json and the Supervisor's MQTT service
reaching the settings, and the bridge connecting to a real Mosquitto with a password file using
the Supervisor's credentials, picking up a changed password on the next connect."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, get_args

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image
from pydantic import SecretStr, TypeAdapter, ValidationError

from rkmqtt import addon
from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from rkmqtt.settings import Settings, load_settings
from tests.addon_rules import lint_config
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "addon"
ADDON_DIR = ADDON / "rkmqtt"
TOKEN = "test-supervisor-token"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    data = load_yaml(ADDON_DIR / "config.yaml")
    assert isinstance(data, dict)
    return data


# -- the add-on's files against the linter's rules (tests/addon_rules.py) ------------------------------


def test_the_linter_rules_catch_what_they_should() -> None:
    bad = {
        "name": "x",
        "version": 1,
        "slug": "x",
        "arch": ["armv7", "sparc"],
        "boot": "auto",
        "startup": "whenever",
        "watchdog": "tcp://[HOST]:[PORT:80]",
        "full_access": True,
        "devices": ["/dev/rknpu:/dev/rknpu:rwm"],
        "services": ["mqtt:maybe"],
        "map": ["config:rw", {"type": "config"}, "nowhere"],
        "bogus": 1,
    }
    problems = "\n".join(lint_config(bad))
    for word in (
        "description: required",
        "version: must be of type str",
        "bogus: unknown key",
        "boot: set to its default value",
        "startup: 'whenever' is not one of",
        "watchdog: use a Docker HEALTHCHECK",
        "full_access: not together with devices",
        "has ':'",
        "arch: armv7 is no longer supported",
        "arch/1: 'sparc' is not one of",
        "services/0: 'mqtt:maybe' does not match",
        "map/2: 'nowhere' is not folder",
        "map: entries must all be strings or all be mappings",
    ):
        assert word in problems, word
    assert lint_config(["not", "a", "mapping"]) == ["config.yaml: must be a mapping of key: value"]
    assert lint_config({"name": "x", "version": "1", "slug": "x", "description": "x", "arch": ["aarch64"]}) == []


def test_config_yaml_passes_the_linter_rules(config: dict[str, Any]) -> None:
    assert lint_config(config) == []


def test_no_build_yaml() -> None:
    # The Supervisor builds addon/rkmqtt/Dockerfile, whose base image is fixed in it. A build.yaml
    # would need its own linter rules in tests/addon_rules.py first.
    assert not (ADDON_DIR / "build.yaml").exists()
    assert (ADDON_DIR / "Dockerfile").exists()


def test_the_checks_use_only_the_repository() -> None:
    """Tests, ./dev and CI read nothing outside the repository (a fresh clone has nothing beside it)."""
    outside = re.compile(r"parents\[[2-9]\]|\.\./shared|shared/schemas")
    files = [*ROOT.joinpath("tests").rglob("*.py"), ROOT / "dev", *ROOT.joinpath(".ci").iterdir()]
    offenders = [f"{f.relative_to(ROOT)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
                 if outside.search(line) and "outside = re.compile" not in line]  # fmt: skip
    assert offenders == []


def test_config_has_what_the_issue_asks_for(config: dict[str, Any]) -> None:
    assert "aarch64" in config["arch"] and "amd64" in config["arch"]
    assert "mqtt:want" in config["services"]
    assert config["video"] is True
    assert "/dev/rknpu" in config["devices"]
    assert "full_access" not in config
    assert {"type": "addon_config"} in config["map"] or "addon_config" in config["map"]
    # Long enough for the grace period and unloading the model.
    assert config["timeout"] >= Settings.model_fields["grace_period"].default + 30
    match = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    assert match
    version = match[1]
    assert config["version"] == version, "the add-on installs the rkmqtt release of its own version"


def test_repository_and_documents() -> None:
    repo = load_yaml(ADDON / "repository.yaml")
    assert isinstance(repo.get("name"), str) and repo["name"]
    for name in ("DOCS.md", "CHANGELOG.md"):
        assert (ADDON_DIR / name).read_text().strip()
    with Image.open(ADDON_DIR / "icon.png") as icon:
        assert icon.format == "PNG" and icon.width == icon.height and icon.width >= 64
    with Image.open(ADDON_DIR / "logo.png") as logo:
        assert logo.format == "PNG"
    changelog = (ADDON_DIR / "CHANGELOG.md").read_text()
    assert f"## [{load_yaml(ADDON_DIR / 'config.yaml')['version']}]" in changelog


# -- options <-> settings -------------------------------------------------------------------------


_TYPE = re.compile(r"^(?P<kind>str|bool|int|float|password|email|url|port|match|list)(?:\((?P<arg>.*)\))?(?P<opt>\?)?$")


def parse_ha_type(text: str) -> tuple[str, str | None, bool]:
    m = _TYPE.match(text)
    assert m, f"not a Supervisor option type: {text}"
    return m["kind"], m["arg"], bool(m["opt"])


def field_adapter(name: str) -> TypeAdapter[Any]:
    field = Settings.model_fields[name]
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)])  # type: ignore[valid-type]


def field_pattern(name: str) -> str | None:
    for meta in Settings.model_fields[name].metadata:
        pattern = getattr(meta, "pattern", None)
        if pattern:
            return str(pattern)
    return None


def test_options_are_exactly_the_exposed_settings(config: dict[str, Any]) -> None:
    schema, options = config["schema"], config["options"]
    assert set(schema) == set(addon.ADDON_OPTIONS), "config.yaml's schema and rkmqtt.addon.ADDON_OPTIONS differ"
    assert set(options) <= set(schema)
    assert set(schema) <= set(Settings.model_fields), set(schema) - set(Settings.model_fields)
    translations = load_yaml(ADDON_DIR / "translations" / "en.yaml")["configuration"]
    assert set(translations) == set(schema)
    for name in schema:
        assert translations[name]["name"] and translations[name]["description"], name


def test_option_types_fit_the_settings(config: dict[str, Any]) -> None:
    for name, spec in config["schema"].items():
        kind, arg, optional = parse_ha_type(spec)
        field = Settings.model_fields[name]
        adapter = field_adapter(name)
        # An optional option left out means the setting's default, which must be "none".
        assert optional == (field.default is None), name
        if name in config["options"]:
            assert adapter.validate_python(config["options"][name]) == field.default, name
        if kind in ("int", "float"):
            low, high = (float(x) for x in (arg or "").split(","))
            cast = int if kind == "int" else float
            adapter.validate_python(cast(low))
            adapter.validate_python(cast(high))
        elif kind == "list":
            values = (arg or "").split("|")
            for v in values:
                adapter.validate_python(v)
            literal = [a for a in get_args(field.annotation) if isinstance(a, str)]
            if literal:
                assert set(values) == set(literal), name
        elif kind == "match":
            assert arg == field_pattern(name), name
        elif kind == "password":
            assert field.annotation == SecretStr | None, name
        else:
            assert kind == "str" and str in (*get_args(field.annotation), field.annotation), name


def test_default_options_give_the_default_settings(config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "options.json"
    path.write_text(json.dumps(config["options"]))
    s = load_settings({}, None, addon.addon_layers(path))
    assert s == load_settings({})


def test_options_json_reaches_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "options.json"
    path.write_text(
        json.dumps(
            {
                "model": "/config/models/qwen.rkllm",
                "engine": "rkllm",
                "n_batch": 3,
                "rkllm_library": "",
                "topic_prefix": "house/llm",
                "max_queue": 10,
                "max_new_tokens": 512,
                "default_new_tokens": 100,
                "max_prompt_chars": 4000,
                "rate_limit": 30.5,
                "broker": "",
                "username": "",
                "password": "",
                "node_name": "npu_box",
                "discovery_prefix": "hass",
                "log_level": "DEBUG",
                "from_a_newer_version": 1,
            }
        )
    )
    layers = addon.addon_layers(path)
    assert layers and "from_a_newer_version" not in layers[0][0]
    s = load_settings({}, None, layers)
    assert (s.model, s.engine, s.n_batch, s.topic_prefix) == ("/config/models/qwen.rkllm", "rkllm", 3, "house/llm")
    assert (s.max_queue, s.max_new_tokens, s.default_new_tokens, s.max_prompt_chars) == (10, 512, 100, 4000)
    assert (s.rate_limit, s.node_name, s.discovery_prefix, s.log_level) == (30.5, "npu_box", "hass", "DEBUG")
    assert s.broker is None and s.username is None and s.password is None and s.rkllm_library is None
    # The options are the lowest layer: the environment and flags win.
    monkeypatch.setenv("RKMQTT_N_BATCH", "2")
    assert load_settings({}, None, layers).n_batch == 2
    assert load_settings({"n_batch": 1}, None, layers).n_batch == 1


def test_options_json_errors(tmp_path: Path) -> None:
    assert addon.addon_layers(tmp_path / "absent.json") == []
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        addon.addon_layers(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"n_batch": 99, "engine": "rkllm"}))
    with pytest.raises(ConfigError, match="n_batch"):
        load_settings({}, None, addon.addon_layers(wrong))


# -- a stand-in Supervisor -------------------------------------------------------------------------


class Supervisor:
    """`GET /services/mqtt` as the Supervisor answers it, checking the add-on's bearer token."""

    def __init__(self) -> None:
        self.service: dict[str, Any] | None = {
            "addon": "core_mosquitto",
            "host": "127.0.0.1",
            "port": "1883",
            "ssl": False,
            "protocol": "3.1.1",
            "username": "addons",
            "password": "secret",
        }
        self.fail_next: list[int] = []  # HTTP statuses to answer before the real answer
        self.requests: list[tuple[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.answer(401, {"result": "error", "message": "Unauthorized"})
                if self.path != "/services/mqtt":
                    return self.answer(404, {"result": "error", "message": "not found"})
                if owner.fail_next:
                    return self.answer(owner.fail_next.pop(0), {"result": "error", "message": "starting"})
                if owner.service is None:
                    return self.answer(400, {"result": "error", "message": "No service provider for mqtt"})
                return self.answer(200, {"result": "ok", "data": owner.service})

            def answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="supervisor", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    s = Supervisor()
    yield s
    s.close()


def test_supervisor_broker_and_credentials(supervisor: Supervisor) -> None:
    values = addon.supervisor_broker(supervisor.url, TOKEN)
    assert values == {"broker": "mqtt://127.0.0.1:1883", "username": "addons", "password": "secret"}
    assert supervisor.requests == [("/services/mqtt", f"Bearer {TOKEN}")]
    supervisor.service = {"host": "core-mosquitto", "port": 8883, "ssl": True, "username": "u", "password": "p"}
    assert addon.supervisor_broker(supervisor.url, TOKEN) == {
        "broker": "mqtts://core-mosquitto:8883",
        "username": "u",
        "password": "p",
    }


def test_supervisor_token_comes_from_the_environment(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    assert addon.supervisor_broker(supervisor.url) is None
    assert supervisor.requests == [], "not an add-on: the Supervisor is not asked"
    monkeypatch.setenv("SUPERVISOR_TOKEN", TOKEN)
    assert addon.is_addon()
    assert addon.supervisor_broker(supervisor.url) is not None


def test_supervisor_refusals_and_retries(supervisor: Supervisor) -> None:
    with pytest.raises(addon.SupervisorError, match="401"):
        addon.supervisor_broker(supervisor.url, "wrong-token")
    supervisor.fail_next = [503, 502]
    assert addon.supervisor_broker(supervisor.url, TOKEN) is not None
    assert len(supervisor.requests) == 4  # 1 refused token + 2 failures + 1 answer
    supervisor.service = None
    assert addon.supervisor_broker(supervisor.url, TOKEN) is None
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(addon.SupervisorError, match="tried 2 times"):
        addon.supervisor_broker(dead, TOKEN, timeout=1, attempts=2)


def test_credentials_provider_asks_each_time(supervisor: Supervisor) -> None:
    provide = addon.credentials_provider(supervisor.url, TOKEN)
    assert provide() == ("addons", "secret")
    supervisor.service = dict(supervisor.service or {}, password="rotated")
    assert provide() == ("addons", "rotated")
    supervisor.fail_next = [500, 500]
    assert addon.credentials_provider(supervisor.url, TOKEN, attempts=2)() is None  # keeps what it had
    assert len(supervisor.requests) == 4


def test_with_supervisor_broker(supervisor: Supervisor) -> None:
    s = addon.with_supervisor_broker(load_settings({}), supervisor.url, TOKEN)
    assert s.broker == "mqtt://127.0.0.1:1883" and s.username == "addons"
    assert s.password is not None and s.password.get_secret_value() == "secret"
    assert s.broker_url.username == "addons" and s.broker_url.password == "secret"
    mine = load_settings({"broker": "mqtt://elsewhere:1884"})
    assert addon.with_supervisor_broker(mine, supervisor.url, TOKEN) is mine
    assert len(supervisor.requests) == 1, "a configured broker wins; the Supervisor is not asked"
    supervisor.service = None
    assert addon.with_supervisor_broker(load_settings({}), supervisor.url, TOKEN).broker is None


# -- end to end: Supervisor credentials against a Mosquitto with a password file -------------------


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Callable[[str], None]]]:
    """A Mosquitto that takes user `addons` with the password last set by set_password()."""
    pwfile = tmp_path / "passwords"

    def set_password(password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "addons", password], check=True)
        pwfile.chmod(0o644)

    set_password("first-password")
    broker = Mosquitto(workdir=tmp_path / "broker", extra_config=f"password_file {pwfile}")
    broker.start()
    yield broker, set_password
    broker.close()


def wait_for_message(url: str, password: str, topic: str, timeout: float = 15) -> bytes:
    """Connect as `addons` (also proving the password works), return the retained `topic`."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    got: list[bytes] = []
    event = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.username_pw_set("addons", password)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1) if not rc.is_failure else None
    client.on_message = lambda c, u, m: (got.append(m.payload), event.set())
    client.connect(host, int(port))
    client.loop_start()
    try:
        assert event.wait(timeout), f"nothing on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def addon_service(broker: Mosquitto, supervisor: Supervisor, options: Path, prefix: str) -> tuple[Service, Settings]:
    flags = {
        "stats_interval": 1.0,
        "batch_window_ms": 10,
        "grace_period": 5,
        "discovery": False,
        "embedded_broker": False,
    }
    settings = load_settings(flags, None, addon.addon_layers(options))
    settings = addon.with_supervisor_broker(settings, supervisor.url, TOKEN)
    svc = Service(
        settings,
        engine=FakeEngine(n_batch=settings.n_batch),
        credentials_provider=addon.credentials_provider(supervisor.url, TOKEN),
    )
    return svc, settings


def test_options_and_supervisor_credentials_reach_a_real_broker(
    secured_broker: tuple[Mosquitto, Callable[[str], None]], supervisor: Supervisor, tmp_path: Path, prefix: str
) -> None:
    broker, _ = secured_broker
    supervisor.service = dict(supervisor.service or {}, port=str(broker.port), password="first-password")
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"topic_prefix": f"{prefix}/house", "n_batch": 3, "engine": "auto"}))
    svc, settings = addon_service(broker, supervisor, options, prefix)
    assert settings.broker == broker.url
    svc.start()
    try:
        assert svc.bridge is not None and svc.bridge.wait_connected(15)
        assert wait_for_message(broker.url, "first-password", f"{prefix}/house/node/+/status") == b"online"
        info = json.loads(wait_for_message(broker.url, "first-password", f"{prefix}/house/node/+/info"))
        assert info["n_batch"] == 3
    finally:
        svc.stop(grace_s=1)


def test_a_refused_password_is_refreshed_from_the_supervisor(
    secured_broker: tuple[Mosquitto, Callable[[str], None]], supervisor: Supervisor, tmp_path: Path, prefix: str
) -> None:
    broker, set_password = secured_broker
    # The Supervisor hands out a stale password at start-up, the right one afterwards.
    supervisor.service = dict(supervisor.service or {}, port=broker.port, password="stale-password")
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"topic_prefix": prefix}))
    svc, settings = addon_service(broker, supervisor, options, prefix)
    assert settings.password is not None and settings.password.get_secret_value() == "stale-password"
    supervisor.service["password"] = "first-password"
    svc.start()
    try:
        assert svc.bridge is not None and svc.bridge.wait_connected(20), "the refreshed password was not used"
        assert len(supervisor.requests) >= 2
        assert wait_for_message(broker.url, "first-password", f"{prefix}/node/+/status") == b"online"

        # The broker's password changes while the bridge is connected; the Supervisor knows the new
        # one. After the broker restarts, the old password is refused and the new one is fetched.
        set_password("second-password")
        supervisor.service["password"] = "second-password"
        asked = len(supervisor.requests)
        broker.kill()
        broker.start()
        deadline = time.monotonic() + 30
        while not (svc.bridge.connects >= 2 and svc.bridge.connected) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert svc.bridge.connects >= 2 and svc.bridge.connected, "no reconnect with the new password"
        assert len(supervisor.requests) > asked
        assert wait_for_message(broker.url, "second-password", f"{prefix}/node/+/status") == b"online"
    finally:
        svc.stop(grace_s=1)


def test_a_wrong_setting_in_the_settings_adapter_is_refused() -> None:
    with pytest.raises(ValidationError):
        field_adapter("n_batch").validate_python(0)
