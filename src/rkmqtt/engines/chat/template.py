"""`ChatTemplate`: a Hugging Face style chat template rendered in a Jinja2 sandbox with the variables
and helpers such templates expect (scheduler thread, in an engine's `prepare`; pure)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from rkmqtt.engines.base import ChatMessage
from rkmqtt.errors import EngineError


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # transformers' `tojson`, not Jinja's (which escapes <, > and & for HTML): the models were
    # trained on plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=bool(kw.get("sort_keys")))


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


class ChatTemplate:
    """One template. `takes_tools`: it reads `tools` (tool definitions reach the model)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "") -> None:
        import jinja2
        import jinja2.meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self.source = source
        self.origin = origin  # where it came from, in words (`rkmqtt check`, the engine's info)
        try:
            self._template = env.from_string(source)
            # A template that reads `tools` renders tool definitions (Qwen2.5, Llama 3.1...); SmolLM2's
            # does not, and tools given to it would be silently dropped.
            self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateError as e:
            raise EngineError(f"the chat template ({origin or 'given'}) does not compile: {e}") from e
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Llama 3's format: a call is the whole answer, {"name": ..., "parameters": {...}}, not a tagged block.
        self.bare_json_calls = "<tool_call>" not in source and '"parameters": ' in source

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = (), add_generation_prompt: bool = True
    ) -> str:
        """The prompt text; `tools` are passed only when given (templates test `if tools`). Thinking is
        off (`enable_thinking` false): the bridge refuses requests that ask for it. Raises ValueError
        when the template refuses the conversation."""
        import jinja2

        data: list[dict[str, Any]] = []
        for m in messages:
            item: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                item["tool_calls"] = list(m.tool_calls)
            if m.tool_call_id is not None:
                item["tool_call_id"] = m.tool_call_id
            data.append(item)
        extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
        try:
            return str(
                self._template.render(
                    messages=data,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                    enable_thinking=False,
                    **extra,
                )
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template refused the conversation: {e}") from e
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:  # a template's own bug
            raise ValueError(f"the model's chat template failed on the conversation ({type(e).__name__}: {e})") from e
