"""The front's-cost benchmark pairs run k through the front with run k of the server alone (main thread)."""

from __future__ import annotations

from typing import Any

from benchmarks.upstream_front import figures


def _run(tps: float, ttft: float | None, errors: int = 0) -> dict[str, Any]:
    return {"tokens_per_s": tps, "ttft_ms_p50": ttft, "errors": errors}


def test_pairs_cancel_drift_and_the_medians_stay_beside() -> None:
    # The machine speeds up over the runs; the front costs 2 % and adds 5 ms in every pair.
    direct = [_run(50.0, 180.0), _run(55.0, 150.0), _run(60.0, 120.0)]
    front = [_run(49.0, 185.0), _run(53.9, 155.0), _run(58.8, 125.0)]
    out = figures(direct, front)
    assert out["ratio_tokens_per_s"] == 0.98
    assert out["ratio_per_repeat"] == [0.98, 0.98, 0.98]
    assert out["added_ttft_ms_p50"] == 5.0
    assert out["ratio_of_medians"] == round(53.9 / 55.0, 4)
    assert out["added_ttft_of_medians_ms"] == 5.0
    assert out["errors"] == 0


def test_a_run_without_a_first_token_is_left_out_of_the_ttft_pairs_and_errors_add_up() -> None:
    direct = [_run(50.0, 100.0), _run(50.0, None, errors=2)]
    front = [_run(45.0, 130.0, errors=1), _run(40.0, 90.0)]
    out = figures(direct, front)
    assert out["added_ttft_ms_per_repeat"] == [30.0]
    assert out["ratio_per_repeat"] == [0.9, 0.8]
    assert out["errors"] == 3
