"""Home Assistant MQTT discovery (any thread; pure): one retained device config per node, whose
entities read the node's status, stats and info and send prompts (docs/architecture.md, "Home
Assistant discovery")."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rkmqtt import __version__
from rkmqtt.protocol import Info
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics

#: The `<client>` name the dashboard's text entity sends prompts as (and Home Assistant's user
#: name on a broker with the shipped ACL, which lets only it read `P/reply/homeassistant/#`).
HA_CLIENT = "homeassistant"

#: The last level of the topic the dashboard's prompts are answered on, `P/reply/homeassistant/dashboard`:
#: a reply to a prompt typed on the dashboard is private to Home Assistant (never on `P/node/<node>/stats`).
DASHBOARD_REPLY = "dashboard"

#: Home Assistant's state strings are limited to 255 characters.
HA_STATE_MAX = 255

#: The longest prompt the dashboard's text entity accepts (Home Assistant's own limit for text).
TEXT_MAX = 255

PAYLOAD_ONLINE = "online"
PAYLOAD_OFFLINE = "offline"


def ha_status_topic(settings: Settings) -> str:
    """The topic where Home Assistant announces `online` / `offline` (its birth and will)."""
    return f"{settings.discovery_prefix}/status"


def is_ha_online(payload: bytes) -> bool:
    """True when a message on `ha_status_topic` means Home Assistant (re)started."""
    return payload.strip() == PAYLOAD_ONLINE.encode()


def discovery_topic(settings: Settings) -> str:
    return f"{settings.discovery_prefix}/device/{settings.effective_node_name()}/config"


def dashboard_reply_topic(settings: Settings) -> str:
    """Where the bridge answers the prompts of the dashboard's text entity."""
    return Topics(settings.topic_prefix).reply(HA_CLIENT, DASHBOARD_REPLY)


def stats_expire_after(settings: Settings) -> int:
    """Seconds after which a live stats sensor (queue, active, tokens/s) shows `unavailable`
    when no stats arrive: three missed intervals, and never less than 15 s."""
    return max(15, math.ceil(3 * settings.stats_interval))


def discovery_messages(settings: Settings, info: Info) -> list[tuple[str, bytes]]:
    """Topic and payload of each retained discovery message. With discovery off: the empty
    payload on the same topic, which makes Home Assistant remove the device (no-op if none)."""
    if not settings.discovery:
        return [(discovery_topic(settings), b"")]
    payload = discovery_payload(settings, info)
    return [(discovery_topic(settings), json.dumps(payload, separators=(",", ":")).encode())]


def slugify(text: str) -> str:
    """Home Assistant's slug of an ASCII name: lower case, every run of other characters one `_`."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def device_name(node: str) -> str:
    """The device's friendly name: the node name with its `_` and `-` as spaces (slug: the node)."""
    return re.sub(r"[_-]+", " ", node).strip() or node


def discovery_payload(settings: Settings, info: Info) -> dict[str, Any]:
    """The device-based discovery document (see the module's docstring for the entities)."""
    node = settings.effective_node_name()
    name = device_name(node)
    topics = Topics(settings.topic_prefix, settings.effective_node_name())
    availability = [
        {
            "topic": topics.status,
            "payload_available": PAYLOAD_ONLINE,
            "payload_not_available": PAYLOAD_OFFLINE,
        }
    ]
    expire = stats_expire_after(settings)
    dashboard = dashboard_reply_topic(settings)

    def entity(platform: str, key: str, label: str, **options: Any) -> tuple[str, dict[str, Any]]:
        return key, {
            "p": platform,
            "name": label,
            "unique_id": f"{node}_{key}",
            # what Home Assistant before 2025.10 makes of the device's and the entity's names
            "default_entity_id": f"{platform}.{slugify(f'{name} {label}')}",
            "availability": availability,
            **options,
        }

    def stat(
        key: str, name: str, field: str, live: bool, platform: str = "sensor", **options: Any
    ) -> tuple[str, dict[str, Any]]:
        config: dict[str, Any] = {
            "state_topic": topics.stats,
            "value_template": f"{{{{ value_json.{field} }}}}",
        }
        if live:
            config["expire_after"] = expire
        config.update(options)
        return entity(platform, key, name, **config)

    def diagnostic(key: str, name: str, field: str, icon: str) -> tuple[str, dict[str, Any]]:
        return entity(
            "sensor",
            key,
            name,
            state_topic=topics.info,
            value_template=f"{{{{ value_json.{field} }}}}",
            entity_category="diagnostic",
            icon=icon,
        )

    connectivity = entity(
        "binary_sensor",
        "connectivity",
        "Connectivity",
        state_topic=topics.status,
        payload_on=PAYLOAD_ONLINE,
        payload_off=PAYLOAD_OFFLINE,
        device_class="connectivity",
        entity_category="diagnostic",
    )
    # Its state is the availability topic: with availability it could only ever show `on`.
    del connectivity[1]["availability"]
    # Whether the engine can take requests (engine openai: its server answers). The bridge may be
    # online while its server is not: requests then wait, and this shows why.
    engine_connectivity = stat(
        "engine_connectivity",
        "Engine connectivity",
        "engine_ready",
        True,
        platform="binary_sensor",
        value_template="{{ 'ON' if value_json.engine_ready else 'OFF' }}",
        device_class="connectivity",
        entity_category="diagnostic",
        json_attributes_topic=topics.stats,
        json_attributes_template="{{ {'problem': value_json.engine_problem} | tojson }}",
    )
    components = dict(
        [
            connectivity,
            engine_connectivity,
            stat(
                "queue_depth",
                "Queue depth",
                "queue_depth",
                True,
                state_class="measurement",
                unit_of_measurement="requests",
                icon="mdi:tray-full",
            ),
            stat(
                "active",
                "Active requests",
                "active",
                True,
                state_class="measurement",
                unit_of_measurement="requests",
                icon="mdi:cog-play",
            ),
            stat(
                "tokens_per_s",
                "Tokens per second",
                "tokens_per_s",
                True,
                value_template="{{ value_json.tokens_per_s | round(1) }}",
                state_class="measurement",
                unit_of_measurement="tok/s",
                suggested_display_precision=1,
                icon="mdi:speedometer",
            ),
            stat(
                "requests_answered",
                "Requests answered",
                "completed",
                False,
                state_class="total_increasing",
                unit_of_measurement="requests",
                icon="mdi:message-reply-text",
                json_attributes_topic=topics.stats,
                json_attributes_template="{{ {'requests_total': value_json.requests_total} | tojson }}",
            ),
            stat(
                "errors",
                "Errors",
                "errors",
                False,
                state_class="total_increasing",
                unit_of_measurement="errors",
                icon="mdi:alert-circle-outline",
                json_attributes_topic=topics.stats,
                json_attributes_template="{{ value_json.errors_by_code | tojson }}",
            ),
            entity(
                "sensor",
                "last_reply",
                "Last reply",
                # The final reply (ok or error) to the text entity's prompts, on their own reply topic.
                state_topic=dashboard,
                value_template=(
                    "{{ (value_json.text if value_json.status == 'ok' else value_json.status ~ ': ' "
                    f"~ value_json.error.message)[:{HA_STATE_MAX}] }}}}"
                ),
                json_attributes_topic=dashboard,
                json_attributes_template=(
                    "{{ ({'text': value_json.text} if value_json.status == 'ok' else {'error': value_json.error}) "
                    "| tojson }}"
                ),
                icon="mdi:message-text",
            ),
            diagnostic("model", "Model", "model", "mdi:brain"),
            diagnostic("engine", "Engine", "engine", "mdi:chip"),
            diagnostic("n_batch", "Batch size", "n_batch", "mdi:view-parallel"),
            entity(
                "text",
                "prompt",
                "Prompt",
                command_topic=topics.request(HA_CLIENT),
                # JSON, so that the answer goes to the reply topic that only the Last reply sensor reads.
                command_template=(
                    f"{{{{ {{'prompt': value, 'reply_to': '{dashboard}', 'stream': false}} | tojson }}}}"
                ),
                qos=1,
                retain=False,
                mode="text",
                min=1,
                max=TEXT_MAX,
                icon="mdi:chat-question",
            ),
        ]
    )

    device: dict[str, Any] = {
        "ids": [node],
        "name": name,
        "mf": "rkmqtt",
        "mdl": f"rkmqtt ({info.engine})",
        "sw": info.version,
    }
    if info.driver_version:
        device["hw"] = f"NPU driver {info.driver_version}"
    return {
        "dev": device,
        "o": {"name": "rkmqtt", "sw": __version__},
        "cmps": components,
        "qos": 1,
    }
