"""ctypes declarations of the RKLLM runtime's C interface, for ABI 1.2.x and 1.3.0 (any thread; pure
declarations, nothing here loads the library). Written from docs/rkllm-runtime.md, "Functions"
and "Struct layouts" (the two ABIs: "Versions and ABIs"), not from Rockchip's header; `Abi` bundles
the set chosen at load time."""

from __future__ import annotations

import ctypes
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

AbiName = Literal["1.2", "1.3"]

LLMHandle = c_void_p


class LLMCallState(IntEnum):
    NORMAL = 0  # one token's text
    WAITING = 1  # bytes of an incomplete UTF-8 character, joined with the next output
    FINISH = 2  # the run is done; perf is filled only here
    ERROR = 3


class RKLLMInputType(IntEnum):
    PROMPT = 0
    TOKEN = 1
    EMBED = 2
    MULTIMODAL = 3


class RKLLMInferMode(IntEnum):
    GENERATE = 0
    GET_LAST_HIDDEN_LAYER = 1
    GET_LOGITS = 2


def cpu_mask(cpus: list[int]) -> int:
    """The `enabled_cpus_mask` for CPU numbers 0-7 (bit i is CPUi; RK3588's big cores are CPU4-CPU7)."""
    mask = 0
    for cpu in cpus:
        if not 0 <= cpu <= 7:
            raise ValueError(f"CPU {cpu} is not 0-7")
        mask |= 1 << cpu
    return mask


# ---- structs shared by both ABIs -------------------------------------------------------------


class RKLLMExtendParam(Structure):
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("n_batch", c_uint8),
        ("use_cross_attn", c_int8),
        ("reserved", c_uint8 * 104),
    ]


class RKLLMLoraAdapter(Structure):
    _fields_ = [("lora_adapter_path", c_char_p), ("lora_adapter_name", c_char_p), ("scale", c_float)]


class RKLLMEmbedInput(Structure):
    _fields_ = [("embed", POINTER(c_float)), ("n_tokens", c_size_t)]


class RKLLMTokenInput(Structure):
    _fields_ = [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)]


class RKLLMLoraParam(Structure):
    _fields_ = [("lora_adapter_name", c_char_p)]


class RKLLMPromptCacheParam(Structure):
    _fields_ = [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]


class RKLLMCrossAttnParam(Structure):
    _fields_ = [
        ("encoder_k_cache", POINTER(c_float)),
        ("encoder_v_cache", POINTER(c_float)),
        ("encoder_mask", POINTER(c_float)),
        ("encoder_pos", POINTER(c_int32)),
        ("num_tokens", c_int),
    ]


class RKLLMResultLastHiddenLayer(Structure):
    _fields_ = [("hidden_states", POINTER(c_float)), ("embd_size", c_int), ("num_tokens", c_int)]


class RKLLMResultLogits(Structure):
    _fields_ = [("logits", POINTER(c_float)), ("vocab_size", c_int), ("num_tokens", c_int)]


class RKLLMPerfStat(Structure):
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


class RKLLMResult(Structure):
    # `text` is declared as a plain pointer so that reading it never converts (NULL must be seen
    # as NULL, and the bytes are copied explicitly with ctypes.string_at during the callback).
    _fields_ = [
        ("text", c_void_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# int (*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state)
LLMResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, c_int)

# 1.3.0's optional callbacks (the 1.3.0 header; rkmqtt passes NULL for both):
# int (*LLMTokenizerCallback)(void* userdata, const char* text, int32_t text_len, int32_t* tokens,
#                             int32_t n_tokens_max)   -> tokens written (>= 0), or < 0 on error
# int (*LLMGetEmbedCallback)(void* userdata, int32_t* tokens, uint64_t num_tokens, void* embed,
#                            uint64_t len)            -> 0 on success (len: the buffer's bytes)
LLMTokenizerCallback = CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)
LLMGetEmbedCallback = CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), c_uint64, c_void_p, c_uint64)

_PARAM_HEAD: list[Any] = [
    ("model_path", c_char_p),
    ("max_context_len", c_int32),
    ("max_new_tokens", c_int32),
    ("top_k", c_int32),
    ("n_keep", c_int32),
    ("top_p", c_float),
    ("temperature", c_float),
    ("repeat_penalty", c_float),
    ("frequency_penalty", c_float),
    ("presence_penalty", c_float),
    ("mirostat", c_int32),
    ("mirostat_tau", c_float),
    ("mirostat_eta", c_float),
    ("skip_special_token", c_bool),
]

# ---- ABI 1.2 (runtime 1.2.1-1.2.3) --------------------------------------------------------------


class RKLLMParam12(Structure):
    _fields_ = [
        *_PARAM_HEAD,
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMMultiModalInput12(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class _RKLLMInputUnion12(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput12),
    ]


class RKLLMInput12(Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("role", c_char_p), ("enable_thinking", c_bool), ("input_type", c_int), ("_u", _RKLLMInputUnion12)]


class RKLLMInferParam12(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("keep_history", c_int),
    ]


# ---- ABI 1.3 (runtime 1.3.0) --------------------------------------------------------------------


class RKLLMParam13(Structure):
    _fields_ = [
        *_PARAM_HEAD,
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMImageInput13(Structure):
    """The anonymous `image` struct inside 1.3.0's RKLLMMultiModalInput."""

    _fields_ = [
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_start", c_char_p),
        ("image_end", c_char_p),
        ("image_content", c_char_p),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class RKLLMVideoInput13(Structure):
    """The anonymous `video` struct inside 1.3.0's RKLLMMultiModalInput."""

    _fields_ = [
        ("video_embed", POINTER(c_float)),
        ("n_frame_tokens", c_size_t),
        ("n_frame_per_video", c_size_t),
        ("n_video", c_size_t),
        ("video_start", c_char_p),
        ("video_end", c_char_p),
        ("video_content", c_char_p),
        ("frame_width", c_size_t),
        ("frame_height", c_size_t),
    ]


class RKLLMMultiModalInput13(Structure):
    _fields_ = [("prompt", c_char_p), ("image", RKLLMImageInput13), ("video", RKLLMVideoInput13)]


class _RKLLMInputUnion13(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput13),
    ]


class RKLLMInput13(Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("role", c_char_p), ("enable_thinking", c_bool), ("input_type", c_int), ("_u", _RKLLMInputUnion13)]


class RKLLMSamplingParam(Structure):
    _fields_ = [
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
    ]


class RKLLMInferParam13(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", POINTER(RKLLMSamplingParam)),
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),
    ]


class RKLLMCallback(Structure):
    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", LLMTokenizerCallback),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", LLMGetEmbedCallback),
        ("embed_userdata", c_void_p),
    ]


# ---- the two sets ---------------------------------------------------------------------------------

_SHARED: dict[str, type[Structure]] = {
    "RKLLMExtendParam": RKLLMExtendParam,
    "RKLLMLoraAdapter": RKLLMLoraAdapter,
    "RKLLMEmbedInput": RKLLMEmbedInput,
    "RKLLMTokenInput": RKLLMTokenInput,
    "RKLLMLoraParam": RKLLMLoraParam,
    "RKLLMPromptCacheParam": RKLLMPromptCacheParam,
    "RKLLMCrossAttnParam": RKLLMCrossAttnParam,
    "RKLLMResultLastHiddenLayer": RKLLMResultLastHiddenLayer,
    "RKLLMResultLogits": RKLLMResultLogits,
    "RKLLMPerfStat": RKLLMPerfStat,
    "RKLLMResult": RKLLMResult,
}


@dataclass(frozen=True)
class Abi:
    """The struct classes of one runtime ABI. `Callback`/`SamplingParam` are None on 1.2."""

    name: AbiName
    Param: type[Structure]
    Input: type[Structure]
    MultiModalInput: type[Structure]
    InferParam: type[Structure]
    SamplingParam: type[Structure] | None
    Callback: type[Structure] | None
    structs: dict[str, type[Structure]]

    @property
    def per_run_sampling(self) -> bool:
        return self.SamplingParam is not None

    def functions(self) -> dict[str, tuple[Any, list[Any]]]:
        """Every exported function: name -> (restype, argtypes)."""
        P = POINTER
        init_cb: Any = P(self.Callback) if self.Callback is not None else LLMResultCallback
        run_args = [LLMHandle, P(self.Input), P(self.InferParam), c_void_p]
        return {
            # Returned BY VALUE: the restype must be the whole struct of this ABI.
            "rkllm_createDefaultParam": (self.Param, []),
            "rkllm_init": (c_int, [P(LLMHandle), P(self.Param), init_cb]),
            "rkllm_run": (c_int, run_args),
            "rkllm_run_async": (c_int, run_args),
            "rkllm_abort": (c_int, [LLMHandle]),
            "rkllm_is_running": (c_int, [LLMHandle]),
            "rkllm_destroy": (c_int, [LLMHandle]),
            "rkllm_clear_kv_cache": (c_int, [LLMHandle, c_int, P(c_int), P(c_int)]),
            "rkllm_get_kv_cache_size": (c_int, [LLMHandle, P(c_int)]),
            "rkllm_set_chat_template": (c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
            "rkllm_set_function_tools": (c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
            "rkllm_load_lora": (c_int, [LLMHandle, P(RKLLMLoraAdapter)]),
            "rkllm_load_prompt_cache": (c_int, [LLMHandle, c_char_p]),
            "rkllm_release_prompt_cache": (c_int, [LLMHandle]),
            "rkllm_set_cross_attn_params": (c_int, [LLMHandle, P(RKLLMCrossAttnParam)]),
        }


ABI_12 = Abi(
    name="1.2",
    Param=RKLLMParam12,
    Input=RKLLMInput12,
    MultiModalInput=RKLLMMultiModalInput12,
    InferParam=RKLLMInferParam12,
    SamplingParam=None,
    Callback=None,
    structs={
        **_SHARED,
        "RKLLMParam": RKLLMParam12,
        "RKLLMMultiModalInput": RKLLMMultiModalInput12,
        "RKLLMInput": RKLLMInput12,
        "RKLLMInferParam": RKLLMInferParam12,
    },
)

ABI_13 = Abi(
    name="1.3",
    Param=RKLLMParam13,
    Input=RKLLMInput13,
    MultiModalInput=RKLLMMultiModalInput13,
    InferParam=RKLLMInferParam13,
    SamplingParam=RKLLMSamplingParam,
    Callback=RKLLMCallback,
    structs={
        **_SHARED,
        "RKLLMParam": RKLLMParam13,
        "RKLLMMultiModalInput": RKLLMMultiModalInput13,
        "RKLLMInput": RKLLMInput13,
        "RKLLMSamplingParam": RKLLMSamplingParam,
        "RKLLMInferParam": RKLLMInferParam13,
        "RKLLMCallback": RKLLMCallback,
    },
)

ABIS: dict[AbiName, Abi] = {"1.2": ABI_12, "1.3": ABI_13}

# Functions the engine cannot work without; the others are declared when present.
REQUIRED_FUNCTIONS = ("rkllm_createDefaultParam", "rkllm_init", "rkllm_run", "rkllm_abort", "rkllm_destroy")


def field_layout(struct: type[Structure]) -> list[tuple[str, int, int]]:
    """(field, offset, size) of every field, with the anonymous union's members in its place."""
    out: list[tuple[str, int, int]] = []
    anonymous = set(getattr(struct, "_anonymous_", ()))
    fields: list[Any] = list(struct._fields_)
    for name, ctype, *_ in fields:
        desc = getattr(struct, name)
        if name in anonymous:
            members: list[Any] = list(ctype._fields_)
            for member, _mtype, *_ in members:
                mdesc = getattr(ctype, member)
                out.append((member, desc.offset + mdesc.offset, mdesc.size))
        else:
            out.append((name, desc.offset, desc.size))
    return out


def struct_size_align(struct: type[Structure]) -> tuple[int, int]:
    return ctypes.sizeof(struct), ctypes.alignment(struct)
