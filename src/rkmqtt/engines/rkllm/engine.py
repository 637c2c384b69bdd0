"""`RkllmEngine`: requests batched into one `rkllm_run` on the Rockchip NPU (static micro-batches).

Public methods run on the scheduler thread, each batch's `rkllm_run` on a worker thread, the result
callback on the runtime's thread; they meet in one queue that `poll()` drains. The handle lock,
aborts, sampling per ABI and recovery: docs/rkllm-runtime.md, "Inside rkmqtt's binding"."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from rkmqtt.engines.base import (
    Capabilities,
    ChatMessage,
    Engine,
    EngineEvent,
    ErrorEvent,
    Generation,
    Prepared,
    SamplingParams,
    TemplateInUse,
)
from rkmqtt.engines.chat.fit import DoesNotFit, fit
from rkmqtt.engines.chat.source import find_template, find_tokenizer
from rkmqtt.engines.chat.template import ChatTemplate
from rkmqtt.engines.chat.toolcalls import CallFilter
from rkmqtt.engines.rkllm.abi import LLMHandle, LLMResultCallback, cpu_mask
from rkmqtt.engines.rkllm.batch import AbortWanted, Batch, BatchEnded, QueueItem
from rkmqtt.engines.rkllm.length import Measure, PromptLength
from rkmqtt.engines.rkllm.library import RuntimeLibrary, locate_runtime
from rkmqtt.engines.rkllm.platform import runtime_cpus
from rkmqtt.engines.rkllm.prompt import cached_prefix, host_rendered, parse_chat_template, render_prompt
from rkmqtt.engines.rkllm.trace import TraceRecorder
from rkmqtt.errors import ConfigError, EngineError, RequestRejected
from rkmqtt.protocol import ErrorCode
from rkmqtt.settings import rkllm_n_batch_problem

if TYPE_CHECKING:
    from rkmqtt.settings import Settings

_LOGGER = logging.getLogger(__name__)

SamplingTuple = tuple[int, float, float, float]  # top_k, top_p, temperature, repeat_penalty

# Failed runs in a row after which the model is reloaded: one failure (an over-long prompt that
# slipped through, a runtime hiccup) is not a reason to spend seconds on rkllm_init.
RELOAD_AFTER_FAILURES = 2
# How long an abort waits for the runtime to show that its run has begun (see the module docstring).
ABORT_CONFIRM_S = 1.0
# max_context when the setting leaves it to the model: what rkllm-toolkit converts for by default and
# Rockchip's model zoo uses (a .rkllm file converted for less makes rkllm_init fail: set max_context).
DEFAULT_CONTEXT = 4096
NO_TEMPLATE = ("", "", "")


def runtime_sampling(s: SamplingParams) -> SamplingTuple:
    """The runtime's (top_k, top_p, temperature, repeat_penalty) for resolved sampling params."""
    if s.greedy:
        return 1, 1.0, 1.0, float(s.repeat_penalty)
    return int(s.top_k), float(s.top_p), float(s.temperature), float(s.repeat_penalty)


class RkllmEngine(Engine):
    """The RKLLM runtime behind the engine interface (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        root: Path = Path("/"),
        recorder: TraceRecorder | None = None,
    ) -> None:
        if problem := rkllm_n_batch_problem(settings.n_batch):
            raise ConfigError(f"setting {problem}")
        if not settings.model:
            raise ConfigError("engine rkllm needs setting model: the path of a .rkllm model file")
        self._settings = settings
        self._model = Path(settings.model)
        self._n_batch = settings.n_batch
        self._cpus = runtime_cpus(settings.rkllm_cpus, root)
        self._template = parse_chat_template(settings.rkllm_chat_template) if settings.rkllm_chat_template else None
        self._max_context = settings.max_context or DEFAULT_CONTEXT
        # The conversation rendered here with the model's template (the runtime's own switched off), or,
        # without one, flattened into one user turn for the runtime's template (docs/rkllm-runtime.md).
        self._host: ChatTemplate | None = None
        if settings.chat_template and self._template is not None:
            raise ConfigError(
                "settings chat_template and rkllm_chat_template are both set: chat_template renders the whole "
                "conversation here, rkllm_chat_template configures the runtime's own template; keep one"
            )
        if self._template is None:
            self._host = find_template(settings.chat_template, self._model)
        self._tokenizer_file = find_tokenizer(settings.rkllm_tokenizer, self._model)
        self._calls = CallFilter()
        self._prompt_cache = settings.rkllm_prompt_cache
        if self._prompt_cache is not None and (self._template is None or not cached_prefix(self._template)):
            raise ConfigError(
                "setting rkllm_prompt_cache needs rkllm_chat_template (system|prefix|postfix) whose system part "
                "is the fixed system prompt to cache"
            )
        self._length = PromptLength(None, self._runtime_template())  # the bound until load() reads the tokenizer
        self._recorder = recorder
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._runtime: RuntimeLibrary | None = None
        self._lib: Any = None
        self._handle: Any = None  # LLMHandle while initialised
        self._handle_lock = threading.Lock()  # see the module docstring
        self._in_run: Batch | None = None  # the batch whose rkllm_run is in progress (under the lock)
        self._idle_running_value: int | None = None  # rkllm_is_running on the idle handle
        self._init_keep: tuple[Any, ...] = ()  # the param and callback structs of the live handle
        self._events: queue.Queue[QueueItem] = queue.Queue()
        self._running: Batch | None = None
        self._worker: threading.Thread | None = None
        self._cancelled: set[Hashable] = set()
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._recoveries = 0
        self._failed_runs = 0
        self._failures_in_a_row = 0
        self._batches = 0
        # One C function pointer for the engine's lifetime: the runtime keeps it from init on.
        self._c_callback = LLMResultCallback(self._on_result)

    @classmethod
    def from_settings(cls, settings: Settings) -> RkllmEngine:
        return cls(settings)

    # ---- Engine interface ----------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        per_run = self._runtime is not None and self._runtime.abi.per_run_sampling
        tools = self._host is not None and self._host.takes_tools
        return Capabilities(
            name="rkllm", continuous=False, max_batch=self._n_batch, per_request_sampling=per_run, tools=tools
        )

    @property
    def model_name(self) -> str:
        return self._model.stem

    def load(self) -> None:
        s = self._settings
        self._runtime = locate_runtime(s.rkllm_library, s.rkllm_abi)
        if not self._model.is_file():
            raise ConfigError(f"setting model={str(self._model)!r}: no such file; give the path of a .rkllm model")
        self._length = PromptLength(self._tokenizer_file, self._runtime_template())
        self._lib = self._runtime.load()
        self._handle = self._init_handle()
        if self._prompt_cache is not None and not self._prompt_cache.is_file():
            self._make_prompt_cache()
            self._load_prompt_cache(self._handle)
        _LOGGER.info(
            "RKLLM runtime %s (ABI %s) from %s: model %s, n_batch %d",
            self._runtime.version or "(unknown version)",
            self._runtime.abi.name,
            self._runtime.path,
            self._model.name,
            self._n_batch,
        )

    def info(self) -> dict[str, Any]:
        rt = self._runtime
        return {
            "runtime_version": rt.version if rt else None,
            "abi": rt.abi.name if rt else None,
            "library": str(rt.path) if rt else None,
            "model_file": str(self._model),
            "n_batch": self._n_batch,
            "cpus": self._cpus,
            "pad_batch": self._settings.rkllm_pad_batch,
            "max_context": self._max_context,
            "chat_template": self._template_words(),
            "tools": self.capabilities.tools,
            "prompt_input": "token ids" if self._token_input() else "text",
            "prompt_cache": str(self._prompt_cache) if self._prompt_cache is not None else None,
            "prompt_length": f"counted ({self._tokenizer_file})" if self._tokenizer_file else "bounded",
            "batches": self._batches,
            "failed_runs": self._failed_runs,
            "recoveries": self._recoveries,
        }

    def template_in_use(self) -> TemplateInUse:
        # Found at construction, from the settings and the files beside the model: loading changes nothing.
        return TemplateInUse(self._template_words(), self.capabilities.tools)

    def _template_words(self) -> str:
        """Which chat template renders the conversations, in words (`rkmqtt check`, info)."""
        if self._host is not None:
            return f"{self._host.origin}, rendered here (the runtime's own template off)"
        if self._template is not None:
            return "rkllm_chat_template (the runtime's, with the conversation flattened into one user turn)"
        return "the runtime's built-in template (the conversation flattened into one user turn; set chat_template)"

    def prepare(self, req: Generation) -> Prepared:
        """The runtime's input: the conversation rendered (trimmed to the context, the oldest turns out),
        as token ids where a tokenizer is at hand. Refuses `too_long` a last turn that cannot fit."""
        limit = min(req.context or self._max_context, self._max_context)
        room = max(1, min(req.max_new_tokens, limit // 4))

        def measure(messages: tuple[ChatMessage, ...]) -> tuple[int, tuple[str, Measure]]:
            text = self._input_text(messages, req)
            m = self._length.measure(text)
            return m.tokens, (text, m)

        try:
            fitted = fit(req.messages, limit - room, measure)
        except DoesNotFit as e:
            raise RequestRejected(
                ErrorCode.TOO_LONG,
                f"the prompt is {'' if self._length.exact else 'up to '}{e.tokens} tokens "
                f"({self._length.describe()}), and the model's "
                f"context is max_context={limit} tokens with room for {room} reply tokens: shorten it",
            ) from None
        text, measured = fitted.rendered
        if fitted.dropped:
            _LOGGER.info(
                "request %s: the %d oldest messages left out to fit the context of %d tokens",
                req.key,
                fitted.dropped,
                limit,
            )
        ids = self._length.encode(text) if self._token_input() else None
        tokens = measured.tokens if measured.exact and measured.allowance == 0 else None
        return Prepared(req, tokens, self.batch_key(req), data=(text, ids))

    def batch_key(self, req: Generation) -> Hashable:
        if self._runtime is not None and self._runtime.abi.per_run_sampling:
            return runtime_sampling(req.sampling)
        return "init-time-sampling"

    def free_slots(self) -> int:
        return self._n_batch if self._running is None and self._handle is not None else 0

    def active(self) -> int:
        batch = self._running
        return batch.live_count() if batch is not None else 0

    def submit(
        self, prepared: Sequence[Prepared], *, token_inputs: Mapping[Hashable, Sequence[int]] | None = None
    ) -> None:
        """Start a batch; `token_inputs` (for `rkmqtt probe`) gives some requests token ids instead of their prompt."""
        reqs = [p.gen for p in prepared]
        texts = {p.key: p.data[0] if p.data is not None else self._input_text(p.gen.messages, p.gen) for p in prepared}
        ids = {p.key: p.data[1] for p in prepared if p.data is not None and p.data[1] is not None}
        if self._running is not None or self._handle is None:
            raise EngineError("submit while the RKLLM engine is busy or not initialised")
        if not 1 <= len(reqs) <= self._n_batch:
            raise ValueError(f"submit takes 1 to {self._n_batch} requests, not {len(reqs)}")
        keys = {self.batch_key(r) for r in reqs}
        if len(keys) != 1:
            raise ValueError("submit: the requests of one batch must share one batch_key")
        assert self._runtime is not None
        per_run = self._runtime.abi.per_run_sampling
        if per_run:
            limit = max(r.max_new_tokens for r in reqs)
            sampling: SamplingTuple | None = runtime_sampling(reqs[0].sampling)
        else:
            limit = self._settings.max_new_tokens
            sampling = None
        batch = Batch(
            next(self._ids),
            reqs,
            abi=self._runtime.abi,
            n_batch=self._n_batch,
            pad=self._settings.rkllm_pad_batch,
            runtime_limit=limit,
            sampling=sampling,
            warnings={r.key: self._warnings(r, per_run) for r in reqs},
            out=self._events,
            render=lambda r: texts[r.key],
            token_inputs={**ids, **(token_inputs or {})},
        )
        for r in reqs:
            if r.tools:
                self._calls.watch(r.key, bare_json=self._host is not None and self._host.bare_json_calls)
        self._running = batch
        self._batches += 1
        self._worker = threading.Thread(
            target=self._run_batch, args=(batch,), name=f"rkllm-run-{batch.id}", daemon=True
        )
        self._worker.start()

    def poll(self, timeout: float) -> list[EngineEvent]:
        try:
            item = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return []
        out: list[EngineEvent] = []
        while True:
            if isinstance(item, AbortWanted):
                batch = self._running
                if batch is not None and batch.id == item.batch_id:
                    self._abort(batch)
            elif isinstance(item, BatchEnded):
                # Every event of that batch came before this marker: forget its cancelled keys.
                self._cancelled.difference_update(item.keys)
            elif item.key not in self._cancelled:
                out.append(item)
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return self._calls.events(out)

    def cancel(self, key: Hashable) -> None:
        batch = self._running
        if batch is None or key not in batch.by_key:
            return
        self._cancelled.add(key)
        self._calls.forget(key)
        if batch.cancel(key):
            self._abort(batch)

    def close(self) -> None:
        self._closing.set()
        batch, worker = self._running, self._worker
        if batch is not None:
            self._abort(batch)
        if worker is not None:
            worker.join(timeout=60)
            if worker.is_alive():
                _LOGGER.error("rkllm_run did not return within 60 s of rkllm_abort; not destroying the handle")
                return
        self._running = None
        self._destroy_handle()

    def runtime_is_running(self) -> int | None:
        """What rkllm_is_running returns now (for `rkmqtt probe`); None without a handle or the function."""
        assert self._runtime is not None
        with self._handle_lock:
            if self._handle is None or "rkllm_is_running" in self._runtime.missing:
                return None
            value = int(self._lib.rkllm_is_running(self._handle))
            if self._recorder is not None:
                self._recorder.call("is_running", rc=value, during_run=self._in_run is not None)
            return value

    def kv_cache_sizes(self, when: str = "idle") -> list[int] | None:
        """What rkllm_get_kv_cache_size reports per slot (for `rkmqtt probe`); None while a run is in
        progress, without a handle or the function, or when it fails."""
        with self._handle_lock:
            if self._in_run is not None:
                return None
            return self._kv_cache_sizes(when)

    # ---- internals -----------------------------------------------------------------------------

    def _runtime_template(self) -> tuple[str, str, str] | None:
        """The template the runtime applies around our input: none when we render (the host template,
        the prompt cache's rendering), rkllm_chat_template's parts, or None for its built-in one."""
        if self._host is not None or self._prompt_cache is not None:
            return NO_TEMPLATE
        return self._template

    def _token_input(self) -> bool:
        """Token ids go to the runtime: the whole input is rendered here and a tokenizer is at hand."""
        return self._host is not None and self._tokenizer_file is not None

    def _input_text(self, messages: tuple[ChatMessage, ...], req: Generation) -> str:
        """What the runtime reads for `messages` as text: the rendered conversation; else one user turn
        (a system message the configured template's system part holds is not repeated), inside that
        template when the engine renders it (prompt cache)."""
        if self._host is not None:
            try:
                return self._host.render(messages, tools=req.tools if self._host.takes_tools else ())
            except ValueError as e:
                raise RequestRejected(ErrorCode.INVALID_REQUEST, str(e)) from e
        prompt = render_prompt(messages, self._template[0] if self._template else None)
        if self._prompt_cache is not None and self._template is not None:
            return host_rendered(self._template, prompt)
        return prompt

    def _kv_cache_sizes(self, when: str) -> list[int] | None:
        """Under the lock."""
        assert self._runtime is not None
        if self._handle is None or "rkllm_get_kv_cache_size" in self._runtime.missing:
            return None
        sizes = (ctypes.c_int * self._n_batch)()
        rc = int(self._lib.rkllm_get_kv_cache_size(self._handle, sizes))
        if self._recorder is not None:
            self._recorder.call("kv_cache_size", rc=rc, sizes=list(sizes), when=when)
        return list(sizes) if rc == 0 else None

    def _set_template(self, handle: Any) -> None:
        """The configured chat template, or none at all when the engine renders it (host template, prompt cache)."""
        parts = self._runtime_template()
        if parts is None:
            return
        rc = self._lib.rkllm_set_chat_template(handle, *(t.encode() for t in parts))
        if self._recorder is not None:
            self._recorder.call("set_chat_template", rc=rc, empty=not any(parts))
        if rc != 0:
            self._call_destroy(handle)
            what = "rkllm_chat_template" if parts != NO_TEMPLATE else "chat_template (the runtime's template off)"
            raise EngineError(f"rkllm_set_chat_template failed ({rc}): check setting {what}", rc)

    def _load_prompt_cache(self, handle: Any) -> None:
        """rkllm_load_prompt_cache of the rkllm_prompt_cache file. Raises EngineError with one line."""
        assert self._prompt_cache is not None
        rc = self._lib.rkllm_load_prompt_cache(handle, os.fsencode(self._prompt_cache))
        if self._recorder is not None:
            self._recorder.call("load_prompt_cache", rc=rc)
        if rc != 0:
            raise EngineError(
                f"rkllm_load_prompt_cache failed ({rc}) for {self._prompt_cache}: delete the file so that the next "
                "start makes it again, or unset rkllm_prompt_cache",
                rc,
            )

    def _make_prompt_cache(self) -> None:
        """One run of the cached prefix alone, whose KV cache the runtime saves to the file (load(),
        scheduler thread, before any request). Raises EngineError with one line."""
        assert self._prompt_cache is not None and self._template is not None and self._runtime is not None
        req = Generation(key=("rkmqtt-prompt-cache",), messages=(), max_new_tokens=1, sampling=SamplingParams())
        prefix = cached_prefix(self._template)
        self._prompt_cache.parent.mkdir(parents=True, exist_ok=True)
        batch = Batch(
            next(self._ids),
            [req],
            abi=self._runtime.abi,
            n_batch=self._n_batch,
            pad=self._settings.rkllm_pad_batch,
            runtime_limit=1 if self._runtime.abi.per_run_sampling else self._settings.max_new_tokens,
            sampling=None,
            warnings={},
            out=self._events,
            render=lambda r: prefix,
            save_prompt_cache=os.fsencode(self._prompt_cache),
        )
        self._running = batch
        self._run_batch(batch)  # on this thread: nothing else runs before load() returns
        errors = []
        while not self._events.empty():
            item = self._events.get_nowait()
            if isinstance(item, ErrorEvent):
                errors.append(item.message)
        if errors or not self._prompt_cache.is_file():
            self._prompt_cache.unlink(missing_ok=True)
            raise EngineError(
                f"making the prompt cache {self._prompt_cache} failed ({errors[0] if errors else 'no file written'}): "
                "unset rkllm_prompt_cache"
            )
        _LOGGER.info("RKLLM prompt cache of the fixed system prompt written to %s", self._prompt_cache)

    def _clear_after_abort(self) -> str | None:
        """Worker thread, after a run we aborted: rkllm_clear_kv_cache, then the prompt cache again.
        Returns what failed (the model is then reloaded), or None."""
        assert self._runtime is not None
        with self._handle_lock:
            handle = self._handle
            if handle is None or "rkllm_clear_kv_cache" in self._runtime.missing:
                return None
            if self._recorder is not None:
                self._kv_cache_sizes("after an abort")
            rc = int(self._lib.rkllm_clear_kv_cache(handle, 0, None, None))
            if self._recorder is not None:
                self._recorder.call("clear_kv_cache", rc=rc, keep_system_prompt=0)
            if rc != 0:
                return f"rkllm_clear_kv_cache after an abort returned {rc}"
            if self._prompt_cache is not None:
                try:
                    self._load_prompt_cache(handle)
                except EngineError as e:
                    return str(e)
        return None

    def _warnings(self, req: Generation, per_run: bool) -> tuple[str, ...]:
        out: list[str] = []
        if req.sampling_requested and not per_run:
            version = self._runtime.version if self._runtime and self._runtime.version else "1.2.x"
            s = self._settings
            out.append(
                f"RKLLM runtime {version} fixes sampling at start-up: this request's sampling fields were not "
                f"applied (temperature={s.temperature}, top_k={s.top_k}, top_p={s.top_p}, "
                f"repeat_penalty={s.repeat_penalty} were used)"
            )
        if req.sampling.seed is not None and not req.sampling.greedy:
            out.append("the RKLLM runtime has no seed: this reply is not reproducible")
        return tuple(out)

    def _init_handle(self) -> Any:
        """rkllm_init from the settings. Raises EngineError naming what to check."""
        assert self._runtime is not None
        abi, lib, s = self._runtime.abi, self._lib, self._settings
        param: Any = lib.rkllm_createDefaultParam()  # by value: restype is this ABI's RKLLMParam
        model_path = os.fsencode(self._model)  # the file system's bytes, whatever the name's encoding
        param.model_path = model_path
        param.max_context_len = self._max_context
        param.max_new_tokens = s.max_new_tokens
        top_k, top_p, temperature, repeat_penalty = runtime_sampling(
            SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repeat_penalty=s.repeat_penalty)
        )
        param.top_k, param.top_p, param.temperature, param.repeat_penalty = top_k, top_p, temperature, repeat_penalty
        param.n_keep = s.rkllm_n_keep
        param.skip_special_token = s.rkllm_skip_special_token
        param.is_async = False
        if abi.name == "1.3":
            param.ignore_eos_token = False
        ext = param.extend_param
        ext.base_domain_id = s.rkllm_base_domain_id
        ext.embed_flash = 1 if s.rkllm_embed_flash else 0
        ext.enabled_cpus_mask = cpu_mask(self._cpus)
        ext.enabled_cpus_num = len(self._cpus)
        ext.n_batch = self._n_batch
        ext.use_cross_attn = 0
        handle = LLMHandle()
        callback: Any
        if abi.Callback is not None:
            callback = abi.Callback()
            callback.result_callback = self._c_callback
            callback.result_userdata = None
            rc = lib.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(callback))
        else:
            callback = self._c_callback
            rc = lib.rkllm_init(ctypes.byref(handle), ctypes.byref(param), callback)
        if self._recorder is not None:
            self._recorder.init(self._n_batch, rc)
        if rc != 0 or not handle.value:
            version = self._runtime.version or abi.name
            raise EngineError(
                f"rkllm_init failed ({rc}) for model {self._model} with runtime {version}: check that the RKNPU "
                f"driver is 0.9.8 or newer (`rkmqtt check`), that the model was converted by rkllm-toolkit "
                f"{version} for this SoC (model and runtime versions must match), and that there is memory for "
                f"max_context={self._max_context} x n_batch={self._n_batch} (try smaller values; the .rkllm file "
                "must have been converted for at least max_context)",
                rc,
            )
        self._init_keep = (param, callback, model_path)
        if "rkllm_is_running" not in self._runtime.missing:
            self._idle_running_value = int(lib.rkllm_is_running(handle))
            if self._recorder is not None:
                self._recorder.call("is_running", rc=self._idle_running_value, during_run=False)
        self._set_template(handle)
        if self._prompt_cache is not None and self._prompt_cache.is_file():
            try:
                self._load_prompt_cache(handle)
            except EngineError:
                self._call_destroy(handle)
                raise
        return handle

    def _call_destroy(self, handle: Any) -> None:
        rc = self._lib.rkllm_destroy(handle)
        if self._recorder is not None:
            self._recorder.destroy(rc)
        if rc != 0:
            _LOGGER.warning("rkllm_destroy returned %d", rc)

    def _destroy_handle(self) -> None:
        """Destroy the handle (worker or scheduler thread): under the lock, so no abort races it."""
        with self._handle_lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                self._call_destroy(handle)
            self._init_keep = ()

    def _abort(self, batch: Batch) -> None:
        """rkllm_abort for `batch`, once, only while its run is in progress (scheduler thread)."""
        with self._handle_lock:
            if self._in_run is not batch or batch.aborted or batch.ending():
                return
            batch.aborted = True
            if batch.called_back.is_set():
                self._call_abort(batch)
                return
        threading.Thread(
            target=self._abort_when_running, args=(batch,), name=f"rkllm-abort-{batch.id}", daemon=True
        ).start()

    def _abort_when_running(self, batch: Batch) -> None:
        """Abort thread: rkllm_abort as soon as the runtime shows `batch`'s run has begun."""
        deadline = time.monotonic() + ABORT_CONFIRM_S
        while True:
            with self._handle_lock:
                if self._in_run is not batch or batch.ending():
                    return  # the run ended, or is ending by itself: nothing to abort
                if batch.called_back.is_set() or self._runtime_running() or time.monotonic() >= deadline:
                    self._call_abort(batch)
                    return
            batch.called_back.wait(0.002)

    def _runtime_running(self) -> bool:
        """Under the lock: whether rkllm_is_running says the handle is not idle (False if it cannot tell)."""
        if self._idle_running_value is None:
            return False
        return int(self._lib.rkllm_is_running(self._handle)) != self._idle_running_value

    def _call_abort(self, batch: Batch) -> None:
        """Under the lock, with `batch`'s run in progress."""
        handle = self._handle
        if self._recorder is not None:
            rc = self._recorder.abort(lambda: int(self._lib.rkllm_abort(handle)))
        else:
            rc = self._lib.rkllm_abort(handle)
        _LOGGER.debug("rkllm_abort for batch %d returned %d", batch.id, rc)

    def _on_result(self, result: Any, userdata: int | None, state: int) -> int:
        """The C result callback (runtime thread): hand the results to the running batch."""
        try:
            if self._recorder is not None:
                self._recorder.callback(result, self._n_batch, state)
            batch = self._running
            if batch is None or batch.returned or (userdata is not None and userdata != batch.id):
                return 0
            return batch.on_result(result, state)
        except BaseException:  # never into C
            return 0

    def _start_run(self, batch: Batch) -> Any:
        """Under the lock: mark `batch` as running and return the handle, or None to skip the run
        (every request was cancelled before it began, or there is no handle)."""
        with self._handle_lock:
            if self._handle is None or batch.live_count() == 0:
                batch.returned = True
                return None
            self._in_run = batch
            if self._recorder is not None:
                self._recorder.run_start(
                    self._n_batch, batch.inputs_text, batch.runtime_limit, batch.saves_prompt_cache
                )
            return self._handle

    def _end_run(self, batch: Batch, rc: int) -> None:
        """Under the lock: the run is over, so no abort may reach the handle from now on."""
        with self._handle_lock:
            self._in_run = None
            batch.returned = True
            if self._recorder is not None:
                self._recorder.run_end(rc)

    def _run_batch(self, batch: Batch) -> None:
        """Worker thread: one rkllm_run, then answer what is open and recover from repeated failures."""
        handle = self._start_run(batch)
        broken: str | None = None
        if handle is None:
            failure = batch.not_run(None if batch.live_count() == 0 else "the RKLLM runtime is not initialised")
        else:
            rc = -1
            try:
                rc = self._lib.rkllm_run(handle, batch.inputs, ctypes.byref(batch.infer), ctypes.c_void_p(batch.id))
            except Exception as e:  # ctypes argument errors: a bug, but the requests still get answers
                batch.callback_error = f"{type(e).__name__}: {e}"
            self._end_run(batch, rc)
            failure = batch.run_returned(rc)
            if batch.aborted:
                broken = self._clear_after_abort()
        self._after_run(batch, failure, broken)
        # Idle from here: every event of the batch is already queued, so a scheduler that submits the
        # next batch before draining them still sees them first. (The bridge's scheduler stops polling
        # once its jobs are answered, so the engine must become free without a poll.)
        self._running = None
        self._events.put(BatchEnded(batch.id, tuple(batch.by_key)))

    def _after_run(self, batch: Batch, failure: str | None, broken: str | None = None) -> None:
        """Worker thread: count failed runs in a row; reload the model after RELOAD_AFTER_FAILURES,
        or at once when the handle is `broken` (a clear after an abort failed)."""
        if broken is not None:
            self._failed_runs += failure is not None
            _LOGGER.error("RKLLM batch %d: %s; re-initialising the runtime", batch.id, broken)
            self._recover()
            return
        if failure is None:
            self._failures_in_a_row = 0
            return
        self._failed_runs += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row < RELOAD_AFTER_FAILURES:
            _LOGGER.error("RKLLM batch %d failed: %s; the model stays loaded", batch.id, failure)
            return
        _LOGGER.error(
            "RKLLM batch %d failed: %s (%d failed runs in a row); re-initialising the runtime",
            batch.id,
            failure,
            self._failures_in_a_row,
        )
        self._recover()

    def _recover(self) -> None:
        """Worker thread: destroy the handle and rkllm_init again with backoff until it works."""
        self._destroy_handle()

        def stop(state: RetryCallState) -> bool:
            return self._closing.is_set()

        def sleep(seconds: float) -> None:
            self._closing.wait(seconds)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            _LOGGER.warning("RKLLM re-init attempt %d failed: %s", state.attempt_number, exc)

        retrying = Retrying(
            stop=stop,
            wait=wait_exponential(multiplier=self._backoff_s, max=self._backoff_max_s),
            retry=retry_if_exception_type(EngineError),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            handle = retrying(self._init_handle)
        except EngineError as e:
            _LOGGER.error("RKLLM runtime not re-initialised (shutting down): %s", e)
            return
        with self._handle_lock:
            self._handle = handle
        self._failures_in_a_row = 0
        self._recoveries += 1
        _LOGGER.info("RKLLM runtime re-initialised")
