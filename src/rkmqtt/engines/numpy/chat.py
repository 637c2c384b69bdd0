"""Render a conversation with the GGUF's chat template (scheduler thread, in `prepare`).

The template is the file's `tokenizer.chat_template`, a Jinja2 template as Hugging Face writes
them, rendered in a sandbox with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
A file without a template gets ChatML (`<|im_start|>role ... <|im_end|>`).
"""

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
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = source or CHATML_TEMPLATE
        self.builtin = source is None
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise EngineError(f"the model's chat template does not compile ({e})") from e
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        import jinja2

        data: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return str(
                self._template.render(
                    messages=data,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._bos,
                    eos_token=self._eos,
                )
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template refused the conversation: {e}") from e
