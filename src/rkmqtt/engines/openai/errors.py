"""The upstream server's errors in the bridge's terms (the engine's event-loop thread; pure).

An HTTP error for one request becomes that request's error code: 400/422 `invalid_request` (or
`too_long` when it speaks of the context), 413 `too_long`, 429 `rate_limited`, 503 `busy`, others
`engine_error`. A server that is itself an rkmqtt bridge names one of our codes: it is kept.
"""

from __future__ import annotations

import os
import re
from typing import Any

from rkmqtt.logtext import clip
from rkmqtt.protocol import ErrorCode

_CONTEXT = re.compile(r"context|too long|too many tokens|maximum.{0,40}length|exceed", re.IGNORECASE)
_CODES = {c.value: c for c in ErrorCode}
_BY_STATUS = {
    413: ErrorCode.TOO_LONG,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.BUSY,
}


def message_of(body: Any, fallback: str) -> str:
    """The words of an error body (OpenAI's `{"message": ...}`, vLLM's, llama.cpp's), clipped."""
    text = body.get("message") if isinstance(body, dict) else body if isinstance(body, str) else None
    return clip(str(text) if text else fallback, 300)


def code_of(body: Any) -> ErrorCode | None:
    """Our own error code, when the server is an rkmqtt bridge that named one."""
    code = body.get("code") if isinstance(body, dict) else None
    return _CODES.get(code) if isinstance(code, str) else None


def status_error(status: int, body: Any, fallback: str) -> tuple[ErrorCode, str]:
    """The error code and message of a request the server answered with HTTP `status`."""
    detail = message_of(body, fallback)
    said = f"the upstream server answered {status}: {detail}"
    if status in (401, 403):
        return ErrorCode.ENGINE_ERROR, f"{said} (check upstream_api_key)"
    if status == 404:
        return ErrorCode.ENGINE_ERROR, f"{said} (check upstream_model and upstream_url)"
    code = code_of(body)
    if code is None:
        if status in (400, 422):
            code = ErrorCode.TOO_LONG if _CONTEXT.search(detail) else ErrorCode.INVALID_REQUEST
        else:
            code = _BY_STATUS.get(status, ErrorCode.ENGINE_ERROR)
    return code, said


def stream_error(body: Any, fallback: str) -> tuple[ErrorCode, str]:
    """An error the server sent inside a streamed answer (an event `{"error": {...}}`)."""
    return code_of(
        body
    ) or ErrorCode.ENGINE_ERROR, f"the upstream server failed the answer: {message_of(body, fallback)}"


def connection_cause(e: BaseException) -> str:
    """Why a connection failed, in words: the operating system's (Connection refused, ...) when
    the chain of causes holds one, else the deepest message."""
    best = ""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        for err in (cur, *getattr(cur, "exceptions", ())):  # an ExceptionGroup: several addresses tried
            if isinstance(err, OSError) and (err.errno or err.strerror):
                return os.strerror(err.errno) if err.errno else str(err.strerror)
        if str(cur):
            best = str(cur)
        cur = cur.__cause__ or cur.__context__
    return clip(best or type(e).__name__, 200)
