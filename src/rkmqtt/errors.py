"""The exception hierarchy of rkmqtt (any thread).

Every error that reaches a device becomes a wire `code` and a human `message`;
every error that stops start-up becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

from rkmqtt.protocol import ErrorCode


class RkmqttError(Exception):
    """Base of every error rkmqtt raises on purpose."""


class ConfigError(RkmqttError):
    """A setting is wrong; the message is one line naming it, its value and what is allowed."""


class EngineError(RkmqttError):
    """The engine failed (load, init or run). `returncode` is the native return code, if any."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class RequestRejected(RkmqttError):
    """A request is refused; `code` is the wire error code sent back to the device."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def exit_status(e: RkmqttError) -> int:
    """A command's exit status for `e`: 2 for a setting or an engine to fix, 1 for the rest."""
    return 2 if isinstance(e, ConfigError | EngineError) else 1
