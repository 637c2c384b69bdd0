"""`rkmqtt ask` (main thread; paho's network thread for the callbacks): one request, its stream
printed as it comes, timing at the end; exit 0 on an ok reply, 1 on an error reply or none. It
reads the bridges' retained status first (`mqtt/presence.py`): with none online it says so at once."""

from __future__ import annotations

import argparse
import json
import queue
import re
import sys
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.connection import make_client
from rkmqtt.mqtt.presence import bridge_online, is_status_topic, status_subscriptions
from rkmqtt.protocol import ID_PATTERN, ErrorReply, OkReply, StreamChunk
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics, is_valid_client

#: Seconds to wait after subscribing for the retained status (the broker sends it right after
#: the SUBACK) before concluding that no bridge is online.
STATUS_WAIT_S = 3.0
#: Seconds a final reply may still take after the bridge's status turned offline (a bridge that
#: stops cleanly answers before it says offline; one that vanished never will).
OFFLINE_GRACE_S = 5.0


def build_request(args: argparse.Namespace, request_id: str) -> dict[str, Any]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    req: dict[str, Any] = {"id": request_id, "prompt": prompt, "stream": not args.json}
    if args.system:
        req["system"] = args.system
    if args.max_new_tokens_req is not None:
        req["max_new_tokens"] = args.max_new_tokens_req
    if args.temperature_req is not None:
        req["temperature"] = args.temperature_req
    if args.seed is not None:
        req["seed"] = args.seed
    return req


def ask(settings: Settings, args: argparse.Namespace) -> int:
    topics = Topics(settings.topic_prefix)
    if not is_valid_client(args.client):
        raise ConfigError(f"--client {args.client!r}: use 1-64 characters of A-Z a-z 0-9 _ -")
    request_id = args.request_id or uuid.uuid4().hex[:12]
    if not re.fullmatch(ID_PATTERN, request_id):
        raise ConfigError(f"--id {request_id!r}: use 1-64 characters of A-Z a-z 0-9 _ . : -")
    reply_topic = topics.reply(args.client, request_id)
    stream_topic = Topics.stream_of(reply_topic)
    events: queue.Queue[tuple[str, bytes]] = queue.Queue()
    addr = settings.broker_url

    client = make_client(settings, f"rkmqtt-ask-{uuid.uuid4().hex[:8]}")

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            events.put(("connect-failed", str(reason).encode()))
            return
        c.subscribe([(reply_topic, 1), (stream_topic, 0), *((t, 1) for t in status_subscriptions(topics))])

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, p: Any) -> None:
        events.put(("subscribed", b""))

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        events.put((msg.topic, bytes(msg.payload)))

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(addr.host, addr.port, keepalive=30)
    except OSError as e:
        print(f"rkmqtt: cannot reach the broker at {addr}: {e}; start one or set --broker", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        return _converse(client, args, events, topics, reply_topic, stream_topic, request_id)
    finally:
        client.disconnect()
        client.loop_stop()


def _converse(
    client: mqtt.Client,
    args: argparse.Namespace,
    events: queue.Queue[tuple[str, bytes]],
    topics: Topics,
    reply_topic: str,
    stream_topic: str,
    request_id: str,
) -> int:
    statuses: dict[str, bytes] = {}
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    status_deadline: float | None = None  # set at the SUBACK: when to give up on a bridge being online
    sent = False
    went_offline = False
    next_seq = 0
    printed: list[str] = []
    pending: dict[int, str] = {}
    while True:
        if not sent and status_deadline is not None:
            online = bridge_online(statuses)
            if online:
                client.publish(topics.request(args.client), json.dumps(build_request(args, request_id)), qos=1)
                t0 = time.monotonic()
                deadline = t0 + args.timeout
                sent = True
            elif time.monotonic() >= status_deadline:
                return _no_bridge(online, topics)
        wait_until = deadline if sent or status_deadline is None else min(deadline, status_deadline)
        try:
            topic, payload = events.get(timeout=max(0.01, wait_until - time.monotonic()))
        except queue.Empty:
            if not sent and status_deadline is not None and time.monotonic() < deadline:
                continue  # the status wait is over: decided at the top of the loop
            why = "the bridge went offline" if went_offline else f"no reply within {args.timeout:.0f} s"
            print(
                f"\nrkmqtt: {why}: is `rkmqtt run` running on this broker with topic_prefix {topics.prefix!r}?",
                file=sys.stderr,
            )
            return 1
        if topic == "connect-failed":
            print(f"rkmqtt: the broker refused the connection: {payload.decode()}", file=sys.stderr)
            return 1
        if topic == "subscribed" and status_deadline is None:
            status_deadline = time.monotonic() + STATUS_WAIT_S
        elif is_status_topic(topics, topic):
            statuses[topic] = payload
            if sent and not bridge_online(statuses) and not went_offline:
                went_offline = True
                deadline = min(deadline, time.monotonic() + OFFLINE_GRACE_S)
        elif topic == stream_topic and not args.json:
            try:
                chunk = StreamChunk.model_validate_json(payload)
            except ValueError:
                continue  # not ours to judge: the final reply carries the whole text anyway
            pending[chunk.seq] = chunk.text
            while next_seq in pending:  # print in order; after a lost chunk the final reply fills in
                printed.append(pending.pop(next_seq))
                sys.stdout.write(printed[-1])
                next_seq += 1
            sys.stdout.flush()
        elif topic == reply_topic:
            return _final(payload, args, "".join(printed), t0)


def _no_bridge(online: bool | None, topics: Topics) -> int:
    if online is None:
        why = (
            f"no rkmqtt bridge has run on this broker with topic_prefix {topics.prefix!r} "
            f"(nothing on {topics.every_node('status')})"
        )
    else:
        why = f"every rkmqtt bridge with topic_prefix {topics.prefix!r} is offline ({topics.every_node('status')})"
    print(f"rkmqtt: {why}: start `rkmqtt run`, or check --broker and --topic-prefix", file=sys.stderr)
    return 1


def _final(payload: bytes, args: argparse.Namespace, printed: str, t0: float) -> int:
    try:
        data = json.loads(payload)
        final: OkReply | ErrorReply = (
            OkReply.model_validate_json(payload)
            if data.get("status") == "ok"
            else ErrorReply.model_validate_json(payload)
        )
    except ValueError as e:
        print(f"rkmqtt: the final reply is not a valid rkmqtt reply: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0 if data.get("status") == "ok" else 1
    if isinstance(final, ErrorReply):
        print(f"rkmqtt: {final.error.code.value}: {final.error.message}", file=sys.stderr)
        return 1
    reply = final
    if reply.text.startswith(printed):
        sys.stdout.write(reply.text[len(printed) :])  # what lost or unstreamed chunks left out
    else:
        sys.stdout.write("\n" + reply.text)
    sys.stdout.write("\n")
    t = reply.timing
    ttft = f"{t.ttft_ms:.0f} ms" if t.ttft_ms is not None else "-"
    print(
        f"[{reply.finish_reason}; {reply.usage.completion_tokens} tokens; queued {t.queued_ms:.0f} ms; "
        f"first token {ttft}; total {t.total_ms:.0f} ms; {t.tokens_per_s:.1f} tok/s; batch of {reply.batch.size}; "
        f"round trip {(time.monotonic() - t0) * 1000:.0f} ms]",
        file=sys.stderr,
    )
    for w in reply.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0
