"""A conversation rendered with the GGUF's own Jinja2 chat template, tools included where the
template reads them, or ChatML without one (scheduler thread, in `prepare`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rkmqtt.engines.base import ChatMessage
from rkmqtt.errors import EngineError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        import jinja2.meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = source or CHATML_TEMPLATE
        self.builtin = source is None
        try:
            self._template = env.from_string(self.source)
            # A template that reads `tools` renders tool definitions (Qwen2.5, Llama 3.1, Hermes...);
            # SmolLM2's does not, and tools given to it would be silently dropped.
            self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(self.source))
        except jinja2.TemplateError as e:
            raise EngineError(f"the model's chat template does not compile ({e})") from e
        self._bos = bos_token
        self._eos = eos_token

    def render(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] = (),
    ) -> str:
        """The prompt text. `tools` are passed only when given (templates test `if tools`)."""
        import jinja2

        data: list[dict[str, Any]] = []
        for m in messages:
            item: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                item["tool_calls"] = list(m.tool_calls)
            data.append(item)
        extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
        try:
            return str(
                self._template.render(
                    messages=data,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._bos,
                    eos_token=self._eos,
                    **extra,
                )
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template refused the conversation: {e}") from e
