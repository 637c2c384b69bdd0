"""Building a paho-mqtt client from the settings (any thread, at set-up): protocol version,
credentials and TLS, TCP_NODELAY and the CONNECT arguments, the same for the bridge, `rkmqtt ask`,
`rkmqtt check` and the bench's simulated devices."""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rkmqtt.settings import BrokerAddress, Settings


def make_client(
    settings: Settings,
    client_id: str,
    address: BrokerAddress | None = None,
    *,
    persistent: bool = False,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A paho 2.x client (callback API version 2) with credentials and TLS applied; not connected.

    `persistent`: MQTT 3.1.1's clean session off (MQTT 5 asks for its session at connect: see
    `connect_args`). `manual_ack`: QoS 1 messages are acknowledged by `client.ack`, not on return
    from `on_message`."""
    address = address or settings.broker_url
    mqtt5 = settings.mqtt_version == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        clean_session=None if mqtt5 else not (persistent and settings.session_expiry > 0),
        reconnect_on_failure=True,
        manual_ack=manual_ack,
    )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(
            ca_certs=str(settings.tls_ca) if settings.tls_ca else None,
            certfile=str(settings.tls_cert) if settings.tls_cert else None,
            keyfile=str(settings.tls_key) if settings.tls_key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        if settings.tls_insecure:
            client.tls_insecure_set(True)
    return client


def set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's `on_socket_open`: without TCP_NODELAY a small packet can wait for the peer's delayed
    ACK, up to ~40 ms (docs/benchmarks.md, "What limits the relay rate")."""
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (a test's socketpair)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_args(settings: Settings, keepalive: int | None = None, persistent: bool = False) -> dict[str, Any]:
    """Keyword arguments of paho's `connect`/`connect_async`: a clean session that ends with the
    connection, or (`persistent`, MQTT 5) the session kept for `session_expiry` seconds, resumed."""
    args: dict[str, Any] = {"keepalive": settings.keepalive if keepalive is None else keepalive}
    if settings.mqtt_version == "5":
        expiry = settings.session_expiry if persistent else 0
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = expiry
        args.update(clean_start=expiry == 0, properties=props)
    return args
