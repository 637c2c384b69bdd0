"""The Markdown summary of a `rkmqtt probe` trace: the tables a board owner pastes into an issue
(main thread; pure functions of the trace; how each figure is made: docs/rkllm-runtime.md)."""

from __future__ import annotations

from typing import Any

from rkmqtt.engines.rkllm.probe_readings import (
    QUESTIONS,
    STATE_NAMES,
    answered,
    callbacks,
    is_timing_line,
    measured_runs,
    readings,
    replies,
    run_of,
    scenarios_by_name,
    speed_summary,
    states_after_abort,
    waiting_behaviour,
    what_ended,
)

__all__ = ["binding_checks", "render_summary", "waiting_behaviour"]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _range(pair: tuple[float, float] | None, digits: int = 1) -> str:
    return f" ({_fmt(pair[0], digits)}–{_fmt(pair[1], digits)})" if pair else ""


def _ok(good: bool) -> str:
    return "ok" if good else "**wrong**"


# ---- the binding's checks ---------------------------------------------------------------------------


def _text_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = run_of(trace, sc)
    if (ended := what_ended(sc)) is not None or run is None:
        return sc["name"], ended or "no run", "–"
    w = waiting_behaviour(run)
    if w["waiting"] == 0:
        what = "no WAITING callback"
    else:
        what = (
            f"{w['waiting']} WAITING callback(s); a slot's next text after one repeated its bytes {w['repeat']}×, "
            f"continued them {w['split']}×, neither {w['other']}×"
        )
    good = answered(sc) and all(_clean_text(r) for r in replies(sc))
    return sc["name"], what, f"{_ok(good)}: every reply complete, no U+FFFD"


def _clean_text(reply: dict[str, Any]) -> bool:
    """No U+FFFD in the text, but for one at the end of a reply cut by length inside a character."""
    text: str = reply["text"]
    if reply["final"] == "length" and text.endswith("\ufffd"):
        text = text[:-1]
    return "\ufffd" not in text


def _kept(sc: dict[str, Any] | None) -> bool:
    return bool((sc or {}).get("engine", {}).get("recoveries") == 0)


def _cancel_all_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = run_of(trace, sc)
    if (ended := what_ended(sc)) is not None or run is None:
        return "cancel all during prefill", ended or "no run (every request was cancelled before it began)", "–"
    at, after = states_after_abort(run)
    ttft = speed_summary([run])["ttft_ms"]
    if at is None:
        what = f"no rkllm_abort during the run (cancel planned at {_fmt(sc.get('cancel_all_at_ms'))} ms)"
    else:
        when = "during prefill" if ttft is None or at < ttft else "after the first token"
        what = (
            f"rkllm_abort at {_fmt(at)} ms ({when}); rkllm_run returned {_fmt(run.get('duration_ms'))} ms "
            f"after its start with {run.get('rc')}; callbacks after the abort: {', '.join(after) or 'none'}"
        )
    cleared = any(c["fn"] == "clear_kv_cache" and c.get("rc") == 0 for c in trace["calls"][sc["runs"][0] :])
    good = all(r["final"] == "cancelled" for r in replies(sc)) and _kept(sc) and (at is None or cleared)
    return "cancel all during prefill", what, f"{_ok(good)}: no reply after the cancel, KV cache cleared, model kept"


def _cancel_one_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = run_of(trace, sc)
    if (ended := what_ended(sc)) is not None or run is None:
        return "cancel one slot of 2", ended or "no run", "–"
    kept = sc.get("replies", {}).get(f"{sc['name']}/0", {})
    tokens_before_abort, aborted = 0, False
    for e in run.get("events", []):
        if e.get("abort"):
            aborted = True
            break
        slots = e.get("slots") or []
        tokens_before_abort += e.get("state") in (0, 1) and bool(slots) and slots[0][0] >= 0
    early = aborted and tokens_before_abort < (kept.get("completion_tokens") or 0)
    abort = "called while slot 0 ran" if early else "called once slot 0 had ended" if aborted else "not called"
    what = (
        f"slot 1 cancelled after 3 chunks; rkllm_abort {abort}; slot 0 ended "
        f"{kept.get('final')} with {kept.get('completion_tokens')} tokens"
    )
    good = not early and kept.get("final") in ("stop", "length")
    return "cancel one slot of 2", what, f"{_ok(good)}: the batch-mate finished, no abort while it ran"


def _over_long_row(trace: dict[str, Any], sc: dict[str, Any], after: dict[str, Any] | None) -> tuple[str, str, str]:
    prep = (sc.get("prepare") or [{}])[0]
    run = run_of(trace, sc)
    if (ended := what_ended(sc)) is not None or run is None:
        runtime = ended or "not run"
    else:
        states = [STATE_NAMES.get(e["state"], str(e["state"])) for e in callbacks(run)]
        runtime = f"rkllm_run returned {run.get('rc')} after {_fmt(run.get('duration_ms'))} ms; callbacks: "
        runtime += ", ".join(states[:6]) + ("…" if len(states) > 6 else "") if states else "none"
    what = f"prepare(): {prep.get('result')}; sent anyway: {runtime}"
    good = prep.get("result") == "too_long" and answered(after) and _kept(after)
    return "over-long prompt", what, f"{_ok(good)}: refused as too_long; after a failed run the model stays loaded"


def _padding_row(trace: dict[str, Any], sc: dict[str, Any]) -> tuple[str, str, str]:
    run = run_of(trace, sc)
    if (ended := what_ended(sc)) is not None or run is None:
        return "1 request at n_batch 2 (padding)", ended or "no run", "–"
    at, after = states_after_abort(run)
    if at is None:
        what = f"no rkllm_abort (the runtime stopped by itself); rkllm_run returned {run.get('rc')}"
    else:
        what = (
            f"the request ended, the padding slot ran on: rkllm_abort at {_fmt(at)} ms; then "
            f"{', '.join(after) or 'no callback'}; rkllm_run returned {run.get('rc')}"
        )
    reply: dict[str, Any] = next(iter(sc.get("replies", {}).values()), {})
    good = reply.get("final") in ("stop", "length") and _kept(sc)
    return "1 request at n_batch 2 (padding)", what, f"{_ok(good)}: answered {reply.get('final')}, model kept"


def _served_row(label: str, sc: dict[str, Any]) -> tuple[str, str, str]:
    """A scenario whose requests must all be answered, whatever the runtime does with them."""
    if (ended := what_ended(sc)) is not None:
        return label, ended, "–"
    rs = replies(sc)
    finals = ", ".join(sorted({str(r["final"]) for r in rs}))
    good = bool(rs) and all(r["final"] not in (None, "timeout") for r in rs) and _kept(sc)
    return label, f"replies: {finals}", f"{_ok(good)}: every request answered, model kept"


def _behaviour_rows(trace: dict[str, Any]) -> list[tuple[str, str, str]]:
    by_name = scenarios_by_name(trace)
    rows: list[tuple[str, str, str]] = []
    for name in ("chinese-n1", "emoji-n1", "chinese+emoji-n2"):
        if name in by_name:
            rows.append(_text_row(trace, by_name[name]))
    if "cancel-all-prefill" in by_name:
        rows.append(_cancel_all_row(trace, by_name["cancel-all-prefill"]))
    if "cancel-one-slot" in by_name:
        rows.append(_cancel_one_row(trace, by_name["cancel-one-slot"]))
    if "over-long" in by_name:
        rows.append(_over_long_row(trace, by_name["over-long"], by_name.get("after-over-long")))
    if "padding" in by_name:
        rows.append(_padding_row(trace, by_name["padding"]))
    for name, label in (("unpadded-n2", "empty slot at n_batch 2"), ("token-input-n2", "token input at n_batch 2")):
        if name in by_name:
            rows.append(_served_row(label, by_name[name]))
    return rows


def binding_checks(trace: dict[str, Any]) -> dict[str, bool]:
    """Each behaviour row's verdict on the binding (True: ok), by check name (for tests)."""
    return {a: c.startswith("ok") for a, _, c in _behaviour_rows(trace) if c.startswith(("ok", "**wrong**"))}


# ---- the tables -------------------------------------------------------------------------------------


def _parts_lines(trace: dict[str, Any]) -> list[str]:
    parts = trace.get("parts", [])
    lines = ["### Parts (each in a child process of its own)", ""]
    dead = [p for p in parts if p.get("outcome") in ("died", "timeout", "exited")]
    for p in dead:
        where = p.get("in")
        runs = [c for c in trace["calls"] if c.get("part") == p["id"] and c["fn"] == "run"]
        done = sum(1 for c in runs if "rc" in c)
        how = {
            "died": f"**the runtime died ({p.get('signal')})**",
            "timeout": f"**no answer within {p.get('after_s', '?')} s** (stopped)",
            "exited": f"**the probe's child exited with {p.get('exit')}**",
        }[p["outcome"]]
        lines.append(f"- {how} in part `{p['id']}`, {where}; the trace holds its {done} run(s) before that")
    if dead:
        lines.append("")
    lines += [
        "| part | n_batch | outcome | scenarios done | seconds | peak RSS of its process (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for p in parts:
        outcome = p.get("outcome") or "running"
        if outcome in ("died", "timeout", "exited"):
            outcome += f" in {p.get('in')}" + (f" ({p['signal']})" if p.get("signal") else "")
        elif outcome in ("init failed", "skipped"):
            error = str(p.get("error", "")).replace("|", "/")
            outcome += f": {error[:117] + '…' if len(error) > 120 else error}"
        lines.append(
            f"| {p['id']} | {p.get('n_batch', '–')} | {outcome} | {len(p.get('completed', []))} | "
            f"{_fmt(p.get('seconds'))} | {_fmt(p.get('peak_rss_mb'), 0)} |"
        )
    return lines


def _npu_memory(sc: dict[str, Any]) -> str:
    mem = sc.get("npu_memory") or {}
    for path, text in mem.items():
        if path.endswith("/mm") and text != "unreadable":
            first = text.splitlines()[0] if text else ""
            return first.replace("|", "/")[:60] or "(empty)"
    return "unreadable"


def _speed_lines(trace: dict[str, Any]) -> list[str]:
    opts = trace.get("options", {})
    by_name = scenarios_by_name(trace)
    parts = {p["id"]: p for p in trace.get("parts", [])}
    lines = [
        f"### Speed ({opts.get('tokens')} new tokens per request at most, greedy, a different prompt per slot; "
        f"median of {opts.get('repeats')} runs after a warm-up, (min–max))",
        "",
        "| n_batch | time to first token (ms) | prefill (tokens/s) | decode, all slots (tokens/s) "
        "| decode per slot (tokens/s) | peak RSS of its process (MB) | NPU memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, sc in by_name.items():
        if not name.startswith("speed-n"):
            continue
        if (ended := what_ended(sc)) is not None:
            lines.append(f"| {sc['n_batch']} | {ended} | | | | | |")
            continue
        f = speed_summary(measured_runs(trace, sc))
        per_slot = f["decode_tps"] / sc["n_batch"] if f["decode_tps"] else None
        rss = sc.get("peak_rss_mb") or parts.get(sc.get("part", ""), {}).get("peak_rss_mb")
        lines.append(
            f"| {sc['n_batch']} | {_fmt(f['ttft_ms'], 0)}{_range(f['ttft_ms_range'], 0)} | {_fmt(f['prefill_tps'])} "
            f"| {_fmt(f['decode_tps'])}{_range(f['decode_tps_range'])} | {_fmt(per_slot)} | {_fmt(rss, 0)} "
            f"| {_npu_memory(sc)} |"
        )
    return lines


def _clock_line(trace: dict[str, Any]) -> str:
    clocks = trace.get("clocks") or {}
    cpu, dev = clocks.get("cpu"), clocks.get("devfreq")
    parts: list[str] = []
    if isinstance(cpu, dict):
        for name, f in cpu.items():
            parts.append(f"{name} {f.get('scaling_governor', '?')} {f.get('scaling_cur_freq', '?')} kHz")
    else:
        parts.append(str(cpu))
    if isinstance(dev, dict):
        for name, f in dev.items():
            parts.append(f"{name} {f.get('governor', '?')} {f.get('cur_freq', '?')} Hz")
    else:
        parts.append(str(dev))
    return "; ".join(parts)


def render_summary(trace: dict[str, Any]) -> str:
    host, rt = trace.get("host", {}), trace.get("runtime", {})
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
        f"| clocks at the start | {_clock_line(trace)} |",
        f"| rkmqtt | {trace.get('rkmqtt')}, probe script {trace.get('script_version')}, {trace.get('created')} |",
        "",
        *_parts_lines(trace),
        "",
        *_speed_lines(trace),
        "",
        "### rkmqtt's binding",
        "",
        "| check | what the runtime did | rkmqtt's binding |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _behaviour_rows(trace)]
    found = readings(trace)
    lines += ["", "### Questions for the runtime", "", "| question | answer | |", "|---|---|---|"]
    lines += [f"| {label} | {found[key][0]} | {found[key][1]} |" for key, label, _ in QUESTIONS]
    timing_part = next((p for p in trace.get("parts", []) if p.get("part") == "timings-n1"), None)
    if timing_part and found["runtime_timings"][0] == "printed":
        shown = [line for line in timing_part.get("log", []) if is_timing_line(line)][:12]
        lines += ["", "The runtime with RKLLM_LOG_LEVEL=1 printed:", "", "```", *shown, "```"]
    logs = [line for p in trace.get("parts", []) for line in p.get("log", [])]
    version_lines = list(dict.fromkeys(line for line in logs if "version" in line.lower()))[:3]
    if version_lines:
        lines += ["", "The runtime said:", "", "```", *version_lines, "```"]
    return "\n".join(lines) + "\n"
