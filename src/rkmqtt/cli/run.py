"""`rkmqtt run` (main thread): the service, with the Supervisor's broker when it runs as a Home Assistant add-on."""

from __future__ import annotations

from rkmqtt.addon import credentials_provider, is_addon, with_supervisor_broker
from rkmqtt.service import Service
from rkmqtt.settings import Settings


def run(settings: Settings) -> int:
    """Run the bridge until SIGTERM or SIGINT; the exit status."""
    provider = None
    if is_addon() and settings.broker is None:
        # As a Home Assistant add-on with no broker set: the Supervisor's, refreshed on rejection.
        settings = with_supervisor_broker(settings)
        provider = credentials_provider()
    return Service(settings, credentials_provider=provider).run_forever()
