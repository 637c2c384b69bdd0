"""Helpers for the RKLLM engine tests: the stand-in runtime compiled once per session, settings,
requests, a loop that drives an engine to the end of its requests, and a Python reference of
the stand-in's deterministic output (see tests/standin/rkllm_standin.c).

Import the fixtures into a test module: `from tests.rkllm_fixtures import standin_fixture, standin_env_fixture`
(they are registered under the names `standin` and `standin_env`).
"""

from __future__ import annotations

import ctypes
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rkmqtt.engines.base import (
    ChatMessage,
    Engine,
    ErrorEvent,
    FinishEvent,
    Generation,
    Prepared,
    SamplingParams,
    TokenEvent,
)
from rkmqtt.engines.rkllm.engine import RkllmEngine
from rkmqtt.settings import Settings
from tests.standin.build import build_standin

ABIS = ("1.2", "1.3")


@dataclass(frozen=True)
class Standin:
    """Stand-in libraries built for this session, and a model file for them to open."""

    libs: dict[str, Path]  # "1.2" -> 1.2.3, "1.3" -> 1.3.0
    model: Path
    build_dir: Path

    def lib(self, abi: str) -> Path:
        return self.libs[abi]


@pytest.fixture(scope="session", name="standin")
def standin_fixture(tmp_path_factory: pytest.TempPathFactory) -> Standin:
    d = tmp_path_factory.mktemp("rkllm-standin")
    libs = {abi: build_standin(abi, d / f"abi{abi}" / "librkllmrt.so") for abi in ABIS}
    model = d / "qwen2.5-1.5b-w8a8.rkllm"
    model.write_bytes(b"stand-in model file\n")
    return Standin(libs=libs, model=model, build_dir=d)


@pytest.fixture(name="standin_env")
def standin_env_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No sleeping in the stand-in, its default behaviour otherwise (no option, no replay)."""
    monkeypatch.setenv("RKLLM_STANDIN_ZERO_DELAY", "1")
    for name in STANDIN_OPTIONS:
        monkeypatch.delenv(name, raising=False)
    yield


# Every environment variable the stand-in reads but RKLLM_STANDIN_ZERO_DELAY (tests/standin/rkllm_standin.c).
STANDIN_OPTIONS = (
    "RKLLM_STANDIN_INIT_FAIL",
    "RKLLM_STANDIN_TOKEN_BYTES",
    "RKLLM_STANDIN_DECODE_MS",
    "RKLLM_STANDIN_PREFILL_MS_PER_TOKEN",
    "RKLLM_STANDIN_BATCH_ALPHA",
    "RKLLM_STANDIN_WAITING_TEXT",
    "RKLLM_STANDIN_AFTER_ABORT",
    "RKLLM_STANDIN_NULL_FINISH",
    "RKLLM_STANDIN_EOS_STEP",
    "RKLLM_STANDIN_BUILTIN_TEMPLATE",
    "RKLLM_STANDIN_FINISH_RESULTS",
    "RKLLM_STANDIN_SLOT_END",
    "RKLLM_STANDIN_PAD_REQUIRED",
    "RKLLM_STANDIN_UNEQUAL_PROMPTS",
    "RKLLM_STANDIN_TOKEN_INPUT_BATCH",
    "RKLLM_STANDIN_EMPTY_TEMPLATE",
    "RKLLM_STANDIN_RUNNING_VALUE",
    "RKLLM_STANDIN_KV_AFTER_RUN",
    "RKLLM_STANDIN_CLEAR_AFTER_ABORT",
    "RKLLM_STANDIN_PROMPT_CACHE",
    "RKLLM_STANDIN_CALLBACK_THREAD",
    "RKLLM_STANDIN_CRASH_AT_RUN",
    "RKLLM_STANDIN_HANG_AT_RUN",
    "RKLLM_STANDIN_REPLAY",
    "RKLLM_STANDIN_REPLAY_PART",
    "RKLLM_STANDIN_REPLAY_SPEED",
    "RKLLM_LOG_LEVEL",
    "RKLLM_STANDIN_INPUT_LOG",
)


# ---- a model with a vocabulary: token inputs the stand-in can read -----------------------------------

# Special tokens of the built-in templates: each one token, as in the models' own tokenizers.
SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character byte-level BPE names it by."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def vocab_model(
    folder: Path, name: str = "Qwen2.5-1.5B-Instruct-w8a8.rkllm", corpus: Sequence[str] = (), vocab_size: int = 2000
) -> Path:
    """A stand-in model file that carries a vocabulary, and beside it the tokenizer.json (Hugging Face,
    byte-level BPE) that encodes text with the same ids: the engine finds it there and sends token ids,
    which the stand-in decodes back to text. Every byte is a token; merges learned from `corpus` make
    text like it a few times shorter in tokens, as a real model's vocabulary would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=[symbols[b] for b in range(256)],
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, "The quick brown fox jumps over the lazy dog."], trainer)
    tok.save(str(folder / "tokenizer.json"))
    byte_of = {c: b for b, c in symbols.items()}
    lines = []
    for i in range(tok.get_vocab_size()):
        piece = tok.id_to_token(i)
        data = piece.encode() if piece in SPECIAL_TOKENS else bytes(byte_of[c] for c in piece)
        lines.append(data.hex())
    model = folder / name
    model.write_text("rkllm-standin vocab 1\n" + "\n".join(lines) + "\n")
    return model


def read_input_log(path: Path) -> list[tuple[str, str]]:
    """What RKLLM_STANDIN_INPUT_LOG wrote: (the entry's header line, the input's text) per slot and run."""
    import re

    data = path.read_text(encoding="utf-8") if path.exists() else ""
    parts = re.split(r"^(--- rkllm-standin input: .*? ---)\n", data, flags=re.M)
    return [(parts[i], parts[i + 1].removesuffix("\n")) for i in range(1, len(parts) - 1, 2)]


def make_settings(standin: Standin, abi: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "engine": "rkllm",
        "model": str(standin.model),
        "rkllm_library": str(standin.lib(abi)),
        "n_batch": 4,
        "max_new_tokens": 1024,
    }
    values.update(overrides)
    return Settings(**values)


def make_engine(standin: Standin, abi: str, **overrides: Any) -> RkllmEngine:
    engine = RkllmEngine(make_settings(standin, abi, **overrides), backoff_s=0.01, backoff_max_s=0.05)
    engine.load()
    return engine


def request(
    key: str,
    prompt: str | None = None,
    *,
    max_new_tokens: int = 256,
    messages: tuple[ChatMessage, ...] | None = None,
    sampling: SamplingParams | None = None,
    sampling_requested: bool = False,
) -> Generation:
    return Generation(
        key=key,
        messages=messages if messages is not None else (ChatMessage("user", prompt or key),),
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingParams(),
        sampling_requested=sampling_requested,
    )


def submit(engine: Engine, reqs: Sequence[Generation]) -> None:
    """Submit as the tests always have: straight to the engine, without `prepare()`'s length check
    (tests/test_rkllm_admission.py tests that)."""
    engine.submit([Prepared(r, None, engine.batch_key(r)) for r in reqs])


@dataclass
class Outcome:
    text: str = ""
    token_events: int = 0
    tokens: int = 0
    final: FinishEvent | ErrorEvent | None = None
    after_final: list[Any] = field(default_factory=list)  # events after the final one (must stay empty)


def drive(
    engine: Engine, keys: list[str], timeout: float = 10.0, cancel: dict[str, int] | None = None
) -> dict[str, Outcome]:
    """Poll until every key has its final event, then until the engine is idle again.

    `cancel` maps a key to the number of TokenEvents after which it is cancelled. Events of that key
    later in the same poll() list came before the cancel and are dropped; any from a later poll() are
    kept in `after_final` (the engine must send none).
    """
    out = {k: Outcome() for k in keys}
    cancel = dict(cancel or {})
    cancelled: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cancelled_in_this_poll: set[str] = set()  # the rest of this list was polled before the cancel
        for ev in engine.poll(0.05):
            o = out[ev.key]
            if ev.key in cancelled_in_this_poll:
                continue
            if o.final is not None or ev.key in cancelled:
                o.after_final.append(ev)
                continue
            if isinstance(ev, TokenEvent):
                o.text += ev.text
                o.tokens += ev.tokens
                o.token_events += 1
                if ev.key in cancel and o.token_events >= cancel[ev.key] and ev.key not in cancelled:
                    engine.cancel(ev.key)
                    cancelled.add(ev.key)
                    cancelled_in_this_poll.add(ev.key)
            else:
                o.final = ev
        if all(out[k].final is not None or k in cancelled for k in keys) and engine.free_slots() > 0:
            return out
    raise AssertionError(f"engine did not finish in {timeout} s: {out}")


def wait_idle(engine: Engine, timeout: float = 10.0) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + timeout
    while engine.free_slots() == 0:
        assert time.monotonic() < deadline, "engine did not become idle"
        events += engine.poll(0.05)
    return events


def describe(lib: Path) -> dict[str, str]:
    """The stand-in's own account of its last init and run (extra symbol rkllm_standin_describe)."""
    cdll = ctypes.CDLL(str(lib))
    fn = cdll.rkllm_standin_describe
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    buf = ctypes.create_string_buffer(1 << 16)
    fn(buf, len(buf))
    lines = buf.value.decode("utf-8", errors="surrogateescape").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


# ---- a Python reference of the stand-in's output -------------------------------------------------


def _fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def _stream(prompt: bytes, n: int) -> bytes:
    period = prompt + b" "
    return (period * (n // len(period) + 2))[:n]


def natural_length(prompt: str, token_bytes: int = 3) -> int:
    """Tokens the stand-in produces for `prompt` before its EOS (no max_new_tokens cut)."""
    data = prompt.encode()
    m = re.search(rb"@len=(-?\d+)", data)
    n = int(m.group(1)) if m else 8 + _fnv1a(data) % 25
    while n > 0 and (_stream(data, n * token_bytes + 1)[-1] & 0xC0) == 0x80:
        n += 1
    return n


def expected_text(prompt: str, tokens: int, token_bytes: int = 3) -> str:
    """The text of the stand-in's first `tokens` tokens for `prompt` (a cut may end in U+FFFD)."""
    return _stream(prompt.encode(), tokens * token_bytes).decode("utf-8", errors="replace")
