"""Ollama's `/api/pull` and `/api/delete` (the HTTP event-loop thread; a pull runs on a worker thread of
the loop's executor and hands its progress back with `call_soon_threadsafe`): a reference pulled into
models_dir with Ollama-shaped progress lines, and a local model deleted."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from rkmqtt.errors import ConfigError, PullError
from rkmqtt.models.pull import PullProgress
from rkmqtt.models.reference import is_hub_reference

from .common import read_body
from .exchange import ApiError, Gateway

if TYPE_CHECKING:
    from rkmqtt.models.catalog import Catalog

NDJSON = "application/x-ndjson"


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    name: str = ""  # older clients
    insecure: bool = False
    stream: bool = True


class DeleteBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    name: str = ""


def progress_line(p: PullProgress) -> dict[str, Any]:
    """A pull's progress as Ollama's own lines ("pulling manifest", "pulling <digest>", ...)."""
    if p.status == "resolving":
        return {"status": "pulling manifest"}
    if p.status == "verifying":
        return {"status": "verifying sha256 digest", "completed": p.completed, "total": p.total or 0}
    if p.status == "done":
        return {"status": "success"}
    digest = f"sha256:{p.digest}" if p.digest else p.file
    return {
        "status": f"pulling {(p.digest or p.file)[:12]}",
        "digest": digest,
        "total": p.total or 0,
        "completed": p.completed,
    }


class ModelsApi:
    def __init__(self, gateway: Gateway, catalog: Catalog | None) -> None:
        self.gateway = gateway
        self.catalog = catalog

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/pull", self.pull), web.delete("/api/delete", self.delete)]

    def _catalog(self) -> Catalog:
        if self.catalog is None:
            raise ApiError(400, "this bridge's engine takes no models by name: pull them where its server runs")
        return self.catalog

    def _reference(self, catalog: Catalog, name: str) -> str:
        """What to pull for `name`: a model of the `models` setting, or a reference itself."""
        if not name.strip():
            raise ApiError(400, "model is required: hf://owner/repo[/file], hf.co/owner/repo[:QUANT], or a name")
        with contextlib.suppress(LookupError):
            served = catalog.find(name)
            return served.reference or ""
        if is_hub_reference(name):
            return name.strip()
        raise ApiError(
            404,
            f"model {name!r} cannot be pulled: give hf://owner/repo[/file] or hf.co/owner/repo[:QUANT] (Hugging "
            "Face), or a name of the models setting",
        )

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, PullBody)
        catalog = self._catalog()
        reference = self._reference(catalog, body.model or body.name)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[PullProgress] = asyncio.Queue()

        def progress(p: PullProgress) -> None:  # the pull's thread
            catalog.progress(p)
            loop.call_soon_threadsafe(queue.put_nowait, p)

        async def run() -> str | None:
            if not reference:
                return None  # the packaged model: nothing to pull
            try:
                await asyncio.to_thread(catalog.puller.pull, reference, progress)
            except (PullError, ConfigError) as e:
                return str(e)
            return None

        task = asyncio.ensure_future(run())
        if not body.stream:
            problem = await task
            if problem is not None:
                raise ApiError(500, problem)
            return web.json_response({"status": "success"})
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        await resp.write(_line({"status": "pulling manifest"}))
        last: tuple[object, ...] | None = None
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            p = getter.result()
            if p.status in ("failed", "done", "resolving"):
                continue  # the end is written below, once; the manifest line went first
            pct = p.percent
            mark = (p.file, p.status, None if pct is None else int(pct))
            if mark != last:
                last = mark
                await resp.write(_line(progress_line(p)))
        problem = task.result()
        if problem is None:
            await resp.write(_line({"status": "writing manifest"}))
            await resp.write(_line({"status": "success"}))
        else:
            await resp.write(_line({"error": problem}))
        await resp.write_eof()
        return resp

    async def delete(self, request: web.Request) -> web.Response:
        body = await self._body(request, DeleteBody)
        catalog = self._catalog()
        name = (body.model or body.name).strip()
        store = catalog.puller.store
        local = await asyncio.to_thread(store.find, name) or await asyncio.to_thread(
            store.find, name.removesuffix(":latest")
        )
        if local is None:
            raise ApiError(404, f"model {name!r} not found in {store.root}")
        await asyncio.to_thread(store.delete, local)
        return web.json_response({})

    async def _body(self, request: web.Request, model: type[BaseModel]) -> Any:
        return await read_body(request, model, self.gateway)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"
