"""A `Generation` as the keyword arguments of a streamed chat-completions request: messages, tools
and sampling, top_k and the repeat penalty as extra fields (the engine's event-loop thread; pure)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rkmqtt.engines.base import ChatMessage, Generation


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation in the API's form. A tool turn without the id of the call it answers (a
    client of the Ollama API, an MQTT device) gets the id of the oldest unanswered call before it:
    servers that check them (vLLM with some templates) need one."""
    out: list[dict[str, Any]] = []
    unanswered: list[str] = []
    for i, m in enumerate(messages):
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            calls = [_call(c, f"call_{i}_{j}") for j, c in enumerate(m.tool_calls)]
            unanswered = [c["id"] for c in calls]
            item["tool_calls"] = calls
        elif m.role == "tool":
            cid = m.tool_call_id or (unanswered[0] if unanswered else None)
            if cid is not None:
                item["tool_call_id"] = cid
                if cid in unanswered:
                    unanswered.remove(cid)
        out.append(item)
    return out


def _call(call: dict[str, Any], default_id: str) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments", {})
    return {
        "id": call.get("id") or default_id,
        "type": "function",
        "function": {
            "name": fn.get("name", ""),
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
        },
    }


def request_body(gen: Generation, model: str) -> dict[str, Any]:
    """Keyword arguments of `chat.completions.create` for `gen`, streamed, with usage at the end."""
    s = gen.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": chat_messages(gen.messages),
        "max_tokens": gen.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if gen.tools:
        body["tools"] = list(gen.tools)
    extra: dict[str, Any] = {}
    if s.top_k > 0:
        extra["top_k"] = s.top_k
    if s.repeat_penalty != 1.0:
        extra["repeat_penalty"] = s.repeat_penalty
        extra["repetition_penalty"] = s.repeat_penalty
    if extra:
        body["extra_body"] = extra
    return body
