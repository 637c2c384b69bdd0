"""The Markdown summary of a `rkmqtt probe` trace: the tables a board owner pastes into an issue
(main thread; pure functions of the trace; how each figure is made: docs/rkllm-runtime.md)."""

from __future__ import annotations

from typing import Any

WAITING, FINISH, ERROR = 1, 2, 3
STATE_NAMES = {0: "NORMAL", 1: "WAITING", 2: "FINISH", 3: "ERROR"}


def _run(trace: dict[str, Any], scenario: dict[str, Any], k: int = 0) -> dict[str, Any] | None:
    runs = scenario.get("runs") or []
    return trace["calls"][runs[k]] if len(runs) > k else None


def _callbacks(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in run.get("events", []) if "state" in e]


def speed(run: dict[str, Any]) -> dict[str, float | None]:
    """Time to first token, decode and prefill speed, memory, from one run's events."""
    token_times: list[tuple[float, int]] = []
    perf: list[float] | None = None
    for e in _callbacks(run):
        slots = e.get("slots") or []
        n = sum(1 for token_id, _ in slots if token_id >= 0)
        if e["state"] in (0, WAITING) and n:
            token_times.append((e["t_ms"], n))
        if e["state"] == FINISH and e.get("perf"):
            perf = e["perf"][0]
    out: dict[str, float | None] = {"ttft_ms": None, "decode_tps": None, "prefill_tps": None, "memory_mb": None}
    if token_times:
        out["ttft_ms"] = token_times[0][0]
        span = token_times[-1][0] - token_times[0][0]
        later = sum(n for _, n in token_times[1:])
        out["decode_tps"] = later / span * 1000.0 if span > 0 and later else None
    if perf is not None:
        p_ms, p_tokens, _, _, memory = perf
        out["prefill_tps"] = p_tokens / p_ms * 1000.0 if p_ms > 0 and p_tokens > 0 else None
        out["memory_mb"] = memory or None
    return out


def waiting_behaviour(run: dict[str, Any]) -> dict[str, int]:
    """How the text after a WAITING step relates to what that step gave, per slot: `repeat` (it
    starts with the same bytes), `split` (it continues them), `other`; `waiting` counts WAITING steps."""
    counts = {"waiting": 0, "repeat": 0, "split": 0, "other": 0}
    held: dict[int, bytes] = {}
    for e in _callbacks(run):
        if e["state"] == WAITING:
            counts["waiting"] += 1
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


def _states_after_abort(run: dict[str, Any]) -> tuple[float | None, list[str]]:
    events = run.get("events", [])
    for k, e in enumerate(events):
        if e.get("abort"):
            after = [STATE_NAMES.get(x["state"], str(x["state"])) for x in events[k + 1 :] if "state" in x]
            return e["t_ms"], after
    return None, []


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ok(good: bool) -> str:
    return "ok" if good else "**wrong**"


# ---- the rows -------------------------------------------------------------------------------------


def _replies(scenario: dict[str, Any]) -> list[dict[str, Any]]:
    return list(scenario.get("replies", {}).values())


def _text_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = _run(trace, sc)
    if run is None:
        return sc["name"], sc.get("error", "no run"), "–"
    w = waiting_behaviour(run)
    if w["waiting"] == 0:
        what = "no WAITING callback"
    else:
        what = (
            f"{w['waiting']} WAITING callback(s); a slot's next text after one repeated its bytes {w['repeat']}×, "
            f"continued them {w['split']}×, neither {w['other']}×"
        )
    replies = _replies(sc)
    good = bool(replies) and all(r["final"] in ("stop", "length") and _clean_text(r) for r in replies)
    return sc["name"], what, f"{_ok(good)}: every reply complete, no U+FFFD"


def _clean_text(reply: dict[str, Any]) -> bool:
    """No U+FFFD in the text, but for one at the end of a reply cut by length inside a character."""
    text: str = reply["text"]
    if reply["final"] == "length" and text.endswith("\ufffd"):
        text = text[:-1]
    return "\ufffd" not in text


def _cancel_all_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = _run(trace, sc)
    if run is None:
        return sc["name"], sc.get("error", "no run (every request was cancelled before it began)"), "–"
    at, after = _states_after_abort(run)
    ttft = speed(run)["ttft_ms"]
    if at is None:
        what = f"no rkllm_abort during the run (cancel planned at {_fmt(sc.get('cancel_all_at_ms'))} ms)"
    else:
        when = "during prefill" if ttft is None or at < ttft else "after the first token"
        what = (
            f"rkllm_abort at {_fmt(at)} ms ({when}); rkllm_run returned {_fmt(run.get('duration_ms'))} ms "
            f"after its start with {run.get('rc')}; callbacks after the abort: {', '.join(after) or 'none'}"
        )
    good = all(r["final"] == "cancelled" for r in _replies(sc)) and sc.get("engine", {}).get("recoveries") == 0
    return "cancel all during prefill", what, f"{_ok(good)}: no reply after the cancel, model kept"


def _cancel_one_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = _run(trace, sc)
    if run is None:
        return sc["name"], sc.get("error", "no run"), "–"
    aborted = any(e.get("abort") for e in run.get("events", []))
    replies = sc.get("replies", {})
    kept = replies.get(f"{sc['name']}/0", {})
    what = (
        f"slot 1 cancelled after 3 chunks; rkllm_abort {'called' if aborted else 'not called'}; slot 0 ended "
        f"{kept.get('final')} with {kept.get('completion_tokens')} tokens"
    )
    good = not aborted and kept.get("final") in ("stop", "length")
    return "cancel one slot of 2", what, f"{_ok(good)}: the batch-mate finished, no abort"


def _over_long_row(trace: dict[str, Any], sc: dict[str, Any], after: dict[str, Any] | None) -> tuple[str, str, str]:
    prep = (sc.get("prepare") or [{}])[0]
    run = _run(trace, sc)
    if run is None:
        runtime = sc.get("error", "not run")
    else:
        states = [STATE_NAMES.get(e["state"], str(e["state"])) for e in _callbacks(run)]
        runtime = f"rkllm_run returned {run.get('rc')} after {_fmt(run.get('duration_ms'))} ms; callbacks: "
        runtime += ", ".join(states[:6]) + ("…" if len(states) > 6 else "") if states else "none"
    what = f"prepare(): {prep.get('result')}; sent anyway: {runtime}"
    served = after is not None and all(r["final"] in ("stop", "length") for r in _replies(after))
    kept = after is not None and after.get("engine", {}).get("recoveries") == 0
    good = prep.get("result") == "too_long" and served and kept
    return "over-long prompt", what, f"{_ok(good)}: refused as too_long; after a failed run the model stays loaded"


def _padding_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = _run(trace, sc)
    if run is None:
        return sc["name"], sc.get("error", "no run"), "–"
    at, after = _states_after_abort(run)
    if at is None:
        what = f"no rkllm_abort (the runtime stopped by itself); rkllm_run returned {run.get('rc')}"
    else:
        what = (
            f"the request ended, the padding slot ran on: rkllm_abort at {_fmt(at)} ms; then "
            f"{', '.join(after) or 'no callback'}; rkllm_run returned {run.get('rc')}"
        )
    reply: dict[str, Any] = next(iter(sc.get("replies", {}).values()), {})
    good = reply.get("final") in ("stop", "length") and sc.get("engine", {}).get("recoveries") == 0
    return "1 request at n_batch 2 (padding)", what, f"{_ok(good)}: answered {reply.get('final')}, model kept"


def render_summary(trace: dict[str, Any]) -> str:
    host, rt, opts = trace.get("host", {}), trace.get("runtime", {}), trace.get("options", {})
    scenarios = {s["name"]: s for s in trace.get("scenarios", [])}
    lines = [
        f"## rkmqtt probe: {host.get('soc') or 'no Rockchip SoC'}, RKLLM runtime {rt.get('version') or '?'} "
        f"(ABI {rt.get('abi')}), {rt.get('model')}",
        "",
        "| | |",
        "|---|---|",
        f"| board | {host.get('board') or '–'} ({host.get('soc') or '–'}), NPU driver {host.get('npu_driver') or '?'}, "
        f"kernel {host.get('kernel')}, {host.get('cpus')} CPUs, {host.get('machine')} |",
        f"| runtime | `{rt.get('library')}`: {rt.get('version') or 'no version string'}, ABI {rt.get('abi')} |",
        f"| model | {rt.get('model')} ({(rt.get('model_bytes') or 0) / 2**20:,.0f} MiB) |",
        f"| rkmqtt | {trace.get('rkmqtt')}, probe script {trace.get('script_version')}, {trace.get('created')} |",
        "",
        f"### Speed ({opts.get('tokens')} new tokens per request, greedy)",
        "",
        "| n_batch | time to first token (ms) | prefill (tokens/s) | decode, all slots (tokens/s) "
        "| decode per slot (tokens/s) | memory (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, sc in scenarios.items():
        if not name.startswith("speed-n"):
            continue
        run = _run(trace, sc)
        if run is None:
            lines.append(f"| {sc['n_batch']} | {sc.get('error', 'no run')} | | | | |")
            continue
        f = speed(run)
        per_slot = f["decode_tps"] / sc["n_batch"] if f["decode_tps"] else None
        lines.append(
            f"| {sc['n_batch']} | {_fmt(f['ttft_ms'], 0)} | {_fmt(f['prefill_tps'])} | {_fmt(f['decode_tps'])} "
            f"| {_fmt(per_slot)} | {_fmt(f['memory_mb'], 0)} |"
        )
    rows: list[tuple[str, str, str]] = []
    for name in ("chinese-n1", "emoji-n1", "chinese+emoji-n2"):
        if name in scenarios:
            rows.append(_text_row(trace, scenarios[name]))
    if "cancel-all-prefill" in scenarios:
        rows.append(_cancel_all_row(trace, scenarios["cancel-all-prefill"]))
    if "cancel-one-slot" in scenarios:
        rows.append(_cancel_one_row(trace, scenarios["cancel-one-slot"]))
    if "over-long" in scenarios:
        rows.append(_over_long_row(trace, scenarios["over-long"], scenarios.get("after-over-long")))
    if "padding" in scenarios:
        rows.append(_padding_row(trace, scenarios["padding"]))
    lines += ["", "### Behaviour", "", "| check | what the runtime did | rkmqtt's binding |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    version_lines = list(dict.fromkeys(line for line in trace.get("runtime_log", []) if "version" in line.lower()))[:3]
    if version_lines:
        lines += ["", "The runtime said:", "", "```", *version_lines, "```"]
    return "\n".join(lines) + "\n"


def binding_checks(trace: dict[str, Any]) -> dict[str, bool]:
    """Each behaviour row's verdict on the binding (True: ok), by check name (for tests)."""
    text = render_summary(trace)
    out: dict[str, bool] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if len(parts) == 3 and parts[2].startswith(("ok", "**wrong**")):
            out[parts[0]] = parts[2].startswith("ok")
    return out
