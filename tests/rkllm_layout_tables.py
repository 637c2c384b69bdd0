"""Struct layouts of the RKLLM runtime, transcribed from docs/rkllm-runtime.md (the facts document,
"Struct layouts"): {struct: (size, align, [(field, offset, size), ...])} per ABI.

Generated from the document's tables by a script, then checked by hand; the tests compare the
ctypes binding and the C stand-in against these numbers.
"""

from __future__ import annotations

Layout = dict[str, tuple[int, int, list[tuple[str, int, int]]]]

LAYOUT_13: Layout = {
    "RKLLMExtendParam": (
        120,
        4,
        [
            ("base_domain_id", 0, 4),
            ("embed_flash", 4, 1),
            ("enabled_cpus_num", 5, 1),
            ("enabled_cpus_mask", 8, 4),
            ("n_batch", 12, 1),
            ("use_cross_attn", 13, 1),
            ("reserved", 14, 104),
        ],
    ),
    "RKLLMParam": (
        184,
        8,
        [
            ("model_path", 0, 8),
            ("max_context_len", 8, 4),
            ("max_new_tokens", 12, 4),
            ("top_k", 16, 4),
            ("n_keep", 20, 4),
            ("top_p", 24, 4),
            ("temperature", 28, 4),
            ("repeat_penalty", 32, 4),
            ("frequency_penalty", 36, 4),
            ("presence_penalty", 40, 4),
            ("mirostat", 44, 4),
            ("mirostat_tau", 48, 4),
            ("mirostat_eta", 52, 4),
            ("skip_special_token", 56, 1),
            ("ignore_eos_token", 57, 1),
            ("is_async", 58, 1),
            ("extend_param", 60, 120),
        ],
    ),
    "RKLLMLoraAdapter": (
        24,
        8,
        [
            ("lora_adapter_path", 0, 8),
            ("lora_adapter_name", 8, 8),
            ("scale", 16, 4),
        ],
    ),
    "RKLLMEmbedInput": (
        16,
        8,
        [
            ("embed", 0, 8),
            ("n_tokens", 8, 8),
        ],
    ),
    "RKLLMTokenInput": (
        16,
        8,
        [
            ("input_ids", 0, 8),
            ("n_tokens", 8, 8),
        ],
    ),
    "RKLLMMultiModalInput": (
        144,
        8,
        [
            ("prompt", 0, 8),
            ("image", 8, 64),
            ("video", 72, 72),
        ],
    ),
    "RKLLMInput": (
        160,
        8,
        [
            ("role", 0, 8),
            ("enable_thinking", 8, 1),
            ("input_type", 12, 4),
            ("prompt_input", 16, 8),
            ("embed_input", 16, 16),
            ("token_input", 16, 16),
            ("multimodal_input", 16, 144),
        ],
    ),
    "RKLLMLoraParam": (
        8,
        8,
        [
            ("lora_adapter_name", 0, 8),
        ],
    ),
    "RKLLMPromptCacheParam": (
        16,
        8,
        [
            ("save_prompt_cache", 0, 4),
            ("prompt_cache_path", 8, 8),
        ],
    ),
    "RKLLMCrossAttnParam": (
        40,
        8,
        [
            ("encoder_k_cache", 0, 8),
            ("encoder_v_cache", 8, 8),
            ("encoder_mask", 16, 8),
            ("encoder_pos", 24, 8),
            ("num_tokens", 32, 4),
        ],
    ),
    "RKLLMSamplingParam": (
        36,
        4,
        [
            ("top_k", 0, 4),
            ("top_p", 4, 4),
            ("temperature", 8, 4),
            ("repeat_penalty", 12, 4),
            ("frequency_penalty", 16, 4),
            ("presence_penalty", 20, 4),
            ("mirostat", 24, 4),
            ("mirostat_tau", 28, 4),
            ("mirostat_eta", 32, 4),
        ],
    ),
    "RKLLMInferParam": (
        40,
        8,
        [
            ("mode", 0, 4),
            ("lora_params", 8, 8),
            ("prompt_cache_params", 16, 8),
            ("sampling_params", 24, 8),
            ("keep_history", 32, 4),
            ("max_new_tokens", 36, 4),
        ],
    ),
    "RKLLMResultLastHiddenLayer": (
        16,
        8,
        [
            ("hidden_states", 0, 8),
            ("embd_size", 8, 4),
            ("num_tokens", 12, 4),
        ],
    ),
    "RKLLMResultLogits": (
        16,
        8,
        [
            ("logits", 0, 8),
            ("vocab_size", 8, 4),
            ("num_tokens", 12, 4),
        ],
    ),
    "RKLLMPerfStat": (
        20,
        4,
        [
            ("prefill_time_ms", 0, 4),
            ("prefill_tokens", 4, 4),
            ("generate_time_ms", 8, 4),
            ("generate_tokens", 12, 4),
            ("memory_usage_mb", 16, 4),
        ],
    ),
    "RKLLMResult": (
        72,
        8,
        [
            ("text", 0, 8),
            ("token_id", 8, 4),
            ("last_hidden_layer", 16, 16),
            ("logits", 32, 16),
            ("perf", 48, 20),
        ],
    ),
    "RKLLMCallback": (
        48,
        8,
        [
            ("result_callback", 0, 8),
            ("result_userdata", 8, 8),
            ("tokenizer_callback", 16, 8),
            ("tokenizer_userdata", 24, 8),
            ("embed_callback", 32, 8),
            ("embed_userdata", 40, 8),
        ],
    ),
}

LAYOUT_12: Layout = {
    "RKLLMExtendParam": (
        120,
        4,
        [
            ("base_domain_id", 0, 4),
            ("embed_flash", 4, 1),
            ("enabled_cpus_num", 5, 1),
            ("enabled_cpus_mask", 8, 4),
            ("n_batch", 12, 1),
            ("use_cross_attn", 13, 1),
            ("reserved", 14, 104),
        ],
    ),
    "RKLLMParam": (
        208,
        8,
        [
            ("model_path", 0, 8),
            ("max_context_len", 8, 4),
            ("max_new_tokens", 12, 4),
            ("top_k", 16, 4),
            ("n_keep", 20, 4),
            ("top_p", 24, 4),
            ("temperature", 28, 4),
            ("repeat_penalty", 32, 4),
            ("frequency_penalty", 36, 4),
            ("presence_penalty", 40, 4),
            ("mirostat", 44, 4),
            ("mirostat_tau", 48, 4),
            ("mirostat_eta", 52, 4),
            ("skip_special_token", 56, 1),
            ("is_async", 57, 1),
            ("img_start", 64, 8),
            ("img_end", 72, 8),
            ("img_content", 80, 8),
            ("extend_param", 88, 120),
        ],
    ),
    "RKLLMLoraAdapter": (
        24,
        8,
        [
            ("lora_adapter_path", 0, 8),
            ("lora_adapter_name", 8, 8),
            ("scale", 16, 4),
        ],
    ),
    "RKLLMEmbedInput": (
        16,
        8,
        [
            ("embed", 0, 8),
            ("n_tokens", 8, 8),
        ],
    ),
    "RKLLMTokenInput": (
        16,
        8,
        [
            ("input_ids", 0, 8),
            ("n_tokens", 8, 8),
        ],
    ),
    "RKLLMMultiModalInput": (
        48,
        8,
        [
            ("prompt", 0, 8),
            ("image_embed", 8, 8),
            ("n_image_tokens", 16, 8),
            ("n_image", 24, 8),
            ("image_width", 32, 8),
            ("image_height", 40, 8),
        ],
    ),
    "RKLLMInput": (
        64,
        8,
        [
            ("role", 0, 8),
            ("enable_thinking", 8, 1),
            ("input_type", 12, 4),
            ("prompt_input", 16, 8),
            ("embed_input", 16, 16),
            ("token_input", 16, 16),
            ("multimodal_input", 16, 48),
        ],
    ),
    "RKLLMLoraParam": (
        8,
        8,
        [
            ("lora_adapter_name", 0, 8),
        ],
    ),
    "RKLLMPromptCacheParam": (
        16,
        8,
        [
            ("save_prompt_cache", 0, 4),
            ("prompt_cache_path", 8, 8),
        ],
    ),
    "RKLLMCrossAttnParam": (
        40,
        8,
        [
            ("encoder_k_cache", 0, 8),
            ("encoder_v_cache", 8, 8),
            ("encoder_mask", 16, 8),
            ("encoder_pos", 24, 8),
            ("num_tokens", 32, 4),
        ],
    ),
    "RKLLMInferParam": (
        32,
        8,
        [
            ("mode", 0, 4),
            ("lora_params", 8, 8),
            ("prompt_cache_params", 16, 8),
            ("keep_history", 24, 4),
        ],
    ),
    "RKLLMResultLastHiddenLayer": (
        16,
        8,
        [
            ("hidden_states", 0, 8),
            ("embd_size", 8, 4),
            ("num_tokens", 12, 4),
        ],
    ),
    "RKLLMResultLogits": (
        16,
        8,
        [
            ("logits", 0, 8),
            ("vocab_size", 8, 4),
            ("num_tokens", 12, 4),
        ],
    ),
    "RKLLMPerfStat": (
        20,
        4,
        [
            ("prefill_time_ms", 0, 4),
            ("prefill_tokens", 4, 4),
            ("generate_time_ms", 8, 4),
            ("generate_tokens", 12, 4),
            ("memory_usage_mb", 16, 4),
        ],
    ),
    "RKLLMResult": (
        72,
        8,
        [
            ("text", 0, 8),
            ("token_id", 8, 4),
            ("last_hidden_layer", 16, 16),
            ("logits", 32, 16),
            ("perf", 48, 20),
        ],
    ),
}

LAYOUTS: dict[str, Layout] = {"1.2": LAYOUT_12, "1.3": LAYOUT_13}
