"""The OpenAI API (the HTTP event-loop thread): `/v1/models` and `/v1/chat/completions`, as
server-sent events or not, with `usage`. What it accepts, ignores and refuses: docs/architecture.md,
"The HTTP API"."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from rkmqtt.engines.base import ChatMessage
from rkmqtt.protocol import ErrorCode, OkReply

from .common import Cards, ModelCard, ToolSpec, check_model, read_body, shown_name
from .exchange import ApiError, Call, Exchange, Gateway, Result
from .textscan import ToolCall, reply_calls

_Stop = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields of newer API versions


class ContentPart(_Body):
    type: str
    text: str | None = None


class CallFunction(_Body):
    name: str
    arguments: str = "{}"


class MessageCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str


class ChatCompletionBody(_Body):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=0, le=100_000)] = None
    repeat_penalty: Annotated[float | None, Field(ge=0.1, le=10.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    seed: Annotated[int | None, Field(ge=0, le=2**32 - 1)] = None
    stop: _Stop | list[_Stop] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None


def _event(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _usage(reply: OkReply) -> dict[str, int]:
    p, c = reply.usage.prompt_tokens or 0, reply.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _calls(calls: list[ToolCall], rid: str, stream: bool) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        item: dict[str, Any] = {
            "id": c.id or f"call_{rid}_{i}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        out.append({"index": i, **item} if stream else item)
    return out


def _finish_reason(result: Result, calls: list[ToolCall]) -> str:
    return "tool_calls" if calls else result.done_reason


class OpenAiApi:
    def __init__(self, gateway: Gateway, cards: Cards) -> None:
        self.gateway = gateway
        self.cards = cards

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
            web.post("/v1/chat/completions", self.chat),
        ]

    @staticmethod
    def _model_object(card: ModelCard) -> dict[str, Any]:
        return {"id": card.name, "object": "model", "created": int(card.modified), "owned_by": "rkmqtt"}

    async def models(self, request: web.Request) -> web.Response:
        cards = await asyncio.to_thread(self.cards.all)  # reads models_dir
        return web.json_response({"object": "list", "data": [self._model_object(c) for c in cards]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            card = await asyncio.to_thread(self.cards.find, name)
        except LookupError as e:
            raise ApiError(404, str(e.args[0])) from None
        return web.json_response(self._model_object(card))

    # -- chat -----------------------------------------------------------------------------------
    def _call(self, body: ChatCompletionBody) -> Call:
        g = self.gateway

        def bad(message: str) -> ApiError:
            return g.refuse(ErrorCode.INVALID_REQUEST, message)

        card = check_model(g, self.cards, body.model)
        if body.n != 1:
            raise bad("n: only 1 choice per request")
        if body.logprobs:
            raise bad("logprobs are not supported")
        if body.response_format is not None and body.response_format.type != "text":
            raise bad("response_format: only text; the engines cannot force JSON")
        choice = body.tool_choice
        if choice not in (None, "auto", "none"):
            raise bad("tool_choice: only auto or none; the engines cannot force a tool")
        messages: list[ChatMessage] = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise bad(f"messages.{i}.content: only text parts; the model reads text only")
                text = "\n".join(p.text or "" for p in m.content)
            else:
                text = m.content or ""
            calls: list[dict[str, Any]] = []
            for j, c in enumerate(m.tool_calls or ()):
                try:
                    args = json.loads(c.function.arguments or "{}")
                except ValueError:
                    raise bad(f"messages.{i}.tool_calls.{j}.function.arguments: not JSON") from None
                call: dict[str, Any] = {"type": "function", "function": {"name": c.function.name, "arguments": args}}
                if c.id:
                    call["id"] = c.id
                calls.append(call)
            role: Literal["system", "user", "assistant", "tool"] = "system" if m.role == "developer" else m.role
            messages.append(ChatMessage(role, text, tuple(calls), m.tool_call_id))
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        tools = () if choice == "none" else tuple(t.model_dump(exclude_none=True) for t in body.tools or ())
        return Call(
            messages=tuple(messages),
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repeat_penalty=body.repeat_penalty,
            seed=body.seed,
            stop=stop,
            tools=tools,
            stream=body.stream,
            model=card.name.removesuffix(":latest"),
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, ChatCompletionBody, self.gateway)
        call = self._call(body)
        ex = await self.gateway.open(self.gateway.client(request.headers.get("Authorization", "")), call)
        try:
            if call.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                return await self._stream(request, ex, usage)
            result = await ex.result()
            content, calls = result.text, reply_calls(result.reply)
            message: dict[str, Any] = {"role": "assistant", "content": (content.strip() or None) if calls else content}
            if calls:
                message["tool_calls"] = _calls(calls, ex.key.id, stream=False)
            out = {
                **self._head(ex),
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": message, "finish_reason": _finish_reason(result, calls), "logprobs": None}
                ],
                "usage": _usage(result.reply),
            }
            return web.json_response(out, dumps=lambda o: json.dumps(o, ensure_ascii=False))
        finally:
            ex.close()

    def _head(self, ex: Exchange) -> dict[str, Any]:
        return {"id": f"chatcmpl-{ex.key.id}", "created": int(ex.created), "model": shown_name(ex.call.model or "")}

    def _chunk(self, ex: Exchange, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **self._head(ex),
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    async def _stream(self, request: web.Request, ex: Exchange, usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": ex.key.id}
        )
        await resp.prepare(request)
        await resp.write(_event(self._chunk(ex, {"role": "assistant", "content": ""})))
        async for text in ex.texts():
            await resp.write(_event(self._chunk(ex, {"content": text})))
        end = ex.ending()
        if isinstance(end, ApiError):
            await resp.write(_event(error_body(end)))
        else:
            calls: list[ToolCall] = reply_calls(end.reply)
            if calls:
                await resp.write(_event(self._chunk(ex, {"tool_calls": _calls(calls, ex.key.id, stream=True)})))
            await resp.write(_event(self._chunk(ex, {}, _finish_reason(end, calls))))
            if usage:
                last = {**self._head(ex), "object": "chat.completion.chunk", "choices": [], "usage": _usage(end.reply)}
                await resp.write(_event(last))
        await resp.write(_event("[DONE]"))
        await resp.write_eof()
        return resp


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(e: ApiError) -> dict[str, Any]:
    """OpenAI's error body, with the bridge's error code as `code`."""
    return {
        "error": {
            "message": e.message,
            "type": _TYPES.get(e.status, "server_error"),
            "param": None,
            "code": e.code.value if e.code is not None else None,
        }
    }
