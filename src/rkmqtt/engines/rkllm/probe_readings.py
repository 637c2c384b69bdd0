"""What a `rkmqtt probe` trace says: speed figures and the answer to each open question (the
probe's main thread; pure functions of the trace; how each figure is made: docs/rkllm-runtime.md,
"The probe's parts")."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

NORMAL, WAITING, FINISH, ERROR = 0, 1, 2, 3
STATE_NAMES = {0: "NORMAL", 1: "WAITING", 2: "FINISH", 3: "ERROR"}
# A prefix reused (cached) must at least halve the time to first token to count: a smaller gain
# cannot be told from the noise of a busy board (the figures are in the answer either way).
CACHE_CUT = 0.5
Reading = tuple[str, str]


def scenarios_by_name(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The last record of each scenario (a part that died and went on has one per attempt)."""
    return {s["name"]: s for s in trace.get("scenarios", [])}


def run_of(trace: dict[str, Any], scenario: dict[str, Any] | None, k: int = 0) -> dict[str, Any] | None:
    runs = (scenario or {}).get("runs") or []
    return trace["calls"][runs[k]] if -len(runs) <= k < len(runs) else None


def measured_runs(trace: dict[str, Any], scenario: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not scenario:
        return []
    indices = scenario.get("measured") or scenario.get("runs") or []
    return [trace["calls"][i] for i in indices if "rc" in trace["calls"][i]]


def callbacks(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in run.get("events", []) if "state" in e]


def speed(run: dict[str, Any]) -> dict[str, float | None]:
    """Time to first token, decode and prefill speed of one run."""
    token_times: list[tuple[float, int]] = []
    perf: list[float] | None = None
    for e in callbacks(run):
        slots = e.get("slots") or []
        n = sum(1 for token_id, _ in slots if token_id >= 0)
        if e["state"] in (NORMAL, WAITING) and n:
            token_times.append((e["t_ms"], n))
        if e["state"] == FINISH and e.get("perf"):
            perf = e["perf"][0]
    out: dict[str, float | None] = {"ttft_ms": None, "decode_tps": None, "prefill_tps": None}
    if token_times:
        out["ttft_ms"] = token_times[0][0]
        span = token_times[-1][0] - token_times[0][0]
        later = sum(n for _, n in token_times[1:])
        out["decode_tps"] = later / span * 1000.0 if span > 0 and later else None
    if perf is not None:
        p_ms, p_tokens = perf[0], perf[1]
        out["prefill_tps"] = p_tokens / p_ms * 1000.0 if p_ms > 0 and p_tokens > 0 else None
    return out


def speed_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min, max) of each figure over `runs`."""
    figures = [speed(r) for r in runs]
    out: dict[str, Any] = {"runs": len(runs)}
    for key in ("ttft_ms", "decode_tps", "prefill_tps"):
        values = [float(v) for f in figures if (v := f[key]) is not None]
        out[key] = statistics.median(values) if values else None
        out[key + "_range"] = (min(values), max(values)) if len(values) > 1 else None
    return out


def waiting_behaviour(run: dict[str, Any]) -> dict[str, int]:
    """How the text after a WAITING step relates to what that step gave, per slot: `repeat` (it
    starts with the same bytes), `split` (it continues them), `other`; `waiting` counts WAITING steps."""
    counts = {"waiting": 0, "repeat": 0, "split": 0, "other": 0}
    held: dict[int, bytes] = {}
    for e in callbacks(run):
        if e["state"] == WAITING:
            counts["waiting"] += 1
        if e["state"] not in (NORMAL, WAITING):
            continue
        for i, (token_id, hex_text) in enumerate(e.get("slots") or []):
            if token_id < 0 or hex_text is None:
                continue
            data = bytes.fromhex(hex_text)
            if i in held and data:
                before = held.pop(i)
                if data.startswith(before):
                    counts["repeat"] += 1
                elif data[0] & 0xC0 == 0x80:
                    counts["split"] += 1
                else:
                    counts["other"] += 1
            if e["state"] == WAITING and _ends_inside_a_character(data):
                held[i] = data
    return counts


def _ends_inside_a_character(data: bytes) -> bool:
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return need > back
    return False


def states_after_abort(run: dict[str, Any]) -> tuple[float | None, list[str]]:
    events = run.get("events", [])
    for k, e in enumerate(events):
        if e.get("abort"):
            after = [STATE_NAMES.get(x["state"], str(x["state"])) for x in events[k + 1 :] if "state" in x]
            return e["t_ms"], after
    return None, []


def replies(scenario: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((scenario or {}).get("replies", {}).values())


def answered(scenario: dict[str, Any] | None) -> bool:
    """Every request of the scenario got a complete reply."""
    rs = replies(scenario)
    return bool(rs) and all(r["final"] in ("stop", "length") for r in rs)


def what_ended(scenario: dict[str, Any] | None) -> str | None:
    """How a scenario that did not finish ended (died, timed out, not run), or None."""
    if not scenario:
        return "not run"
    if "died" in scenario:
        return f"the runtime died ({scenario['died']['name']})"
    if scenario.get("timeout"):
        return f"no answer within {scenario.get('after_s', '?')} s"
    if "exited" in scenario:
        return f"the probe's child exited with {scenario['exited']}"
    if scenario.get("error"):
        return str(scenario["error"])
    return None


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


# ---- the readings ------------------------------------------------------------------------------------


def slot_end(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    """Can one slot end naturally while its batch-mates run?"""
    sc = by_name.get("unequal-lengths-n2")
    if (ended := what_ended(sc)) is not None:
        return "unknown", ended
    run = run_of(trace, sc)
    assert run is not None
    for step, e in enumerate(callbacks(run)):
        ids = [t for t, _ in e.get("slots") or []]
        if e["state"] in (NORMAL, WAITING) and any(t < 0 for t in ids) and any(t >= 0 for t in ids):
            return "own", f"yes: at step {step} a slot ended (token_id < 0) while its batch-mate went on"
    return "together", "no: every slot produced tokens until the batch's last step"


def fewer_inputs(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    """Does a batch with fewer real inputs than n_batch (an empty prompt in the other slot) work?"""
    sc = by_name.get("unpadded-n2")
    if (ended := what_ended(sc)) is not None:
        return ("died" if "died" in (sc or {}) else "unknown"), ended
    run = run_of(trace, sc)
    if run is not None and run.get("rc") == 0 and answered(sc):
        return "empty slots work", "an empty input in the unused slot works: padding is not needed"
    message = next((r.get("message") for r in replies(sc) if r.get("message")), "")
    rc = run.get("rc") if run else None
    return "padding needed", f"an empty input failed the batch (rkllm_run returned {rc}; {message}): keep padding"


def unequal_prompts(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    """Do prompts of very different lengths in one batch get what each gets alone?"""
    batch, alone = by_name.get("unequal-prompts-n2"), by_name.get("unequal-prompts-alone")
    for sc in (batch, alone):
        if (ended := what_ended(sc)) is not None:
            return "unknown", ended
    assert batch is not None and alone is not None
    together = [batch["replies"].get(f"unequal-prompts-n2/{i}", {}).get("text", "") for i in range(2)]
    single = [alone["replies"].get(f"unequal-prompts-alone/{i}", {}).get("text", "") for i in range(2)]
    same = [
        a[: min(len(a), len(b))] == b[: min(len(a), len(b))] and a and b for a, b in zip(together, single, strict=True)
    ]
    if all(same):
        return "same", "yes: each reply in the batch began as the same prompt's reply alone (greedy)"
    which = ", ".join(("short", "long")[i] for i, ok in enumerate(same) if not ok)
    return "differ", f"no: the {which} prompt's reply in the batch differs from its reply alone (greedy)"


def token_input(n: int) -> Callable[[dict[str, Any], dict[str, dict[str, Any]]], Reading]:
    def reading(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
        sc = by_name.get(f"token-input-n{n}")
        if sc is None:
            part = next((p for p in trace.get("parts", []) if p["id"] == f"tokens-n{n}"), None)
            return "not asked", (part or {}).get("error") or "not run"
        if (ended := what_ended(sc)) is not None:
            return ("died" if "died" in sc else "unknown"), ended
        run = run_of(trace, sc)
        if run is not None and run.get("rc") == 0 and answered(sc) and all(r["text"] for r in replies(sc)):
            return "works", f"works at n_batch {n}: every slot answered"
        message = next((r.get("message") for r in replies(sc) if r.get("message")), "")
        return "fails", f"fails at n_batch {n}: rkllm_run returned {run.get('rc') if run else None} ({message})"

    return reading


def _prefill_tokens(trace: dict[str, Any], sc: dict[str, Any] | None) -> int | None:
    run = run_of(trace, sc, -1)
    for e in callbacks(run or {}):
        if e["state"] == FINISH and e.get("perf"):
            return int(e["perf"][0][1])
    return None


def template_off(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    """Does rkllm_set_chat_template with three empty strings switch the template off?"""
    on, off = by_name.get("template-on-n1"), by_name.get("template-off-n1")
    for sc in (on, off):
        if (ended := what_ended(sc)) is not None:
            return "unknown", ended
    tokens_on, tokens_off = _prefill_tokens(trace, on), _prefill_tokens(trace, off)
    if tokens_on is None or tokens_off is None:
        return "unknown", "no prefill_tokens in the FINISH perf"
    if tokens_off < tokens_on:
        return (
            "off",
            f"yes: the same prompt took {tokens_off} prefill tokens with it off, {tokens_on} with the built-in",
        )
    return "unchanged", (
        f"no change: {tokens_off} prefill tokens with three empty parts, {tokens_on} with the built-in template "
        "(the empty parts were ignored, or the built-in template adds nothing)"
    )


def is_running(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    values = (by_name.get("speed-n1") or {}).get("is_running") or {}
    idle, running = values.get("idle"), values.get("running")
    if idle is None or running is None:
        return "unknown", "not read"
    code = (
        "1 while running" if (idle, running) == (0, 1) else "0 while running" if (idle, running) == (1, 0) else "same"
    )
    return code, f"idle: {idle}, during a run: {running}"


def kv_after_run(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    sizes = (by_name.get("speed-n1") or {}).get("kv_cache_sizes")
    if sizes is None:
        return "unknown", "not read"
    return ("empty" if not any(sizes) else "kept"), f"after a run with keep_history=0: {sizes}"


def kv_after_abort(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    call = next((c for c in trace["calls"] if c["fn"] == "kv_cache_size" and c.get("when") == "after an abort"), None)
    if call is None:
        return "unknown", "no abort, or no rkllm_get_kv_cache_size"
    sizes = call.get("sizes")
    return ("empty" if not any(sizes or []) else "kept"), f"{sizes} (rkmqtt then clears it)"


def callback_thread(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    caller = sum(c.get("callback_threads", {}).get("caller", 0) for c in trace["calls"] if c["fn"] == "run")
    other = sum(c.get("callback_threads", {}).get("other", 0) for c in trace["calls"] if c["fn"] == "run")
    if not caller and not other:
        return "unknown", "no callback recorded"
    if caller and other:
        return "both", f"{caller} callbacks on the thread that called rkllm_run, {other} on others"
    if caller:
        return "caller", f"the thread that called rkllm_run ({caller} callbacks)"
    return "runtime thread", f"a thread of the runtime's, not the one that called rkllm_run ({other} callbacks)"


TIMING_WORDS = ("prefill", "generate", "decode", "token", "memory", "time")


def is_timing_line(line: str) -> bool:
    """A line of the runtime's log that tells a timing (not its version, not the stand-in's own notes)."""
    lower = line.lower()
    return any(w in lower for w in TIMING_WORDS) and "rkllm-standin:" not in line and "version" not in lower


def runtime_timings(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    part = next((p for p in trace.get("parts", []) if p.get("part") == "timings-n1"), None)
    if part is None:
        return "unknown", "not run"
    lines = [line for line in part.get("log", []) if is_timing_line(line)]
    if not lines:
        return "none", "RKLLM_LOG_LEVEL=1 printed no timings"
    return "printed", f"{len(lines)} line(s) with RKLLM_LOG_LEVEL=1 (below)"


def _ttft(trace: dict[str, Any], sc: dict[str, Any] | None) -> float | None:
    value = speed_summary(measured_runs(trace, sc))["ttft_ms"]
    return float(value) if value is not None else None


def prompt_cache(n: int) -> Callable[[dict[str, Any], dict[str, dict[str, Any]]], Reading]:
    def reading(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
        cached, host = by_name.get(f"system-prompt-cache-n{n}"), by_name.get(f"system-prompt-host-n{n}")
        if (ended := what_ended(cached)) is not None:
            return ("failed" if cached else "unknown"), ended
        if (ended := what_ended(host)) is not None:
            return "unknown", f"no figure without the cache: {ended}"
        with_cache, without = _ttft(trace, cached), _ttft(trace, host)
        if with_cache is None or without is None or without <= 0:
            return "unknown", "no time to first token"
        figures = f"time to first token {_ms(with_cache)} with it, {_ms(without)} without"
        if with_cache < CACHE_CUT * without:
            return "cuts", f"yes at n_batch {n}: {figures}"
        return "no cut", f"no at n_batch {n}: {figures}"

    return reading


def runtime_system_prompt(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    """Does the runtime reuse its template's system prompt between runs by itself?"""
    runtime, host = by_name.get("system-prompt-runtime-n1"), by_name.get("system-prompt-host-n1")
    for sc in (runtime, host):
        if (ended := what_ended(sc)) is not None:
            return "unknown", ended
    a, b = _ttft(trace, runtime), _ttft(trace, host)
    if a is None or b is None or b <= 0:
        return "unknown", "no time to first token"
    figures = f"time to first token {_ms(a)} with the system prompt in the runtime's template, {_ms(b)} rendered here"
    return ("reused" if a < CACHE_CUT * b else "not reused"), figures


def finish_results(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    """How many results does FINISH pass at n_batch 2 (every one read, in a child of its own)?"""
    sc = by_name.get("finish-slots-n2")
    if sc and "died" in sc:
        return "died", f"reading result[1] at FINISH killed the process ({sc['died']['name']}): it passes fewer"
    if (ended := what_ended(sc)) is not None:
        return "unknown", ended
    run = run_of(trace, sc)
    rows = next((e["perf"] for e in callbacks(run or {}) if e["state"] == FINISH and e.get("perf")), None)
    if not rows:
        return "unknown", "no FINISH perf"
    plausible = all(0 <= r[1] <= 1 << 20 and 0 <= r[3] <= 1 << 20 and 0 <= r[0] < 1e7 for r in rows)
    text = "; ".join(f"[{r[0]:.1f} ms, {r[1]}, {r[2]:.1f} ms, {r[3]}, {r[4]:.0f} MB]" for r in rows)
    return ("n_batch results" if plausible else "garbage past result[0]"), f"perf per result: {text}"


def after_abort(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    sc = by_name.get("cancel-all-prefill")
    if (ended := what_ended(sc)) is not None:
        return "unknown", ended
    run = run_of(trace, sc)
    at, after = states_after_abort(run or {})
    if at is None:
        return "unknown", "no rkllm_abort during the run"
    return (
        after[-1] if after else "none"
    ), f"{', '.join(after) or 'no callback'}; rkllm_run returned {(run or {}).get('rc')}"


def waiting_text(trace: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> Reading:
    counts = {"waiting": 0, "repeat": 0, "split": 0, "other": 0}
    for name in ("chinese-n1", "emoji-n1", "chinese+emoji-n2"):
        run = run_of(trace, by_name.get(name))
        for k, v in waiting_behaviour(run or {}).items():
            counts[k] += v
    if not counts["waiting"]:
        return "no waiting", "no WAITING callback"
    code = (
        "repeat"
        if counts["repeat"] and not counts["split"]
        else "split"
        if counts["split"] and not counts["repeat"]
        else "mixed"
    )
    return code, (
        f"{counts['waiting']} WAITING callbacks; the next text repeated the held bytes {counts['repeat']}×, "
        f"continued them {counts['split']}×, neither {counts['other']}×"
    )


QUESTIONS: list[tuple[str, str, Callable[[dict[str, Any], dict[str, dict[str, Any]]], Reading]]] = [
    ("slot_end", "one slot ends while its batch-mates run", slot_end),
    ("fewer_inputs", "fewer inputs than n_batch (empty slot)", fewer_inputs),
    ("unequal_prompts", "unequal prompt lengths in one batch", unequal_prompts),
    ("token_input_n1", "RKLLM_INPUT_TOKEN at n_batch 1", token_input(1)),
    ("token_input_n2", "RKLLM_INPUT_TOKEN at n_batch 2", token_input(2)),
    ("template_off", "template off (three empty parts)", template_off),
    ("is_running", "rkllm_is_running", is_running),
    ("kv_after_run", "rkllm_get_kv_cache_size after a run", kv_after_run),
    ("kv_after_abort", "rkllm_get_kv_cache_size after an abort", kv_after_abort),
    ("callback_thread", "the thread of the callback", callback_thread),
    ("runtime_timings", "the runtime's timings (RKLLM_LOG_LEVEL=1)", runtime_timings),
    ("prompt_cache_n1", "prompt cache of the system prompt, n_batch 1", prompt_cache(1)),
    ("prompt_cache_n2", "prompt cache of the system prompt, n_batch 2", prompt_cache(2)),
    ("runtime_system_prompt", "the runtime's template system prompt reused", runtime_system_prompt),
    ("finish_results", "results passed at FINISH, n_batch 2", finish_results),
    ("after_abort", "how a run ends after rkllm_abort", after_abort),
    ("waiting_text", "the text of WAITING steps", waiting_text),
]


def readings(trace: dict[str, Any]) -> dict[str, Reading]:
    """Every question's reading, by key."""
    by_name = scenarios_by_name(trace)
    return {key: read(trace, by_name) for key, _, read in QUESTIONS}
