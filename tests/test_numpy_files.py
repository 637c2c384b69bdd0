"""The numpy engine's model files: bad files give one clear error each; tensors dequantize; the
tokenizer agrees with transformers'; the chat template renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rkmqtt.engines import create_engine
from rkmqtt.engines.base import ChatMessage
from rkmqtt.engines.chat.source import builtin
from rkmqtt.engines.chat.template import ChatTemplate
from rkmqtt.engines.numpy.engine import NumpyEngine
from rkmqtt.engines.numpy.gguf_file import GGUFFile
from rkmqtt.engines.numpy.tokenizer import GGUFTokenizer
from rkmqtt.errors import EngineError
from rkmqtt.settings import Settings
from tests import reference
from tests.numpy_fixtures import TinySpec, drive, req, smollm_path, write_tiny_gguf
from tests.reference import MIXED_TEXT, TOKEN_CASES


def load_error(path: Path) -> str:
    engine = NumpyEngine(model=str(path), n_batch=1, max_context=64)
    with pytest.raises(EngineError) as info:
        engine.load()
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in load_error(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.rkllm"
    path.write_bytes(b"RKLLM\x00\x01" + bytes(200))
    msg = load_error(path)
    assert "not a GGUF file" in msg and "engine rkllm" in msg


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "not a GGUF file" in load_error(path)


@pytest.mark.parametrize("keep", [0.5, 0.98, 0.0002])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    src = write_tiny_gguf(tmp_path / "full.gguf", TinySpec(seed=9))
    data = src.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    assert "truncated" in load_error(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = load_error(path)
    assert "architecture 'gpt2' is not supported" in msg and "llama" in msg and "qwen2" in msg


def test_missing_tensor(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "partial.gguf", TinySpec(seed=10, drop=("blk.1.ffn_up.weight",)))
    assert "tensor 'blk.1.ffn_up.weight' is missing" in load_error(path)


def test_rope_freqs_of_the_wrong_length(tmp_path: Path) -> None:
    """Llama 3's rope_freqs.weight holds one factor per rotary frequency (head_dim / 2 = 32 here)."""
    path = write_tiny_gguf(tmp_path / "l3.gguf", TinySpec(seed=12, rope_freqs=(1.0,) * 31))
    assert "rope_freqs.weight has 31 values, expected 32 positive factors" in load_error(path)


def test_default_model_and_create_engine() -> None:
    settings = Settings(engine="numpy", n_batch=2, max_context=256)
    engine = create_engine(settings)
    assert isinstance(engine, NumpyEngine)
    caps = engine.capabilities
    assert (caps.name, caps.continuous, caps.max_batch, caps.per_request_sampling) == ("numpy", True, 2, True)
    assert engine.model_name == "SmolLM2-135M-Instruct.Q4_1"


def test_dequantized_tensors_match_gguf(tmp_path: Path) -> None:
    """Every supported type comes out as float32 in (out, in) order with gguf's own values."""
    from gguf.quants import dequantize

    types = (
        ("attn_q.weight", "Q4_K"),
        ("attn_k.weight", "Q6_K"),
        ("attn_v.weight", "Q4_0"),
        ("attn_output.weight", "Q4_1"),
        ("ffn_gate.weight", "F16"),
        ("ffn_up.weight", "Q8_0"),
    )
    path = write_tiny_gguf(tmp_path / "t.gguf", TinySpec(types=types, seed=11))
    f = GGUFFile(path)
    import gguf

    reader = gguf.GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        ours = f.tensor(t.name)
        assert ours.dtype == np.float32 and ours.flags.c_contiguous
        assert ours.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        ref = dequantize(t.data, t.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(ours, ref.astype(np.float32))
        seen.add(t.tensor_type.name)
    assert {"F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= seen
    f.close()


def smollm_tokenizer() -> GGUFTokenizer:
    path = smollm_path()
    f = GGUFFile(path)
    try:
        return GGUFTokenizer(f.metadata, str(path))
    finally:
        f.close()


def test_tokenizer_agrees_with_transformers() -> None:
    ours = smollm_tokenizer()
    ids = ours.encode(MIXED_TEXT)
    assert ids == reference.tokens("smollm2-mixed", smollm_path())
    assert ours.decode(ids) == MIXED_TEXT
    # digits are split one by one (tokenizer.ggml.pre = smollm)
    assert [ours.token_text(i) for i in ours.encode("x 2024")] == ["x", "Ġ", "2", "0", "2", "4"]
    # special tokens written in the text are single tokens
    chat = TOKEN_CASES["smollm2-chat"].text
    assert ours.encode(chat) == reference.tokens("smollm2-chat", smollm_path())
    assert ours.encode(chat)[0] == 1 and 2 in ours.encode(chat)
    assert ours.eos_id == 2 and ours.stop_ids == {2} and not ours.add_bos


def test_smollm_pre_tokenizer_follows_the_model_not_transformers_gguf_default() -> None:
    """Known difference: transformers' GGUF converter has no entry for `smollm`, so it splits
    with GPT-2's expression alone; SmolLM2's own tokenizer (and llama.cpp) split digits first.
    The two differ only on whitespace runs before a digit. Ours matches SmolLM2's own
    pre-tokenizer (Digits(individual) then ByteLevel), which the reference sets on transformers'
    tokenizer for this case."""
    case = TOKEN_CASES["smollm2-digits"]
    assert case.digits_first and case.text.endswith("line\n 99 bottles\n\n  42")
    assert smollm_tokenizer().encode(case.text) == reference.tokens("smollm2-digits", smollm_path())


def tiny_tokenizer(tmp_path: Path, name: str) -> GGUFTokenizer:
    spec = TOKEN_CASES[name].model
    assert isinstance(spec, TinySpec)
    path = write_tiny_gguf(tmp_path / f"{name}.gguf", spec)
    f = GGUFFile(path)
    try:
        return GGUFTokenizer(f.metadata, str(path))
    finally:
        f.close()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_tokenizer_agrees_with_transformers(tmp_path: Path, name: str) -> None:
    ours = tiny_tokenizer(tmp_path, name)
    assert ours.encode(TOKEN_CASES[name].text) == reference.tokens(name, tmp_path / f"{name}.gguf")


def test_chat_template_renders_prompt_system_and_turns(tmp_path: Path) -> None:
    path = smollm_path()
    f = GGUFFile(path)
    chat = ChatTemplate(f.get("tokenizer.chat_template"), "<|im_start|>", "<|im_end|>")
    f.close()
    one = chat.render([ChatMessage("user", "Hi")])
    assert one.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in one  # the template's default system prompt
    sys = chat.render([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert sys.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in sys
    turns = chat.render([ChatMessage("user", "A"), ChatMessage("assistant", "B"), ChatMessage("user", "C")])
    assert "<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n" in turns
    # a file without a template gets ChatML
    assert builtin("chatml").render([ChatMessage("user", "x")]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    assert "not a regular file" in load_error(tmp_path)


def test_sentencepiece_tokenizer_agrees_with_transformers(tmp_path: Path) -> None:
    """tokenizer.ggml.model = llama (TinyLlama, Llama 2): SentencePiece BPE with byte fallback,
    merges recovered from the token scores."""
    ours = tiny_tokenizer(tmp_path, "spm-cat")
    for name in ("spm-cat", "spm-mixed", "spm-specials"):
        assert ours.encode(TOKEN_CASES[name].text) == reference.tokens(name, tmp_path / "spm-cat.gguf"), name
    ids = ours.encode("the café 😀")
    assert [ours.token_text(i) for i in ids][:2] == ["▁the", "▁c"]
    assert ours.decode(ids) == " the café 😀"  # byte-fallback tokens rebuild the characters
    assert ours.add_bos and ours.bos_id == 1


def test_sentencepiece_model_runs_with_bos(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "spm.gguf", TinySpec(tokenizer="llama", seed=14))
    engine = NumpyEngine(model=str(path), n_batch=1, max_context=64)
    engine.load()
    r = req("s", "the cat", 4)
    assert engine.encode_chat(r)[0] == 1  # <s> first, as add_bos_token says
    res = drive(engine, [r])["s"]
    assert res.finish is not None and res.finish.completion_tokens <= 4
