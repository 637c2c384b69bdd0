"""A property test of intake (pure, no broker): over arbitrary payloads, MQTT 5 properties and
topics, `Intake.accept` never raises, answers every message exactly once (a request for the
scheduler, or one refusal), and never routes a reply outside the client's own reply subtree, nor
with more Correlation Data or a longer topic than the caps allow."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkmqtt.mqtt.intake import MAX_MESSAGE_CHARS, Incoming, Intake
from rkmqtt.mqtt.outbox import Outbox
from rkmqtt.mqtt.replies import Refusal, Replies
from rkmqtt.mqtt.sink import MqttSink
from rkmqtt.protocol import ErrorReply, RequestPayload
from rkmqtt.sched.admission import Admission
from rkmqtt.sched.finals import Finals
from rkmqtt.sched.request import Request
from rkmqtt.settings import load_settings
from rkmqtt.topics import Topics, has_wildcards

P = "home/llm"
SETTINGS = load_settings(
    {"topic_prefix": P, "max_correlation_bytes": 32, "max_reply_topic_chars": 64, "rate_limit": 600, "rate_burst": 5}
)
TOPICS = Topics(P)
REPLIES = Replies(Finals("model"))
SINK = MqttSink(Outbox(100), REPLIES)

# A topic level a broker can deliver: UTF-8 without NUL, no `/`, and (in a topic name) no wildcards.
LEVEL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/+#\x00"), min_size=0, max_size=70)
VALID_CLIENTS = st.sampled_from(["kitchen", "dev-1", "a", "x" * 64])
CLIENTS = st.one_of(VALID_CLIENTS, VALID_CLIENTS, VALID_CLIENTS, LEVEL)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
FIELDS = st.sampled_from([*RequestPayload.model_fields, "unknown", ""])


def topic_like(client: str) -> st.SearchStrategy[str]:
    """Reply topics: anything, or near misses around the client's own subtree."""
    own = f"{P}/reply/{client}/"
    fine = st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=30)
    return st.one_of(
        st.builds(lambda rest: own + rest, fine),
        st.builds(lambda rest: own + rest, fine),
        st.text(max_size=90),
        st.builds(lambda rest: own + rest, st.text(max_size=90)),
        st.builds(lambda other, rest: f"{P}/reply/{other}/{rest}", LEVEL, st.text(max_size=20)),
        st.sampled_from([own, own[:-1], f"{P}/reply/", own + "#", own + "a/+/b", own + "a//b", own + "x" * 200]),
    )


@st.composite
def payloads(draw: st.DrawFn, client: str) -> bytes:
    kind = draw(st.sampled_from(["json", "raw", "text", "request", "request", "request"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=100)).encode()
    obj: dict[str, Any] = draw(st.dictionaries(FIELDS, JSON, max_size=6 if kind == "json" else 1))
    if kind == "request":  # mostly valid, so that many get through to routing and limits
        obj = {k: v for k, v in obj.items() if draw(st.integers(0, 9)) == 0}
        obj["prompt"] = draw(st.text(min_size=1, max_size=30))
        for key in ("id", "reply_to", "temperature", "top_p", "stream"):
            if draw(st.booleans()):
                obj[key] = draw(
                    {
                        "id": st.text(max_size=70),
                        "reply_to": topic_like(client),
                        "temperature": st.floats(0, 5),
                        "top_p": st.floats(1e-320, 1),
                        "stream": st.booleans(),
                    }[key]
                )
    return json.dumps(obj).encode()


@st.composite
def incoming(draw: st.DrawFn) -> Incoming:
    client = draw(CLIENTS)
    return Incoming(
        client=client,
        payload=draw(payloads(client)),
        response_topic=draw(st.one_of(st.none(), st.none(), topic_like(client))),
        correlation=draw(st.one_of(st.none(), st.binary(max_size=32), st.binary(min_size=33, max_size=64))),
        expiry_s=draw(st.none() | st.integers(0, 2**32 - 1).map(float)),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(incoming(), min_size=1, max_size=8))
def test_intake_never_raises_answers_once_and_stays_in_the_clients_subtree(messages: list[Incoming]) -> None:
    intake = Intake(SETTINGS, TOPICS, Admission(SETTINGS, lambda code: None), SINK)
    for now, msg in enumerate(messages):
        result = intake.accept(msg, now=float(now))  # never raises
        own = f"{P}/reply/{msg.client}/"
        route = result.route
        # Exactly one answer: a request (answered later, once, by the core) or one refusal now.
        assert isinstance(result, Request | Refusal)
        assert route.topic.startswith(own) and len(route.topic) > len(own)
        assert not has_wildcards(route.topic) and "\x00" not in route.topic
        assert len(route.topic) <= max(SETTINGS.max_reply_topic_chars, len(TOPICS.reply(msg.client, result.id)))
        assert route.correlation is None or len(route.correlation) <= SETTINGS.max_correlation_bytes
        assert route.correlation in (None, msg.correlation)
        if isinstance(result, Refusal):
            out = REPLIES.refusal(result)
            assert out.topic == route.topic and out.qos == 1
            reply = ErrorReply.model_validate_json(out.payload)
            assert reply.id == result.id and len(reply.error.message) <= MAX_MESSAGE_CHARS + 1
        else:
            assert result.client == msg.client
            assert TOPICS.stream_of(route.topic).startswith(own)
            assert result.gen.sampling.top_p >= 1e-6
            assert result.gen.sampling.temperature == 0 or result.gen.sampling.temperature >= 1e-3
