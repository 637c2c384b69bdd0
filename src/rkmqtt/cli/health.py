"""`rkmqtt health` (main thread): reads the file the service rewrites every second and exits 0
when the service is connected, its scheduler turns, and its engine is not stuck."""

from __future__ import annotations

import json
import sys
import time

from rkmqtt.errors import ConfigError
from rkmqtt.settings import Settings


def check_health(settings: Settings, max_age: float, max_stall: float) -> int:
    path = settings.health_file
    if path is None:
        raise ConfigError("setting health_file is empty: set RKMQTT_HEALTH_FILE for the service and this check")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"unhealthy: cannot read {path}: {e}", file=sys.stderr)
        return 1
    now = time.time()
    if data.get("stopped"):
        print("unhealthy: the service has stopped", file=sys.stderr)
        return 1
    problems = []
    if now - float(data.get("updated", 0)) > max_age:
        problems.append(f"health file not updated for {now - float(data.get('updated', 0)):.0f} s")
    if not data.get("connected"):
        problems.append("not connected to the broker")
    if now - float(data.get("heartbeat", 0)) > max_age:
        problems.append(f"the scheduler has not turned for more than {max_age:.0f} s")
    if float(data.get("engine_stalled_s", 0)) > max_stall:
        problems.append(f"the engine produced nothing for {data['engine_stalled_s']:.0f} s while busy")
    if problems:
        print("unhealthy: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("healthy")
    return 0
