"""The MQTT door: the bridge's paho client, intake, replies, outbox, journal, node sharing and discovery."""
