"""Real OpenAI-compatible servers for the openai engine's tests: `rkmqtt run` serving the numpy
engine over its HTTP API as a process (killed and restarted by the tests), and a small aiohttp
server that answers what a test tells it to (an error status, a stall, tool-call deltas) and
keeps every request body it got."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from rkmqtt.mqtt.broker import free_port
from rkmqtt.service import Service
from tests.bridge_process import BridgeProcess
from tests.conftest import bridge_settings
from tests.mqtt_probe import Probe
from tests.threaded_site import ThreadedSite


class UpstreamRkmqtt:
    """`rkmqtt run --engine numpy --http-listen ...`: the upstream server of the openai engine."""

    def __init__(self, broker_url: str, workdir: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.health = workdir / "upstream-health.json"
        self.process = BridgeProcess(
            broker_url, f"up{self.port}", workdir / "upstream.log",
            "--engine", "numpy", "--temperature", "0", "--n-batch", "8", "--rate-limit", "0", "--no-journal",
            "--node-name", f"upstream-{self.port}", "--http-listen", f"127.0.0.1:{self.port}",
            "--health-file", str(self.health), "--max-new-tokens", "4096", "--default-new-tokens", "4096", *args,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120) -> UpstreamRkmqtt:
        """Start it and wait until its HTTP API answers: its port is bound before the model loads,
        so a port that answers is not yet a server that does."""
        self.process.start()
        end = time.monotonic() + timeout
        while True:
            assert self.process.proc is not None and self.process.proc.poll() is None, self.process.output()[-3000:]
            assert time.monotonic() < end, "the upstream's HTTP API did not answer"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)

    def active(self) -> int:
        """Requests the upstream's engine runs now (its health file, rewritten every second)."""
        try:
            return int(json.loads(self.health.read_text())["active"])
        except (OSError, ValueError, KeyError):
            return -1

    def wait_active(self, pred: Callable[[int], bool], timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while True:
            n = self.active()
            if pred(n):
                return n
            assert time.monotonic() < end, f"the upstream's active count stayed {n}"
            time.sleep(0.1)

    def kill9(self) -> None:
        self.process.kill9()
        self.health.unlink(missing_ok=True)

    def stop(self) -> None:
        self.process.stop()


Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class ScriptedServer(ThreadedSite):
    """An aiohttp server on its own thread: /v1/models lists `model`, /v1/chat/completions runs
    `handler(request, body)` (set by the test) and keeps each body in `bodies`."""

    handler_cancellation = True

    def __init__(self, model: str = "scripted-model") -> None:
        super().__init__("scripted-server")
        self.model = model
        self.bodies: list[dict[str, Any]] = []
        self.models_status = 200
        self.handler: Handler = self.answer_text
        self.cancelled = 0  # handlers that ended because the client left

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            return web.json_response({"error": {"message": "no"}}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                               "owned_by": "test"}]})  # fmt: skip

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        try:
            return await self.handler(request, body)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    # -- handlers a test may choose ----------------------------------------------------------
    @staticmethod
    def error(status: int, message: str, **fields: Any) -> Handler:
        async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
            return web.json_response({"error": {"message": message, "type": "x", **fields}}, status=status)

        return handler

    @staticmethod
    async def stall(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    @staticmethod
    async def sse(request: web.Request, chunks: list[dict[str, Any]], done: bool = True) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            data = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "scripted-model", **c}
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
        if done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @staticmethod
    async def endless(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """Counts "0 1 2 ..." a hundred a second, for a minute."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(6000):
            delta = {"index": 0, "delta": {"content": f"{i} "}, "finish_reason": None}
            data = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [delta]}
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
            await asyncio.sleep(0.01)
        return resp

    async def answer_text(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await self.sse(request, [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
        ])  # fmt: skip


class Fronts:
    """In-process bridges with engine openai on a test's broker: `start(url, **settings)`."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.broker_url, self.prefix = broker_url, prefix
        self.services: list[Service] = []

    def start(self, url: str, **overrides: Any) -> Service:
        flags = {"engine": "openai", "upstream_url": url, "n_batch": 3, **overrides}
        svc = Service(bridge_settings(self.broker_url, self.prefix, **flags))
        self.services.append(svc)
        svc.start()
        assert svc.bridge is not None and svc.bridge.wait_connected(15), "bridge did not connect"
        wait_online(self.broker_url, self.prefix)
        return svc

    def close(self) -> None:
        for svc in self.services:
            svc.stop(grace_s=1)


def wait_online(broker_url: str, prefix: str) -> None:
    """Until the broker has the bridge's `online` status, published after its request subscription:
    `wait_connected` returns once paho has queued them, and a request published at once can reach
    the broker before the subscription does (it then goes nowhere)."""
    probe = Probe(broker_url, [f"{prefix}/node/+/status"])
    try:
        probe.wait_for(lambda m: m.payload == b"online", 15)
    finally:
        probe.close()


class Device:
    """An MQTT device of the test: asks and waits for its final reply, reads the bridge's stats."""

    def __init__(self, probe: Probe, prefix: str) -> None:
        self.probe, self.prefix = probe, prefix

    def send(self, payload: dict[str, Any]) -> str:
        rid = payload.setdefault("id", uuid.uuid4().hex[:12])
        self.probe.publish(f"{self.prefix}/request/dev", payload)
        return str(rid)

    def final(self, rid: str, timeout: float = 30) -> dict[str, Any]:
        return self.probe.final(f"{self.prefix}/reply/dev/{rid}", timeout)

    def ask(self, payload: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        return self.final(self.send(payload), timeout)

    def first_chunk(self, rid: str, timeout: float = 60) -> None:
        """Until the request's first stream chunk came (its final reply first is a failure)."""
        got = self.probe.wait_for(lambda m: m.topic.startswith(f"{self.prefix}/reply/dev/{rid}"), timeout)
        assert got[0].topic.endswith("/stream"), f"no stream, but the final reply {got[0].payload!r}"

    def stats(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        found = self.probe.wait_for(lambda m: m.is_node("stats") and pred(m.json()), timeout)
        return found[-1].json()  # type: ignore[no-any-return]
