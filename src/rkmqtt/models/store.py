"""The models under `models_dir` (the thread that pulls, lists or deletes; a lock file per repository
keeps two pullers apart): `hf/<owner>/<repo>/<file>` as pulled, with a record of what each file's
checksum was; a file is checked (LFS: sha256, else git's oid) before it is moved there from
`.partial/`, so nothing half-downloaded or corrupt is ever taken for a model."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkmqtt.errors import PullError
from rkmqtt.models.choose import engine_of_file
from rkmqtt.models.hub import RemoteFile
from rkmqtt.models.reference import HubRef

_LOGGER = logging.getLogger(__name__)

_MANIFEST = ".rkmqtt.json"
_HASH_BLOCK = 4 * 2**20


@dataclass(frozen=True)
class LocalModel:
    """A model file under `models_dir` (or a path a setting names)."""

    name: str  # what requests and `rkmqtt models` call it: the file's stem
    path: Path
    engine: str  # numpy (.gguf) or rkllm (.rkllm)
    size: int
    source: str  # hf://owner/repo/file, or "local" for a file put there by hand
    sha256: str | None = None
    modified: float = 0.0


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    # -- places -----------------------------------------------------------------------------
    def repo_dir(self, ref: HubRef) -> Path:
        return self.root / "hf" / ref.owner / ref.repo

    def staging_dir(self, ref: HubRef) -> Path:
        return self.root / ".partial" / ref.owner / ref.repo

    @contextlib.contextmanager
    def lock(self, ref: HubRef) -> Iterator[None]:
        """One puller of a repository at a time (another process's too): the second waits, then finds
        the files in place."""
        staging = self.staging_dir(ref)
        try:
            staging.mkdir(parents=True, exist_ok=True)
            fd = os.open(staging / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise PullError(f"models_dir {self.root}: cannot write there ({e.strerror}): make it writable") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- what was pulled ----------------------------------------------------------------------
    def _manifest(self, ref: HubRef) -> dict[str, Any]:
        try:
            data = json.loads((self.repo_dir(ref) / _MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"files": {}, "choices": {}}
        return data if isinstance(data, dict) else {"files": {}, "choices": {}}

    def _write_manifest(self, ref: HubRef, data: dict[str, Any]) -> None:
        path = self.repo_dir(ref) / _MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    def have(self, ref: HubRef, path: str, remote: RemoteFile | None = None) -> Path | None:
        """The local copy of `path` if it was pulled whole (and is the remote file, when given)."""
        entry = self._manifest(ref).get("files", {}).get(path)
        local = self.repo_dir(ref) / path
        if not isinstance(entry, dict) or not local.is_file() or local.stat().st_size != entry.get("size"):
            return None
        if remote is not None and (entry.get("sha256"), entry.get("git_oid")) != (remote.sha256, remote.git_oid):
            return None
        return local

    def chosen(self, ref: HubRef, engine: str) -> str | None:
        """The file picked from `ref`'s repository for `engine` at the last pull."""
        choice = self._manifest(ref).get("choices", {}).get(f"{engine}:{ref.tag or ''}")
        return choice if isinstance(choice, str) else None

    def record_choice(self, ref: HubRef, engine: str, path: str) -> None:
        data = self._manifest(ref)
        data.setdefault("choices", {})[f"{engine}:{ref.tag or ''}"] = path
        self._write_manifest(ref, data)

    def take(
        self, ref: HubRef, remote: RemoteFile, staged: Path, commit: str, on_bytes: Callable[[int, int | None], None]
    ) -> Path:
        """Check `staged` against the repository's checksum, then move it into place and record it.
        A file that does not match is deleted and refused (PullError)."""
        size = staged.stat().st_size
        digest = _digest(staged, remote, on_bytes)
        expected = remote.sha256 or remote.git_oid
        if expected is not None and digest != expected:
            staged.unlink(missing_ok=True)
            raise PullError(
                f"hf://{ref.repo_id}/{remote.path}: checksum mismatch (got {digest[:12]}…, the repository says "
                f"{expected[:12]}…): the download was corrupted; it was deleted: pull it again"
            )
        dest = self.repo_dir(ref) / remote.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        data = self._manifest(ref)
        data.setdefault("files", {})[remote.path] = {
            "size": size,
            "sha256": remote.sha256,
            "git_oid": remote.git_oid,
            "commit": commit,
            "pulled": round(time.time(), 3),
        }
        self._write_manifest(ref, data)
        return dest

    # -- listing and deleting -----------------------------------------------------------------
    def list(self) -> list[LocalModel]:
        """Every model file under models_dir (.gguf, .rkllm), pulled or put there by hand."""
        out: list[LocalModel] = []
        if not self.root.is_dir():
            return out
        manifests: dict[Path, dict[str, Any]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                engine = engine_of_file(fname)
                if engine is None or fname.startswith("."):
                    continue
                path = Path(dirpath) / fname
                out.append(self._describe(path, engine, manifests))
        return out

    def _describe(self, path: Path, engine: str, manifests: dict[Path, dict[str, Any]]) -> LocalModel:
        st = path.stat()
        source, sha = "local", None
        rel = path.relative_to(self.root).parts
        if len(rel) >= 4 and rel[0] == "hf":
            ref = HubRef(rel[1], rel[2])
            repo_dir = self.repo_dir(ref)
            if repo_dir not in manifests:
                manifests[repo_dir] = self._manifest(ref)
            in_repo = "/".join(rel[3:])
            entry = manifests[repo_dir].get("files", {}).get(in_repo)
            if isinstance(entry, dict):
                source, sha = str(ref.with_file(in_repo)), entry.get("sha256")
        return LocalModel(path.stem, path, engine, st.st_size, source, sha, st.st_mtime)

    def find(self, name: str) -> LocalModel | None:
        """The local model a name means: its stem, its file name, or the hf:// reference it came from."""
        wanted = name.strip()
        for m in self.list():
            if wanted in (m.name, m.path.name, m.source) or wanted.lower() == m.name.lower():
                return m
        return None

    def delete(self, model: LocalModel) -> None:
        """Remove a model's file; its repository's folder goes with its last model."""
        model.path.unlink(missing_ok=True)
        rel = model.path.relative_to(self.root).parts
        if len(rel) >= 4 and rel[0] == "hf":
            ref = HubRef(rel[1], rel[2])
            data = self._manifest(ref)
            data.get("files", {}).pop("/".join(rel[3:]), None)
            data["choices"] = {k: v for k, v in data.get("choices", {}).items() if v != "/".join(rel[3:])}
            repo_dir = self.repo_dir(ref)
            if not any(engine_of_file(p.name) for p in repo_dir.rglob("*") if p.is_file()):
                shutil.rmtree(repo_dir, ignore_errors=True)
                shutil.rmtree(self.staging_dir(ref), ignore_errors=True)
            else:
                self._write_manifest(ref, data)
        _LOGGER.info("deleted model %s (%s)", model.name, model.path)


def _digest(path: Path, remote: RemoteFile, on_bytes: Callable[[int, int | None], None]) -> str:
    """sha256 for an LFS file, git's blob oid (sha1 of a header and the bytes) for the others."""
    size = path.stat().st_size
    h = hashlib.sha256() if remote.sha256 is not None or remote.git_oid is None else hashlib.sha1()
    if h.name == "sha1":
        h.update(b"blob %d\0" % size)
    done = 0
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            done += len(block)
            on_bytes(done, size)
    return h.hexdigest()
