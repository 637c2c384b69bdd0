"""NumpyEngine as the scheduler drives it: answers, continuous batching, seeds, UTF-8 streaming,
context limits, cancel. SmolLM2 is loaded once for the module; small GGUF models written by the
tests cover what SmolLM2 cannot be made to do on demand."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rkmqtt.bench.prompts import BUILTIN_PROMPTS
from rkmqtt.engines.base import ErrorEvent, FinishEvent, TokenEvent
from rkmqtt.engines.numpy.engine import NumpyEngine
from rkmqtt.errors import RequestRejected
from rkmqtt.protocol import ErrorCode
from tests.numpy_fixtures import Result, TinySpec, byte_token, drive, req, write_tiny_gguf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "What is 2+2?",
    "Name a famous scientist.",
]


def loaded(n_batch: int, reuse_prefix: bool = True) -> Iterator[NumpyEngine]:
    engine = NumpyEngine(n_batch=n_batch, max_context=512, reuse_prefix=reuse_prefix)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def smol() -> Iterator[NumpyEngine]:
    yield from loaded(3)


def test_paris(smol: NumpyEngine) -> None:
    res = drive(smol, [req("paris", "What is the capital of France?", 32)])["paris"]
    assert "Paris" in res.text
    assert res.finish is not None and res.finish.reason == "stop"  # ended on <|im_end|>
    assert res.finish.completion_tokens == sum(c.tokens for c in res.chunks)
    assert "<|im_end|>" not in res.text
    assert smol.free_slots() == 3


def test_batched_greedy_equals_one_at_a_time(smol: NumpyEngine) -> None:
    lengths = [14, 6, 18, 9, 12]  # requests leave at different steps and others take their slots
    reqs = [req(f"r{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))]
    alone = {r.key: drive(smol, [r])[r.key] for r in reqs}
    concurrency: list[int] = []
    together = drive(smol, reqs, one_per_step=True, on_step=lambda s, _: concurrency.append(smol.active()))
    assert max(concurrency) == 3  # the slots were shared
    slots_used = {together[r.key].finish.slot for r in reqs}  # type: ignore[union-attr]
    assert slots_used == {0, 1, 2}
    for r in reqs:
        a, t = alone[r.key], together[r.key]
        assert t.text == a.text, r.key
        assert t.finish is not None and a.finish is not None
        assert (t.finish.reason, t.finish.completion_tokens) == (a.finish.reason, a.finish.completion_tokens)


def test_a_new_request_reuses_the_prompt_prefix_its_slot_holds(smol: NumpyEngine) -> None:
    """A slot's KV cache keeps the last request's tokens: a request that shares a prefix with them
    (here SmolLM2's built-in system prompt, or the whole prompt again) starts its prefill after
    it, takes the slot with the longest shared prefix, and answers exactly as a cold slot does."""
    prompts = ["What is the capital of France?", "Name a famous scientist."]
    smol.reuse_prefix = False
    try:
        cold = {p: drive(smol, [req("cold", p, 12)])["cold"] for p in prompts}
        assert all(c.finish is not None and c.finish.perf["reused_prompt_tokens"] == 0 for c in cold.values())
    finally:
        smol.reuse_prefix = True
    first = drive(smol, [req("a", prompts[0], 12)])["a"]  # warms a slot with prompts[0] and its answer
    again = drive(smol, [req("b", prompts[0], 12)])["b"]
    other = drive(smol, [req("c", prompts[1], 12)])["c"]
    n0 = first.finish.prompt_tokens if first.finish and first.finish.prompt_tokens else 0
    assert again.finish is not None and again.finish.perf["reused_prompt_tokens"] == n0 - 1
    assert other.finish is not None and other.finish.perf["reused_prompt_tokens"] >= 20  # the system prompt
    assert again.text == cold[prompts[0]].text and first.text == cold[prompts[0]].text
    assert other.text == cold[prompts[1]].text
    assert smol.info()["reused_prompt_tokens"] >= n0 - 1 + 20


def test_seeded_sampling_is_independent_of_batch_mates(smol: NumpyEngine) -> None:
    sampled = req("s", "Tell me a short story about a robot.", 20, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    alone = drive(smol, [sampled])["s"].text
    mates = [
        req("m1", "What is Python?", 12, temperature=0.8, seed=7),
        req("m2", "Describe a cat.", 25),
    ]
    together = drive(smol, [mates[0], sampled, mates[1]], one_per_step=True)["s"].text
    assert together == alone
    again = drive(smol, [sampled])["s"].text
    assert again == alone
    other_seeds = {
        drive(smol, [req("o", sampled.messages[0].content, 20, temperature=1.0, seed=s)])["o"].text for s in (1, 2, 3)
    }
    assert len(other_seeds | {alone}) > 1  # the seed matters


def test_repeat_penalty_and_top_k_1(smol: NumpyEngine) -> None:
    greedy = drive(smol, [req("g", "Count from one to ten in words.", 20)])["g"].text
    top1 = drive(smol, [req("k", "Count from one to ten in words.", 20, temperature=1.5, top_k=1, seed=3)])["k"].text
    assert top1 == greedy  # top-k 1 is greedy whatever the temperature
    penal = drive(smol, [req("p", "Count from one to ten in words.", 20, repeat_penalty=3.0)])["p"].text
    assert penal != greedy


def test_extreme_sampling_values_run_beside_a_plain_request(smol: NumpyEngine) -> None:
    """The ends of every range the wire contract accepts, in one batch with a greedy request:
    each ends normally, and the greedy one is unaffected by its batch-mates."""
    prompt = "Name three fruits."
    plain = req("plain", "Count from one to ten in words.", 12)
    alone = drive(smol, [plain])["plain"]
    greedy = drive(smol, [req("g", prompt, 12)])["g"].text
    extremes = [
        req("tiny-temp", prompt, 12, temperature=1e-320, seed=1),  # overflows a softmax: greedy
        req("tiny-top-p", prompt, 12, temperature=1.0, top_p=1e-320, seed=2),  # keeps the top token
        req("hot", prompt, 12, temperature=5.0, top_k=100_000, top_p=1.0, repeat_penalty=10.0, seed=3),
        req("low-penalty", prompt, 12, temperature=0.01, top_k=1, repeat_penalty=0.1, seed=4),
    ]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # an overflow or a NaN is a failure
        results = drive(smol, [plain, *extremes], one_per_step=True)
    for r in [plain, *extremes]:
        res = results[r.key]
        assert res.error is None and res.finish is not None, r.key
        assert res.finish.completion_tokens >= 1
    assert results["plain"].text == alone.text
    assert results["tiny-temp"].text == greedy
    assert results["tiny-top-p"].text == greedy


def test_too_long_is_refused_before_taking_a_slot(smol: NumpyEngine) -> None:
    long = req("long", "word " * 600, 16)
    with pytest.raises(RequestRejected) as info:
        smol.prepare(long)
    assert info.value.code is ErrorCode.TOO_LONG and "512" in info.value.message
    assert smol.free_slots() == 3
    # the rule: the prompt plus min(max_new_tokens, max_context // 4) must fit
    fits = req("fits", "word " * 300, 100)
    n = smol.prepare(fits).prompt_tokens
    assert n is not None and n + 100 <= 512
    # a long answer is not refused while a quarter of the context (128) is left for it
    assert smol.prepare(req("big", "word " * 300, 10_000)).prompt_tokens == n
    with pytest.raises(RequestRejected):
        smol.prepare(req("bigger", "word " * 400, 10_000))
    assert smol.prepare(req("short", "word " * 400, 50)).prompt_tokens is not None
    assert smol.free_slots() == 3  # preparing takes nothing from the engine


def test_cancel_frees_the_slot_at_once(smol: NumpyEngine) -> None:
    a, b = req("a", "Write a long poem about autumn.", 200), req("b", "What is 2+2?", 8)
    smol.submit([smol.prepare(a), smol.prepare(b)])
    assert smol.free_slots() == 1
    for _ in range(3):
        smol.poll(0.0)
    smol.cancel("a")
    assert smol.free_slots() == 2 and smol.active() == 1
    keys = set()
    while smol.active():
        keys |= {ev.key for ev in smol.poll(0.0)}
    assert keys == {"b"}


def test_idle_poll_returns_at_once_and_info(smol: NumpyEngine) -> None:
    t = time.perf_counter()
    assert smol.poll(1.0) == []
    assert time.perf_counter() - t < 0.05
    info = smol.info()
    assert info["architecture"] == "llama" and info["parameters"] > 130_000_000
    assert info["kv_cache_bytes"] == 2 * 30 * 3 * 3 * 512 * 64 * 4
    assert info["rss_bytes"] > info["weights_bytes"] > 500_000_000
    assert info["model"] == "SmolLM2-135M-Instruct.Q4_1" and info["n_batch"] == 3
    assert info["blas"].startswith("openblas")


def test_numpy_threads_limits_blas() -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=None):  # restores the process's BLAS threads afterwards
        engine = NumpyEngine(n_batch=1, max_context=64, threads=1)
        engine.load()
        assert engine.info()["blas"].endswith("(1 thread)")
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
        engine.close()


def test_long_prompt_prefill_is_chunked_while_others_decode(smol: NumpyEngine) -> None:
    """A joining request with a long prompt does not stall a slot that has been decoding: that
    slot gets a token on every step while the prompt goes in by chunks of `prefill_chunk`."""
    first = req("first", "Write a long poem about autumn.", 30)
    smol.submit([smol.prepare(first)])
    tokens = 0
    while tokens < 2:  # its first token, and one decoded
        tokens += sum(isinstance(e, TokenEvent) for e in smol.poll(0.0))
    joiner = req("join", "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 20, 4)
    prepared = smol.prepare(joiner)
    n = prepared.prompt_tokens
    assert n is not None and n > 3 * smol.prefill_chunk
    reused = smol.reused_prompt_tokens
    smol.submit([prepared])
    chunks = math.ceil((n - (smol.reused_prompt_tokens - reused)) / smol.prefill_chunk)  # a cached prefix is skipped
    steps_with_first_token, joiner_first = 0, None
    for step in range(1, chunks + 1):
        events = smol.poll(0.0)
        steps_with_first_token += any(e.key == "first" for e in events)
        if joiner_first is None and any(e.key == "join" for e in events):
            joiner_first = step
    assert steps_with_first_token == chunks
    assert joiner_first == chunks  # its prompt went in by chunks
    smol.cancel("first")
    smol.cancel("join")


HOUSE = BUILTIN_PROMPTS[:8]  # what 8 devices of a house ask at once (`rkmqtt bench`'s first 8 prompts)


@pytest.fixture(scope="module")
def smol8() -> Iterator[NumpyEngine]:
    yield from loaded(8, reuse_prefix=False)  # every prompt whole: the passes below count all of it


def passes_to_first_event(engine: NumpyEngine, keys: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Poll until every request has ended: the pass (1, 2, ...) of each one's first event, and its text."""
    first: dict[str, int] = {}
    text = dict.fromkeys(keys, "")
    passes = 0
    while engine.active():
        passes += 1
        for ev in engine.poll(0.0):
            first.setdefault(str(ev.key), passes)
            if isinstance(ev, TokenEvent):
                text[str(ev.key)] += ev.text
    return first, text


def test_prompts_that_arrive_together_are_prefilled_together(smol8: NumpyEngine) -> None:
    """8 prompts submitted at once, more than one pass's budget in all, are prefilled in
    ⌈total / idle_prefill_chunk⌉ passes: the requests that got their first token in the first pass
    decode in the second while the rest of the prompts go in (one pass more before, at
    `prefill_chunk`). Each answers as it does alone (greedy)."""
    reqs = [req(f"h{i}", p, 6) for i, p in enumerate(HOUSE)]
    alone = {r.key: drive(smol8, [r])[r.key].text for r in reqs}
    prepared = [smol8.prepare(r) for r in reqs]
    total = sum(p.prompt_tokens or 0 for p in prepared)
    assert smol8.idle_prefill_chunk < total <= 2 * smol8.idle_prefill_chunk  # 312 tokens
    smol8.submit(prepared)
    first, text = passes_to_first_event(smol8, list(alone))
    assert max(first.values()) == math.ceil(total / smol8.idle_prefill_chunk) == 2
    assert text == alone


def test_requests_that_come_one_step_apart_are_prefilled_in_one_pass(smol8: NumpyEngine) -> None:
    """Through MQTT the first of several devices' requests often reaches the engine a step before
    the others (a few ms apart): they join while it is at its first token, and all their prompts go
    in at the next pass (the first one waits that pass for its second token)."""
    reqs = [req(f"s{i}", p, 6) for i, p in enumerate(HOUSE[:7])]
    smol8.submit([smol8.prepare(reqs[0])])
    first_pass = smol8.poll(0.0)
    assert [type(e) for e in first_pass] == [TokenEvent]
    rest = [smol8.prepare(r) for r in reqs[1:]]
    total = sum(p.prompt_tokens or 0 for p in rest)
    assert 3 * smol8.prefill_chunk < total <= smol8.idle_prefill_chunk  # 237 tokens
    smol8.submit(rest)
    first, _ = passes_to_first_event(smol8, [r.key for r in reqs])
    assert {first[r.key] for r in reqs[1:]} == {1}  # one pass for all 6 (at prefill_chunk: 8)


def test_benchmark_size_uses_a_bfloat16_cache() -> None:
    """n_batch 8 with 2048-token contexts: the float32 cache would take 755 MB, so the engine
    keeps K and V in bfloat16 (377 MB); answers and batching still hold."""
    engine = NumpyEngine(n_batch=8, max_context=2048)
    engine.load()
    try:
        info = engine.info()
        assert info["kv_cache_dtype"] == "bfloat16"
        assert info["kv_cache_bytes"] == 2 * 30 * 8 * 3 * 2048 * 64 * 2
        reqs = [req(f"b{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS[:4], [10, 5, 12, 7], strict=True))]
        alone = {r.key: drive(engine, [r])[r.key].text for r in reqs}
        together = drive(engine, reqs, one_per_step=True)
        assert {k: v.text for k, v in together.items()} == alone
        assert "Paris" in drive(engine, [req("p", PROMPTS[0], 12)])["p"].text
    finally:
        engine.close()


# -- a small model that walks a chain of byte tokens ---------------------------------------------------

E_ACUTE = [0xC3, 0xA9]  # é
GRIN = [0xF0, 0x9F, 0x98, 0x80]  # 😀
NEWLINE = 0x0A  # the last token of every ChatML prompt


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chain = tuple(byte_token(b) for b in [NEWLINE, *E_ACUTE, *GRIN])
    return write_tiny_gguf(tmp_path_factory.mktemp("chain") / "chain.gguf", TinySpec(chain=chain, context=128))


def chain_engine(path: Path, n_batch: int = 2, max_context: int = 128) -> NumpyEngine:
    engine = NumpyEngine(model=str(path), n_batch=n_batch, max_context=max_context)
    engine.load()
    return engine


def test_utf8_is_held_back_until_whole(chain_model: Path) -> None:
    engine = chain_engine(chain_model)
    res = drive(engine, [req("u", "hi", 12)])["u"]
    # greedy walks: é (2 byte tokens), 😀 (4), newline (1), é, 😀 ... cut at 12 tokens
    texts = [(c.text, c.tokens) for c in res.chunks]
    assert texts[:4] == [("é", 2), ("😀", 4), ("\n", 1), ("é", 2)]
    assert res.text == "é😀\né\ufffd"  # the last 3 tokens are 3 bytes of 😀: flushed as U+FFFD at the end
    assert res.finish is not None and (res.finish.reason, res.finish.completion_tokens) == ("length", 12)
    for c in res.chunks:
        c.text.encode("utf-8")  # every chunk is valid UTF-8 (no lone surrogates)


def test_generation_stops_at_the_context_end(chain_model: Path) -> None:
    engine = chain_engine(chain_model, n_batch=1, max_context=64)
    n = engine.prepare(req("c", "hi", 10_000)).prompt_tokens
    assert n is not None
    res = drive(engine, [req("c", "hi", 10_000)])["c"]
    assert res.finish is not None and res.finish.reason == "length"
    assert res.finish.prompt_tokens == n
    assert res.finish.prompt_tokens + res.finish.completion_tokens == 64


def test_parallel_chain_requests_in_a_small_context(chain_model: Path) -> None:
    engine = chain_engine(chain_model, n_batch=2, max_context=64)
    results: dict[str, Result] = drive(
        engine, [req(f"p{i}", "hi" * (i + 1), 5 + i) for i in range(5)], one_per_step=True
    )
    for i in range(5):
        fin = results[f"p{i}"].finish
        assert isinstance(fin, FinishEvent) and fin.completion_tokens == 5 + i
        assert results[f"p{i}"].text.startswith("é😀" if i else "é\ufffd")


def test_a_failing_step_still_delivers_the_finish_of_a_request_that_ended_in_it(chain_model: Path) -> None:
    """Two prompts prefill in one step: the first ends there (max_new_tokens 1) and leaves its
    slot, then sampling the second fails. The first still gets its FinishEvent, the second an
    ErrorEvent, and no slot's cached tokens survive the failed step."""
    engine = chain_engine(chain_model)
    engine.submit([engine.prepare(req("done", "hi", 1)), engine.prepare(req("bad", "ho", 5))])
    bad = engine._running["bad"]

    def boom(logits: object, history: object) -> int:
        raise RuntimeError("sampler exploded")

    bad.sampler.sample = boom  # type: ignore[method-assign]
    events = engine.poll(0.0)
    finishes = [e for e in events if isinstance(e, FinishEvent)]
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [(f.key, f.reason, f.completion_tokens) for f in finishes] == [("done", "length", 1)]
    assert [(e.key, e.code) for e in errors] == [("bad", ErrorCode.ENGINE_ERROR)]
    assert "sampler exploded" in errors[0].message
    assert engine.active() == 0 and engine.free_slots() == 2
    assert engine.info()["reused_prompt_tokens"] == 0
    assert all(not held for held in engine._kv_tokens)


def test_loading_again_forgets_the_cached_prompts(chain_model: Path) -> None:
    engine = chain_engine(chain_model, n_batch=1)
    first = drive(engine, [req("a", "hi", 4)])["a"]
    assert engine._kv_tokens[0]  # the slot holds the prompt and the answer
    engine.load()  # a fresh, zeroed cache: nothing in it may be reused
    again = drive(engine, [req("b", "hi", 4)])["b"]
    assert again.finish is not None and again.finish.perf["reused_prompt_tokens"] == 0
    assert again.text == first.text
