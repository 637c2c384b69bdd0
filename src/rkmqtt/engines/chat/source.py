"""Where a model's chat template comes from (main thread, at load; file reads only): the setting
`chat_template` (a built-in name, or a Jinja or tokenizer_config.json file), else the Hugging Face
tokenizer files next to the model; and the tokenizer.json beside it (docs/architecture.md, "Chat")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rkmqtt.engines.chat.template import ChatTemplate
from rkmqtt.errors import ConfigError


@dataclass(frozen=True)
class Builtin:
    file: str
    bos_token: str
    eos_token: str


# Our own templates, rendering the formats these families were trained on (tests/test_chat_templates.py).
BUILTINS: dict[str, Builtin] = {
    "qwen2.5": Builtin("qwen2.5.jinja", "", "<|im_end|>"),
    "qwen3": Builtin("qwen3.jinja", "", "<|im_end|>"),
    "llama3": Builtin("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "deepseek-r1": Builtin("deepseek-r1.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "chatml": Builtin("chatml.jinja", "", "<|im_end|>"),
}
TOKENIZER_FILES = ("chat_template.jinja", "tokenizer_config.json")


def builtin(name: str) -> ChatTemplate:
    b = BUILTINS[name]
    text = resources.files("rkmqtt.engines.chat").joinpath("templates", b.file).read_text(encoding="utf-8")
    return ChatTemplate(text, b.bos_token, b.eos_token, origin=f"built-in {name}")


def from_setting(value: str) -> ChatTemplate:
    """The template the setting `chat_template` names. Raises ConfigError saying what to give."""
    if value in BUILTINS:
        return builtin(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"setting chat_template={value!r}: neither a built-in template ({', '.join(BUILTINS)}) nor a file; "
            "give one of those names, or the path of a Jinja template or of the model's tokenizer_config.json"
        )
    if path.suffix == ".json":
        found = _from_tokenizer_config(path, path.parent)
        if found is None:
            raise ConfigError(f"setting chat_template={value!r}: the file has no chat_template")
        return found
    return ChatTemplate(_read(path), *_special_tokens(path.parent), origin=str(path))


def beside(model: Path) -> ChatTemplate | None:
    """The template of the Hugging Face tokenizer files in the model's folder, if any: chat_template.jinja
    (where newer transformers save it), else tokenizer_config.json's `chat_template`."""
    folder = model.parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(_read(jinja), *_special_tokens(folder), origin=str(jinja))
    config = folder / "tokenizer_config.json"
    return _from_tokenizer_config(config, folder) if config.is_file() else None


def find_template(setting: str | None, model: Path | None) -> ChatTemplate | None:
    """The setting's template, else the one beside the model, else None (the engine's own fallback)."""
    if setting:
        return from_setting(setting)
    return beside(model) if model is not None else None


def find_tokenizer(setting: Path | None, model: Path | None) -> Path | None:
    """The tokenizer.json to count and encode prompts with: the setting's, else the one beside the model."""
    if setting is not None:
        return setting
    if model is not None and (model.parent / "tokenizer.json").is_file():
        return model.parent / "tokenizer.json"
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"chat template {path}: cannot read it ({e}); give a readable UTF-8 file") from e


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read(path))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); give the model's tokenizer_config.json") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a tokenizer_config.json (a JSON object)")
    return data


def _from_tokenizer_config(path: Path, folder: Path) -> ChatTemplate | None:
    value = _load_json(path).get("chat_template")
    if isinstance(value, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    if not isinstance(value, str) or not value.strip():
        return None
    return ChatTemplate(value, *_special_tokens(folder), origin=f"{path} (chat_template)")


def _special_tokens(folder: Path) -> tuple[str, str]:
    """bos_token and eos_token of the folder's tokenizer_config.json ("" when it has none)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return "", ""
    data = _load_json(path)

    def text(v: Any) -> str:
        if isinstance(v, dict):
            v = v.get("content")
        return v if isinstance(v, str) else ""

    return text(data.get("bos_token")), text(data.get("eos_token"))
