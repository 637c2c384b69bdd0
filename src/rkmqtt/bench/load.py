"""Simulated devices against a bridge over MQTT (the caller's thread drives; one `NetLoop` thread runs
every device's paho client, receives the replies and, in a closed loop, sends each device's next
request). Each device publishes on `P/request/<name>`, times its first chunk and its final reply,
and keeps the bridge's own `timing`, `usage` and `batch` figures."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.bench.cpuusage import CpuMeter
from rkmqtt.bench.metrics import RequestRecord
from rkmqtt.bench.mqttclient import BenchClient
from rkmqtt.bench.netloop import NetLoop
from rkmqtt.bench.workload import Workload, device_name
from rkmqtt.errors import RkmqttError
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics

Progress = Callable[[int], None]


class _Device:
    def __init__(self, gen: LoadGenerator, index: int) -> None:
        self.gen = gen
        self.index = index
        self.name = device_name(index)
        self.seq = 0
        self.records: dict[str, RequestRecord] = {}
        self.request_topic = gen.topics.request(self.name)
        self.mqtt = BenchClient(
            gen.settings,
            f"rkmqtt-bench-{gen.tag}-{self.name}",
            [f"{gen.topics.prefix}/reply/{self.name}/#"],
            self.on_message,
            gen.netloop,
        )

    def send(self, measured: bool) -> RequestRecord:
        """Publish this device's next request (any thread)."""
        w = self.gen.workload
        with self.gen.lock:
            seq = self.seq
            self.seq += 1
            rid = f"{self.gen.tag}.{self.name}.{seq}" if measured else f"{self.gen.tag}.{self.name}.w{seq}"
            pidx = w.prompt_index(self.index, seq) if measured else w.warmup_prompt_index(self.index, seq)
            rec = RequestRecord(device=self.index, seq=seq, id=rid, prompt_index=pidx, sent=0.0)
            self.records[rid] = rec
        payload = json.dumps(
            {"id": rid, "prompt": w.prompts[pidx], "max_new_tokens": w.max_new_tokens, "stream": True}
        ).encode()
        rec.sent = time.monotonic()
        self.mqtt.publish(self.request_topic, payload, qos=1)
        return rec

    # -- the NetLoop thread -------------------------------------------------------------------
    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        # P/reply/<client>/<id>[/stream], where P itself may hold slashes
        if parts[-1] == "stream":
            rid = parts[-2]
            rec = self.records.get(rid)
            if rec is None or rec.status != "pending":
                return
            if rec.first_token is None:
                rec.first_token = now
            rec.chunks += 1
            try:
                seq = int(json.loads(msg.payload)["seq"])
            except (ValueError, KeyError, TypeError):
                return
            rec.max_seq = max(rec.max_seq, seq)
            return
        rec = self.records.get(parts[-1])
        if rec is None or rec.status != "pending":
            return
        rec.done = now
        try:
            reply: Any = json.loads(msg.payload)
        except ValueError:
            reply = None
        if isinstance(reply, dict):
            _fill(rec, reply)
        else:
            rec.status, rec.error_code = "error", "unreadable_reply"
        self.gen.on_final(self, rec)


def _fill(rec: RequestRecord, reply: dict[str, Any]) -> None:
    if reply.get("status") == "ok":
        rec.status = "ok"
        usage = reply.get("usage") or {}
        timing = reply.get("timing") or {}
        batch = reply.get("batch") or {}
        rec.completion_tokens = int(usage.get("completion_tokens") or 0)
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.queued_ms = timing.get("queued_ms")
        rec.server_ttft_ms = timing.get("ttft_ms")
        rec.server_total_ms = timing.get("total_ms")
        rec.batch_size = batch.get("size")
        rec.finish_reason = reply.get("finish_reason")
        if rec.first_token is None and rec.server_ttft_ms is not None:
            # No chunk came (a text-less answer): the bridge's figure, shifted to the sender's clock.
            rec.first_token = rec.sent + rec.server_ttft_ms / 1000.0
    else:
        rec.status = "error"
        rec.error_code = str((reply.get("error") or {}).get("code") or "unknown")


class LoadGenerator:
    """Runs one workload against the bridge listening under `settings.topic_prefix`."""

    def __init__(
        self,
        settings: Settings,
        workload: Workload,
        progress: Progress | None = None,
        meter: CpuMeter | None = None,
    ) -> None:
        self.settings = settings
        self.meter = meter
        self.cpu: dict[str, float] = {}  # the meter's figures over the measured part
        self.workload = workload
        self.topics = Topics(settings.topic_prefix)
        self.tag = uuid.uuid4().hex[:6]
        self.lock = threading.Lock()
        self.progress = progress
        self._cond = threading.Condition(self.lock)
        self._measuring = False
        self._issued = 0
        self._finished = 0
        self._warm_done = 0
        self.devices: list[_Device] = []
        self.netloop = NetLoop()

    # -- callbacks (the NetLoop thread) ---------------------------------------------------------
    def on_final(self, dev: _Device, rec: RequestRecord) -> None:
        measured = ".w" not in rec.id
        with self._cond:
            if measured:
                self._finished += 1
            else:
                self._warm_done += 1
            self._cond.notify_all()
        if measured and self.progress is not None:
            self.progress(1)
        if measured and self.workload.shape == "closed":
            self._closed_next(dev)

    def _closed_next(self, dev: _Device) -> None:
        with self._cond:
            if self._issued >= self.workload.total:
                return
            self._issued += 1
        dev.send(measured=True)

    # -- driving (caller's thread) ----------------------------------------------------------------
    def run(self) -> list[RequestRecord]:
        """Connect the devices, warm up, run the workload, and return the measured requests' records
        (requests with no final reply within the timeout have status "timeout")."""
        w = self.workload
        self.netloop.start()
        try:
            for i in range(w.devices):
                self.devices.append(_Device(self, i))
            for d in self.devices:
                d.mqtt.start()
            self._warm_up()
            self._measuring = True
            if self.meter is not None:
                self.meter.start()
            if w.shape == "closed":
                with self._cond:
                    first = min(w.devices, w.total)
                    self._issued = first
                for d in self.devices[:first]:
                    d.send(measured=True)
                self._wait(lambda: self._finished >= w.total)
            elif w.shape == "burst":
                for rnd in range(w.rounds):
                    for d in self.devices:
                        d.send(measured=True)
                    if not self._wait(self._finished_at_least((rnd + 1) * w.devices)):
                        break
            else:
                start = time.monotonic()
                for t, dev in w.open_arrivals():
                    if self.netloop.error is not None:
                        break
                    delay = start + t - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    self.devices[dev].send(measured=True)
                self._wait(lambda: self._finished >= w.total)
            if self.meter is not None:
                self.cpu = self.meter.stop()
        finally:
            for d in self.devices:  # all at once, then one shared wait: a wedged broker costs 2 s, not 2 s each
                d.mqtt.begin_stop()
            deadline = time.monotonic() + 2.0
            for d in self.devices:
                d.mqtt.wait_stopped(deadline)
            self.netloop.stop()
        if self.netloop.error is not None:
            raise RkmqttError(f"bench: the devices' network loop failed: {self.netloop.error!r}")
        records = [r for d in self.devices for r in d.records.values() if ".w" not in r.id]
        for r in records:
            if r.status == "pending":
                r.status, r.error_code = "timeout", "timeout"
        return sorted(records, key=lambda r: r.sent)

    def _warm_up(self) -> None:
        """`warmup` rounds in which every device sends one request at once, so that the engine has
        seen full batches (first-time allocations, caches) before anything is measured."""
        n = len(self.devices)
        for k in range(self.workload.warmup):
            for d in self.devices:
                d.send(measured=False)
            self._wait(self._warm_done_at_least((k + 1) * n))
        with self.lock:  # the warm-up's sequence numbers do not shift the measured prompts
            for d in self.devices:
                d.seq = 0

    def _finished_at_least(self, n: int) -> Callable[[], bool]:
        return lambda: self._finished >= n

    def _warm_done_at_least(self, n: int) -> Callable[[], bool]:
        return lambda: self._warm_done >= n

    def _wait(self, done: Callable[[], bool]) -> bool:
        """Wait until `done()`; False when no final reply came for `timeout_s`."""
        with self._cond:
            last = self._finished + self._warm_done
            deadline = time.monotonic() + self.workload.timeout_s
            while not done():
                now = time.monotonic()
                seen = self._finished + self._warm_done
                if seen != last:
                    last, deadline = seen, now + self.workload.timeout_s
                if now >= deadline or self.netloop.error is not None:
                    return False
                self._cond.wait(min(1.0, deadline - now))
            return True
