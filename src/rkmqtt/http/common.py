"""What the two HTTP APIs share (the HTTP server's event-loop thread): the served model as the
APIs list it, and reading a request's JSON body with the bridge's limits and error codes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rkmqtt.protocol import ErrorCode, Info, describe_validation_error

from .exchange import Gateway

M = TypeVar("M", bound=BaseModel)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    """A tool definition, the same in both APIs and as chat templates take it."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionSpec


def rfc3339(t: float | None = None) -> str:
    """A UTC time as Ollama writes them: 2026-01-02T03:04:05.123456Z."""
    when = dt.datetime.now(dt.timezone.utc) if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _size_label(n: Any) -> str:
    if not isinstance(n, int) or n <= 0:
        return ""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}".removesuffix(".0") + unit
    return str(n)


@dataclass(frozen=True)
class ModelCard:
    """The one model this bridge serves, as `/api/tags`, `/api/show` and `/v1/models` list it."""

    name: str  # "<model>:latest": Ollama's name:tag form; requests may leave out ":latest"
    engine: str
    family: str
    parameter_size: str
    quantization: str
    size: int  # bytes of the model file (0 when unknown)
    digest: str  # an identity of the file (path, size, time), not a hash of its bytes
    modified: float  # the file's modification time, Unix seconds
    context_length: int | None
    n_batch: int
    tools: bool

    @classmethod
    def from_info(cls, info: Info, tools: bool) -> ModelCard:
        e = info.engine_info
        path = Path(str(e.get("model_path") or e.get("model_file") or ""))
        try:
            st = path.stat() if str(path) not in ("", ".") else None
        except OSError:
            st = None
        size = st.st_size if st else 0
        modified = st.st_mtime if st else 0.0
        ident = f"{path}:{size}:{modified}:{info.model}".encode()
        return cls(
            name=f"{info.model}:latest",
            engine=info.engine,
            family=str(e.get("architecture") or info.engine),
            parameter_size=_size_label(e.get("parameters")),
            quantization=str(e.get("file_type") or ""),
            size=size,
            digest=hashlib.sha256(ident).hexdigest(),
            modified=modified,
            context_length=e.get("max_context") if isinstance(e.get("max_context"), int) else None,
            n_batch=info.n_batch,
            tools=tools,
        )

    def matches(self, name: str) -> bool:
        wanted = name.strip().lower()
        return wanted in (self.name.lower(), self.name.lower().removesuffix(":latest"))

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf" if self.engine == "numpy" else self.engine,
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }

    def capabilities(self) -> list[str]:
        return ["completion", "tools"] if self.tools else ["completion"]


def check_model(gateway: Gateway, card: ModelCard, name: str) -> None:
    """Refuse (404, counted `invalid_request`) a request for a model this bridge does not serve."""
    if not name.strip():
        raise gateway.refuse(ErrorCode.INVALID_REQUEST, f"model is required: this bridge serves {card.name!r}")
    if not card.matches(name):
        raise gateway.refuse(
            ErrorCode.INVALID_REQUEST, f"model {name!r} not found: this bridge serves {card.name!r}", status=404
        )


async def read_body(request: web.Request, model: type[M], gateway: Gateway) -> M:
    """The body as `model`; refuses `payload_too_large` (413) and `invalid_request` (400)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = gateway.settings.max_payload_bytes
        raise gateway.refuse(ErrorCode.PAYLOAD_TOO_LARGE, f"the body is over the limit of {limit} bytes") from None
    try:
        data = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        raise gateway.refuse(ErrorCode.INVALID_REQUEST, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise gateway.refuse(ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise gateway.refuse(ErrorCode.INVALID_REQUEST, describe_validation_error(e)) from None
