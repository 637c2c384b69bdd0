"""What the openai engine needs from the settings (any thread; pure data)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from rkmqtt.errors import ConfigError
from rkmqtt.settings import Settings

#: How long a probe of the server (GET /models) may take before it counts as not answering.
PROBE_TIMEOUT_S = 5.0
#: How long connecting to the server may take, for a request or a probe.
CONNECT_TIMEOUT_S = 5.0


def quiet_http_logs() -> None:
    """The HTTP client logs a line per request at INFO; the engine logs what matters itself."""
    for name in ("httpx", "httpx2"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class UpstreamConfig:
    url: str  # the API base, e.g. http://127.0.0.1:8080/v1 (no trailing slash)
    model: str | None  # None: the first the server lists
    api_key: str | None
    n_batch: int  # requests in flight upstream at once
    timeout_s: float  # the longest silence inside an answer

    @classmethod
    def from_settings(cls, s: Settings) -> UpstreamConfig:
        if s.upstream_url is None:
            raise ConfigError("engine openai needs upstream_url: the server's API base, e.g. http://127.0.0.1:8080/v1")
        return cls(s.upstream_url.rstrip("/"), s.upstream_model, s.upstream_key(), s.n_batch, s.upstream_timeout)

    @property
    def shown_url(self) -> str:
        """The URL for logs and `info`: without a password it may carry."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
