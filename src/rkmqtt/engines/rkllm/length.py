"""How many tokens the runtime will see for a prompt, counted with `rkllm_tokenizer` or bounded at
one per byte, so that an over-long one is refused `too_long` before admission (scheduler thread;
docs/rkllm-runtime.md, "Prompt length")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkmqtt.errors import ConfigError

TEMPLATE_ALLOWANCE = 64


@dataclass(frozen=True)
class Measure:
    tokens: int  # the count, or the bound, template included
    exact: bool  # True when counted with the model's tokenizer
    allowance: int  # tokens of `tokens` reserved for the built-in template (0 with a configured one)

    def describe(self) -> str:
        """How `tokens` was found, for a too_long message."""
        how = (
            "counted with the model's tokenizer"
            if self.exact
            else "at one per UTF-8 byte; put the model's tokenizer.json beside it, or set rkllm_tokenizer, to count"
        )
        extra = f", {self.allowance} of them for the built-in chat template" if self.allowance else ""
        return f"{how}{extra}"


class PromptLength:
    """Counts (with a tokenizer file) or bounds (without) the tokens of a prompt and its template."""

    def __init__(self, tokenizer_file: Path | None, template: tuple[str, str, str] | None) -> None:
        self._tokenizer: Any = _load_tokenizer(tokenizer_file) if tokenizer_file is not None else None
        self.tokenizer_file = tokenizer_file
        self._allowance = TEMPLATE_ALLOWANCE if template is None else 0
        self._overhead = self._allowance if template is None else sum(self._count(part) for part in template)

    @property
    def exact(self) -> bool:
        return self._tokenizer is not None

    def describe(self) -> str:
        """How prompts are counted, for a too_long message."""
        return Measure(0, self.exact, self._allowance).describe()

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (special tokens in it, such as <|im_start|>, as one id each)."""
        assert self._tokenizer is not None, "encode without a tokenizer"
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def measure(self, prompt: str) -> Measure:
        return Measure(
            tokens=self._count(prompt) + self._overhead, exact=self._tokenizer is not None, allowance=self._allowance
        )

    def _count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.encode("utf-8")) + 1
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ConfigError(f"setting rkllm_tokenizer={str(path)!r}: no such file; give the model's tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclasses
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"setting rkllm_tokenizer={str(path)!r}: not a Hugging Face tokenizer.json ({first}); "
            "give the tokenizer.json of the model the .rkllm file was converted from"
        ) from e
