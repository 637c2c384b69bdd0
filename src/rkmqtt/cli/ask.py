"""`rkmqtt ask` (main thread; paho's network thread for the callbacks): one request, its stream
printed as it comes, timing at the end; exit 0 on an ok reply, 1 on an error reply or none. It
reads the bridges' retained status first (`mqtt/presence.py`): with none online it says so at once.
Ctrl-C cancels the request on the bridge and waits briefly for its final (exit 130)."""

from __future__ import annotations

import argparse
import json
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.connection import make_client
from rkmqtt.mqtt.link import describe_failure
from rkmqtt.mqtt.presence import bridge_online, is_status_topic, status_subscriptions
from rkmqtt.mqtt.reach import CONNECT_TIMEOUT_S, not_mqtt
from rkmqtt.protocol import ID_PATTERN, ErrorReply, OkReply, StreamChunk
from rkmqtt.settings import Settings
from rkmqtt.topics import Topics, is_valid_client

#: Seconds to wait after subscribing for the retained status (the broker sends it right after
#: the SUBACK) before concluding that no bridge is online.
STATUS_WAIT_S = 3.0
#: Seconds a final reply may still take after the bridge's status turned offline (a bridge that
#: stops cleanly answers before it says offline; one that vanished never will).
OFFLINE_GRACE_S = 5.0
#: Seconds to wait for the final reply (`cancelled`) after Ctrl-C has cancelled the request.
CANCEL_WAIT_S = 5.0
#: The exit status of a command ended by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


@dataclass
class _Progress:
    """How far the conversation got: what Ctrl-C has to undo."""

    sent: bool = False
    printed: list[str] = field(default_factory=list)


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
    client.connect_timeout = CONNECT_TIMEOUT_S
    answered = threading.Event()  # a CONNACK came
    handshake_over = threading.Event()  # a CONNACK came, or the peer closed the connection

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        answered.set()
        handshake_over.set()
        if reason.is_failure:
            events.put(("connect-failed", f"the broker refused the connection: {reason}".encode()))
            return
        c.subscribe([(reply_topic, 1), (stream_topic, 0), *((t, 1) for t in status_subscriptions(topics))])

    def on_disconnect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not answered.is_set():  # an HTTP server, say, closes the connection at MQTT's CONNECT
            events.put(("connect-failed", f"{addr}: {not_mqtt(closed=True)}".encode()))
            handshake_over.set()

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, p: Any) -> None:
        events.put(("subscribed", b""))

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        events.put((msg.topic, bytes(msg.payload)))

    def on_publish(c: mqtt.Client, u: Any, mid: int, reason: Any, p: Any) -> None:
        if getattr(reason, "is_failure", False):  # MQTT 5's PUBACK says why (3.1.1's cannot)
            events.put(("publish-refused", str(reason).encode()))

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.on_disconnect, client.on_publish = on_disconnect, on_publish
    try:
        client.connect(addr.host, addr.port, keepalive=30)
    except (OSError, ValueError) as e:
        print(
            f"rkmqtt: cannot reach the broker at {addr}: {describe_failure(e)}; start one or set --broker",
            file=sys.stderr,
        )
        return 1
    client.loop_start()
    progress = _Progress()
    try:
        try:
            # A peer that took the TCP connection but does not answer MQTT is not waited for over
            # the whole --timeout.
            if not handshake_over.wait(CONNECT_TIMEOUT_S):
                print(f"rkmqtt: {addr}: {not_mqtt(closed=False)}", file=sys.stderr)
                return 1
            return _converse(client, args, events, topics, reply_topic, stream_topic, request_id, progress)
        except KeyboardInterrupt:
            return _cancel(client, events, topics.cancel(args.client), reply_topic, request_id, progress)
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
    progress: _Progress,
) -> int:
    statuses: dict[str, bytes] = {}
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    status_deadline: float | None = None  # set at the SUBACK: when to give up on a bridge being online
    went_offline = False
    next_seq = 0
    printed = progress.printed
    pending: dict[int, str] = {}
    while True:
        if not progress.sent and status_deadline is not None:
            online = bridge_online(statuses)
            if online:
                client.publish(topics.request(args.client), json.dumps(build_request(args, request_id)), qos=1)
                t0 = time.monotonic()
                deadline = t0 + args.timeout
                progress.sent = True
            elif time.monotonic() >= status_deadline:
                return _no_bridge(online, topics)
        wait_until = deadline if progress.sent or status_deadline is None else min(deadline, status_deadline)
        try:
            topic, payload = events.get(timeout=max(0.01, wait_until - time.monotonic()))
        except queue.Empty:
            if not progress.sent and status_deadline is not None and time.monotonic() < deadline:
                continue  # the status wait is over: decided at the top of the loop
            why = "the bridge went offline" if went_offline else f"no reply within {args.timeout:.0f} s"
            print(
                f"\nrkmqtt: {why}: is `rkmqtt run` running on this broker with topic_prefix {topics.prefix!r}?",
                file=sys.stderr,
            )
            return 1
        if topic == "connect-failed":
            print(f"rkmqtt: {payload.decode()}", file=sys.stderr)
            return 1
        if topic == "publish-refused" and progress.sent:
            return _refused(payload.decode(), topics.request(args.client), args.client, client.username)
        if topic == "subscribed" and status_deadline is None:
            status_deadline = time.monotonic() + STATUS_WAIT_S
        elif is_status_topic(topics, topic):
            statuses[topic] = payload
            if progress.sent and not bridge_online(statuses) and not went_offline:
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


def _cancel(
    client: mqtt.Client,
    events: queue.Queue[tuple[str, bytes]],
    cancel_topic: str,
    reply_topic: str,
    request_id: str,
    progress: _Progress,
) -> int:
    """Ctrl-C: cancel the request on the bridge (it would otherwise hold a slot to its end) and wait
    a moment for its final reply, which says `cancelled`. A second Ctrl-C ends the wait."""
    if not progress.sent:
        print("\nrkmqtt: interrupted before the request was sent", file=sys.stderr)
        return EXIT_INTERRUPTED
    client.publish(cancel_topic, request_id.encode(), qos=1)
    print(f"\nrkmqtt: cancelling request {request_id}…", file=sys.stderr)
    end = time.monotonic() + CANCEL_WAIT_S
    while (left := end - time.monotonic()) > 0:
        try:
            topic, payload = events.get(timeout=left)
        except queue.Empty:
            break
        if topic != reply_topic:
            continue
        try:
            data = json.loads(payload)
        except ValueError:
            break
        if data.get("status") == "ok":
            tokens = (data.get("usage") or {}).get("completion_tokens")
            print(f"[{data.get('finish_reason')} by Ctrl-C after {tokens} tokens]", file=sys.stderr)
        else:
            error = data.get("error") or {}
            print(f"rkmqtt: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"rkmqtt: no final reply within {CANCEL_WAIT_S:.0f} s of the cancel", file=sys.stderr)
    return EXIT_INTERRUPTED


def _refused(reason: str, topic: str, name: str, user: str | None) -> int:
    """The broker did not take the request (its ACL, on the shipped broker files: a login publishes
    only as the client of its own name)."""
    hint = (
        f" (deploy/mosquitto/rkmqtt.acl lets a device's login ask only as itself, on the devices' listener: "
        f"--client {user})"
        if user and user != name
        else ""
    )
    print(f"rkmqtt: the broker refused the request on {topic}: {reason}{hint}", file=sys.stderr)
    return 1


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
