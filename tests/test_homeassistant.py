"""Home Assistant discovery: the payload's structure, its templates rendered with Jinja (as Home
Assistant does) against real stats and info payloads, and, against a real Mosquitto, that the
bridge publishes it retained, republishes it when Home Assistant comes online, publishes every
state topic it names, and keeps the same ids across a restart."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import paho.mqtt.client as mqtt
import pytest
import yaml

from rkmqtt.mqtt import discovery as ha
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.protocol import (
    BatchInfo,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    Info,
    Limits,
    OkReply,
    Stats,
    Timing,
    Usage,
    parse_request_payload,
)
from rkmqtt.service import Service
from rkmqtt.settings import Settings, load_settings
from rkmqtt.topics import Topics
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_probe import Probe

# -- helpers ---------------------------------------------------------------------------------

_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined)


def render(template: str, value_json: Any) -> str:
    """Render a discovery template the way Home Assistant does for an MQTT message."""
    return _JINJA.from_string(template).render(value_json=value_json, value=json.dumps(value_json)).strip()


def make_settings(**overrides: Any) -> Settings:
    flags: dict[str, Any] = {"node_name": "board_1", "topic_prefix": "rk/test"}
    flags.update(overrides)
    return load_settings(flags)


def make_info(**overrides: Any) -> Info:
    values: dict[str, Any] = {
        "version": "0.1.0",
        "engine": "rkllm",
        "model": "Qwen2.5-1.5B-Instruct_W8A8_RK3588",
        "n_batch": 4,
        "batching": "static",
        "runtime_version": "1.2.3",
        "driver_version": "0.9.8",
        "limits": Limits(**load_settings({}).limits()),
    }
    values.update(overrides)
    return Info(**values)


def make_stats(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "uptime_s": 12.5,
        "queue_depth": 3,
        "active": 2,
        "n_batch": 4,
        "tokens_per_s": 31.4159,
        "requests_total": 10,
        "completed": 8,
        "errors": 2,
        "errors_by_code": {"busy": 1, "too_long": 1},
    }
    values.update(overrides)
    return json.loads(Stats(**values).model_dump_json())  # type: ignore[no-any-return]


def payload_of(settings: Settings, info: Info) -> dict[str, Any]:
    messages = ha.discovery_messages(settings, info)
    assert len(messages) == 1
    return json.loads(messages[0][1])  # type: ignore[no-any-return]


def walk_keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from walk_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_keys(v)


# -- the payload -------------------------------------------------------------------------------


def test_one_device_message_on_the_device_topic() -> None:
    s = make_settings(discovery_prefix="hass")
    [(topic, raw)] = ha.discovery_messages(s, make_info())
    assert topic == "hass/device/board_1/config"
    doc = json.loads(raw)
    assert set(doc) >= {"dev", "o", "cmps"}
    assert doc["dev"]["ids"] == ["board_1"]
    assert doc["dev"]["sw"] == "0.1.0"
    assert doc["o"]["name"] == "rkmqtt"
    assert "object_id" not in set(walk_keys(doc)), "object_id is retired: default_entity_id replaces it"


def ha_slugify(text: str) -> str:
    """Home Assistant's `slugify` (python-slugify with `_`) for ASCII text: lower case, every run of
    characters other than a-z, 0-9 and `-` becomes `-`, runs of `-` one, stripped, then `-` -> `_`."""
    text = re.sub(r"[^-a-z0-9]+", "-", text.lower())
    return re.sub(r"-{2,}", "-", text).strip("-").replace("-", "_")


def entity_id_before_2025_10(platform: str, device: dict[str, Any], component: dict[str, Any]) -> str:
    """The entity id Home Assistant 2025.4 gives a discovered entity with a name and a device: it
    ignores `default_entity_id` and slugs "<device name> <entity name>"."""
    names = f"{device['name']} {component['name']}"
    return f"{platform}.{ha_slugify(names)}"


def test_every_entity_has_ids_availability_and_a_bridge_topic() -> None:
    s = make_settings()
    doc = payload_of(s, make_info())
    topics = Topics(s.topic_prefix, s.effective_node_name())
    published_by_bridge = {topics.status, topics.info, topics.stats, ha.dashboard_reply_topic(s)}
    unique_ids = [c["unique_id"] for c in doc["cmps"].values()]
    assert len(unique_ids) == len(set(unique_ids))
    for key, c in doc["cmps"].items():
        assert c["p"] in {"sensor", "binary_sensor", "text"}, key
        assert c["unique_id"] == f"board_1_{key}"
        assert re.fullmatch(r"[a-z_]+\.[a-z0-9_]+", c["default_entity_id"]), c["default_entity_id"]
        if key != "connectivity":
            assert c["availability"] == [
                {
                    "topic": "rk/test/node/board_1/status",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            ]
        if c["p"] == "text":
            assert c["command_topic"] == topics.request(ha.HA_CLIENT)
        else:
            assert c["state_topic"] in published_by_bridge, key
        for t in ("json_attributes_topic",):
            if t in c:
                assert c[t] in published_by_bridge


def test_entity_ids_are_the_same_in_home_assistant_2025_4_and_2026_2() -> None:
    """2026.2 takes `default_entity_id`; 2025.4 ignores it and derives the id from the device's and
    the entity's names. Both must give the same ids (and the node name is in each)."""
    for node in ("board_1", "rkmqtt_opi5", "Kitchen-NPU", "a--b__c"):
        doc = payload_of(make_settings(node_name=node), make_info())
        for key, c in doc["cmps"].items():
            assert c["default_entity_id"] == entity_id_before_2025_10(c["p"], doc["dev"], c), (node, key)
            assert c["default_entity_id"].split(".", 1)[1].startswith(ha_slugify(node) + "_"), (node, key)
    ids = {c["default_entity_id"] for c in payload_of(make_settings(), make_info())["cmps"].values()}
    assert ids == {
        "binary_sensor.board_1_connectivity",
        "binary_sensor.board_1_engine_connectivity",
        "sensor.board_1_queue_depth",
        "sensor.board_1_active_requests",
        "sensor.board_1_tokens_per_second",
        "sensor.board_1_requests_answered",
        "sensor.board_1_errors",
        "sensor.board_1_last_reply",
        "sensor.board_1_model",
        "sensor.board_1_engine",
        "sensor.board_1_batch_size",
        "text.board_1_prompt",
    }


def test_the_device_has_a_friendly_name() -> None:
    for node, name in (("board_1", "board 1"), ("rkmqtt_opi5", "rkmqtt opi5"), ("Kitchen-NPU", "Kitchen NPU")):
        dev = payload_of(make_settings(node_name=node), make_info())["dev"]
        assert dev["name"] == name and dev["ids"] == [node]


def test_connectivity_can_show_offline() -> None:
    """Its state is P/status: availability on that same topic would make it unavailable exactly
    when it should read `off`."""
    c = payload_of(make_settings(), make_info())["cmps"]["connectivity"]
    assert "availability" not in c and "availability_topic" not in c
    assert (c["state_topic"], c["payload_off"]) == ("rk/test/node/board_1/status", "offline")


def test_the_entities_the_issue_asks_for() -> None:
    doc = payload_of(make_settings(), make_info())
    cmps = doc["cmps"]
    assert cmps["connectivity"]["p"] == "binary_sensor"
    assert cmps["connectivity"]["device_class"] == "connectivity"
    assert (cmps["connectivity"]["payload_on"], cmps["connectivity"]["payload_off"]) == ("online", "offline")
    for key in ("queue_depth", "active", "tokens_per_s", "requests_answered", "errors"):
        assert cmps[key]["p"] == "sensor"
        assert cmps[key]["state_topic"] == "rk/test/node/board_1/stats"
    # The dashboard's replies are private: on Home Assistant's own reply topic, not on P/stats.
    assert cmps["last_reply"]["p"] == "sensor"
    assert cmps["last_reply"]["state_topic"] == "rk/test/reply/homeassistant/dashboard"
    assert cmps["last_reply"]["json_attributes_topic"] == "rk/test/reply/homeassistant/dashboard"
    for key in ("model", "engine", "n_batch"):
        assert cmps[key]["entity_category"] == "diagnostic"
        assert cmps[key]["state_topic"] == "rk/test/node/board_1/info"
    assert cmps["requests_answered"]["state_class"] == "total_increasing"
    assert cmps["errors"]["state_class"] == "total_increasing"
    assert cmps["prompt"]["p"] == "text"
    assert cmps["prompt"]["max"] <= 255


def test_templates_read_real_stats_and_info() -> None:
    doc = payload_of(make_settings(), make_info())
    cmps = doc["cmps"]
    stats = make_stats()
    info = json.loads(make_info().model_dump_json())
    assert render(cmps["queue_depth"]["value_template"], stats) == "3"
    assert render(cmps["active"]["value_template"], stats) == "2"
    assert render(cmps["tokens_per_s"]["value_template"], stats) == "31.4"
    assert render(cmps["requests_answered"]["value_template"], stats) == "8"
    assert json.loads(render(cmps["requests_answered"]["json_attributes_template"], stats)) == {"requests_total": 10}
    assert render(cmps["errors"]["value_template"], stats) == "2"
    assert json.loads(render(cmps["errors"]["json_attributes_template"], stats)) == {"busy": 1, "too_long": 1}
    assert render(cmps["model"]["value_template"], info) == "Qwen2.5-1.5B-Instruct_W8A8_RK3588"
    assert render(cmps["engine"]["value_template"], info) == "rkllm"
    assert render(cmps["n_batch"]["value_template"], info) == "4"


def test_engine_connectivity_reads_the_engines_readiness_from_stats() -> None:
    """The bridge can be online while its engine cannot take requests (engine openai: the server
    is down): a second connectivity sensor shows that, with the reason as an attribute."""
    c = payload_of(make_settings(), make_info())["cmps"]["engine_connectivity"]
    assert (c["p"], c["device_class"], c["state_topic"]) == (
        "binary_sensor",
        "connectivity",
        "rk/test/node/board_1/stats",
    )
    assert c["availability"][0]["topic"] == "rk/test/node/board_1/status" and c["expire_after"] >= 15
    assert render(c["value_template"], make_stats()) == "ON"
    down = {
        **make_stats(),
        "engine_ready": False,
        "engine_problem": "the upstream server http://gpu:8000/v1 is unavailable",
    }
    assert render(c["value_template"], down) == "OFF"
    assert json.loads(render(c["json_attributes_template"], down)) == {"problem": down["engine_problem"]}


def test_every_template_field_exists_in_the_wire_models() -> None:
    doc = payload_of(make_settings(), make_info())
    fields = {
        "rk/test/node/board_1/stats": set(Stats.model_fields),
        "rk/test/node/board_1/info": set(Info.model_fields),
        "rk/test/reply/homeassistant/dashboard": set(OkReply.model_fields) | set(ErrorReply.model_fields),
    }
    for key, c in doc["cmps"].items():
        for name in ("value_template", "json_attributes_template"):
            if name not in c:
                continue
            topic = c["state_topic"] if name == "value_template" else c["json_attributes_topic"]
            used = set(re.findall(r"value_json\.(\w+)", c[name]))
            assert used, (key, name)
            assert used <= fields[topic], (key, name, used - fields[topic])


def ok_reply(text: str) -> dict[str, Any]:
    return json.loads(  # type: ignore[no-any-return]
        OkReply(
            id="d1",
            text=text,
            finish_reason="stop",
            usage=Usage(prompt_tokens=3, completion_tokens=2),
            timing=Timing(queued_ms=1, ttft_ms=2, total_ms=3, tokens_per_s=4),
            batch=BatchInfo(size=1, slot=0),
            model="m",
        ).model_dump_json()
    )


@pytest.mark.parametrize("length", [0, 10, 255, 256, 5000])
def test_last_reply_state_is_cut_to_255_and_the_attribute_has_it_all(length: int) -> None:
    cmp = payload_of(make_settings(), make_info())["cmps"]["last_reply"]
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    reply = ok_reply(text)
    state = render(cmp["value_template"], reply)
    assert state == text[:255]
    assert len(state) <= ha.HA_STATE_MAX
    assert json.loads(render(cmp["json_attributes_template"], reply)) == {"text": text}


def test_last_reply_shows_an_error_reply() -> None:
    cmp = payload_of(make_settings(), make_info())["cmps"]["last_reply"]
    err = ErrorReply(id="d1", error=ErrorBody(code=ErrorCode.BUSY, message="the queue is full " + "x" * 400))
    reply = json.loads(err.model_dump_json())
    state = render(cmp["value_template"], reply)
    assert state.startswith("error: the queue is full") and len(state) == ha.HA_STATE_MAX
    assert json.loads(render(cmp["json_attributes_template"], reply)) == {"error": reply["error"]}


def test_live_stats_expire_after_missed_intervals_and_counters_do_not() -> None:
    for interval, expected in ((5.0, 15), (0.5, 15), (20.0, 60)):
        cmps = payload_of(make_settings(stats_interval=interval), make_info())["cmps"]
        for key in ("queue_depth", "active", "tokens_per_s"):
            assert cmps[key]["expire_after"] == expected
            assert cmps[key]["expire_after"] >= 2 * interval
        for key in ("requests_answered", "errors", "last_reply", "model", "engine", "n_batch"):
            assert "expire_after" not in cmps[key]


def test_ids_are_stable_and_follow_the_node_name() -> None:
    a = payload_of(make_settings(), make_info())
    b = payload_of(make_settings(), make_info(model="other", engine="numpy", n_batch=2))
    assert [c["unique_id"] for c in a["cmps"].values()] == [c["unique_id"] for c in b["cmps"].values()]
    c = payload_of(make_settings(node_name="board_2"), make_info())
    assert not {x["unique_id"] for x in a["cmps"].values()} & {x["unique_id"] for x in c["cmps"].values()}
    # Without a node name, the host name makes it: the same in every run on this host.
    plain = load_settings({})
    assert ha.discovery_messages(plain, make_info()) == ha.discovery_messages(load_settings({}), make_info())


def test_discovery_off_publishes_the_empty_config() -> None:
    """The empty retained config is how Home Assistant is told to remove the device."""
    s = make_settings(discovery=False, discovery_prefix="hass")
    assert ha.discovery_messages(s, make_info()) == [("hass/device/board_1/config", b"")]


def test_ha_status_topic_follows_the_prefix() -> None:
    assert ha.ha_status_topic(load_settings({})) == "homeassistant/status"
    assert ha.ha_status_topic(make_settings(discovery_prefix="hass")) == "hass/status"
    assert ha.is_ha_online(b"online") and ha.is_ha_online(b"online\n")
    assert not ha.is_ha_online(b"offline")


def text_command(cmp: dict[str, Any], value: str) -> str:
    """What Home Assistant publishes when `value` is typed into the text entity."""
    return _JINJA.from_string(cmp["command_template"]).render(value=value)


@pytest.mark.parametrize("prompt", ["What is the capital of France?", 'Say "hi" & it\'s {{ x }}\n\\ ok'])
def test_the_text_entity_sends_a_valid_request_answered_on_the_dashboard_topic(prompt: str) -> None:
    s = make_settings()
    cmp = payload_of(s, make_info())["cmps"]["prompt"]
    topics = Topics(s.topic_prefix, s.effective_node_name())
    assert topics.client_of(cmp["command_topic"], "request") == ha.HA_CLIENT
    req = parse_request_payload(text_command(cmp, prompt).encode())
    assert req.prompt == prompt
    assert req.reply_to == ha.dashboard_reply_topic(s) == "rk/test/reply/homeassistant/dashboard"
    assert req.stream is False
    assert topics.is_allowed_reply_topic(req.reply_to, ha.HA_CLIENT)


# -- against a real broker and bridge --------------------------------------------------------


@pytest.fixture
def ha_bridge(mosquitto: Mosquitto, prefix: str) -> Iterator[Callable[..., Service]]:
    services: list[Service] = []

    def start(discovery: bool = True) -> Service:
        settings = bridge_settings(
            mosquitto.url, prefix, discovery=discovery, discovery_prefix=f"ha{prefix}", node_name=f"node_{prefix}"
        )
        svc = Service(settings, engine=FakeEngine(step_s=0.005))
        svc.start()
        services.append(svc)
        assert svc.bridge is not None and svc.bridge.wait_connected(15), "bridge did not connect"
        return svc

    yield start
    for svc in services:
        svc.stop(grace_s=1)


def discovery_of(probe: Probe, topic: str, count: int = 1) -> list[dict[str, Any]]:
    return [m.json() for m in probe.wait_for(lambda m: m.topic == topic and m.payload != b"", 20, count)]


def test_bridge_publishes_discovery_and_every_state_topic(
    ha_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    ha_bridge()
    topic = f"ha{prefix}/device/node_{prefix}/config"
    # A client connecting afterwards gets it: it is retained.
    late = probe_factory([f"ha{prefix}/#", f"{prefix}/#"])
    [doc] = discovery_of(late, topic)
    assert late.wait_for(lambda m: m.topic == topic)[0].retain

    # Every topic an entity reads is really published, and its templates render on it. The
    # dashboard's reply topic gets a message once a prompt is typed into the text entity.
    cmps = doc["cmps"]
    dashboard = f"{prefix}/reply/{ha.HA_CLIENT}/{ha.DASHBOARD_REPLY}"
    state_topics = {c["state_topic"] for c in cmps.values() if "state_topic" in c}
    assert state_topics == {
        f"{prefix}/node/node_{prefix}/status",
        f"{prefix}/node/node_{prefix}/info",
        f"{prefix}/node/node_{prefix}/stats",
        dashboard,
    }
    # The text entity's command, rendered as Home Assistant does, answered where Last reply reads.
    late.publish(cmps["prompt"]["command_topic"], text_command(cmps["prompt"], "ping pong"), qos=1)
    seen = {t: late.wait_for(lambda m, t=t: m.topic == t, 20)[0] for t in state_topics}
    assert seen[f"{prefix}/node/node_{prefix}/status"].payload == b"online"
    for c in cmps.values():
        if c.get("state_topic") in (
            f"{prefix}/node/node_{prefix}/info",
            f"{prefix}/node/node_{prefix}/stats",
            dashboard,
        ):
            render(c["value_template"], seen[c["state_topic"]].json())
        if "json_attributes_template" in c:
            json.loads(render(c["json_attributes_template"], seen[c["json_attributes_topic"]].json()))
    assert render(cmps["engine"]["value_template"], seen[f"{prefix}/node/node_{prefix}/info"].json()) == "fake"
    reply = seen[dashboard].json()
    assert reply["status"] == "ok" and reply["text"].strip() == "ping pong"
    # (Home Assistant strips a rendered state, as render() does.)
    assert render(cmps["last_reply"]["value_template"], reply) == reply["text"][:255].strip()
    assert late.on(Topics.stream_of(dashboard)) == [], "the dashboard asks for no stream"
    # P/stats, which every device may read, carries no prompt or reply text.
    stats = late.wait_for(lambda m: m.is_node("stats") and m.json()["completed"] >= 1, 20)[0]
    assert b"ping" not in stats.payload and b"pong" not in stats.payload
    assert set(stats.json()) == set(Stats.model_fields)


def test_discovery_is_republished_when_home_assistant_comes_online(
    ha_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    ha_bridge()
    topic = f"ha{prefix}/device/node_{prefix}/config"
    probe = probe_factory([topic])
    first = discovery_of(probe, topic)
    probe.publish(f"ha{prefix}/status", "offline")
    probe.publish(f"ha{prefix}/status", "online")
    again = discovery_of(probe, topic, count=2)
    assert again[1] == first[0]
    assert len(probe.on(topic)) == 2, "offline must not republish"


def test_turning_discovery_off_removes_the_device(
    ha_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    svc = ha_bridge()
    topic = f"ha{prefix}/device/node_{prefix}/config"
    probe = probe_factory([topic])
    discovery_of(probe, topic)
    svc.stop(grace_s=1)
    ha_bridge(discovery=False)
    assert probe.wait_for(lambda m: m.topic == topic and m.payload == b"", 20)
    # Nothing retained is left for Home Assistant to find: a new subscriber gets the retained
    # status (asked for in the same SUBSCRIBE, after the config topic) and no config.
    late = probe_factory([topic, f"{prefix}/node/+/status"])
    assert late.wait_for(lambda m: m.is_node("status") and m.retain, 20)
    assert late.on(topic) == []


def test_same_ids_after_a_restart(
    ha_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    svc = ha_bridge()
    topic = f"ha{prefix}/device/node_{prefix}/config"
    probe = probe_factory([topic, f"{prefix}/node/+/status"])
    [before] = discovery_of(probe, topic)
    svc.stop(grace_s=1)
    assert probe.wait_for(lambda m: m.is_node("status") and m.payload == b"offline")
    ha_bridge()
    after = discovery_of(probe, topic, count=2)[1]
    ids = lambda doc: {k: (c["unique_id"], c["default_entity_id"]) for k, c in doc["cmps"].items()}  # noqa: E731
    assert ids(after) == ids(before)
    assert after["dev"]["ids"] == before["dev"]["ids"]


# -- the automation examples in docs/homeassistant/ ------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "homeassistant"
_HA_JINJA = jinja2.Environment(undefined=jinja2.ChainableUndefined)


@dataclass
class FakeHass:
    """What the examples' templates ask of Home Assistant: entity states, each entity's integration
    and its device's manufacturer (`integration_entities`, `is_state`, `device_attr`)."""

    states: dict[str, str] = field(default_factory=dict)
    integration: dict[str, str] = field(default_factory=dict)
    manufacturer: dict[str, str] = field(default_factory=dict)

    def add(self, entity_id: str, state: str, integration: str = "mqtt", manufacturer: str = "rkmqtt") -> FakeHass:
        self.states[entity_id], self.integration[entity_id] = state, integration
        self.manufacturer[entity_id] = manufacturer
        return self

    def template_globals(self) -> dict[str, Any]:
        return {
            "now": datetime.now,
            "integration_entities": lambda domain: [e for e, d in self.integration.items() if d == domain],
            "is_state": lambda entity, state: self.states.get(entity) == state,
            "device_attr": lambda entity, attr: self.manufacturer.get(entity) if attr == "manufacturer" else None,
        }

    @classmethod
    def from_discovery(cls, doc: dict[str, Any], retained: dict[str, bytes]) -> FakeHass:
        """The binary sensors Home Assistant makes from a discovery document, with the state the
        retained message on each one's state topic gives it (no message: unknown)."""
        hass = cls()
        for c in doc["cmps"].values():
            if c["p"] != "binary_sensor":
                continue
            payload = retained.get(c["state_topic"])
            state = "unknown"
            if payload is not None:
                state = {c["payload_on"]: "on", c["payload_off"]: "off"}.get(payload.decode(), "unknown")
            hass.add(c["default_entity_id"], state, manufacturer=doc["dev"]["mf"])
        return hass


ONLINE = FakeHass().add("binary_sensor.rkmqtt_board_connectivity", "on")


def ha_render(template: Any, variables: dict[str, Any], hass: FakeHass = ONLINE) -> Any:
    """Render like Home Assistant: templates in strings, nested in lists and mappings, and a
    result that reads as a Python literal becomes that value (its "native types")."""
    if isinstance(template, dict):
        return {k: ha_render(v, variables, hass) for k, v in template.items()}
    if isinstance(template, list):
        return [ha_render(v, variables, hass) for v in template]
    if not isinstance(template, str):
        return template
    text = _HA_JINJA.from_string(template).render(**hass.template_globals(), **variables).strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def render_variables(block: dict[str, Any], variables: dict[str, Any], hass: FakeHass = ONLINE) -> dict[str, Any]:
    out = dict(variables)
    for name, template in block.items():  # in order: later ones see earlier ones
        out[name] = ha_render(template, out, hass)
    return out


def load_example(name: str) -> Any:
    return yaml.safe_load((EXAMPLES / name).read_text())


def step_of(sequence: list[dict[str, Any]], key: str, value: Any = None) -> int:
    return next(i for i, s in enumerate(sequence) if key in s and (value is None or s[key] == value))


@dataclass
class ScriptRun:
    response: Any = None
    published: list[tuple[str, str]] = field(default_factory=list)  # (topic, payload) as mqtt.publish sends them
    waited_on: list[str] = field(default_factory=list)  # topics of wait_for_trigger
    variables: dict[str, Any] = field(default_factory=dict)


def run_ask_script(
    prompt: str, hass: FakeHass = ONLINE, reply: Callable[[str, ScriptRun], dict[str, Any] | None] | None = None
) -> ScriptRun:
    """Run script.rkmqtt_ask as Home Assistant does, step by step: `variables`, `if` with template
    conditions, `script.turn_on` of rkmqtt_send (its mqtt.publish is recorded), `wait_for_trigger`
    (`reply(topic, run)` gives the payload that arrives, None for a timeout) and `stop`."""
    scripts = load_example("scripts.yaml")
    send = scripts["rkmqtt_send"]["sequence"]
    run = ScriptRun()

    def steps(sequence: list[dict[str, Any]], variables: dict[str, Any]) -> bool:
        for step in sequence:
            run.variables = variables
            if "variables" in step:
                variables = render_variables(step["variables"], variables, hass)
            elif "if" in step:
                conditions = step["if"]
                assert all(c["condition"] == "template" for c in conditions)
                holds = all(ha_render(c["value_template"], variables, hass) is True for c in conditions)
                if steps(step["then"] if holds else step.get("else", []), dict(variables)):
                    return True
            elif step.get("action") == "script.turn_on":
                assert step["target"]["entity_id"] == "script.rkmqtt_send"
                sent = ha_render(step["data"]["variables"], variables, hass)
                publish = send[step_of(send, "action", "mqtt.publish")]["data"]
                # mqtt.publish sends the payload as it renders (a string, not a native type)
                raw = _HA_JINJA.from_string(publish["payload"]).render(**sent)
                run.published.append((ha_render(publish["topic"], sent, hass), raw))
            elif "wait_for_trigger" in step:
                [trigger] = step["wait_for_trigger"]
                assert trigger["trigger"] == "mqtt"
                topic = ha_render(trigger["topic"], variables, hass)
                run.waited_on.append(topic)
                payload = reply(topic, run) if reply is not None else None
                variables = {**variables, "wait": {"trigger": None if payload is None else {"payload_json": payload}}}
            elif "stop" in step:
                run.response = variables[step["response_variable"]]
                run.variables = variables
                return True
            else:
                raise AssertionError(f"a step this runner does not know: {step}")
        return False

    assert steps(scripts["rkmqtt_ask"]["sequence"], {"prompt": prompt}), "the script ends with stop"
    return run


def script_request(prompt: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Run rkmqtt_ask with a bridge online up to its wait: (variables, request topic, request payload)."""
    run = run_ask_script(prompt)
    [(topic, raw)] = run.published
    return run.variables, topic, json.loads(raw)


def test_script_publishes_a_valid_request_with_id_and_reply_to() -> None:
    variables, topic, payload = script_request('Say "hi" & <go>\nnow')
    topics = Topics("rkmqtt")
    client = topics.client_of(topic, "request")
    assert client == ha.HA_CLIENT, "the shipped ACL lets Home Assistant publish requests only as its own user"
    req = parse_request_payload(json.dumps(payload).encode())
    assert req.prompt == 'Say "hi" & <go>\nnow'
    assert req.id is not None and req.reply_to is not None, "Home Assistant cannot set MQTT 5 properties"
    assert req.stream is False
    # The bridge accepts that reply topic, and it is where it would answer anyway.
    assert topics.is_allowed_reply_topic(req.reply_to, client)
    assert req.reply_to == topics.reply(client, req.id) == variables["reply_topic"]
    assert req.reply_to != topics.reply(client, ha.DASHBOARD_REPLY)
    # Two runs do not share an id.
    assert script_request("x")[2]["id"] != script_request("x")[2]["id"]


def test_script_waits_before_it_publishes() -> None:
    scripts = load_example("scripts.yaml")
    seq = scripts["rkmqtt_ask"]["sequence"]
    assert scripts["rkmqtt_ask"]["mode"] == "parallel" and scripts["rkmqtt_send"]["mode"] == "parallel"
    # No mqtt.publish in the asking script itself: it starts the sender (which does not block) and
    # only then waits; the sender publishes after a delay, once the reply topic is subscribed.
    assert all(s.get("action") != "mqtt.publish" for s in seq)
    i_send, i_wait = step_of(seq, "action", "script.turn_on"), step_of(seq, "wait_for_trigger")
    assert i_send == i_wait - 1
    send = scripts["rkmqtt_send"]["sequence"]
    assert step_of(send, "delay") < step_of(send, "action", "mqtt.publish")
    assert send[step_of(send, "delay")]["delay"]["seconds"] >= 1
    run = run_ask_script("hello")
    [(_, raw)] = run.published
    assert run.waited_on == [json.loads(raw)["reply_to"]]
    assert seq[i_wait]["timeout"] and seq[i_wait]["continue_on_timeout"] is True
    assert seq[-1]["stop"] and seq[-1]["response_variable"] == "answer"


def ask_answer(wait: dict[str, Any]) -> Any:
    seq = load_example("scripts.yaml")["rkmqtt_ask"]["sequence"]
    block = next(s["variables"] for s in seq if "variables" in s and "answer" in s["variables"])
    return render_variables(block, {"wait": wait})["answer"]


def test_script_answer_from_ok_error_and_timeout() -> None:
    ok = {"id": "a", "status": "ok", "text": "Paris.", "finish_reason": "stop"}
    assert ask_answer({"trigger": {"payload_json": ok}}) == {"status": "ok", "text": "Paris.", "error": None}
    err = {"id": "a", "status": "error", "error": {"code": "busy", "message": "queue full"}}
    assert ask_answer({"trigger": {"payload_json": err}}) == {
        "status": "error",
        "text": "",
        "error": {"code": "busy", "message": "queue full"},
    }
    timed_out = ask_answer({"trigger": None})
    assert timed_out["status"] == "error" and timed_out["error"]["code"] == "timeout"
    assert run_ask_script("x", reply=lambda topic, run: ok).response == {
        "status": "ok",
        "text": "Paris.",
        "error": None,
    }


OFFLINE_ANSWER = {
    "status": "error",
    "text": "",
    "error": {
        "code": "offline",
        "message": "rkmqtt is offline (no rkmqtt device in Home Assistant shows Connectivity on)",
    },
}


@pytest.mark.parametrize(
    "hass",
    [
        FakeHass(),
        FakeHass().add("binary_sensor.rkmqtt_board_connectivity", "off"),
        FakeHass().add("binary_sensor.rkmqtt_board_connectivity", "unavailable"),
        FakeHass().add("binary_sensor.plug_connectivity", "on", manufacturer="Shelly"),
        FakeHass().add("binary_sensor.zigbee_thing", "on", integration="zha"),
        FakeHass().add("sensor.rkmqtt_board_queue_depth", "on"),
    ],
    ids=["no-device", "off", "unavailable", "another-makers-sensor", "another-integration", "not-a-binary-sensor"],
)
def test_script_answers_at_once_when_no_bridge_is_online(hass: FakeHass) -> None:
    """Nothing would answer: no request goes out and the script does not wait two minutes."""
    run = run_ask_script("hello", hass, reply=lambda topic, run: pytest.fail("it waited for a reply"))
    assert run.response == OFFLINE_ANSWER
    assert run.published == [] and run.waited_on == []


def test_script_finds_a_bridge_among_several_devices() -> None:
    hass = FakeHass().add("binary_sensor.rkmqtt_a_connectivity", "off").add("binary_sensor.rkmqtt_b_connectivity", "on")
    hass.add("binary_sensor.plug_connectivity", "off", manufacturer="Shelly")
    assert len(run_ask_script("hello", hass).published) == 1


def test_assist_automation_answers_with_the_reply() -> None:
    automations = load_example("automations.yaml")
    assist = next(a for a in automations if a["triggers"][0]["trigger"] == "conversation")
    assert all("{question}" in c for c in assist["triggers"][0]["command"])
    call = assist["actions"][0]
    assert call["action"] == "script.rkmqtt_ask" and call["response_variable"] == "answer"
    assert ha_render(call["data"]["prompt"], {"trigger": {"slots": {"question": "why is the sky blue"}}}) == (
        "why is the sky blue"
    )
    respond = assist["actions"][1]["set_conversation_response"]
    ok = {"answer": {"status": "ok", "text": "Rayleigh scattering.", "error": None}}
    assert ha_render(respond, ok) == "Rayleigh scattering."
    err = {"answer": {"status": "error", "text": "", "error": {"code": "busy", "message": "queue full"}}}
    assert "queue full" in ha_render(respond, err)
    # With the bridge down the script answers at once, and Assist says why.
    assert "rkmqtt is offline" in ha_render(respond, {"answer": run_ask_script("why", FakeHass()).response})


def test_dashboard_reply_automation_is_always_subscribed_to_the_text_entitys_replies() -> None:
    automations = load_example("automations.yaml")
    auto = next(a for a in automations if a["triggers"][0]["trigger"] == "mqtt")
    sub = auto["triggers"][0]["topic"]
    topics = Topics("rkmqtt")
    cmd = payload_of(load_settings({}), make_info())["cmps"]["prompt"]["command_topic"]
    client = topics.client_of(cmd, "request")
    assert client == ha.HA_CLIENT
    reply = ha.dashboard_reply_topic(load_settings({}))
    assert mqtt.topic_matches_sub(sub, reply)
    assert not mqtt.topic_matches_sub(sub, Topics.stream_of(reply))
    _, _, payload = script_request("x")
    assert not mqtt.topic_matches_sub(sub, payload["reply_to"]), "the script's replies are its own"
    message = auto["actions"][0]["data"]["message"]
    assert ha_render(message, {"trigger": {"payload_json": {"status": "ok", "text": "42"}}}) == 42
    err = {"status": "error", "error": {"code": "too_long", "message": "prompt too long"}}
    assert ha_render(message, {"trigger": {"payload_json": err}}) == "too_long: prompt too long"


def test_script_against_a_real_bridge(
    start_bridge: Callable[..., Service], probe_factory: Callable[..., Probe], prefix: str
) -> None:
    """What Home Assistant would do with the script, step by step, on a real broker and bridge: the
    Connectivity entity from the bridge's real discovery and retained status, then the request and
    the reply; and once the bridge has stopped, the answer `offline` at once."""
    node, disc = f"node_{prefix}", f"ha{prefix}"
    svc = start_bridge(
        FakeEngine(step_s=0.005), topic_prefix="rkmqtt", discovery=True, discovery_prefix=disc, node_name=node
    )
    status_topic = f"rkmqtt/node/{node}/status"
    watcher = probe_factory([f"{disc}/device/{node}/config", status_topic])

    def hass_now(status: bytes) -> FakeHass:
        [doc] = discovery_of(watcher, f"{disc}/device/{node}/config")
        watcher.wait_for(lambda m: m.topic == status_topic and m.payload == status, 20)
        return FakeHass.from_discovery(doc, {status_topic: status})

    hass = hass_now(b"online")
    # Engine connectivity reads the stats, which are not retained: unknown to this snapshot.
    assert hass.states == {
        f"binary_sensor.{node}_connectivity": "on",
        f"binary_sensor.{node}_engine_connectivity": "unknown",
    }

    def reply(topic: str, run: ScriptRun) -> dict[str, Any]:
        waiter = probe_factory([topic])  # wait_for_trigger subscribes first
        [(request_topic, raw)] = run.published
        waiter.publish(request_topic, raw, qos=1)  # then rkmqtt_send publishes
        [msg] = waiter.wait_for(lambda m: m.topic == topic, 20)
        assert waiter.on(Topics.stream_of(topic)) == [], "stream: false"
        return msg.json()  # type: ignore[no-any-return]

    answer = run_ask_script("the quick brown fox", hass, reply).response
    assert answer["status"] == "ok" and answer["text"].strip() == "the quick brown fox"

    svc.stop(grace_s=1)
    offline = run_ask_script("anyone?", hass_now(b"offline"), reply=lambda t, r: pytest.fail("it waited"))
    assert offline.response == OFFLINE_ANSWER and offline.published == []
