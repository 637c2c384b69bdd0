"""Hugging Face through `huggingface_hub` (the thread that pulls: the CLI's main thread, a bridge's
loader thread, or the HTTP API's pull worker): a repository's files with their sizes and checksums,
one file downloaded into a staging folder, and every failure as one line naming the fix. What the
library does and does not check: docs/architecture.md, "Models"."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rkmqtt.errors import PullError

_LOGGER = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository at one commit: its size and what checks it (LFS: sha256; else git's oid)."""

    path: str
    size: int | None
    sha256: str | None
    git_oid: str | None


@dataclass(frozen=True)
class Listing:
    repo_id: str
    commit: str
    files: dict[str, RemoteFile]
    base_model: str | None  # the model card's `base_model`, when it names one repository


def endpoint() -> str:
    """The Hub's address: HF_ENDPOINT, read at each call (tests and users set it at run time)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


class Hub:
    """One Hugging Face endpoint (HF_ENDPOINT, else huggingface.co)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = (url or endpoint()).rstrip("/")

    def listing(self, repo_id: str) -> Listing:
        from huggingface_hub import HfApi

        try:
            info = HfApi(endpoint=self.url).model_info(repo_id, files_metadata=True)
        except Exception as e:
            raise PullError(explain(e, self.url, repo_id)) from e
        files: dict[str, RemoteFile] = {}
        for s in info.siblings or ():
            lfs = s.lfs
            files[s.rfilename] = RemoteFile(
                s.rfilename,
                s.size,
                str(lfs["sha256"]) if lfs is not None else None,
                None if lfs is not None else s.blob_id,
            )
        base = getattr(info.card_data, "base_model", None) if info.card_data is not None else None
        if isinstance(base, list):
            base = base[0] if len(base) == 1 else None
        commit = info.sha or "main"
        return Listing(repo_id, commit, files, base if isinstance(base, str) else None)

    def download(
        self, repo_id: str, commit: str, path: str, staging: Path, on_bytes: Callable[[int, int | None], None]
    ) -> Path:
        """The file at `commit`, downloaded under `staging` (huggingface_hub's local folder: it writes
        to a temporary file there and moves it into place once whole). `on_bytes(done, total)` as it comes."""
        from huggingface_hub import hf_hub_download

        try:
            got = hf_hub_download(
                repo_id,
                path,
                revision=commit,
                local_dir=staging,
                endpoint=self.url,
                tqdm_class=cast(Any, _meter(on_bytes)),
            )
        except Exception as e:
            raise PullError(explain(e, self.url, repo_id, path)) from e
        return Path(got)


def _meter(on_bytes: Callable[[int, int | None], None]) -> type:
    """A stand-in for the tqdm class huggingface_hub drives: it reports the bytes instead of drawing."""

    class Meter:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            self.total = total
            self.n = initial
            on_bytes(self.n, self.total)

        def update(self, n: int | float = 1) -> None:
            self.n += int(n)
            on_bytes(self.n, self.total)

        def close(self) -> None:
            pass

        def __enter__(self) -> Meter:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    return Meter


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def disk_full_message(where: Path, needed: int | None = None, free: int | None = None) -> str:
    amount = f"{needed / 1e6:.0f} MB are needed, {free / 1e6:.0f} MB free" if needed and free is not None else "full"
    return (
        f"not enough disk space in {where} ({amount}): free some space, or set models_dir to a folder on a bigger disk"
    )


def explain(e: BaseException, url: str, repo_id: str, path: str | None = None) -> str:
    """One line for a failure of huggingface_hub: what went wrong and how to fix it."""
    from huggingface_hub import errors as hf

    what = f"hf://{repo_id}/{path}" if path else f"hf://{repo_id}"
    chain = _chain(e)
    if isinstance(e, PullError):
        return str(e)
    for x in chain:
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return f"{what}: " + disk_full_message(Path(x.filename or "models_dir"))
    if isinstance(e, hf.OfflineModeIsEnabled) or any(isinstance(x, hf.OfflineModeIsEnabled) for x in chain):
        return f"{what}: HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to pull"
    if isinstance(e, hf.GatedRepoError) or _status(e) in (401, 403):
        return (
            f"{what}: {url} refuses access (gated or private repository): accept its terms on the Hub and set "
            "HF_TOKEN to a token of yours"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return f"{what}: no repository {repo_id} on {url}: check the owner and name (a private one needs HF_TOKEN)"
    if isinstance(e, hf.RevisionNotFoundError):
        return f"{what}: the repository has no such revision: check the name"
    if isinstance(e, hf.LocalEntryNotFoundError) or any(_is_network(x) for x in chain):
        return (
            f"{what}: cannot reach {url} ({_short(chain)}): check the network, or HF_ENDPOINT and the proxy "
            "variables (HTTPS_PROXY)"
        )
    if isinstance(e, hf.EntryNotFoundError):
        return f"{what}: no such file in {repo_id}: see its files on the Hub and name one that is there"
    if isinstance(e, hf.HfHubHTTPError):
        return f"{what}: {url} answered HTTP {_status(e) or '?'}: try again later"
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return f"{what}: the download ended short (the connection broke too often): pull it again"
    if isinstance(e, OSError):
        return f"{what}: {e.strerror or e}: check that models_dir is writable"
    return f"{what}: {type(e).__name__}: {e}"


def _is_network(x: BaseException) -> bool:
    name = type(x).__name__
    if any(part in name for part in ("ConnectError", "ConnectTimeout", "Timeout", "ConnectionError", "ProxyError")):
        return True
    return isinstance(x, OSError) and x.errno in (
        errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.ECONNRESET,
    )  # fmt: skip


def _short(chain: list[BaseException]) -> str:
    last = chain[-1]
    text = str(last).splitlines()[0] if str(last) else type(last).__name__
    return text[:120]
