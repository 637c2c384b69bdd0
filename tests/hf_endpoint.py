"""A Hugging Face–compatible endpoint on 127.0.0.1 for the tests (HF_ENDPOINT): the model-info API with
each file's size and checksum (LFS sha256, git oid), and `resolve` with the headers huggingface_hub
reads, Range requests for resuming, and on request a download cut midway or a corrupted file.

It serves what a test puts in `repos`: repository id -> {path in the repository: bytes or a Path}."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.threaded_site import ThreadedSite

# Files at least this large are served as Git LFS files (the Hub's own rule is about 10 MB; small
# ones are enough here to cover both kinds).
LFS_FROM = 1024
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    data: bytes | Path
    size: int
    sha256: str
    oid: str

    @property
    def lfs(self) -> bool:
        return self.size >= LFS_FROM

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.data, bytes):
            return self.data[start:end]
        with self.data.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


def _describe(data: bytes | Path) -> _File:
    raw = data if isinstance(data, bytes) else data.read_bytes()
    return _File(data, len(raw), hashlib.sha256(raw).hexdigest(), git_oid(raw))


@dataclass
class HubLog:
    """What the endpoint served: (method, path, Range header or "") per request."""

    requests: list[tuple[str, str, str]] = field(default_factory=list)

    def gets(self, path_end: str) -> list[str]:
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(path_end)]


class HfEndpoint(ThreadedSite):
    def __init__(self) -> None:
        super().__init__("hf-endpoint")
        self.repos: dict[str, dict[str, bytes | Path]] = {}
        self.cards: dict[str, dict[str, Any]] = {}  # repo id -> cardData (e.g. base_model)
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the first GET is cut
        self.corrupt: set[str] = set()  # paths served with a byte changed (their checksum is the good one's)
        self.delay_s = 0.0  # per chunk of a download: lets a test watch a pull's progress
        self.claimed_size: dict[str, int] = {}  # path -> the size the model info gives instead of the real one
        self.log = HubLog()
        self._described: dict[tuple[str, str], _File] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def file(self, repo: str, path: str) -> _File:
        key = (repo, path)
        if key not in self._described:
            self._described[key] = _describe(self.repos[repo][path])
        return self._described[key]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{repo}", self._info)
        app.router.add_get("/api/models/{owner}/{repo}/revision/{rev}", self._info)
        app.router.add_get("/{owner}/{repo}/resolve/{rev}/{path:.+}", self._resolve)  # and HEAD
        return app

    def _repo(self, request: web.Request) -> str:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        self.log.requests.append((request.method, request.path, request.headers.get("Range", "")))
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        return repo

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        siblings = []
        for path in sorted(self.repos[repo]):
            f = self.file(repo, path)
            size = self.claimed_size.get(path, f.size)
            sib: dict[str, Any] = {"rfilename": path, "size": size, "blobId": f.oid}
            if f.lfs:
                sib["lfs"] = {"size": size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sib)
        body: dict[str, Any] = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
        if repo in self.cards:
            body["cardData"] = self.cards[repo]
        return web.json_response(body)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = request.match_info["path"]
        if path not in self.repos[repo]:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT}
            )
        f = self.file(repo, path)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        start = 0
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes=") and request.method == "GET":
            start = int(rng.removeprefix("bytes=").split("-")[0])
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(f.size)})
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{f.size - 1}/{f.size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = f.size - start
        await resp.prepare(request)
        cut = self.cut_after.pop(path, None)
        pos = start
        while pos < f.size:
            end = min(f.size, pos + (1 << 20))
            if cut is not None and end >= cut:
                await resp.write(f.read(pos, cut))
                assert request.transport is not None
                request.transport.close()  # the connection breaks midway
                return resp
            chunk = f.read(pos, end)
            if path in self.corrupt and pos == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            await resp.write(chunk)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            pos = end
        await resp.write_eof()
        return resp


SMOLLM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


def serve_smollm2() -> HfEndpoint:
    """An endpoint with the packaged SmolLM2 GGUF in its repository (the README's and the report's demo)."""
    from rkmqtt.engines.numpy.gguf_file import DEFAULT_MODEL_FILE, default_model_path

    hub = HfEndpoint()
    hub.repos[SMOLLM_REPO] = {DEFAULT_MODEL_FILE: default_model_path(), "README.md": b"# SmolLM2\n"}
    return hub.start()


if __name__ == "__main__":  # python -m tests.hf_endpoint: serve it until Ctrl-C
    import time

    hub = serve_smollm2()
    print(f"HF_ENDPOINT={hub.url}  (hf://{SMOLLM_REPO}/...)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.close()
