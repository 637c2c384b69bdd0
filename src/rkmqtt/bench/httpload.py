"""Simulated devices against a bridge's Ollama HTTP API (the caller's thread runs one asyncio loop
that drives them all with aiohttp): `load.py`'s workload, device by device and prompt by prompt,
through `POST /api/chat` streamed, timing the first piece and the final line, which carries the
token counts (docs/benchmarks.md, "HTTP against MQTT")."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aiohttp

from rkmqtt.bench.cpuusage import CpuMeter
from rkmqtt.bench.metrics import RequestRecord
from rkmqtt.bench.workload import Workload, device_name
from rkmqtt.errors import RkmqttError
from rkmqtt.mqtt.broker import port_answers

Progress = Callable[[int], None]
# One request of a device: `one(device, measured)`.
SendOne = Callable[[int, bool], Coroutine[Any, Any, None]]


async def warm_up(w: Workload, one: SendOne) -> None:
    """`w.warmup` rounds in which every device sends one request at once (not measured)."""
    for _ in range(w.warmup):
        await asyncio.gather(*(one(d, False) for d in range(w.devices)))


async def send_measured(w: Workload, one: SendOne) -> None:
    """The measured requests in `w`'s shape: a closed loop (each device sends again when answered,
    `w.total` in all), bursts of one request per device, or open arrivals at their times."""
    if w.shape == "closed":
        issued = 0

        async def device(d: int) -> None:
            nonlocal issued
            while issued < w.total:
                issued += 1
                await one(d, True)

        await asyncio.gather(*(device(d) for d in range(min(w.devices, w.total))))
    elif w.shape == "burst":
        for _ in range(w.rounds):
            await asyncio.gather(*(one(d, True) for d in range(w.devices)))
    else:
        start = time.monotonic()
        tasks = []
        for t, d in w.open_arrivals():
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(d, True)))
        await asyncio.gather(*tasks)


class HttpLoadGenerator:
    """Runs one workload against the HTTP API at `url` (http://host:port); `tokens` are the devices'
    bearer tokens by device name, when the bridge wants them."""

    def __init__(
        self,
        url: str,
        workload: Workload,
        progress: Progress | None = None,
        meter: CpuMeter | None = None,
        tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.workload = workload
        self.progress = progress
        self.meter = meter
        self.cpu: dict[str, float] = {}
        self.tag = uuid.uuid4().hex[:6]
        self._tokens = tokens
        self._seq = [0] * workload.devices
        self._model = ""
        self._records: list[RequestRecord] = []

    def run(self) -> list[RequestRecord]:
        """Warm up, run the workload, and return the measured requests' records."""
        return asyncio.run(self._main())

    async def _main(self) -> list[RequestRecord]:
        w = self.workload
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        end = time.monotonic() + 60
        while not port_answers(host, int(port)):
            if time.monotonic() > end:
                raise RkmqttError(f"bench: nothing answers on {self.url} (the bridge's http_listen)")
            await asyncio.sleep(0.2)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=w.timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            async with session.get(f"{self.url}/api/tags", headers=self._auth(0)) as resp:
                self._model = (await resp.json())["models"][0]["model"]
            one = functools.partial(self._one, session)
            await warm_up(w, one)
            self._seq = [0] * w.devices  # the warm-up does not shift the measured prompts
            if self.meter is not None:
                self.meter.start()
            await send_measured(w, one)
            if self.meter is not None:
                self.cpu = self.meter.stop()
        return sorted(self._records, key=lambda r: r.sent)

    def _auth(self, device: int) -> dict[str, str]:
        return {} if self._tokens is None else {"Authorization": f"Bearer {self._tokens[device_name(device)]}"}

    async def _one(self, session: aiohttp.ClientSession, device: int, measured: bool) -> None:
        w = self.workload
        seq = self._seq[device]
        self._seq[device] += 1
        name = device_name(device)
        pidx = w.prompt_index(device, seq)
        rid = f"{self.tag}.{name}.{seq}" if measured else f"{self.tag}.{name}.w{seq}"
        rec = RequestRecord(device=device, seq=seq, id=rid, prompt_index=pidx, sent=time.monotonic())
        body = {
            "model": self._model,
            "messages": [{"role": "user", "content": w.prompts[pidx]}],
            "options": {"num_predict": w.max_new_tokens},
            "stream": True,
        }
        try:
            async with session.post(f"{self.url}/api/chat", json=body, headers=self._auth(device)) as resp:
                if resp.status != 200:
                    reply: Any = await resp.json(content_type=None)
                    rec.status, rec.error_code = "error", str(reply.get("code") or f"http_{resp.status}")
                else:
                    async for line in resp.content:
                        if line.strip():
                            _take(rec, json.loads(line), time.monotonic())
                rec.done = rec.done or time.monotonic()
        except (asyncio.TimeoutError, aiohttp.ClientError, ValueError) as e:
            rec.status, rec.error_code = (
                ("timeout", "timeout")
                if isinstance(e, asyncio.TimeoutError)
                else (
                    "error",
                    type(e).__name__,
                )
            )
        if rec.status == "pending":
            rec.status, rec.error_code = "error", "no_final_line"
        if measured:
            self._records.append(rec)
            if self.progress is not None:
                self.progress(1)


def _take(rec: RequestRecord, obj: dict[str, Any], now: float) -> None:
    """One NDJSON line of a streamed `/api/chat` reply."""
    if "error" in obj:
        rec.status, rec.error_code, rec.done = "error", str(obj.get("code") or "stream_error"), now
    elif obj.get("done"):
        rec.status, rec.done = "ok", now
        rec.completion_tokens = int(obj.get("eval_count") or 0)
        rec.prompt_tokens = obj.get("prompt_eval_count")
        rec.finish_reason = obj.get("done_reason")
    elif (obj.get("message") or {}).get("content"):
        rec.chunks += 1
        if rec.first_token is None:
            rec.first_token = now
