"""A reference made into a local model file (the thread that pulls: the CLI's main thread, a bridge's
loader thread, the HTTP API's pull worker): a path as it is, a Hugging Face file or repository pulled
into `models_dir` when it is not there whole already, with progress reported as it goes."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from rkmqtt.errors import ConfigError, PullError
from rkmqtt.models.choose import Target, choose_file, engine_of_file, tokenizer_files
from rkmqtt.models.hub import Hub, Listing, RemoteFile, disk_full_message
from rkmqtt.models.reference import HubRef, Reference, parse_reference
from rkmqtt.models.store import LocalModel, ModelStore

_LOGGER = logging.getLogger(__name__)

# Room left free beside a download (the manifest, logs, the journal).
_DISK_MARGIN = 32 * 2**20

Status = Literal["resolving", "downloading", "verifying", "done", "failed"]


@dataclass(frozen=True)
class PullProgress:
    """Where a pull stands: one file's bytes while it downloads or is checked."""

    reference: str
    status: Status
    file: str = ""
    completed: int = 0
    total: int | None = None
    digest: str | None = None  # the file's sha256, when the repository gives one
    message: str = ""  # a failure's one line

    @property
    def percent(self) -> float | None:
        return None if not self.total else min(100.0, 100.0 * self.completed / self.total)


ProgressSink = Callable[[PullProgress], None]


def no_progress(p: PullProgress) -> None:
    pass


class LogProgress:
    """Progress as log lines: one when a file starts, then every `step` percent, and at the end."""

    def __init__(self, step: float = 5.0, logger: logging.Logger = _LOGGER) -> None:
        self.step = step
        self.logger = logger
        self._last: tuple[str, str, float] | None = None

    def __call__(self, p: PullProgress) -> None:
        pct = p.percent
        mark = (p.file, p.status, -1.0 if pct is None else pct // self.step)
        if mark == self._last and p.status not in ("done", "failed"):
            return
        self._last = mark
        if p.status == "failed":
            self.logger.warning("pull failed: %s", p.message)
        elif p.status == "done":
            self.logger.info("pull %s: done", p.reference)
        elif p.status == "resolving":
            self.logger.info("pull %s: looking it up", p.reference)
        elif pct is not None:
            self.logger.info(
                "pull %s: %s %s %.0f%% (%.1f of %.1f MB)",
                p.reference, p.status, p.file, pct, p.completed / 1e6, (p.total or 0) / 1e6,
            )  # fmt: skip


class Puller:
    """Pulls references for one engine (and, on a board, its SoC and runtime version) into a store."""

    def __init__(self, store: ModelStore, target: Target, hub: Callable[[], Hub] = Hub) -> None:
        self.store = store
        self.target = target
        self._hub = hub

    def local(self, ref: Reference) -> LocalModel | None:
        """The model without asking the network: a path that exists, or what an earlier pull left whole."""
        if isinstance(ref, Path):
            return _from_path(ref) if ref.is_file() else None
        path = ref.file or self.store.chosen(ref, self.target.engine)
        have = self.store.have(ref, path) if path else None
        return None if have is None else self._described(have)

    def pull(
        self, reference: str | Reference, progress: ProgressSink = no_progress, base: str | None = None
    ) -> LocalModel:
        """Make the reference a local model file, downloading what is missing or changed. `base`: a
        repository whose tokenizer files go beside an .rkllm whose own repository has none."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        shown = str(ref)
        try:
            if isinstance(ref, Path):
                if not ref.is_file():
                    raise ConfigError(
                        f"model {ref}: no such file: give the path of a model file, or hf://owner/repo[/file]"
                    )
                model = _from_path(ref)
            else:
                model = self._pull_hub(ref, shown, progress, base)
        except (PullError, ConfigError) as e:
            progress(PullProgress(shown, "failed", message=str(e)))
            raise
        progress(PullProgress(shown, "done", model.path.name, model.size, model.size, model.sha256))
        return model

    def _pull_hub(self, ref: HubRef, shown: str, progress: ProgressSink, base: str | None) -> LocalModel:
        progress(PullProgress(shown, "resolving"))
        hub = self._hub()
        with self.store.lock(ref):
            listing = hub.listing(ref.repo_id)
            path = self._pick(ref, listing)
            wanted: list[tuple[HubRef, Listing, RemoteFile, str]] = [(ref, listing, listing.files[path], path)]
            if self.target.engine == "rkllm":
                wanted += self._tokenizer(hub, ref, listing, path, base)
            missing = [w for w in wanted if self.store.have(ref, w[3], w[2]) is None]
            self._check_space(ref, [w[2] for w in missing])
            for source, src_listing, remote, dest in missing:
                self._fetch(hub, ref, source, src_listing.commit, remote, dest, shown, progress)
            if ref.file is None:
                self.store.record_choice(ref, self.target.engine, path)
            have = self.store.have(ref, path)
            assert have is not None
        return self._described(have)

    def _pick(self, ref: HubRef, listing: Listing) -> str:
        if ref.file is not None:
            if ref.file not in listing.files:
                models = sorted(f for f in listing.files if engine_of_file(f))
                there = f" (its model files: {', '.join(models[:8])})" if models else " (it holds no model file)"
                raise PullError(f"{ref}: no file {ref.file!r} in {ref.repo_id}{there}: name a file that is there")
            return ref.file
        path, others = choose_file(ref.repo_id, list(listing.files), self.target, ref.tag)
        also = f" (also: {', '.join(others[:4])})" if others else ""
        _LOGGER.info("%s: %s for engine %s%s", ref, path, self.target.engine, also)
        return path

    def _tokenizer(
        self, hub: Hub, ref: HubRef, listing: Listing, path: str, base: str | None
    ) -> list[tuple[HubRef, Listing, RemoteFile, str]]:
        """The tokenizer and chat template files for an .rkllm, to go beside it: its own repository's,
        else those of `base` (or of the base model its model card names)."""
        folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
        own = tokenizer_files(list(listing.files), path)
        if own:
            return [(ref, listing, listing.files[f], folder + f.rsplit("/", 1)[-1]) for f in own]
        base_id = base or listing.base_model
        if not base_id:
            _LOGGER.warning(
                "%s has no tokenizer files and its model card names no base model: prompts are bounded, not counted; "
                "name the base repository (tokenizer: hf://owner/repo)",
                ref,
            )
            return []
        base_ref = parse_reference(base_id if "://" in base_id else f"hf://{base_id}")
        if not isinstance(base_ref, HubRef):
            raise ConfigError(f"the tokenizer's repository {base_id!r} must be hf://owner/repo")
        base_listing = hub.listing(base_ref.repo_id)
        files = tokenizer_files(list(base_listing.files), "")
        if not files:
            _LOGGER.warning("%s: %s has no tokenizer files either", ref, base_ref)
        return [(base_ref, base_listing, base_listing.files[f], folder + f.rsplit("/", 1)[-1]) for f in files]

    def _check_space(self, ref: HubRef, files: list[RemoteFile]) -> None:
        needed = sum(f.size or 0 for f in files)
        if not needed:
            return
        where = self.store.root
        where.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(where).free
        if free < needed + _DISK_MARGIN:
            raise PullError(f"{ref}: " + disk_full_message(where, needed + _DISK_MARGIN, free))

    def _fetch(
        self, hub: Hub, ref: HubRef, source: HubRef, commit: str, remote: RemoteFile, dest: str, shown: str,
        progress: ProgressSink,
    ) -> None:  # fmt: skip
        staging = self.store.staging_dir(ref)
        base = PullProgress(shown, "downloading", dest, 0, remote.size, remote.sha256)
        progress(base)
        t0 = time.monotonic()

        def downloading(done: int, total: int | None) -> None:
            progress(replace(base, completed=done, total=total or remote.size))

        def verifying(done: int, total: int | None) -> None:
            progress(replace(base, status="verifying", completed=done, total=total))

        staged = hub.download(source.repo_id, commit, remote.path, staging, downloading)
        _LOGGER.info("%s: %s downloaded in %.1f s; checking it", shown, remote.path, time.monotonic() - t0)
        self.store.take(ref, replace(remote, path=dest), staged, commit, verifying)

    def _described(self, path: Path) -> LocalModel:
        return next((m for m in self.store.list() if m.path == path), None) or _from_path(path)


def _from_path(path: Path) -> LocalModel:
    st = path.stat()
    return LocalModel(path.stem, path, engine_of_file(path.name) or "?", st.st_size, str(path), None, st.st_mtime)
