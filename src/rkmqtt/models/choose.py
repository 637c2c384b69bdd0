"""Which file of a repository an engine takes (any thread; pure): for numpy a single-file GGUF in a
quantisation it reads (Q8_0, then Q4_K_M, ...); for RKLLM the `.rkllm` built for this SoC and runtime
version where its name says so; and the tokenizer files that come along with an `.rkllm`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rkmqtt.errors import ConfigError

#: Quantisations the numpy engine reads (its tensor types; a *_K_M/_K_S file mixes K types it reads
#: too), best first: Q8_0 is nearly lossless, Q4_K_M the usual small one.
NUMPY_QUANTS = (
    "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_K_S", "Q5_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32",
)  # fmt: skip
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[0-9A-Z]+)*|F16|BF16|F32)(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_SOC_RE = re.compile(r"rk35(88|76|62)s?", re.IGNORECASE)
# A runtime version in a file name: 1.1.4, 1.2.x, v1.2 (not "Qwen2.5" or "1.5B": two parts and no v).
_VERSION_RE = re.compile(r"(?<![\d.])(?:v?(\d)\.(\d{1,2})\.(?:\d{1,2}|x)|v(\d)\.(\d{1,2}))(?![\d])", re.IGNORECASE)
#: Files an `.rkllm` needs beside it: the tokenizer (to count a prompt's tokens) and the chat template
#: (tokenizer_config.json's `chat_template`, or a chat_template file of its own).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """What the file is for: the engine, and on a board its SoC ("RK3588") and runtime ("1.2.1")."""

    engine: str
    soc: str | None = None
    runtime: str | None = None


def engine_of_file(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".gguf"):
        return "numpy"
    if lower.endswith(".rkllm"):
        return "rkllm"
    return None


def quant_of(name: str) -> str | None:
    """The quantisation a GGUF file's name states ("Q4_K_M"), upper-cased, or None."""
    found = _QUANT_RE.findall(name.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


def choose_file(repo: str, files: Sequence[str], target: Target, tag: str | None = None) -> tuple[str, list[str]]:
    """The file to take, and the other candidates (for the log). ConfigError with one line when none fits."""
    if target.engine == "numpy":
        return _choose_gguf(repo, files, tag)
    if target.engine == "rkllm":
        return _choose_rkllm(repo, files, target, tag)
    raise ConfigError(f"engine {target.engine} takes no model file from a repository: give its model another way")


def _choose_gguf(repo: str, files: Sequence[str], tag: str | None) -> tuple[str, list[str]]:
    ggufs = [f for f in files if f.lower().endswith(".gguf") and not _SPLIT_RE.search(f) and "mmproj" not in f.lower()]
    if not ggufs:
        raise ConfigError(f"hf://{repo} holds no single-file .gguf model: name the file, hf://{repo}/FILE")
    wanted = [tag.upper()] if tag else list(NUMPY_QUANTS)
    ranked = sorted(
        (f for f in ggufs if quant_of(f) in wanted), key=lambda f: (wanted.index(quant_of(f) or ""), len(f), f)
    )
    if not ranked:
        have = ", ".join(sorted({quant_of(f) or "?" for f in ggufs}))
        what = f"no {tag.upper()} file" if tag else "no file in a quantisation the numpy engine reads"
        raise ConfigError(
            f"hf://{repo} has {what} (it has {have}; the engine reads {', '.join(NUMPY_QUANTS)}): "
            f"name the file, hf://{repo}/FILE"
        )
    return ranked[0], ranked[1:]


def _soc_family(soc: str) -> str:
    return soc.upper().removesuffix("S")  # RK3588S runs RK3588 models: the same NPU


def _choose_rkllm(repo: str, files: Sequence[str], target: Target, tag: str | None) -> tuple[str, list[str]]:
    models = [f for f in files if f.lower().endswith(".rkllm")]
    if tag:
        models = [f for f in models if tag.lower() in f.lower()]
    if not models:
        raise ConfigError(f"hf://{repo} holds no .rkllm model{f' matching {tag!r}' if tag else ''}: name the file")
    soc = _soc_family(target.soc) if target.soc else None
    runtime = tuple(int(x) for x in target.runtime.split(".")[:2]) if target.runtime else None

    def fits(name: str) -> bool:
        socs = {_soc_family(m.group(0)) for m in _SOC_RE.finditer(name)}
        if soc is not None and socs and soc not in socs:
            return False  # built for another SoC
        versions = _versions(name)
        return runtime is None or not versions or runtime in versions

    def rank(name: str) -> tuple[int, int, str]:
        says_soc = soc is not None and any(_soc_family(m.group(0)) == soc for m in _SOC_RE.finditer(name))
        says_version = runtime is not None and runtime in _versions(name)
        # Names that say this SoC and runtime first; then Rockchip's default quantisation (w8a8).
        return (-(says_soc + says_version), 0 if "w8a8" in name.lower() else 1, name)

    fitting = sorted((f for f in models if fits(f)), key=rank)
    if not fitting:
        wanted = " and ".join(x for x in (soc, f"runtime {target.runtime}" if target.runtime else None) if x)
        raise ConfigError(
            f"hf://{repo} has no .rkllm for {wanted} (it has {', '.join(sorted(models)[:6])}): name the file, "
            f"hf://{repo}/FILE, or convert the model for this board"
        )
    return fitting[0], fitting[1:]


def _versions(name: str) -> set[tuple[int, int]]:
    """The runtime versions (major, minor) a file's name states."""
    found = _VERSION_RE.finditer(name.rsplit("/", 1)[-1])
    return {(int(m.group(1) or m.group(3)), int(m.group(2) or m.group(4))) for m in found}


def _folder(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def tokenizer_files(files: Sequence[str], model_file: str) -> list[str]:
    """The tokenizer and chat template files of a repository for the model `model_file`: those in its
    folder, else those at the top."""
    folder = _folder(model_file)
    for where in dict.fromkeys((folder, "")):
        found = [f for f in files if f.rsplit("/", 1)[-1] in TOKENIZER_FILES and _folder(f) == where]
        if found:
            return sorted(found)
    return []
