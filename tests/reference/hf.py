"""Hugging Face transformers as the reference (PyTorch, CPU). Only `./dev crosscheck` and
`make_reference` import this module: `./dev test` needs neither transformers nor PyTorch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def hf_model(path: Path, rope_parameters: dict[str, Any] | None = None) -> Any:
    """Hugging Face transformers' own model for a GGUF file: its config and its dequantized,
    un-permuted weights (`load_gguf_checkpoint`), in float32. (`from_pretrained(..., gguf_file=)`
    would do the same but insists on the `accelerate` package.) `rope_parameters` replace the
    config's (its GGUF reader does not turn rope_freqs.weight into Llama 3 rope scaling)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if missing:
        assert config.tie_word_embeddings
        model.tie_weights()
    model.eval()
    return model


def hf_logits(model: Any, ids: Sequence[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return np.asarray(out.float().numpy(), dtype=np.float32)


def hf_token_ids(path: Path, text: str, digits_first: bool = False) -> list[int]:
    """transformers' tokenizer for a GGUF file. `digits_first`: with SmolLM2's own pre-tokenizer
    (Digits(individual) then ByteLevel); transformers' GGUF converter has no entry for `smollm`
    and splits with GPT-2's expression alone, which differs on whitespace before a digit."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if digits_first:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
