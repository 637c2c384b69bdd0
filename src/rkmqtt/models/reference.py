"""Model references as users write them (any thread; pure): a local path, `hf://owner/repo/file`,
`hf://owner/repo` (the file is picked for the engine), and Ollama's `hf.co/owner/repo[:QUANT]`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rkmqtt.errors import ConfigError

HF_SCHEME = "hf://"
# Ollama's own way of naming a Hugging Face repository (`ollama pull hf.co/owner/repo:Q4_K_M`).
_OLLAMA_HOSTS = ("hf.co/", "huggingface.co/")
# Hugging Face's rule for owner and repository names.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_FILE_PART_RE = re.compile(r"^[^/\\\x00]+$")


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face model repository, and one of its files when the reference names it."""

    owner: str
    repo: str
    file: str | None = None  # path inside the repository; None: picked for the engine
    tag: str | None = None  # Ollama's `:QUANT`, a hint for the pick (e.g. Q4_K_M)

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    def __str__(self) -> str:
        tail = f"/{self.file}" if self.file else ""
        tag = f":{self.tag}" if self.tag and not self.file else ""
        return f"{HF_SCHEME}{self.repo_id}{tail}{tag}"

    def with_file(self, file: str) -> HubRef:
        return HubRef(self.owner, self.repo, file)


Reference = HubRef | Path


def is_hub_reference(text: str) -> bool:
    t = text.strip()
    return t.startswith(HF_SCHEME) or any(t.startswith(h) for h in _OLLAMA_HOSTS)


def parse_reference(text: str) -> Reference:
    """A reference from its text; ConfigError with one line saying what a reference looks like."""
    t = text.strip()
    if not t:
        raise ConfigError("an empty model reference: give hf://owner/repo, hf://owner/repo/file or a file's path")
    if t.startswith(HF_SCHEME):
        return _hub(t[len(HF_SCHEME) :], t, ollama=False)
    for host in _OLLAMA_HOSTS:
        if t.startswith(host):
            return _hub(t[len(host) :], t, ollama=True)
    if "://" in t:
        raise ConfigError(f"model reference {t!r}: unknown scheme; use hf://owner/repo[/file] or a file's path")
    return Path(t).expanduser()


def _hub(rest: str, text: str, ollama: bool) -> HubRef:
    tag = None
    if ollama and ":" in rest.rsplit("/", 1)[-1]:
        rest, tag = rest.rsplit(":", 1)
        tag = None if tag.lower() == "latest" else tag
    parts = rest.strip("/").split("/")
    if len(parts) < 2 or not _NAME_RE.fullmatch(parts[0]) or not _NAME_RE.fullmatch(parts[1]):
        raise ConfigError(
            f"model reference {text!r}: expected hf://owner/repo or hf://owner/repo/file "
            "(owner and repository as Hugging Face names them)"
        )
    file_parts = parts[2:]
    if ollama and file_parts:
        raise ConfigError(f"model reference {text!r}: hf.co/owner/repo[:QUANT] names no file; use hf://owner/repo/file")
    if any(p in ("", ".", "..") or not _FILE_PART_RE.fullmatch(p) for p in file_parts):
        raise ConfigError(f"model reference {text!r}: the file's path inside the repository is not a plain path")
    return HubRef(parts[0], parts[1], "/".join(file_parts) or None, tag)
