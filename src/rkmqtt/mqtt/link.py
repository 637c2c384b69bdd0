"""The broker connection as a user reads it in the log (paho network thread; pure bookkeeping).

One line per outage, naming the broker and the cause — refused, unreachable, host name unknown,
not authorised, bad credentials, certificate, host name mismatch — and one line when it is back.
Repeated failures with the same cause stay quiet.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time

_LOGGER = logging.getLogger(__name__)

# CONNACK / DISCONNECT reason codes: MQTT 5 and, for CONNACK, 3.1.1's return codes 1-5.
_REASONS = {
    1: "the broker does not speak this MQTT version (set mqtt_version)",
    2: "the broker refused our client id",
    3: "the broker is unavailable",
    4: "bad user name or password",
    5: "not authorised (check the user name and password)",
    128: "the broker refused the connection",
    132: "the broker does not speak this MQTT version (set mqtt_version)",
    133: "the broker refused our client id",
    134: "bad user name or password",
    135: "not authorised (check the user name and password)",
    136: "the broker is unavailable",
    137: "the broker is busy",
    138: "banned",
    140: "bad authentication method",
    142: "session taken over by another client with our client id",
    149: "packet too large",
    151: "quota exceeded",
    156: "use another server",
    157: "the server moved",
    159: "connection rate exceeded",
}
TAKEN_OVER = 142


def describe_failure(exc: BaseException | None) -> str:
    """The cause of a failed TCP/TLS connect, in words."""
    if exc is None:
        return "could not connect"
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or str(exc)
        if "hostname" in msg.lower() or "ip address mismatch" in msg.lower():
            return f"the broker's certificate is not for this host name ({msg}); check the broker URL or tls_insecure"
        return f"the broker's certificate was not accepted ({msg}); check tls_ca"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc}); is the port a TLS port, and are tls_cert/tls_key right?"
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running, on this port?)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "unreachable (timed out)"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable (no route to the host)"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "connection reset"
    return f"{type(exc).__name__}: {exc}"


def describe_reason(code: int) -> str:
    return _REASONS.get(code, f"reason code {code}")


class Link:
    """Reports the state of the connection to `broker` (a URL without the password)."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self._down_since: float | None = None
        self._cause: str | None = None
        self.outages = 0

    @property
    def cause(self) -> str | None:
        """Why the broker is not reachable, while it is not."""
        return self._cause

    def up(self, session_present: bool) -> None:
        now = time.monotonic()
        if self._down_since is not None:
            gone = " (it had no session for us: what was queued there went to another node, or was lost)"
            _LOGGER.warning(
                "broker %s is back after %.1f s%s", self.broker, now - self._down_since, "" if session_present else gone
            )
        self._down_since = None
        self._cause = None

    def failed(self, cause: str) -> None:
        """A connect attempt failed (socket, TLS, or a CONNACK that refused)."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
        if cause != self._cause:
            self._cause = cause
            _LOGGER.warning("broker %s: %s; retrying", self.broker, cause)
        else:
            _LOGGER.debug("broker %s: %s; retrying", self.broker, cause)

    def lost(self, code: int | None, stopping: bool) -> None:
        """The connection dropped (`code`: the DISCONNECT reason, when the broker sent one; 142
        when it gave the session to another client, which the bridge looks into)."""
        if stopping:
            return
        # 128 is also what paho reports when the socket closed without a DISCONNECT (Mosquitto 2.0
        # closes a session taken over so): not a refusal.
        cause = "connection lost" if code in (None, 0, 128) else f"disconnected: {describe_reason(code)}"
        self.failed(cause)
