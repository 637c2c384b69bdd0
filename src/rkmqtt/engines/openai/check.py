"""`rkmqtt check` for engine openai (main thread): is the upstream server reachable, does it list
the model, does it generate a token — in plain words, one line each."""

from __future__ import annotations

import time

import openai

from rkmqtt.engines.base import ChatMessage, Generation, SamplingParams
from rkmqtt.settings import Settings

from .body import request_body
from .config import CONNECT_TIMEOUT_S, PROBE_TIMEOUT_S, UpstreamConfig, quiet_http_logs
from .errors import connection_cause, status_error, stream_error

Line = tuple[bool | None, str, str]


def check_upstream(settings: Settings) -> list[Line]:
    config = UpstreamConfig.from_settings(settings)
    url = config.shown_url
    quiet_http_logs()
    client = openai.OpenAI(
        base_url=config.url,
        api_key=config.api_key or "none",
        max_retries=0,
        timeout=openai.Timeout(max(PROBE_TIMEOUT_S, config.timeout_s), connect=CONNECT_TIMEOUT_S),
    )
    try:
        t0 = time.monotonic()
        try:
            listed = [m.id for m in client.models.list(timeout=PROBE_TIMEOUT_S).data]
        except openai.APIConnectionError as e:
            return [
                (False, "upstream", f"cannot reach {url} ({connection_cause(e)}): start the server or fix upstream_url")
            ]
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                return [(False, "upstream", f"{url} refuses this bridge ({e.status_code}): check upstream_api_key")]
            listed = []
            if e.status_code >= 500:
                return [(False, "upstream", f"{url} answers {e.status_code} to GET /models: is the server healthy?")]
        out: list[Line] = [(True, "upstream", f"{url} answered in {(time.monotonic() - t0) * 1000:.0f} ms")]
        model = config.model or (listed[0] if listed else None)
        if model is None:
            out.append((False, "upstream model", f"{url} lists no model: set upstream_model"))
            return out
        shown = ", ".join(listed[:5]) + (" …" if len(listed) > 5 else "")
        if config.model is None:
            out.append((True, "upstream model", f"{model} (the first of those listed: {shown})"))
        elif listed and model not in listed:
            out.append((False, "upstream model", f"{model} is not among those listed ({shown}): set upstream_model"))
        else:
            out.append((True, "upstream model", f"{model} is served"))
        out.append(_one_token(client, model, url))
        return out
    finally:
        client.close()


def _one_token(client: openai.OpenAI, model: str, url: str) -> Line:
    gen = Generation("check", (ChatMessage("user", "Say OK."),), 1, SamplingParams())
    body = request_body(gen, model)
    t0 = time.monotonic()
    try:
        with client.chat.completions.create(**body) as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].delta)
    except openai.APIConnectionError as e:
        return False, "upstream generation", f"{url} did not answer ({connection_cause(e)})"
    except openai.APIStatusError as e:
        return False, "upstream generation", status_error(e.status_code, e.body, e.message)[1]
    except openai.APIError as e:
        return False, "upstream generation", stream_error(e.body, e.message)[1]
    ms = (time.monotonic() - t0) * 1000
    return True, "upstream generation", f"one token ({text!r}) in {ms:.0f} ms"
