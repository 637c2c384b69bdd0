/*
 * rkllm_standin.c - a stand-in for Rockchip's librkllmrt.so, for tests and simulation.
 *
 * Written from the project's facts document (docs/rkllm-runtime.md), not from Rockchip's
 * header. It exports the runtime's symbols with the struct layouts of one ABI, chosen at
 * compile time:
 *
 *     cc -shared -fPIC -pthread -O2 -DRKLLM_ABI_13 rkllm_standin.c -o librkllmrt.so   (1.3.0)
 *     cc -shared -fPIC -pthread -O2 rkllm_standin.c -o librkllmrt.so                  (1.2.x)
 *     -DRKLLM_STANDIN_VERSION='"1.2.1"'   the version embedded in rodata (default 1.2.3 / 1.3.0)
 *     -DRKLLM_STANDIN_NO_VERSION          embed no version string at all
 *
 * (tests/standin/build.py does this: `python tests/standin/build.py --abi 1.3 -o build/librkllmrt.so`;
 * it compiles this file with standin_json.h, the small JSON reader the trace replay uses.)
 *
 * Behaviour
 * ---------
 * rkllm_run() blocks while a thread of its own generates and calls the result callback once per
 * step with an array of n_batch RKLLMResult. Slot i's reply is the bytes of its input followed
 * by one space, repeated, cut into tokens of RKLLM_STANDIN_TOKEN_BYTES bytes (default 3), so
 * multibyte characters are split across tokens; a step in which any slot's token ends inside a
 * character is reported as RKLLM_RUN_WAITING. (A token input's "bytes" are its ids in decimal,
 * each after a space.) What a slot's text holds then depends on RKLLM_STANDIN_WAITING_TEXT (see
 * the facts document, LLMCallState):
 *     repeat (default)  what Rockchip's consumers imply: a slot whose bytes end inside a character
 *                       gets all its bytes since its last complete character (the partial ones
 *                       included) and gets them again, completed, in its next text; a consumer
 *                       that prints only NORMAL text loses nothing
 *     split             the header's literal reading: every text is the token's own bytes, and the
 *                       rest of a split character comes at the start of the next text
 * A slot ends at its natural length (default 8 + fnv1a32(input) % 25 tokens, or `@len=N` in the
 * prompt; either is extended to the next character boundary, so that a natural end never splits a
 * character): the step after its last token samples "EOS" and reports token_id -1 with text NULL
 * (that step costs decode time); a slot that reaches max_new_tokens ends without an EOS step.
 * Ended slots report -1/NULL until every slot has ended; then one RKLLM_RUN_FINISH callback
 * carries the perf figures and rkllm_run returns 0. An empty prompt is a slot that has ended from
 * the start. rkllm_abort() (from any thread) stops the run at the next step; then FINISH is
 * delivered and rkllm_run returns 0, or, with RKLLM_STANDIN_AFTER_ABORT=error, one RKLLM_RUN_ERROR
 * callback (no FINISH) and rkllm_run returns -1 (what the real runtime does after an abort is
 * undocumented). A prompt of more tokens than max_context_len fails the whole run at once: "the
 * length of prompt is greater than max context" on stderr, no callback, rkllm_run returns -1.
 *
 * Every result array the callback gets lies flush against an inaccessible page: a binding that
 * reads one RKLLMResult more than it was given dies with SIGSEGV instead of reading garbage.
 *
 * Prompt words (directives) that inject failures, per slot, anywhere in the input (the table
 * DIRECTIVES below; each sets an int of the slot, -1 when absent); a token input is read as the text
 * its ids stand for when the model file carries a vocabulary (below):
 *     @len=N        natural length N tokens
 *     @error=K      when this slot has produced K tokens, one RKLLM_RUN_ERROR callback (text NULL,
 *                   token_id -1 in every slot); no FINISH; rkllm_run then returns 0
 *     @fail=K       at step K, rkllm_run returns -1 without any further callback (K=0: at once)
 *     @initfail=N   the next N calls of rkllm_init fail with -1 (combine with @error/@fail)
 *     @say64=B64    the first time the handle sees the directive (the same base64 text), the slot
 *                   answers exactly the text B64 decodes to (then EOS); every later time, "Done." -
 *                   what a model answers after the tool it called has run, when the conversation
 *                   that carries the directive in its history comes back with the tool's result
 *
 * Vocabulary: a model file that begins with the line "rkllm-standin vocab 1" carries one token a
 * line after it, line k being token k's bytes in hex (an empty line: no bytes). A token input is
 * then decoded to text (its reply source, its directives), as the real runtime's tokenizer would;
 * without one, a token input's "bytes" are its ids in decimal. (Tests write the file, and a
 * tokenizer.json that agrees with it, from one list: tests/rkllm_fixtures.py.)
 *
 * RKLLM_STANDIN_INPUT_LOG=FILE appends each slot's input of every run to FILE, as text (a token
 * input decoded when there is a vocabulary; a prompt with the template in force around it), each
 * after a line "--- rkllm-standin input: run N, slot I, prompt|tokens, B bytes ---".
 *
 * Environment (read at every rkllm_init / rkllm_run; the struct Behaviour below holds them). Where
 * the real runtime's behaviour is unknown, the stand-in can behave either way, so that what
 * `rkmqtt probe` reads from a trace, and the binding itself, are tested against both readings:
 *     RKLLM_STANDIN_INIT_FAIL=1            every rkllm_init fails with -1
 *     RKLLM_STANDIN_ZERO_DELAY=1           no sleeping at all
 *     RKLLM_STANDIN_PREFILL_MS_PER_TOKEN   prefill cost per prompt token (default 378/128 = 2.953)
 *     RKLLM_STANDIN_DECODE_MS              decode step cost with one active slot (default 1000/16.7)
 *     RKLLM_STANDIN_BATCH_ALPHA            step_ms(b) = DECODE_MS * (1 + ALPHA * (b - 1)), b = slots
 *                                          still active in that step (default 0.10; an assumption:
 *                                          nobody has published multi-batch figures for RK3588)
 *     RKLLM_STANDIN_TOKEN_BYTES            bytes per output token (default 3)
 *     RKLLM_STANDIN_BUILTIN_TEMPLATE       bytes the built-in chat template adds to a prompt (default 0)
 *     RKLLM_STANDIN_WAITING_TEXT           repeat (default) or split: the text of a WAITING step (above)
 *     RKLLM_STANDIN_AFTER_ABORT            finish (default) or error: how a run ends after rkllm_abort
 *     RKLLM_STANDIN_NULL_FINISH=1          the FINISH callback gets a NULL result pointer
 *     RKLLM_STANDIN_EOS_STEP=0             a slot's natural end is not a step of its own (token_id -1):
 *                                          its last token is its last result, and when it is the batch's
 *                                          last slot, FINISH follows at once
 *     RKLLM_STANDIN_FINISH_RESULTS         all (default): FINISH and ERROR get n_batch results, FINISH
 *                                          with each slot's perf; one: a single RKLLMResult whose perf
 *                                          holds the batch's totals (reading a second one crashes)
 *     RKLLM_STANDIN_SLOT_END               own (default): a slot ends at its own natural length while
 *                                          its batch-mates run; batch: every slot runs on to the
 *                                          batch's longest natural length (they all end together)
 *     RKLLM_STANDIN_PAD_REQUIRED=1         an empty prompt in a slot of a batch fails the run (-1):
 *                                          every slot must be filled (default: it is a slot that ended)
 *     RKLLM_STANDIN_UNEQUAL_PROMPTS        ok (default) or garbled: in a batch whose prompts differ in
 *                                          length, a shorter prompt's reply is shifted (not what it
 *                                          gets alone)
 *     RKLLM_STANDIN_TOKEN_INPUT_BATCH=0    RKLLM_INPUT_TOKEN at n_batch > 1 fails the run (-1)
 *     RKLLM_STANDIN_EMPTY_TEMPLATE         off (default): rkllm_set_chat_template with three empty
 *                                          strings turns the template off; builtin: it is ignored and
 *                                          the built-in template stays
 *     RKLLM_STANDIN_RUNNING_VALUE          what rkllm_is_running returns during a run (default 1, the
 *                                          1.3.0 header; 0 is the 1.2 header); idle gives the other
 *     RKLLM_STANDIN_KV_AFTER_RUN           cleared (default) or kept: rkllm_get_kv_cache_size after a
 *                                          keep_history=0 run (an aborted run's always stays)
 *     RKLLM_STANDIN_CLEAR_AFTER_ABORT      optional (default) or required: a run after an aborted run
 *                                          fails (-1) until rkllm_clear_kv_cache has been called
 *     RKLLM_STANDIN_PROMPT_CACHE           reuse (default), ignore or batch1: whether a prompt cache
 *                                          loaded with rkllm_load_prompt_cache saves the prefill of a
 *                                          prompt that begins with the cached one (batch1: at n_batch 1
 *                                          only). RKLLMInferParam.prompt_cache_params with
 *                                          save_prompt_cache=1 writes the run's first input to the file.
 *     RKLLM_STANDIN_CALLBACK_THREAD        own (default): callbacks come from a thread of the runtime;
 *                                          caller: from the thread that called rkllm_run
 *     RKLLM_LOG_LEVEL=1                    (the real runtime's variable) print the run's timings at its end
 *     RKLLM_STANDIN_CRASH_AT_RUN=N         the process's N-th rkllm_run raises SIGSEGV after its first callback
 *     RKLLM_STANDIN_HANG_AT_RUN=N          the process's N-th rkllm_run never returns after its first callback
 *     RKLLM_STANDIN_REPLAY=<trace.json>    replay a trace recorded by `rkmqtt probe` (below)
 *     RKLLM_STANDIN_REPLAY_PART=<id>       replay only the calls of that part of the trace
 *     RKLLM_STANDIN_REPLAY_SPEED           factor on the recorded times (default 1; 0: no waiting)
 * Defaults are shaped on Rockchip's RK3588 figures for Qwen2.5-1.5B w8a8: 378 ms to the first
 * token for a 128-token prompt, 16.7 tokens/s at batch 1. Prefill is compute-bound, so a batch's
 * prefill costs the sum of its slots' prompt tokens (no batching gain). A prompt counts
 * ceil(bytes/4) tokens (template text included: the one rkllm_set_chat_template set, else the
 * built-in one's RKLLM_STANDIN_BUILTIN_TEMPLATE bytes), a token input its n_tokens; the first token
 * comes out of the prefill, and every later step costs step_ms(b).
 *
 * Layout checks: rkllm_init and rkllm_run verify that the structs they receive look sane (n_batch
 * 1..8, a readable model path, sampling figures in range, reserved bytes zero, input types, ...)
 * and fail with -1 and a line on stderr otherwise, so a binding with a wrong layout is caught.
 * rkllm_init also checks, through /proc/self/maps, that the callback argument is code (1.2) or an
 * RKLLMCallback whose result_callback is code (1.3): the clearest tell of a binding of the other
 * ABI, whose by-value RKLLMParam is also the wrong size (the facts document's warning).
 *
 * Replay: with RKLLM_STANDIN_REPLAY naming a trace written by `rkmqtt probe` (its "calls" list,
 * only those whose "part" is RKLLM_STANDIN_REPLAY_PART when that is set), each rkllm_init takes
 * the trace's next "init" call (same n_batch, its return code) and each rkllm_run the next "run"
 * call: its callbacks are delivered as recorded (state, per-slot token_id and text bytes, FINISH
 * perf, a NULL result pointer) at the recorded times from the call, and the recorded return code
 * is returned; a run recorded as killed by a signal ("died") raises that signal 0.2 s after its
 * last recorded callback, one that timed out never returns. The callbacks come from the thread the
 * recording's came from (the caller's or one of the runtime's), and with RKLLM_LOG_LEVEL=1 a
 * replayed run prints its recorded FINISH perf as timings. Where the recording's binding called
 * rkllm_abort, the replay waits (up to 10 s) for this binding's rkllm_abort before going on. The
 * recorded rkllm_get_kv_cache_size, rkllm_clear_kv_cache, rkllm_set_chat_template and
 * rkllm_load_prompt_cache calls give their results in order, rkllm_is_running the recorded idle
 * and running values. The prompts are not read. So a trace from a board replays the board's
 * runtime through the binding under test.
 *
 * Handles: a destroyed handle is poisoned and kept, not freed, so that a call on it is counted
 * (invalid_handle_calls), not undefined; rkllm_abort while no rkllm_run call is in progress on the
 * handle (before the call has begun or after it has returned) is counted too (idle_aborts).
 *
 * Extra symbols (not in the real runtime): rkllm_standin_layout() writes "name size align" and
 * "struct.field offset size" lines measured with sizeof/offsetof; rkllm_standin_describe() writes
 * "key=value" lines about the last init/run (for tests).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "standin_json.h"

#ifdef RKLLM_ABI_13
#define STANDIN_ABI "1.3"
#ifndef RKLLM_STANDIN_VERSION
#define RKLLM_STANDIN_VERSION "1.3.0"
#endif
#else
#define STANDIN_ABI "1.2"
#ifndef RKLLM_STANDIN_VERSION
#define RKLLM_STANDIN_VERSION "1.2.3"
#endif
#endif

#ifdef RKLLM_STANDIN_NO_VERSION
static const char standin_banner[] __attribute__((used)) = "rkllm stand-in runtime (no version)";
#else
static const char standin_banner[] __attribute__((used)) = "rkllm-runtime version: " RKLLM_STANDIN_VERSION;
#endif

/* ---- the interface, from the layout tables -------------------------------------------- */

typedef void *LLMHandle;

typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 } LLMCallState;
typedef enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1, RKLLM_INPUT_EMBED = 2, RKLLM_INPUT_MULTIMODAL = 3 } RKLLMInputType;
typedef enum { RKLLM_INFER_GENERATE = 0, RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1, RKLLM_INFER_GET_LOGITS = 2 } RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#ifdef RKLLM_ABI_13
    bool ignore_eos_token;
    bool is_async;
#else
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#ifdef RKLLM_ABI_13
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

#ifdef RKLLM_ABI_13
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#ifdef RKLLM_ABI_13
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#ifdef RKLLM_ABI_13
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#ifdef RKLLM_ABI_13
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    void *tokenizer_callback; /* optional; the stand-in never calls it */
    void *tokenizer_userdata;
    void *embed_callback; /* optional; the stand-in never calls it */
    void *embed_userdata;
} RKLLMCallback;
#endif

/* ---- behaviour: every environment option, read in one place -------------------------------- */

typedef enum { CACHE_REUSE, CACHE_IGNORE, CACHE_BATCH1 } PromptCacheMode;

typedef struct {
    double prefill_ms, decode_ms, alpha; /* timing model */
    int token_bytes;
    int builtin_template_bytes;
    bool waiting_split;          /* RKLLM_STANDIN_WAITING_TEXT=split */
    bool abort_error;            /* RKLLM_STANDIN_AFTER_ABORT=error */
    bool null_finish;            /* RKLLM_STANDIN_NULL_FINISH */
    bool eos_step;               /* RKLLM_STANDIN_EOS_STEP (default on) */
    bool finish_one;             /* RKLLM_STANDIN_FINISH_RESULTS=one */
    bool slots_run_on;           /* RKLLM_STANDIN_SLOT_END=batch */
    bool pad_required;           /* RKLLM_STANDIN_PAD_REQUIRED */
    bool unequal_garbled;        /* RKLLM_STANDIN_UNEQUAL_PROMPTS=garbled */
    bool token_batch;            /* RKLLM_STANDIN_TOKEN_INPUT_BATCH (default on) */
    bool empty_template_builtin; /* RKLLM_STANDIN_EMPTY_TEMPLATE=builtin */
    int running_value;           /* RKLLM_STANDIN_RUNNING_VALUE (default 1) */
    bool kv_kept;                /* RKLLM_STANDIN_KV_AFTER_RUN=kept */
    bool clear_required;         /* RKLLM_STANDIN_CLEAR_AFTER_ABORT=required */
    PromptCacheMode prompt_cache;/* RKLLM_STANDIN_PROMPT_CACHE */
    bool callback_on_caller;     /* RKLLM_STANDIN_CALLBACK_THREAD=caller */
    int log_level;               /* RKLLM_LOG_LEVEL */
    int crash_at_run, hang_at_run;
} Behaviour;

static double env_double(const char *name, double def) {
    const char *v = getenv(name);
    if (!v || !*v) return def;
    char *end;
    double d = strtod(v, &end);
    return end == v ? def : d;
}

static bool env_true(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static bool env_is(const char *name, const char *value) {
    const char *v = getenv(name);
    return v && strcmp(v, value) == 0;
}

static void behaviour_read(Behaviour *b) {
    b->prefill_ms = env_double("RKLLM_STANDIN_PREFILL_MS_PER_TOKEN", 378.0 / 128.0);
    b->decode_ms = env_double("RKLLM_STANDIN_DECODE_MS", 1000.0 / 16.7);
    b->alpha = env_double("RKLLM_STANDIN_BATCH_ALPHA", 0.10);
    b->token_bytes = (int)env_double("RKLLM_STANDIN_TOKEN_BYTES", 3);
    if (b->token_bytes < 1) b->token_bytes = 1;
    if (b->token_bytes > 32) b->token_bytes = 32;
    b->builtin_template_bytes = (int)env_double("RKLLM_STANDIN_BUILTIN_TEMPLATE", 0);
    if (b->builtin_template_bytes < 0 || b->builtin_template_bytes > 4096) b->builtin_template_bytes = 0;
    b->waiting_split = env_is("RKLLM_STANDIN_WAITING_TEXT", "split");
    b->abort_error = env_is("RKLLM_STANDIN_AFTER_ABORT", "error");
    b->null_finish = env_true("RKLLM_STANDIN_NULL_FINISH");
    b->eos_step = !env_is("RKLLM_STANDIN_EOS_STEP", "0");
    b->finish_one = env_is("RKLLM_STANDIN_FINISH_RESULTS", "one");
    b->slots_run_on = env_is("RKLLM_STANDIN_SLOT_END", "batch");
    b->pad_required = env_true("RKLLM_STANDIN_PAD_REQUIRED");
    b->unequal_garbled = env_is("RKLLM_STANDIN_UNEQUAL_PROMPTS", "garbled");
    b->token_batch = !env_is("RKLLM_STANDIN_TOKEN_INPUT_BATCH", "0");
    b->empty_template_builtin = env_is("RKLLM_STANDIN_EMPTY_TEMPLATE", "builtin");
    b->running_value = env_is("RKLLM_STANDIN_RUNNING_VALUE", "0") ? 0 : 1;
    b->kv_kept = env_is("RKLLM_STANDIN_KV_AFTER_RUN", "kept");
    b->clear_required = env_is("RKLLM_STANDIN_CLEAR_AFTER_ABORT", "required");
    b->prompt_cache = env_is("RKLLM_STANDIN_PROMPT_CACHE", "ignore")   ? CACHE_IGNORE
                      : env_is("RKLLM_STANDIN_PROMPT_CACHE", "batch1") ? CACHE_BATCH1
                                                                        : CACHE_REUSE;
    b->callback_on_caller = env_is("RKLLM_STANDIN_CALLBACK_THREAD", "caller");
    b->log_level = (int)env_double("RKLLM_LOG_LEVEL", 0);
    b->crash_at_run = (int)env_double("RKLLM_STANDIN_CRASH_AT_RUN", 0);
    b->hang_at_run = (int)env_double("RKLLM_STANDIN_HANG_AT_RUN", 0);
}

/* ---- state ------------------------------------------------------------------------------ */

#define MAX_BATCH 8
#define HANDLE_MAGIC 0x524b4c4cu /* "RKLL" */
#define CACHE_MAGIC "rkllm-standin prompt cache 1\n"

typedef struct {
    char *source;     /* the bytes the reply stream repeats: the prompt, or a token input's ids */
    char *full;       /* the whole input the model reads (template included), for the prompt cache */
    size_t len;       /* bytes of the reply stream's period: source + ' ' */
    size_t offset;    /* where the stream starts (RKLLM_STANDIN_UNEQUAL_PROMPTS=garbled) */
    int prompt_tokens;
    int prefill_tokens; /* what the prefill costs (fewer when a loaded prompt cache covers a prefix) */
    int natural_len;
    int target; /* tokens it will produce */
    bool eos_due; /* ends by sampling EOS (a step) rather than by max_new_tokens */
    int error_at, fail_at, initfail; /* directives; -1 when absent */
    int produced;
    bool ended;
    bool exact;        /* @say64: the reply is the source once, not repeated */
    char buf[64];      /* this step's token */
    int buf_len;       /* its bytes (an exact reply's last token may be shorter) */
    char pend[112];    /* repeat mode: the slot's bytes since its last complete character */
    size_t pend_len;
} Slot;

/* Prompt directives: `word` followed by an int, stored at `offset` in the Slot. */
typedef struct {
    const char *word;
    size_t offset;
} Directive;

static const Directive DIRECTIVES[] = {
    {"@len=", offsetof(Slot, natural_len)},
    {"@error=", offsetof(Slot, error_at)},
    {"@fail=", offsetof(Slot, fail_at)},
    {"@initfail=", offsetof(Slot, initfail)},
};

/* Result arrays flush against an inaccessible page (see the header). */
typedef struct {
    void *base;
    size_t body, len;
} ResultBuf;

typedef struct Runtime Runtime;

typedef struct {
    Runtime *rt;
    Behaviour b;
    Slot slots[MAX_BATCH];
    int n;
    int limit;
    void *userdata;
    int rc;
    bool aborted;
    bool crash, hang; /* RKLLM_STANDIN_CRASH_AT_RUN / HANG_AT_RUN chose this run */
    ResultBuf res;
    const JVal *replay; /* the recorded "run" call to replay, or NULL */
    int nth;            /* the process's nth rkllm_run */
} Run;

struct Runtime {
    uint32_t magic;
    RKLLMParam param;
    char *model_path;
    LLMResultCallback callback;
    void *callback_userdata;
    char *tmpl[3];
    bool tmpl_set;
    char *cache_text; /* the loaded prompt cache's input, or NULL */
    char **vocab;     /* token k's bytes (the model file's vocabulary), or NULL */
    size_t *vocab_len;
    int n_vocab;
    char **said;      /* @say64: the directives this handle has seen (under mu) */
    size_t n_said, cap_said;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool running;
    int in_call; /* rkllm_run calls between their entry and their return */
    bool abort_requested;
    bool dirty; /* the last run was aborted and no rkllm_clear_kv_cache came since */
    int kv_sizes[MAX_BATCH];
    int runs, aborts, kv_clears, refused_runs, cache_loads, cache_saves;
    /* what the last run received, for rkllm_standin_describe */
    int last_infer_max_new_tokens;
    bool last_sampling_given;
    int last_top_k;
    float last_top_p, last_temperature, last_repeat_penalty;
    int last_keep_history;
    char last_roles[MAX_BATCH * 8 + 8];
    char last_prompt_bytes[MAX_BATCH * 12 + 8];
    char last_input_types[MAX_BATCH * 2 + 8];
};

static pthread_mutex_t global_mu = PTHREAD_MUTEX_INITIALIZER;
static int pending_init_failures;
static int init_calls, destroy_calls, total_aborts, idle_aborts, invalid_handle_calls, process_runs;
static Runtime *last_runtime;

/* replay: the trace, and the next call of each function that the replay takes (under global_mu) */
typedef struct {
    const char *fn;
    size_t next;
} ReplayCursor;
static ReplayCursor replay_cursors[] = {{"init", 0},           {"run", 0},         {"kv_cache_size", 0},
                                       {"clear_kv_cache", 0}, {"set_chat_template", 0}, {"load_prompt_cache", 0}};
static const JVal *replay_trace(bool *bad);
static const JVal *replay_take(const JVal *doc, const char *fn);

static void logf_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("rkllm-standin: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* The model file's vocabulary, if it has one (see the header). */
static void load_vocab(Runtime *rt) {
    FILE *f = fopen(rt->model_path, "rb");
    if (!f) return;
    char head[32] = "";
    if (!fgets(head, sizeof head, f) || strcmp(head, "rkllm-standin vocab 1\n") != 0) { fclose(f); return; }
    size_t cap = 0;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n") / 2;
        if ((size_t)rt->n_vocab == cap) {
            cap = cap ? cap * 2 : 512;
            rt->vocab = realloc(rt->vocab, cap * sizeof *rt->vocab);
            rt->vocab_len = realloc(rt->vocab_len, cap * sizeof *rt->vocab_len);
        }
        char *bytes = malloc(n + 1);
        for (size_t k = 0; k < n; k++) {
            unsigned v = 0;
            sscanf(line + 2 * k, "%2x", &v);
            bytes[k] = (char)v;
        }
        bytes[n] = '\0';
        rt->vocab[rt->n_vocab] = bytes;
        rt->vocab_len[rt->n_vocab++] = n;
    }
    fclose(f);
}

/* A token input as the text its ids stand for (malloc'd); an id outside the vocabulary reads "?". */
static char *decode_tokens(const Runtime *rt, const RKLLMTokenInput *t) {
    size_t need = 1;
    for (size_t k = 0; k < t->n_tokens; k++) {
        int id = t->input_ids[k];
        need += id >= 0 && id < rt->n_vocab ? rt->vocab_len[id] : 1;
    }
    char *out = malloc(need), *p = out;
    if (!out) return NULL;
    for (size_t k = 0; k < t->n_tokens; k++) {
        int id = t->input_ids[k];
        if (id >= 0 && id < rt->n_vocab) { memcpy(p, rt->vocab[id], rt->vocab_len[id]); p += rt->vocab_len[id]; }
        else *p++ = '?';
    }
    *p = '\0';
    return out;
}


static int b64_value(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
}

/* What a slot whose input holds `@say64=B64` answers (malloc'd), or NULL without the directive. */
static char *say64_answer(Runtime *rt, const char *input) {
    const char *p = strstr(input, "@say64=");
    if (!p) return NULL;
    p += strlen("@say64=");
    size_t n = 0;
    while (b64_value(p[n]) >= 0) n++;
    char *key = strndup(p, n);
    pthread_mutex_lock(&rt->mu);
    bool seen = false;
    for (size_t k = 0; k < rt->n_said && !seen; k++) seen = strcmp(rt->said[k], key) == 0;
    if (!seen) {
        if (rt->n_said == rt->cap_said) {
            rt->cap_said = rt->cap_said ? rt->cap_said * 2 : 16;
            rt->said = realloc(rt->said, rt->cap_said * sizeof *rt->said);
        }
        rt->said[rt->n_said++] = strdup(key);
    }
    pthread_mutex_unlock(&rt->mu);
    if (seen) { free(key); return strdup("Done."); }
    char *out = malloc(n / 4 * 3 + 4), *o = out;
    unsigned acc = 0;
    int bits = 0;
    for (size_t k = 0; k < n; k++) {
        acc = (acc << 6) | (unsigned)b64_value(key[k]);
        bits += 6;
        if (bits >= 8) { bits -= 8; *o++ = (char)((acc >> bits) & 0xFF); }
    }
    *o = '\0';
    free(key);
    return out;
}

/* RKLLM_STANDIN_INPUT_LOG: the slot's input appended to the file. */
static void log_input(int run, int slot, bool tokens, const char *text) {
    const char *path = getenv("RKLLM_STANDIN_INPUT_LOG");
    if (!path || !*path) return;
    pthread_mutex_lock(&global_mu);
    FILE *f = fopen(path, "ab");
    if (f) {
        fprintf(f, "--- rkllm-standin input: run %d, slot %d, %s, %zu bytes ---\n%s\n", run, slot,
                tokens ? "tokens" : "prompt", strlen(text), text);
        fclose(f);
    }
    pthread_mutex_unlock(&global_mu);
}

static void parse_directives(Slot *s, const char *prompt) {
    for (size_t d = 0; d < sizeof DIRECTIVES / sizeof DIRECTIVES[0]; d++) {
        const char *p = strstr(prompt, DIRECTIVES[d].word);
        *(int *)((char *)s + DIRECTIVES[d].offset) = p ? atoi(p + strlen(DIRECTIVES[d].word)) : -1;
    }
}

static uint32_t fnv1a(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

static bool str_ok(const char *s, size_t max) {
    return s != NULL && strnlen(s, max) < max;
}

/* Whether `p` lies in an executable mapping of this process (a function, or a libffi closure). A
 * binding of the other ABI passes an RKLLMCallback* (data) where 1.2 takes a function pointer, or
 * the reverse; this tells them apart. */
static bool is_executable(const void *p) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return true; /* cannot tell: do not fail */
    char line[512];
    bool found = false, exec = false;
    uintptr_t a = (uintptr_t)p;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) == 3 && a >= lo && a < hi) {
            found = true;
            exec = perms[2] == 'x';
            break;
        }
    }
    fclose(f);
    return found && exec;
}

static bool resbuf_init(ResultBuf *rb, int n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t need = sizeof(RKLLMResult) * (size_t)n;
    rb->body = (need + page - 1) / page * page;
    rb->len = rb->body + page;
    rb->base = mmap(NULL, rb->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rb->base == MAP_FAILED) { rb->base = NULL; return false; }
    if (mprotect((char *)rb->base + rb->body, page, PROT_NONE) != 0) { munmap(rb->base, rb->len); rb->base = NULL; return false; }
    return true;
}

/* `count` zeroed results whose last one ends where the inaccessible page begins. */
static RKLLMResult *resbuf_tail(ResultBuf *rb, int count) {
    RKLLMResult *r = (RKLLMResult *)((char *)rb->base + rb->body - sizeof(RKLLMResult) * (size_t)count);
    memset(r, 0, sizeof(RKLLMResult) * (size_t)count);
    for (int i = 0; i < count; i++) r[i].token_id = -1;
    return r;
}

static void resbuf_free(ResultBuf *rb) {
    if (rb->base) munmap(rb->base, rb->len);
    rb->base = NULL;
}

/* ---- layout report (extra symbol) ------------------------------------------------------- */

#define LAY_S(T) n += snprintf(buf + n, n < len ? len - n : 0, "%s %zu %zu\n", #T, sizeof(T), _Alignof(T))
#define LAY_F(T, f) n += snprintf(buf + n, n < len ? len - n : 0, "%s.%s %zu %zu\n", #T, #f, offsetof(T, f), sizeof(((T *)0)->f))

size_t rkllm_standin_layout(char *buf, size_t len) {
    size_t n = 0;
    LAY_S(RKLLMExtendParam);
    LAY_F(RKLLMExtendParam, base_domain_id); LAY_F(RKLLMExtendParam, embed_flash);
    LAY_F(RKLLMExtendParam, enabled_cpus_num); LAY_F(RKLLMExtendParam, enabled_cpus_mask);
    LAY_F(RKLLMExtendParam, n_batch); LAY_F(RKLLMExtendParam, use_cross_attn); LAY_F(RKLLMExtendParam, reserved);
    LAY_S(RKLLMParam);
    LAY_F(RKLLMParam, model_path); LAY_F(RKLLMParam, max_context_len); LAY_F(RKLLMParam, max_new_tokens);
    LAY_F(RKLLMParam, top_k); LAY_F(RKLLMParam, n_keep); LAY_F(RKLLMParam, top_p); LAY_F(RKLLMParam, temperature);
    LAY_F(RKLLMParam, repeat_penalty); LAY_F(RKLLMParam, frequency_penalty); LAY_F(RKLLMParam, presence_penalty);
    LAY_F(RKLLMParam, mirostat); LAY_F(RKLLMParam, mirostat_tau); LAY_F(RKLLMParam, mirostat_eta);
    LAY_F(RKLLMParam, skip_special_token);
#ifdef RKLLM_ABI_13
    LAY_F(RKLLMParam, ignore_eos_token);
#endif
    LAY_F(RKLLMParam, is_async);
#ifndef RKLLM_ABI_13
    LAY_F(RKLLMParam, img_start); LAY_F(RKLLMParam, img_end); LAY_F(RKLLMParam, img_content);
#endif
    LAY_F(RKLLMParam, extend_param);
    LAY_S(RKLLMLoraAdapter);
    LAY_F(RKLLMLoraAdapter, lora_adapter_path); LAY_F(RKLLMLoraAdapter, lora_adapter_name); LAY_F(RKLLMLoraAdapter, scale);
    LAY_S(RKLLMEmbedInput);
    LAY_F(RKLLMEmbedInput, embed); LAY_F(RKLLMEmbedInput, n_tokens);
    LAY_S(RKLLMTokenInput);
    LAY_F(RKLLMTokenInput, input_ids); LAY_F(RKLLMTokenInput, n_tokens);
    LAY_S(RKLLMMultiModalInput);
    LAY_F(RKLLMMultiModalInput, prompt);
#ifdef RKLLM_ABI_13
    LAY_F(RKLLMMultiModalInput, image); LAY_F(RKLLMMultiModalInput, video);
#else
    LAY_F(RKLLMMultiModalInput, image_embed); LAY_F(RKLLMMultiModalInput, n_image_tokens);
    LAY_F(RKLLMMultiModalInput, n_image); LAY_F(RKLLMMultiModalInput, image_width);
    LAY_F(RKLLMMultiModalInput, image_height);
#endif
    LAY_S(RKLLMInput);
    LAY_F(RKLLMInput, role); LAY_F(RKLLMInput, enable_thinking); LAY_F(RKLLMInput, input_type);
    LAY_F(RKLLMInput, prompt_input); LAY_F(RKLLMInput, embed_input); LAY_F(RKLLMInput, token_input);
    LAY_F(RKLLMInput, multimodal_input);
    LAY_S(RKLLMLoraParam);
    LAY_F(RKLLMLoraParam, lora_adapter_name);
    LAY_S(RKLLMPromptCacheParam);
    LAY_F(RKLLMPromptCacheParam, save_prompt_cache); LAY_F(RKLLMPromptCacheParam, prompt_cache_path);
    LAY_S(RKLLMCrossAttnParam);
    LAY_F(RKLLMCrossAttnParam, encoder_k_cache); LAY_F(RKLLMCrossAttnParam, encoder_v_cache);
    LAY_F(RKLLMCrossAttnParam, encoder_mask); LAY_F(RKLLMCrossAttnParam, encoder_pos);
    LAY_F(RKLLMCrossAttnParam, num_tokens);
#ifdef RKLLM_ABI_13
    LAY_S(RKLLMSamplingParam);
    LAY_F(RKLLMSamplingParam, top_k); LAY_F(RKLLMSamplingParam, top_p); LAY_F(RKLLMSamplingParam, temperature);
    LAY_F(RKLLMSamplingParam, repeat_penalty); LAY_F(RKLLMSamplingParam, frequency_penalty);
    LAY_F(RKLLMSamplingParam, presence_penalty); LAY_F(RKLLMSamplingParam, mirostat);
    LAY_F(RKLLMSamplingParam, mirostat_tau); LAY_F(RKLLMSamplingParam, mirostat_eta);
#endif
    LAY_S(RKLLMInferParam);
    LAY_F(RKLLMInferParam, mode); LAY_F(RKLLMInferParam, lora_params); LAY_F(RKLLMInferParam, prompt_cache_params);
#ifdef RKLLM_ABI_13
    LAY_F(RKLLMInferParam, sampling_params);
#endif
    LAY_F(RKLLMInferParam, keep_history);
#ifdef RKLLM_ABI_13
    LAY_F(RKLLMInferParam, max_new_tokens);
#endif
    LAY_S(RKLLMResultLastHiddenLayer);
    LAY_F(RKLLMResultLastHiddenLayer, hidden_states); LAY_F(RKLLMResultLastHiddenLayer, embd_size);
    LAY_F(RKLLMResultLastHiddenLayer, num_tokens);
    LAY_S(RKLLMResultLogits);
    LAY_F(RKLLMResultLogits, logits); LAY_F(RKLLMResultLogits, vocab_size); LAY_F(RKLLMResultLogits, num_tokens);
    LAY_S(RKLLMPerfStat);
    LAY_F(RKLLMPerfStat, prefill_time_ms); LAY_F(RKLLMPerfStat, prefill_tokens); LAY_F(RKLLMPerfStat, generate_time_ms);
    LAY_F(RKLLMPerfStat, generate_tokens); LAY_F(RKLLMPerfStat, memory_usage_mb);
    LAY_S(RKLLMResult);
    LAY_F(RKLLMResult, text); LAY_F(RKLLMResult, token_id); LAY_F(RKLLMResult, last_hidden_layer);
    LAY_F(RKLLMResult, logits); LAY_F(RKLLMResult, perf);
#ifdef RKLLM_ABI_13
    LAY_S(RKLLMCallback);
    LAY_F(RKLLMCallback, result_callback); LAY_F(RKLLMCallback, result_userdata);
    LAY_F(RKLLMCallback, tokenizer_callback); LAY_F(RKLLMCallback, tokenizer_userdata);
    LAY_F(RKLLMCallback, embed_callback); LAY_F(RKLLMCallback, embed_userdata);
#endif
    return n;
}

/* ---- default parameters ----------------------------------------------------------------- */

RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.model_path = NULL;
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.is_async = false;
#ifndef RKLLM_ABI_13
    p.img_start = "";
    p.img_end = "";
    p.img_content = "";
#endif
    p.extend_param.base_domain_id = 0;
    p.extend_param.embed_flash = 0;
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.enabled_cpus_mask = 0xF0u;
    p.extend_param.n_batch = 1;
    p.extend_param.use_cross_attn = 0;
    return p;
}

/* ---- init / destroy ------------------------------------------------------------------------ */

static int check_param(const RKLLMParam *p) {
    const RKLLMExtendParam *e = &p->extend_param;
    if (!str_ok(p->model_path, 4096)) { logf_("init: model_path is NULL or not a string"); return -1; }
    if (p->max_context_len < 16 || p->max_context_len > 131072) {
        logf_("init: max_context_len %d out of range (layout mismatch?)", p->max_context_len); return -1; }
    if (p->max_new_tokens == 0 || p->max_new_tokens < -1 || p->max_new_tokens > (1 << 20)) {
        logf_("init: max_new_tokens %d out of range (layout mismatch?)", p->max_new_tokens); return -1; }
    if (p->top_k < 0 || p->top_k > 1000000) { logf_("init: top_k %d out of range", p->top_k); return -1; }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) { logf_("init: top_p %f out of range", p->top_p); return -1; }
    if (!(p->temperature >= 0.0f && p->temperature <= 10.0f)) { logf_("init: temperature %f out of range", p->temperature); return -1; }
    if (!(p->repeat_penalty >= 0.1f && p->repeat_penalty <= 10.0f)) { logf_("init: repeat_penalty out of range"); return -1; }
    if (p->is_async) { logf_("init: is_async is set (the stand-in runs synchronously; layout mismatch?)"); return -1; }
    if (e->n_batch < 1 || e->n_batch > MAX_BATCH) {
        logf_("init: extend_param.n_batch %u is not 1..8 (the manual recommends at most 8; the stand-in takes no more; "
              "0 or a large value: layout mismatch?)", e->n_batch); return -1; }
    if (e->enabled_cpus_mask == 0 || e->enabled_cpus_mask > 0xFFu ||
        e->enabled_cpus_num != __builtin_popcount(e->enabled_cpus_mask)) {
        logf_("init: enabled_cpus_mask 0x%x / enabled_cpus_num %d do not agree", e->enabled_cpus_mask, e->enabled_cpus_num);
        return -1; }
    if (e->embed_flash != 0 && e->embed_flash != 1) { logf_("init: embed_flash %d is not 0/1", e->embed_flash); return -1; }
    if (e->use_cross_attn != 0) { logf_("init: use_cross_attn is set (layout mismatch?)"); return -1; }
    if (e->base_domain_id < 0 || e->base_domain_id > 255) { logf_("init: base_domain_id out of range"); return -1; }
    for (size_t i = 0; i < sizeof e->reserved; i++)
        if (e->reserved[i]) { logf_("init: extend_param.reserved[%zu] is not zero (layout mismatch?)", i); return -1; }
    FILE *f = fopen(p->model_path, "rb");
    if (!f) { logf_("init: cannot open model %s: %s", p->model_path, strerror(errno)); return -1; }
    fclose(f);
    return 0;
}

#ifdef RKLLM_ABI_13
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    pthread_mutex_lock(&global_mu);
    init_calls++;
    bool fail = env_true("RKLLM_STANDIN_INIT_FAIL");
    if (pending_init_failures > 0) { pending_init_failures--; fail = true; }
    pthread_mutex_unlock(&global_mu);
    fprintf(stderr, "I rkllm: %s, rknpu driver version: 0.9.8, platform: RK3588 (stand-in)\n", standin_banner);
    if (!handle || !param || !callback) { logf_("init: NULL argument"); return -1; }
    *handle = NULL;
    if (fail) { logf_("init: failing on demand"); return -1; }
#ifdef RKLLM_ABI_13
    if (is_executable(callback)) {
        logf_("init: the third argument points to code, not to an RKLLMCallback (a 1.2.x binding?)"); return -1; }
    if (!callback->result_callback || !is_executable((const void *)callback->result_callback)) {
        logf_("init: RKLLMCallback.result_callback is NULL or not code"); return -1; }
#else
    if (!is_executable((const void *)callback)) {
        logf_("init: the result callback is not code (an RKLLMCallback* from a 1.3.0 binding?)"); return -1; }
#endif
    if (check_param(param) != 0) return -1;
    bool bad = false;
    pthread_mutex_lock(&global_mu);
    const JVal *trace = replay_trace(&bad);
    const JVal *rec = trace ? replay_take(trace, "init") : NULL;
    pthread_mutex_unlock(&global_mu);
    if (bad) return -1;
    if (trace && !rec) { logf_("replay: the trace has no more rkllm_init calls"); return -1; }
    if (rec) {
        int want = (int)jnum(jget(rec, "n_batch"), -1);
        if (want != param->extend_param.n_batch) {
            logf_("replay: this rkllm_init has n_batch %u, the recorded one %d", param->extend_param.n_batch, want);
            return -1;
        }
        int rc = (int)jnum(jget(rec, "rc"), 0);
        if (rc != 0) { logf_("replay: the recorded rkllm_init returned %d", rc); return rc; }
    }
    Runtime *rt = calloc(1, sizeof *rt);
    if (!rt) return -1;
    rt->magic = HANDLE_MAGIC;
    rt->param = *param;
    rt->model_path = strdup(param->model_path);
    load_vocab(rt);
    rt->param.model_path = rt->model_path;
#ifdef RKLLM_ABI_13
    rt->callback = callback->result_callback;
    rt->callback_userdata = callback->result_userdata;
#else
    rt->callback = callback;
    rt->callback_userdata = NULL;
#endif
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&rt->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&rt->mu, NULL);
    rt->last_infer_max_new_tokens = -2;
    pthread_mutex_lock(&global_mu);
    last_runtime = rt;
    pthread_mutex_unlock(&global_mu);
    *handle = rt;
    return 0;
}

static Runtime *runtime_of(LLMHandle h) {
    Runtime *rt = (Runtime *)h;
    if (!rt || rt->magic != HANDLE_MAGIC) {
        logf_("invalid handle (NULL or destroyed)");
        pthread_mutex_lock(&global_mu);
        invalid_handle_calls++;
        pthread_mutex_unlock(&global_mu);
        return NULL;
    }
    return rt;
}

int rkllm_destroy(LLMHandle handle) {
    Runtime *rt = runtime_of(handle);
    if (!rt) return -1;
    pthread_mutex_lock(&rt->mu);
    bool busy = rt->running;
    pthread_mutex_unlock(&rt->mu);
    if (busy) { logf_("destroy: a run is in progress"); return -1; }
    pthread_mutex_lock(&global_mu);
    destroy_calls++;
    if (last_runtime == rt) last_runtime = NULL;
    pthread_mutex_unlock(&global_mu);
    /* Poisoned and kept, not freed: a later call on this handle is counted, not undefined. */
    rt->magic = 0xDEADu;
    for (int i = 0; i < 3; i++) { free(rt->tmpl[i]); rt->tmpl[i] = NULL; }
    free(rt->cache_text);
    rt->cache_text = NULL;
    return 0;
}

/* ---- the run -------------------------------------------------------------------------------- */

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Sleep `ms` unless aborted first; returns true when aborted. */
static bool sleep_abortable(Runtime *rt, double ms) {
    pthread_mutex_lock(&rt->mu);
    if (ms > 0 && !env_true("RKLLM_STANDIN_ZERO_DELAY")) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long long ns = ts.tv_nsec + (long long)(ms * 1e6);
        ts.tv_sec += ns / 1000000000LL;
        ts.tv_nsec = ns % 1000000000LL;
        while (!rt->abort_requested) {
            int r = pthread_cond_timedwait(&rt->cv, &rt->mu, &ts);
            if (r == ETIMEDOUT) break;
        }
    }
    bool aborted = rt->abort_requested;
    pthread_mutex_unlock(&rt->mu);
    return aborted;
}

static void sleep_plain(double ms) {
    if (ms <= 0 || env_true("RKLLM_STANDIN_ZERO_DELAY")) return;
    struct timespec ts = {(time_t)(ms / 1e3), (long)((ms - 1e3 * (double)(time_t)(ms / 1e3)) * 1e6)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* Whether the template set with rkllm_set_chat_template is in force (not the built-in one). */
static bool custom_template(const Runtime *rt, const Behaviour *b) {
    if (!rt->tmpl_set) return false;
    bool empty = !*rt->tmpl[0] && !*rt->tmpl[1] && !*rt->tmpl[2];
    return !(empty && b->empty_template_builtin);
}

/* The whole input the model reads for a prompt: the template around it (malloc'd). The built-in
 * template is RKLLM_STANDIN_BUILTIN_TEMPLATE bytes of filler, half before the prompt, half after. */
static char *full_input(const Runtime *rt, const Behaviour *b, const char *prompt) {
    const char *pre1 = "", *pre2 = "", *post = "";
    char before[2049] = "", after[2049] = "";
    if (custom_template(rt, b)) {
        pre1 = rt->tmpl[0]; pre2 = rt->tmpl[1]; post = rt->tmpl[2];
    } else {
        int n = b->builtin_template_bytes, half = n / 2;
        memset(before, 'T', (size_t)half); before[half] = '\0';
        memset(after, 't', (size_t)(n - half)); after[n - half] = '\0';
        pre1 = before; post = after;
    }
    size_t len = strlen(pre1) + strlen(pre2) + strlen(prompt) + strlen(post);
    char *out = malloc(len + 1);
    if (out) snprintf(out, len + 1, "%s%s%s%s", pre1, pre2, prompt, post);
    return out;
}

static int tokens_of_bytes(size_t bytes) { return (int)((bytes + 3) / 4); }

/* A token input's reply source: its ids in decimal, each after a space (malloc'd). */
static char *token_source(const RKLLMTokenInput *t) {
    size_t cap = t->n_tokens * 12 + 1, n = 0;
    char *out = malloc(cap);
    if (!out) return NULL;
    out[0] = '\0';
    for (size_t k = 0; k < t->n_tokens; k++) n += (size_t)snprintf(out + n, cap - n, " %d", t->input_ids[k]);
    return out;
}

/* Byte `pos` of the endless reply stream source+' '+source+' '... */
static unsigned char stream_byte(const Slot *s, size_t pos) {
    if (s->exact) return pos < s->len - 1 ? (unsigned char)s->source[pos] : ' ';
    size_t q = (pos + s->offset) % s->len;
    return q < s->len - 1 ? (unsigned char)s->source[q] : ' ';
}

/* Token k of a slot: bytes [k*tb, (k+1)*tb) of the stream. Returns true when the token ends
 * inside a character (the next byte is a UTF-8 continuation byte). */
static bool make_token(Slot *s, int k, int tb) {
    size_t start = (size_t)k * tb;
    s->buf_len = tb;
    if (s->exact && start + (size_t)tb > s->len - 1) s->buf_len = start < s->len - 1 ? (int)(s->len - 1 - start) : 0;
    for (int j = 0; j < s->buf_len; j++) s->buf[j] = (char)stream_byte(s, start + j);
    s->buf[s->buf_len] = '\0';
    return (stream_byte(s, start + tb) & 0xC0) == 0x80;
}

/* The text a slot reports for its token this step (RKLLM_STANDIN_WAITING_TEXT, see the header). */
static const char *slot_text(Slot *s, int tb, bool repeat) {
    if (!repeat) return s->buf;
    (void)tb;
    if (s->pend_len + (size_t)s->buf_len >= sizeof s->pend) s->pend_len = 0; /* cannot happen with tb <= 32 */
    memcpy(s->pend + s->pend_len, s->buf, (size_t)s->buf_len);
    s->pend_len += (size_t)s->buf_len;
    s->pend[s->pend_len] = '\0';
    return s->pend;
}

/* One decode step's result for slot `s`; returns true when its token ends inside a character. */
static bool step_slot(Slot *s, RKLLMResult *r, int tb, bool repeat, bool eos_step) {
    r->text = NULL;
    r->token_id = -1;
    if (s->ended) return false;
    if (s->produced >= s->target) {
        s->ended = true; /* this step sampled EOS */
        return false;
    }
    bool incomplete = make_token(s, s->produced, tb);
    r->text = slot_text(s, tb, repeat);
    r->token_id = 1000 + (int32_t)(fnv1a(s->buf) % 30000u);
    s->produced++;
    if (s->produced == s->target && (!s->eos_due || !eos_step)) s->ended = true;
    return incomplete;
}

/* FINISH's results: each slot's perf, or (RKLLM_STANDIN_FINISH_RESULTS=one) a single result with
 * the batch's totals. Returns the array the callback gets. */
static RKLLMResult *fill_perf(Run *run, double t_prefill, double t_gen) {
    int count = run->b.finish_one ? 1 : run->n;
    RKLLMResult *res = resbuf_tail(&run->res, count);
    float memory = 1689.0f + 64.0f * (run->n - 1);
    for (int i = 0; i < run->n; i++) {
        RKLLMPerfStat *p = &res[run->b.finish_one ? 0 : i].perf;
        p->prefill_time_ms = (float)t_prefill;
        p->prefill_tokens += run->slots[i].prompt_tokens;
        p->generate_time_ms = (float)t_gen;
        p->generate_tokens += run->slots[i].produced;
        p->memory_usage_mb = memory;
    }
    return res;
}

/* RKLLM_STANDIN_CRASH_AT_RUN / HANG_AT_RUN, once the run has called back `delivered` times. */
static void maybe_die(const Run *run, int delivered) {
    if (delivered < 1) return;
    if (run->crash) {
        logf_("run: raising SIGSEGV (RKLLM_STANDIN_CRASH_AT_RUN)");
        fflush(stderr);
        raise(SIGSEGV);
    }
    if (run->hang) {
        logf_("run: hanging for ever (RKLLM_STANDIN_HANG_AT_RUN)");
        for (;;) pause();
    }
}

/* RKLLM_LOG_LEVEL >= 1: the run's timings on stderr, as a runtime's verbose log would have them. */
static void log_timings(const Run *run, double t_prefill, double t_gen) {
    if (run->b.log_level < 1) return;
    int prompt = 0, produced = 0;
    for (int i = 0; i < run->n; i++) { prompt += run->slots[i].prompt_tokens; produced += run->slots[i].produced; }
    fprintf(stderr, "I rkllm: stand-in timings: prefill %.2f ms, %d tokens, %.2f tokens/s\n", t_prefill, prompt,
            t_prefill > 0 ? prompt * 1000.0 / t_prefill : 0.0);
    fprintf(stderr, "I rkllm: stand-in timings: generate %.2f ms, %d tokens, %.2f tokens/s\n", t_gen, produced,
            t_gen > 0 ? produced * 1000.0 / t_gen : 0.0);
    fprintf(stderr, "I rkllm: stand-in timings: peak memory %.2f MB\n", 1689.0 + 64.0 * (run->n - 1));
}

static void *generate(void *arg) {
    Run *run = arg;
    Runtime *rt = run->rt;
    const Behaviour *b = &run->b;
    int tb = b->token_bytes;
    bool repeat = !b->waiting_split;

    double t0 = now_ms();
    int total_prefill = 0;
    for (int i = 0; i < run->n; i++) total_prefill += run->slots[i].prefill_tokens;
    for (int i = 0; i < run->n; i++)
        if (run->slots[i].fail_at == 0) { run->rc = -1; return NULL; }
    bool aborted = sleep_abortable(rt, total_prefill * b->prefill_ms);
    double t_prefill = now_ms() - t0;
    double t1 = now_ms();
    int delivered = 0;

    for (int step = 0; !aborted; step++) {
        int active = 0;
        for (int i = 0; i < run->n; i++) active += !run->slots[i].ended;
        if (active == 0) break;
        for (int i = 0; i < run->n; i++)
            if (run->slots[i].fail_at >= 0 && step >= run->slots[i].fail_at) { run->rc = -1; return NULL; }
        maybe_die(run, delivered);
        if (step > 0 && sleep_abortable(rt, b->decode_ms * (1.0 + b->alpha * (active - 1)))) { aborted = true; break; }
        bool waiting = false, error = false;
        bool incomplete[MAX_BATCH] = {false};
        RKLLMResult *res = resbuf_tail(&run->res, run->n);
        for (int i = 0; i < run->n; i++) {
            Slot *s = &run->slots[i];
            incomplete[i] = step_slot(s, &res[i], tb, repeat, b->eos_step);
            waiting |= incomplete[i];
            if (s->error_at >= 0 && s->produced >= s->error_at) error = true;
        }
        if (error) {
            rt->callback(resbuf_tail(&run->res, b->finish_one ? 1 : run->n), run->userdata, RKLLM_RUN_ERROR);
            run->rc = 0;
            return NULL;
        }
        rt->callback(res, run->userdata, waiting ? RKLLM_RUN_WAITING : RKLLM_RUN_NORMAL);
        delivered++;
        for (int i = 0; i < run->n; i++)
            if (!incomplete[i]) run->slots[i].pend_len = 0; /* its character is complete: nothing to repeat */
    }
    run->aborted = aborted;
    if (!aborted) maybe_die(run, delivered);
    if (aborted && b->abort_error) {
        rt->callback(resbuf_tail(&run->res, b->finish_one ? 1 : run->n), run->userdata, RKLLM_RUN_ERROR);
        run->rc = -1;
        return NULL;
    }
    double t_gen = now_ms() - t1;
    RKLLMResult *res = fill_perf(run, t_prefill, t_gen);
    log_timings(run, t_prefill, t_gen);
    rt->callback(b->null_finish ? NULL : res, run->userdata, RKLLM_RUN_FINISH);
    run->rc = 0;
    return NULL;
}

/* ---- starting a run: its arguments, its slots, the behaviours that refuse it ---------------- */

static int check_run_args(Runtime *rt, RKLLMInput *input, RKLLMInferParam *infer) {
    if (!input || !infer) { logf_("run: NULL input or infer param"); return -1; }
    if (infer->mode != RKLLM_INFER_GENERATE) {
        if (rt->param.extend_param.n_batch > 1 && infer->mode == RKLLM_INFER_GET_LOGITS)
            logf_("run: Getting the logits is not supported for multiple batches");
        else
            logf_("run: infer mode %d not supported by the stand-in (layout mismatch?)", (int)infer->mode);
        return -1;
    }
    if (infer->keep_history != 0 && infer->keep_history != 1) {
        logf_("run: keep_history %d is not 0/1 (layout mismatch?)", infer->keep_history); return -1; }
    const RKLLMPromptCacheParam *pc = infer->prompt_cache_params;
    if (pc && ((pc->save_prompt_cache != 0 && pc->save_prompt_cache != 1) ||
               (pc->save_prompt_cache && !str_ok(pc->prompt_cache_path, 4096)))) {
        logf_("run: prompt_cache_params is not {0/1, path} (layout mismatch?)"); return -1; }
#ifdef RKLLM_ABI_13
    if (infer->max_new_tokens < -1 || infer->max_new_tokens > (1 << 20)) {
        logf_("run: max_new_tokens %d out of range (layout mismatch?)", infer->max_new_tokens); return -1; }
    const RKLLMSamplingParam *sp = infer->sampling_params;
    if (sp && (sp->top_k < 0 || sp->top_k > 1000000 || !(sp->top_p > 0 && sp->top_p <= 1) ||
               !(sp->temperature >= 0 && sp->temperature <= 10) || !(sp->repeat_penalty >= 0.1f && sp->repeat_penalty <= 10))) {
        logf_("run: sampling_params out of range (layout mismatch?)"); return -1; }
#endif
    for (int i = 0; i < rt->param.extend_param.n_batch; i++) {
        const RKLLMInput *in = &input[i];
        if (in->role && !(strcmp(in->role, "user") == 0 || strcmp(in->role, "tool") == 0)) {
            logf_("run: input[%d].role is not \"user\" or \"tool\"", i); return -1; }
        if (in->input_type == RKLLM_INPUT_PROMPT) {
            if (!str_ok(in->prompt_input, 1 << 22)) { logf_("run: input[%d].prompt_input is NULL", i); return -1; }
        } else if (in->input_type == RKLLM_INPUT_TOKEN) {
            const RKLLMTokenInput *t = &in->token_input;
            if (!t->input_ids || t->n_tokens < 1 || t->n_tokens > (size_t)rt->param.max_context_len * 4) {
                logf_("run: input[%d].token_input is {%p, %zu} (layout mismatch?)", i, (void *)t->input_ids, t->n_tokens);
                return -1; }
        } else {
            logf_("run: input[%d].input_type %d: the stand-in takes prompts and tokens only (layout mismatch?)", i,
                  (int)in->input_type);
            return -1;
        }
    }
    return 0;
}

/* The behaviours that refuse a run (where the real runtime might): -1 with a line, else 0. */
static int refuse_run(Runtime *rt, const Behaviour *b, const RKLLMInput *input) {
    int n = rt->param.extend_param.n_batch;
    if (rt->dirty && b->clear_required) {
        logf_("run: the KV cache still holds an aborted run: call rkllm_clear_kv_cache first "
              "(RKLLM_STANDIN_CLEAR_AFTER_ABORT=required)");
        return -1;
    }
    for (int i = 0; i < n && n > 1; i++) {
        if (input[i].input_type == RKLLM_INPUT_TOKEN && !b->token_batch) {
            logf_("run: input[%d]: token input is not supported with n_batch > 1 (RKLLM_STANDIN_TOKEN_INPUT_BATCH=0)", i);
            return -1;
        }
        if (input[i].input_type == RKLLM_INPUT_PROMPT && !*input[i].prompt_input && b->pad_required) {
            logf_("run: input[%d] is empty: every slot of the batch needs an input (RKLLM_STANDIN_PAD_REQUIRED=1)", i);
            return -1;
        }
    }
    return 0;
}

/* Slot `i`'s reply and costs from its input. */
static void setup_slot(Run *run, int i, const RKLLMInput *in) {
    Runtime *rt = run->rt;
    Slot *s = &run->slots[i];
    bool tokens = in->input_type == RKLLM_INPUT_TOKEN;
    const char *p = tokens ? "" : in->prompt_input;
    if (tokens && rt->vocab) {
        s->source = decode_tokens(rt, &in->token_input);
        p = s->source; /* what the model reads: its directives too (a token input has no template) */
    } else {
        s->source = tokens ? token_source(&in->token_input) : strdup(p);
    }
    s->full = tokens ? strdup(s->source) : full_input(rt, &run->b, p);
    log_input(run->nth, i, tokens, s->full);
    char *say = *p ? say64_answer(rt, s->full) : NULL;
    if (say) { free(s->source); s->source = say; s->exact = true; }
    s->len = strlen(s->source) + 1;
    s->prompt_tokens = tokens ? (int)in->token_input.n_tokens : (*p ? tokens_of_bytes(strlen(s->full)) : 0);
    s->prefill_tokens = s->prompt_tokens;
    bool cache = rt->cache_text && run->b.prompt_cache != CACHE_IGNORE &&
                 !(run->b.prompt_cache == CACHE_BATCH1 && run->n > 1);
    if (cache && !tokens && *p && strncmp(s->full, rt->cache_text, strlen(rt->cache_text)) == 0)
        s->prefill_tokens = tokens_of_bytes(strlen(s->full) - strlen(rt->cache_text));
    parse_directives(s, s->full);
    if (s->exact) s->natural_len = (int)((s->len - 1 + (size_t)run->b.token_bytes - 1) / (size_t)run->b.token_bytes);
    s->natural_len = s->natural_len >= 0 ? s->natural_len : 8 + (int)(fnv1a(s->source) % 25u);
}

/* Each slot's length: its natural one (RKLLM_STANDIN_SLOT_END=batch: the batch's longest), never
 * ending inside a character, cut at the run's limit. Also the garbled stream of unequal prompts. */
static void plan_lengths(Run *run) {
    int longest = 0, most_tokens = 0;
    for (int i = 0; i < run->n; i++) {
        Slot *s = &run->slots[i];
        while (s->natural_len > 0 && (stream_byte(s, (size_t)s->natural_len * run->b.token_bytes) & 0xC0) == 0x80)
            s->natural_len++;
        if (s->prompt_tokens > 0 && s->natural_len > longest) longest = s->natural_len;
        if (s->prompt_tokens > most_tokens) most_tokens = s->prompt_tokens;
    }
    for (int i = 0; i < run->n; i++) {
        Slot *s = &run->slots[i];
        if (run->b.slots_run_on && s->prompt_tokens > 0) s->natural_len = longest;
        if (run->b.unequal_garbled && s->prompt_tokens > 0 && s->prompt_tokens < most_tokens) {
            s->offset = (size_t)(most_tokens - s->prompt_tokens) * 4 % s->len;
            while ((stream_byte(s, 0) & 0xC0) == 0x80) s->offset++; /* still whole characters */
        }
        if (s->prompt_tokens == 0 || s->natural_len == 0) {
            s->ended = true;
            s->target = 0;
        } else {
            s->target = s->natural_len < run->limit ? s->natural_len : run->limit;
            s->eos_due = s->natural_len <= run->limit;
        }
    }
}

/* What the last run received, for rkllm_standin_describe. */
static void note_run_args(Runtime *rt, const RKLLMInput *input, const RKLLMInferParam *infer, int n) {
#ifdef RKLLM_ABI_13
    rt->last_infer_max_new_tokens = infer->max_new_tokens;
    rt->last_sampling_given = infer->sampling_params != NULL;
    if (infer->sampling_params) {
        rt->last_top_k = infer->sampling_params->top_k;
        rt->last_top_p = infer->sampling_params->top_p;
        rt->last_temperature = infer->sampling_params->temperature;
        rt->last_repeat_penalty = infer->sampling_params->repeat_penalty;
    }
#endif
    rt->last_keep_history = infer->keep_history;
    rt->last_roles[0] = rt->last_prompt_bytes[0] = rt->last_input_types[0] = '\0';
    for (int i = 0; i < n; i++) {
        const char *sep = i + 1 < n ? "," : "";
        size_t len = input[i].input_type == RKLLM_INPUT_TOKEN ? input[i].token_input.n_tokens : strlen(input[i].prompt_input);
        strncat(rt->last_roles, input[i].role ? input[i].role : "NULL", 5);
        strcat(rt->last_roles, sep);
        snprintf(rt->last_prompt_bytes + strlen(rt->last_prompt_bytes), 12, "%zu%s", len, sep);
        snprintf(rt->last_input_types + strlen(rt->last_input_types), 3, "%d%s", (int)input[i].input_type, sep);
    }
}

static int start_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata, bool async);
static Runtime *runtime_of(LLMHandle h);
static void replay_generate_run(Run *run);

static void count_call(LLMHandle handle, int delta) {
    Runtime *rt = (Runtime *)handle;
    if (!rt || rt->magic != HANDLE_MAGIC) return;
    pthread_mutex_lock(&rt->mu);
    rt->in_call += delta;
    pthread_mutex_unlock(&rt->mu);
}

int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    count_call(handle, 1);
    int rc = start_run(handle, input, infer, userdata, false);
    count_call(handle, -1);
    return rc;
}

int rkllm_run_async(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    return start_run(handle, input, infer, userdata, true);
}

/* The slot's input saved as the prompt cache (RKLLMPromptCacheParam.save_prompt_cache). */
static void save_prompt_cache(Runtime *rt, const Run *run, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) { logf_("run: cannot write the prompt cache %s: %s", path, strerror(errno)); return; }
    fprintf(f, "%s%d\n%s", CACHE_MAGIC, run->n, run->slots[0].full ? run->slots[0].full : "");
    fclose(f);
    rt->cache_saves++;
}

static void finish_run(Run *run, const RKLLMInferParam *infer) {
    Runtime *rt = run->rt;
    if (infer && run->rc == 0 && !run->aborted && infer->prompt_cache_params && infer->prompt_cache_params->save_prompt_cache)
        save_prompt_cache(rt, run, infer->prompt_cache_params->prompt_cache_path);
    pthread_mutex_lock(&rt->mu);
    for (int i = 0; i < run->n; i++) {
        Slot *s = &run->slots[i];
        rt->kv_sizes[i] = run->aborted || run->b.kv_kept ? s->prompt_tokens + s->produced : 0;
        free(s->source);
        free(s->full);
    }
    if (run->aborted) rt->dirty = true;
    rt->running = false;
    rt->abort_requested = false;
    pthread_mutex_unlock(&rt->mu);
    resbuf_free(&run->res);
}

static void *run_body(void *arg) {
    Run *run = arg;
    if (run->replay) replay_generate_run(run); else generate(run);
    return NULL;
}

static void *async_main(void *arg) {
    Run *run = arg;
    run_body(run);
    finish_run(run, NULL);
    free(run);
    return NULL;
}

static int start_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata, bool async) {
    Runtime *rt = runtime_of(handle);
    if (!rt) return -1;
    if (check_run_args(rt, input, infer) != 0) return -1;
    Behaviour b;
    behaviour_read(&b);
    bool bad = false;
    pthread_mutex_lock(&global_mu);
    int nth = ++process_runs;
    const JVal *trace = replay_trace(&bad);
    const JVal *rec = trace ? replay_take(trace, "run") : NULL;
    pthread_mutex_unlock(&global_mu);
    if (bad) return -1;
    if (trace && !rec) { logf_("replay: the trace has no more rkllm_run calls"); return -1; }
    if (!rec && refuse_run(rt, &b, input) != 0) {
        pthread_mutex_lock(&rt->mu);
        rt->refused_runs++;
        pthread_mutex_unlock(&rt->mu);
        return -1;
    }
    pthread_mutex_lock(&rt->mu);
    if (rt->running) { pthread_mutex_unlock(&rt->mu); logf_("run: the handle is already running"); return -1; }
    rt->running = true;
    rt->abort_requested = false;
    rt->runs++;
    pthread_mutex_unlock(&rt->mu);

    Run *run = calloc(1, sizeof *run);
    run->rt = rt;
    run->b = b;
    run->n = rt->param.extend_param.n_batch;
    run->userdata = userdata ? userdata : rt->callback_userdata;
    run->replay = rec;
    if (rec) { /* the recorded thread of the callbacks */
        const JVal *threads = jget(rec, "callback_threads");
        run->b.callback_on_caller = jnum(jget(threads, "caller"), 0) > 0 && jnum(jget(threads, "other"), 0) == 0;
    }
    run->nth = nth;
    run->crash = b.crash_at_run == nth;
    run->hang = b.hang_at_run == nth;
    int limit = rt->param.max_new_tokens;
#ifdef RKLLM_ABI_13
    if (infer->max_new_tokens > 0) limit = infer->max_new_tokens;
#endif
    run->limit = limit <= 0 ? 1 << 30 : limit;
    note_run_args(rt, input, infer, run->n);
    if (!resbuf_init(&run->res, run->n)) { logf_("run: out of memory"); finish_run(run, NULL); free(run); return -1; }
    int pending_fail = 0;
    for (int i = 0; i < run->n; i++) {
        setup_slot(run, i, &input[i]);
        if (run->slots[i].initfail > 0) pending_fail += run->slots[i].initfail;
    }
    plan_lengths(run);
    if (run->replay && (int)jnum(jget(run->replay, "n_batch"), -1) != run->n) {
        logf_("replay: this rkllm_run has n_batch %d, the recorded one %d", run->n,
              (int)jnum(jget(run->replay, "n_batch"), -1));
        finish_run(run, NULL); free(run); return -1;
    }
    for (int i = 0; i < run->n && !run->replay; i++) {
        if (run->slots[i].prompt_tokens > rt->param.max_context_len) {
            logf_("run: the length of prompt is greater than max context (slot %d: %d > %d tokens)", i,
                  run->slots[i].prompt_tokens, rt->param.max_context_len);
            finish_run(run, NULL); free(run); return -1;
        }
    }
    if (pending_fail && !run->replay) { /* the recording decides what fails */
        pthread_mutex_lock(&global_mu);
        pending_init_failures += pending_fail;
        pthread_mutex_unlock(&global_mu);
    }
    pthread_t th;
    if (async) {
        if (pthread_create(&th, NULL, async_main, run) != 0) { finish_run(run, NULL); free(run); return -1; }
        pthread_detach(th);
        return 0;
    }
    if (run->b.callback_on_caller) {
        run_body(run);
    } else {
        if (pthread_create(&th, NULL, run_body, run) != 0) { finish_run(run, NULL); free(run); return -1; }
        pthread_join(th, NULL);
    }
    int rc = run->rc;
    finish_run(run, infer);
    free(run);
    return rc;
}

int rkllm_abort(LLMHandle handle) {
    Runtime *rt = runtime_of(handle);
    if (!rt) return -1;
    pthread_mutex_lock(&rt->mu);
    bool running = rt->running;
    bool idle = !running && rt->in_call == 0;
    if (running) {
        rt->abort_requested = true;
        rt->aborts++;
        pthread_cond_broadcast(&rt->cv);
    }
    pthread_mutex_unlock(&rt->mu);
    pthread_mutex_lock(&global_mu);
    total_aborts++;
    if (idle) idle_aborts++;
    pthread_mutex_unlock(&global_mu);
    return 0;
}

/* ---- replay of a recorded trace -------------------------------------------------------------- */

static JVal *replay_doc;
static char *replay_path;

/* The trace named by RKLLM_STANDIN_REPLAY (parsed once per path), or NULL when it is not set. Sets
 * *bad on a file that cannot be read or parsed. Called with global_mu held. */
static const JVal *replay_trace(bool *bad) {
    const char *path = getenv("RKLLM_STANDIN_REPLAY");
    *bad = false;
    if (!path || !*path) return NULL;
    if (replay_doc && replay_path && strcmp(replay_path, path) == 0) return replay_doc;
    FILE *f = fopen(path, "rb");
    if (!f) { logf_("replay: cannot open %s: %s", path, strerror(errno)); *bad = true; return NULL; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = size >= 0 ? malloc((size_t)size + 1) : NULL;
    size_t got = text ? fread(text, 1, (size_t)size, f) : 0;
    fclose(f);
    if (!text || got != (size_t)size) { logf_("replay: cannot read %s", path); free(text); *bad = true; return NULL; }
    size_t err_at = 0;
    JVal *doc = jparse(text, (size_t)size, &err_at);
    free(text);
    if (!doc || !jget(doc, "calls") || jget(doc, "calls")->t != J_ARR) {
        logf_("replay: %s is not a trace written by `rkmqtt probe` (JSON error near byte %zu, or no \"calls\")", path,
              err_at);
        *bad = true;
        return NULL;
    }
    free(replay_path);
    replay_path = strdup(path);
    replay_doc = doc;
    for (size_t k = 0; k < sizeof replay_cursors / sizeof replay_cursors[0]; k++) replay_cursors[k].next = 0;
    return doc;
}

/* Whether recorded call `c` is one of RKLLM_STANDIN_REPLAY_PART's (every call when it is not set). */
static bool replay_in_part(const JVal *c) {
    const char *part = getenv("RKLLM_STANDIN_REPLAY_PART");
    if (!part || !*part) return true;
    const char *its = jstr(jget(c, "part"));
    return its && strcmp(its, part) == 0;
}

/* The trace's next call of function `fn` (NULL when there is none). Called with global_mu held. */
static const JVal *replay_take(const JVal *doc, const char *fn) {
    ReplayCursor *cur = NULL;
    for (size_t k = 0; k < sizeof replay_cursors / sizeof replay_cursors[0]; k++)
        if (strcmp(replay_cursors[k].fn, fn) == 0) cur = &replay_cursors[k];
    if (!cur) return NULL;
    const JVal *calls = jget(doc, "calls");
    while (cur->next < calls->n) {
        const JVal *c = calls->items[cur->next++];
        const char *name = jstr(jget(c, "fn"));
        if (name && strcmp(name, fn) == 0 && replay_in_part(c)) return c;
    }
    return NULL;
}

/* Under replay: the recorded result of the next call of `fn` (its "rc"); `found` false when the
 * stand-in is not replaying. */
static int replay_rc(const char *fn, bool *found, const JVal **call) {
    bool bad = false;
    pthread_mutex_lock(&global_mu);
    const JVal *trace = replay_trace(&bad);
    const JVal *c = trace ? replay_take(trace, fn) : NULL;
    pthread_mutex_unlock(&global_mu);
    *found = trace != NULL || bad;
    if (call) *call = c;
    if (bad) return -1;
    if (trace && !c) { logf_("replay: the trace has no more %s calls", fn); return -1; }
    return c ? (int)jnum(jget(c, "rc"), 0) : 0;
}

/* Under replay: what rkllm_is_running returned in the recording, idle or during a run (a
 * recorded "is_running" call of this part); -1 when there is none. */
static int replay_running_value(bool during_run) {
    bool bad = false;
    int out = -1;
    pthread_mutex_lock(&global_mu);
    const JVal *trace = replay_trace(&bad);
    const JVal *calls = trace ? jget(trace, "calls") : NULL;
    for (size_t k = 0; calls && k < calls->n && out < 0; k++) {
        const JVal *c = calls->items[k];
        const char *name = jstr(jget(c, "fn"));
        const JVal *dr = jget(c, "during_run");
        if (name && strcmp(name, "is_running") == 0 && replay_in_part(c) && dr && dr->t == J_BOOL && dr->b == during_run)
            out = (int)jnum(jget(c, "rc"), -1);
    }
    pthread_mutex_unlock(&global_mu);
    return out;
}

/* Wait until this binding calls rkllm_abort (the recording's binding did at this point). */
static void replay_wait_for_abort(Runtime *rt, double timeout_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = ts.tv_nsec + (long long)(timeout_ms * 1e6);
    ts.tv_sec += ns / 1000000000LL;
    ts.tv_nsec = ns % 1000000000LL;
    pthread_mutex_lock(&rt->mu);
    while (!rt->abort_requested)
        if (pthread_cond_timedwait(&rt->cv, &rt->mu, &ts) == ETIMEDOUT) break;
    bool got = rt->abort_requested;
    pthread_mutex_unlock(&rt->mu);
    if (!got) logf_("replay: the binding did not call rkllm_abort where the recording did; going on");
}

static char *unhex(const char *hex) {
    size_t n = strlen(hex) / 2;
    char *out = malloc(n + 1);
    if (!out) return NULL;
    for (size_t k = 0; k < n; k++) {
        unsigned v = 0;
        sscanf(hex + 2 * k, "%2x", &v);
        out[k] = (char)v;
    }
    out[n] = '\0';
    return out;
}

/* One recorded callback: [token_id, "hex" or null] per slot (as many results as were recorded, at
 * most n_batch), perf rows on FINISH, or a NULL result. */
static void replay_callback(Run *run, const JVal *e) {
    char *texts[MAX_BATCH] = {NULL};
    int state = (int)jnum(jget(e, "state"), RKLLM_RUN_NORMAL);
    const JVal *slots = jget(e, "slots");
    if (!slots || slots->t != J_ARR) {
        run->rt->callback(NULL, run->userdata, (LLMCallState)state);
        return;
    }
    int count = slots->n < 1 ? 1 : slots->n > (size_t)run->n ? run->n : (int)slots->n;
    RKLLMResult *res = resbuf_tail(&run->res, count);
    const JVal *perf = jget(e, "perf");
    for (int k = 0; k < count; k++) {
        const JVal *item = (size_t)k < slots->n ? slots->items[k] : NULL;
        if (item && item->t == J_ARR && item->n >= 2) {
            res[k].token_id = (int32_t)jnum(item->items[0], -1);
            const char *hex = jstr(item->items[1]);
            if (hex) res[k].text = texts[k] = unhex(hex);
        }
        const JVal *row = perf && perf->t == J_ARR && (size_t)k < perf->n ? perf->items[k] : NULL;
        if (row && row->t == J_ARR && row->n >= 5) {
            res[k].perf.prefill_time_ms = (float)jnum(row->items[0], 0);
            res[k].perf.prefill_tokens = (int)jnum(row->items[1], 0);
            res[k].perf.generate_time_ms = (float)jnum(row->items[2], 0);
            res[k].perf.generate_tokens = (int)jnum(row->items[3], 0);
            res[k].perf.memory_usage_mb = (float)jnum(row->items[4], 0);
        }
    }
    run->rt->callback(res, run->userdata, (LLMCallState)state);
    for (int k = 0; k < count; k++) free(texts[k]);
}

static void replay_generate_run(Run *run) {
    const JVal *events = jget(run->replay, "events");
    double speed = env_double("RKLLM_STANDIN_REPLAY_SPEED", 1.0);
    double t0 = now_ms();
    int delivered = 0;
    for (size_t k = 0; events && events->t == J_ARR && k < events->n; k++) {
        const JVal *e = events->items[k];
        sleep_plain(t0 + jnum(jget(e, "t_ms"), 0) * speed - now_ms());
        if (jget(e, "abort")) {
            replay_wait_for_abort(run->rt, 10000.0);
            run->aborted = true;
        } else {
            maybe_die(run, delivered);
            replay_callback(run, e);
            delivered++;
        }
    }
    const JVal *finish = events && events->t == J_ARR && events->n ? events->items[events->n - 1] : NULL;
    const JVal *perf = jget(finish, "perf");
    if (run->b.log_level >= 1 && perf && perf->t == J_ARR && perf->n && perf->items[0]->t == J_ARR && perf->items[0]->n >= 5) {
        const JVal *row = perf->items[0]; /* the recorded perf, as this stand-in prints timings */
        fprintf(stderr, "I rkllm: replayed timings: prefill %.2f ms, %d tokens; generate %.2f ms, %d tokens; memory %.2f MB\n",
                jnum(row->items[0], 0), (int)jnum(row->items[1], 0), jnum(row->items[2], 0), (int)jnum(row->items[3], 0),
                jnum(row->items[4], 0));
    }
    int sig = (int)jnum(jget(jget(run->replay, "died"), "signal"), 0);
    if (sig > 0) {
        logf_("replay: the recorded run died by signal %d here", sig);
        fflush(stderr);
        /* A real crash may come at any moment; this one leaves the binding 0.2 s to pass on what it
         * recorded, so that a replay ends with the same callbacks as its recording. */
        struct timespec pause_ts = {0, 200 * 1000000L};
        nanosleep(&pause_ts, NULL);
        raise(sig);
    }
    if (jget(run->replay, "timeout")) {
        logf_("replay: the recorded run never returned");
        for (;;) pause();
    }
    run->rc = (int)jnum(jget(run->replay, "rc"), 0);
}

/* ---- the rest of the interface ------------------------------------------------------------ */

int rkllm_is_running(LLMHandle handle) {
    Runtime *rt = runtime_of(handle);
    if (!rt) return -1;
    pthread_mutex_lock(&rt->mu);
    bool running = rt->running;
    pthread_mutex_unlock(&rt->mu);
    int recorded = replay_running_value(running);
    if (recorded >= 0) return recorded;
    int value = env_is("RKLLM_STANDIN_RUNNING_VALUE", "0") ? 0 : 1;
    return running ? value : !value;
}

int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    Runtime *rt = runtime_of(handle);
    if (!rt) return -1;
    if ((start_pos == NULL) != (end_pos == NULL) || keep_system_prompt < 0 || keep_system_prompt > 1) {
        logf_("clear_kv_cache: keep_system_prompt %d, start_pos %p, end_pos %p", keep_system_prompt, (void *)start_pos,
              (void *)end_pos);
        return -1;
    }
    bool replaying;
    int rc = replay_rc("clear_kv_cache", &replaying, NULL);
    pthread_mutex_lock(&rt->mu);
    if (rt->running) { pthread_mutex_unlock(&rt->mu); logf_("clear_kv_cache: a run is in progress"); return -1; }
    rt->kv_clears++;
    rt->dirty = false;
    memset(rt->kv_sizes, 0, sizeof rt->kv_sizes);
    if (!keep_system_prompt) { free(rt->cache_text); rt->cache_text = NULL; } /* the loaded prompt cache goes too */
    pthread_mutex_unlock(&rt->mu);
    return replaying ? rc : 0;
}

int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    Runtime *rt = runtime_of(handle);
    if (!rt || !cache_sizes) return -1;
    int n = rt->param.extend_param.n_batch;
    bool replaying;
    const JVal *call = NULL;
    int rc = replay_rc("kv_cache_size", &replaying, &call);
    const JVal *sizes = call ? jget(call, "sizes") : NULL;
    pthread_mutex_lock(&rt->mu);
    for (int i = 0; i < n; i++)
        cache_sizes[i] = replaying ? (sizes && sizes->t == J_ARR && (size_t)i < sizes->n ? (int)jnum(sizes->items[i], 0) : 0)
                                   : rt->kv_sizes[i];
    pthread_mutex_unlock(&rt->mu);
    return replaying ? rc : 0;
}

int rkllm_set_chat_template(LLMHandle handle, const char *system, const char *prefix, const char *postfix) {
    Runtime *rt = runtime_of(handle);
    if (!rt || !system || !prefix || !postfix) return -1;
    bool replaying;
    int rc = replay_rc("set_chat_template", &replaying, NULL);
    const char *v[3] = {system, prefix, postfix};
    for (int i = 0; i < 3; i++) {
        free(rt->tmpl[i]);
        rt->tmpl[i] = strdup(v[i]);
    }
    rt->tmpl_set = true;
    return replaying ? rc : 0;
}

int rkllm_set_function_tools(LLMHandle handle, const char *system, const char *tools, const char *tool_response) {
    (void)system; (void)tools; (void)tool_response;
    return runtime_of(handle) ? 0 : -1;
}

int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *adapter) {
    return runtime_of(handle) && adapter ? 0 : -1;
}

int rkllm_load_prompt_cache(LLMHandle handle, const char *path) {
    Runtime *rt = runtime_of(handle);
    if (!rt || !str_ok(path, 4096)) return -1;
    bool replaying;
    int rc = replay_rc("load_prompt_cache", &replaying, NULL);
    if (replaying) return rc;
    FILE *f = fopen(path, "rb");
    if (!f) { logf_("load_prompt_cache: cannot open %s: %s", path, strerror(errno)); return -1; }
    char head[64] = "";
    int n_batch = 0;
    bool ok = fread(head, 1, strlen(CACHE_MAGIC), f) == strlen(CACHE_MAGIC) && memcmp(head, CACHE_MAGIC, strlen(CACHE_MAGIC)) == 0 &&
              fscanf(f, "%d", &n_batch) == 1 && fgetc(f) == '\n';
    char *text = NULL;
    if (ok) {
        long start = ftell(f);
        fseek(f, 0, SEEK_END);
        long end = ftell(f);
        fseek(f, start, SEEK_SET);
        text = malloc((size_t)(end - start) + 1);
        ok = text && fread(text, 1, (size_t)(end - start), f) == (size_t)(end - start);
        if (ok) text[end - start] = '\0';
    }
    fclose(f);
    if (!ok) { free(text); logf_("load_prompt_cache: %s is not a prompt cache", path); return -1; }
    pthread_mutex_lock(&rt->mu);
    free(rt->cache_text);
    rt->cache_text = text;
    rt->cache_loads++;
    pthread_mutex_unlock(&rt->mu);
    return 0;
}

int rkllm_release_prompt_cache(LLMHandle handle) {
    Runtime *rt = runtime_of(handle);
    if (!rt) return -1;
    pthread_mutex_lock(&rt->mu);
    free(rt->cache_text);
    rt->cache_text = NULL;
    pthread_mutex_unlock(&rt->mu);
    return 0;
}

int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *params) {
    return runtime_of(handle) && params ? 0 : -1;
}

/* ---- description for tests (extra symbol) --------------------------------------------------- */

size_t rkllm_standin_describe(char *buf, size_t len) {
    pthread_mutex_lock(&global_mu);
    Runtime *rt = last_runtime;
    size_t n = 0;
#define D(...) n += snprintf(buf + n, n < len ? len - n : 0, __VA_ARGS__)
    D("abi=%s\nbanner=%s\ninit_calls=%d\ndestroy_calls=%d\naborts=%d\nidle_aborts=%d\ninvalid_handle_calls=%d\n"
      "pending_init_failures=%d\nprocess_runs=%d\n",
      STANDIN_ABI, standin_banner, init_calls, destroy_calls, total_aborts, idle_aborts, invalid_handle_calls,
      pending_init_failures, process_runs);
    if (rt) {
        const RKLLMParam *p = &rt->param;
        const RKLLMExtendParam *e = &p->extend_param;
        D("model_path=%s\nmax_context_len=%d\nmax_new_tokens=%d\ntop_k=%d\nn_keep=%d\ntop_p=%g\ntemperature=%g\n"
          "repeat_penalty=%g\nskip_special_token=%d\nbase_domain_id=%d\nembed_flash=%d\nenabled_cpus_num=%d\n"
          "enabled_cpus_mask=%u\nn_batch=%u\nruns=%d\n",
          p->model_path, p->max_context_len, p->max_new_tokens, p->top_k, p->n_keep, p->top_p, p->temperature,
          p->repeat_penalty, p->skip_special_token, e->base_domain_id, e->embed_flash, e->enabled_cpus_num,
          e->enabled_cpus_mask, e->n_batch, rt->runs);
        D("template_system=%s\ntemplate_prefix=%s\ntemplate_postfix=%s\n", rt->tmpl[0] ? rt->tmpl[0] : "(none)",
          rt->tmpl[1] ? rt->tmpl[1] : "(none)", rt->tmpl[2] ? rt->tmpl[2] : "(none)");
        D("last_infer_max_new_tokens=%d\nlast_sampling_given=%d\nlast_top_k=%d\nlast_top_p=%g\nlast_temperature=%g\n"
          "last_repeat_penalty=%g\nlast_keep_history=%d\nlast_roles=%s\nlast_prompt_bytes=%s\nlast_input_types=%s\n",
          rt->last_infer_max_new_tokens, rt->last_sampling_given, rt->last_top_k, rt->last_top_p, rt->last_temperature,
          rt->last_repeat_penalty, rt->last_keep_history, rt->last_roles, rt->last_prompt_bytes, rt->last_input_types);
        D("kv_clears=%d\nrefused_runs=%d\ndirty=%d\nprompt_cache_loads=%d\nprompt_cache_saves=%d\nprompt_cache_loaded=%d\n",
          rt->kv_clears, rt->refused_runs, rt->dirty, rt->cache_loads, rt->cache_saves, rt->cache_text != NULL);
    }
#undef D
    pthread_mutex_unlock(&global_mu);
    return n;
}
