"""What the two HTTP APIs share (the HTTP server's event-loop thread): the served models as the
APIs list them, and reading a request's JSON body with the bridge's limits and error codes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rkmqtt.models.catalog import parameter_size
from rkmqtt.models.choose import quant_of
from rkmqtt.protocol import ErrorCode, Info, describe_validation_error
from rkmqtt.settings import Settings

from .exchange import Gateway

if TYPE_CHECKING:
    from rkmqtt.models.catalog import Catalog, Served

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


def shown_name(model: str) -> str:
    """A model's name as Ollama shows it: name:tag (`:latest` when it has none)."""
    return model if ":" in model else f"{model}:latest"


def _size_label(n: Any) -> str:
    if not isinstance(n, int) or n <= 0:
        return ""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}".removesuffix(".0") + unit
    return str(n)


@dataclass(frozen=True)
class ModelCard:
    """A model this bridge serves, as `/api/tags`, `/api/show` and `/v1/models` list it."""

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
            name=shown_name(info.model),
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

    @classmethod
    def from_served(cls, served: Served, engine: str, n_batch: int, context: int | None, tools: bool) -> ModelCard:
        """A model of a bridge that serves several, from its file (when it is here)."""
        local = served.local
        size = local.size if local is not None else 0
        modified = local.modified if local is not None else 0.0
        ident = local.sha256 if local is not None and local.sha256 else f"{served.reference}:{size}:{modified}"
        file_name = local.path.name if local is not None else served.reference
        return cls(
            name=shown_name(served.name),
            engine=engine,
            family=engine,
            parameter_size=parameter_size(served.name) or parameter_size(file_name),
            quantization=quant_of(file_name) or "",
            size=size,
            digest=ident if len(ident) == 64 else hashlib.sha256(ident.encode()).hexdigest(),
            modified=modified,
            context_length=context,
            n_batch=n_batch,
            tools=tools,
        )


class Cards:
    """The models the HTTP APIs list and take: one card, or every model of a catalog (any thread)."""

    def __init__(
        self,
        default: ModelCard,
        catalog: Catalog | None = None,
        loaded: Callable[[], list[str]] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.default = default
        self.catalog = catalog
        self._loaded = loaded
        self._settings = settings

    def _card(self, served: Served) -> ModelCard:
        assert self.catalog is not None
        if served.name == self.default.name.removesuffix(":latest") and self.default.size:
            return self.default  # the first model, described by its loaded engine
        s = self._settings
        e = served.entry
        n_batch = e.n_batch if e is not None and e.n_batch else (s.n_batch if s else self.default.n_batch)
        context = e.max_context if e is not None and e.max_context else (s.max_context if s else None)
        tools = bool(self.catalog.choose(served.name).tools)
        return ModelCard.from_served(served, self.catalog.engine, n_batch, context, tools)

    def all(self) -> list[ModelCard]:
        if self.catalog is None:
            return [self.default]
        return [self._card(s) for s in self.catalog.served()]

    def loaded(self) -> list[ModelCard]:
        if self.catalog is None or self._loaded is None:
            return [self.default]
        names = set(self._loaded())
        return [self._card(s) for s in self.catalog.served() if s.name in names]

    def find(self, name: str) -> ModelCard:
        """The card of the model `name` means; LookupError saying what is served."""
        if self.catalog is None:
            if not self.default.matches(name):
                raise LookupError(f"model {name!r} not found: this bridge serves {self.default.name!r}")
            return self.default
        return self._card(self.catalog.find(name))


def check_model(gateway: Gateway, cards: Cards, name: str) -> ModelCard:
    """The model a request names; refuses (404, counted `invalid_request`) one this bridge does not serve."""
    if not name.strip():
        raise gateway.refuse(ErrorCode.INVALID_REQUEST, f"model is required: this bridge serves {cards.default.name!r}")
    try:
        return cards.find(name)
    except LookupError as e:
        raise gateway.refuse(ErrorCode.INVALID_REQUEST, str(e.args[0]), status=404) from None


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
