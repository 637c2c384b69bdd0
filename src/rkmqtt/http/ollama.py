"""The Ollama API (the HTTP event-loop thread): `/api/version`, `/api/tags`, `/api/ps`, `/api/show`,
`/api/chat` and `/api/generate`, NDJSON-streamed or not (`/api/pull`, `/api/delete`: `pulls.py`).
What it accepts, ignores and refuses: docs/architecture.md, "The HTTP API"."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from rkmqtt import __version__
from rkmqtt.engines.base import ChatMessage
from rkmqtt.protocol import ErrorCode, OkReply, parse_duration

from .common import Cards, ModelCard, ToolSpec, check_model, read_body, rfc3339, shown_name
from .exchange import ApiError, Call, Exchange, Gateway
from .pulls import ModelsApi
from .textscan import ToolCall, reply_calls

_LOGGER = logging.getLogger(__name__)

# The Ollama release whose API this one follows (clients compare it against Ollama's versions).
API_VERSION = "0.6.0"

NDJSON = "application/x-ndjson"
_Kind = Literal["chat", "generate"]


class _Body(BaseModel):
    # Ollama ignores fields it does not know (clients send newer ones); so does this.
    model_config = ConfigDict(extra="ignore")


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # num_thread, num_gpu...: accepted, no effect

    temperature: Annotated[float | None, Field(ge=0.0, le=5.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=0, le=100_000)] = None
    num_predict: Annotated[int | None, Field(ge=-2, le=1_000_000)] = None  # -1: no cap, -2: fill the context
    seed: Annotated[int | None, Field(ge=-(2**31), le=2**32 - 1)] = None  # negative: random
    repeat_penalty: Annotated[float | None, Field(ge=0.1, le=10.0)] = None
    stop: list[Annotated[str, Field(min_length=1)]] | str | None = None
    num_ctx: Annotated[float | None, Field(ge=1, le=10_000_000)] = None  # Home Assistant sends 8192.0


class CallFunction(_Body):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class MessageCall(_Body):
    function: CallFunction


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[MessageCall] | None = None


class _Generating(_Body):
    model: str
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True  # Ollama streams unless told not to
    keep_alive: float | str | None = None  # how long the model stays loaded after this request
    think: bool | str | None = None


class ChatBody(_Generating):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolSpec] | None = None


class GenerateBody(_Generating):
    prompt: str | None = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None
    images: list[Any] | None = None


class ShowBody(_Body):
    model: str = ""
    name: str = ""  # older clients


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _stats(reply: OkReply) -> dict[str, Any]:
    """Ollama's durations (nanoseconds) and counts from the bridge's final reply."""
    t, u = reply.timing, reply.usage
    prefill_ms = t.prefill_ms
    if prefill_ms is None and t.ttft_ms is not None:
        prefill_ms = max(0.0, t.ttft_ms - t.queued_ms)
    decode_ms = t.decode_ms
    if decode_ms is None:
        decode_ms = u.completion_tokens / t.tokens_per_s * 1000 if t.tokens_per_s > 0 else 0.0
    return {
        "total_duration": int(t.total_ms * 1e6),
        "load_duration": 0,
        "prompt_eval_count": u.prompt_tokens or 0,
        "prompt_eval_duration": int((prefill_ms or 0.0) * 1e6),
        "eval_count": u.completion_tokens,
        "eval_duration": int(decode_ms * 1e6),
    }


class OllamaApi:
    def __init__(self, gateway: Gateway, cards: Cards) -> None:
        self.gateway = gateway
        self.cards = cards

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/version", self.version),
            web.get("/api/tags", self.tags),
            web.get("/api/ps", self.ps),
            web.post("/api/show", self.show),
            web.post("/api/chat", self.chat),
            web.post("/api/generate", self.generate),
            *ModelsApi(self.gateway, self.cards.catalog).routes(),
        ]

    # -- facts ----------------------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": API_VERSION, "rkmqtt": __version__})

    @staticmethod
    def _model_entry(c: ModelCard) -> dict[str, Any]:
        return {
            "name": c.name,
            "model": c.name,
            "modified_at": rfc3339(c.modified or None),
            "size": c.size,
            "digest": c.digest,
            "details": c.details(),
        }

    async def tags(self, request: web.Request) -> web.Response:
        cards = await asyncio.to_thread(self.cards.all)  # reads models_dir
        return web.json_response({"models": [self._model_entry(c) for c in cards]})

    async def ps(self, request: web.Request) -> web.Response:
        models = []
        for card in await asyncio.to_thread(self.cards.loaded):
            entry = self._model_entry(card)
            entry.pop("modified_at")
            entry.update({"expires_at": "2999-12-31T23:59:59Z", "size_vram": 0})
            if card.context_length:
                entry["context_length"] = card.context_length
            models.append(entry)
        return web.json_response({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        body = await read_body(request, ShowBody, self.gateway)
        c = check_model(self.gateway, self.cards, body.model or body.name)
        info: dict[str, Any] = {
            "general.architecture": c.family,
            "rkmqtt.engine": c.engine,
            "rkmqtt.n_batch": c.n_batch,
        }
        if c.context_length:
            info[f"{c.family}.context_length"] = c.context_length
        return web.json_response(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": c.details(),
                "model_info": info,
                "capabilities": c.capabilities(),
                "modified_at": rfc3339(c.modified or None),
            }
        )

    # -- generating -----------------------------------------------------------------------------
    def _common(self, body: _Generating) -> dict[str, Any]:
        """The Call fields of the options; refuses what the engines cannot honour."""
        g = self.gateway
        card = check_model(g, self.cards, body.model)
        keep_alive = body.keep_alive
        if keep_alive is not None:
            try:
                parse_duration(keep_alive)
            except ValueError as e:
                raise g.refuse(ErrorCode.INVALID_REQUEST, f"keep_alive {keep_alive!r} {e}") from None
        if body.format not in (None, ""):
            raise g.refuse(
                ErrorCode.INVALID_REQUEST, "format (structured output) is not supported: the engines cannot force it"
            )
        if body.think not in (None, False):
            raise g.refuse(ErrorCode.INVALID_REQUEST, f"{card.name} does not support thinking")
        o = body.options or Options()
        if o.model_extra:
            _LOGGER.debug("Ollama options without effect here: %s", sorted(o.model_extra))
        max_new: int | None = o.num_predict
        if max_new is not None and max_new <= 0:
            max_new = g.settings.max_new_tokens if max_new < 0 else None  # -1/-2: as many as allowed
        stop = (o.stop,) if isinstance(o.stop, str) else tuple(o.stop or ())
        return {
            "max_new_tokens": max_new,
            "temperature": o.temperature,
            "top_k": o.top_k,
            "top_p": o.top_p,
            "repeat_penalty": o.repeat_penalty,
            "seed": o.seed if o.seed is not None and o.seed >= 0 else None,
            "stop": tuple(s for s in stop if s),
            "stream": body.stream,
            "num_ctx": int(o.num_ctx) if o.num_ctx is not None else None,
            "model": card.name.removesuffix(":latest"),
            "keep_alive": keep_alive,
        }

    def _loaded(self, kind: _Kind, model: str) -> web.Response:
        """Ollama's answer to a request with nothing to generate: the model is loaded."""
        out: dict[str, Any] = {"model": shown_name(model), "created_at": rfc3339(), "done": True, "done_reason": "load"}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        return web.json_response(out)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ChatBody, self.gateway)
        try:
            return await self._chat(request, body)
        except ApiError as e:
            if body.stream and self._errors_as_text(request):
                return await self._error_as_text(request, e, body.model)
            raise

    async def _chat(self, request: web.Request, body: ChatBody) -> web.StreamResponse:
        g = self.gateway
        common = self._common(body)
        messages: list[ChatMessage] = []
        for i, m in enumerate(body.messages):
            if m.images:
                raise g.refuse(ErrorCode.INVALID_REQUEST, f"messages.{i}.images: the model reads text only")
            calls = tuple(
                {"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls or ()
            )
            messages.append(ChatMessage(m.role, m.content or "", calls))
        if not messages:
            return self._loaded("chat", common["model"])
        tools = tuple(t.model_dump(exclude_none=True) for t in body.tools or ())
        call = Call(messages=tuple(messages), tools=tools, **common)
        return await self._run(request, call, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        g = self.gateway
        body = await read_body(request, GenerateBody, g)
        common = self._common(body)
        for name in ("suffix", "template"):
            if getattr(body, name):
                raise g.refuse(ErrorCode.INVALID_REQUEST, f"{name} is not supported: the model's chat template is used")
        if body.raw:
            raise g.refuse(ErrorCode.INVALID_REQUEST, "raw is not supported: the model's chat template is used")
        if body.context:
            raise g.refuse(ErrorCode.INVALID_REQUEST, "context is not supported: send the conversation to /api/chat")
        if body.images:
            raise g.refuse(ErrorCode.INVALID_REQUEST, "images: the model reads text only")
        if not body.prompt:
            return self._loaded("generate", common["model"])
        messages = [ChatMessage("system", body.system)] if body.system else []
        messages.append(ChatMessage("user", body.prompt))
        return await self._run(request, Call(messages=tuple(messages), **common), "generate")

    def _errors_as_text(self, request: web.Request) -> bool:
        """Whether a streamed chat's failure is answered as text (setting ollama_stream_errors)."""
        how = self.gateway.settings.ollama_stream_errors
        return how == "text" or (how == "auto" and request.headers.get("User-Agent", "").startswith("ollama-python/"))

    async def _error_as_text(self, request: web.Request, e: ApiError, model: str) -> web.StreamResponse:
        """A 200 stream whose assistant message states the error: Home Assistant's integration raises on
        an HTTP error while reading the stream ("Unexpected error during intent recognition") and on an
        error line, and shows only the assistant's text."""
        _LOGGER.info("HTTP %s %s: %s (answered as text)", request.method, request.path, error_text(e))
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        await resp.write(_line(self._piece("chat", spoken_error(e), model)))
        last = self._piece("chat", "", model)
        last.update({"done": True, "done_reason": "stop"})
        await resp.write(_line(last))
        await resp.write_eof()
        return resp

    async def _run(self, request: web.Request, call: Call, kind: _Kind) -> web.StreamResponse:
        ex = await self.gateway.open(self.gateway.client(request.headers.get("Authorization", "")), call)
        try:
            if call.stream:
                return await self._stream(request, ex, kind, text_errors=self._errors_as_text(request))
            result = await ex.result()
            out = self._head(call.model or "")
            if kind == "chat":
                content, calls = result.text, reply_calls(result.reply)
                message: dict[str, Any] = {"role": "assistant", "content": content.strip() if calls else content}
                if calls:
                    message["tool_calls"] = _tool_calls(calls)
                out["message"] = message
            else:
                out["response"] = result.text
            out.update({"done": True, "done_reason": result.done_reason, **_stats(result.reply)})
            return web.json_response(out, dumps=lambda o: json.dumps(o, ensure_ascii=False))
        finally:
            ex.close()

    def _head(self, model: str) -> dict[str, Any]:
        return {"model": shown_name(model), "created_at": rfc3339()}

    def _piece(self, kind: _Kind, text: str, model: str) -> dict[str, Any]:
        out = self._head(model)
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = False
        return out

    async def _stream(
        self, request: web.Request, ex: Exchange, kind: _Kind, text_errors: bool = False
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": NDJSON, "X-Request-Id": ex.key.id})
        await resp.prepare(request)
        model = ex.call.model or ""
        async for text in ex.texts():
            await resp.write(_line(self._piece(kind, text, model)))
        end = ex.ending()
        if isinstance(end, ApiError) and text_errors and kind == "chat":
            await resp.write(_line(self._piece(kind, "\n\n" + spoken_error(end), model)))
            last = self._piece(kind, "", model)
            last.update({"done": True, "done_reason": "stop"})
            await resp.write(_line(last))
        elif isinstance(end, ApiError):
            await resp.write(_line(error_body(end)))
        else:
            calls: list[ToolCall] = reply_calls(end.reply) if kind == "chat" else []
            if calls:
                piece = self._piece(kind, "", model)
                piece["message"]["tool_calls"] = _tool_calls(calls)
                await resp.write(_line(piece))
            last = self._piece(kind, "", model)
            last.update({"done": True, "done_reason": end.done_reason, **_stats(end.reply)})
            await resp.write(_line(last))
        await resp.write_eof()
        return resp


def error_text(e: ApiError) -> str:
    return f"{e.code.value}: {e.message}" if e.code is not None else e.message


def spoken_error(e: ApiError) -> str:
    """An error as a Home Assistant user reads it in Assist: what went wrong and the code."""
    code = f" ({e.code.value})" if e.code is not None else ""
    return f"Sorry, rkmqtt could not answer: {e.message}{code}."


def error_body(e: ApiError) -> dict[str, Any]:
    """Ollama's error body, `{"error": "..."}`, with the bridge's code beside it."""
    out: dict[str, Any] = {"error": error_text(e)}
    if e.code is not None:
        out["code"] = e.code.value
    return out
