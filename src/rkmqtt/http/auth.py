"""Who an HTTP request is (the HTTP server's event-loop thread; pure).

With `http_tokens` set, a request must carry `Authorization: Bearer <token>` and its client name
(its share of the fair queue, its rate limit) is that token's name; without tokens every request
is the client `http_client`.
"""

from __future__ import annotations

import hmac
import ipaddress


class Auth:
    def __init__(self, tokens: dict[str, str], default_client: str) -> None:
        self._tokens = {token.encode(): name for token, name in tokens.items()}  # token -> client name
        self.default_client = default_client

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def client(self, authorization: str) -> str | None:
        """The client name of a request with this `Authorization` header; None: not allowed."""
        if not self._tokens:
            return self.default_client
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        found = None
        for known, name in self._tokens.items():  # every token compared, each in constant time
            if hmac.compare_digest(known, given):
                found = name
        return found


def is_local(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only (loopback, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
