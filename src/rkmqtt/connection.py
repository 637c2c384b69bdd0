"""Building a paho-mqtt client from the settings (any thread, at set-up): protocol version,
credentials and TLS, the same for the bridge, `rkmqtt ask` and `rkmqtt check`."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from rkmqtt.settings import BrokerAddress, Settings


def make_client(settings: Settings, client_id: str, address: BrokerAddress | None = None) -> mqtt.Client:
    """A paho 2.x client (callback API version 2) with credentials and TLS applied; not connected."""
    address = address or settings.broker_url
    mqtt5 = settings.mqtt_version == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        reconnect_on_failure=True,
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
