"""Finding, identifying and loading librkllmrt.so: located and its version read without loading it
(wherever start-up or `rkmqtt check` runs), loaded with ctypes once, on the scheduler thread, when
the engine loads (docs/rkllm-runtime.md, "Versions and ABIs")."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkmqtt.engines.rkllm.abi import ABIS, REQUIRED_FUNCTIONS, Abi, AbiName
from rkmqtt.errors import ConfigError, EngineError

_LOGGER = logging.getLogger(__name__)

LIBRARY_NAME = "librkllmrt.so"

# Where Rockchip's instructions and the distributions put the library (searched under `root`).
SEARCH_DIRS = (
    "usr/lib",
    "usr/local/lib",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/arm-linux-gnueabihf",
    "usr/lib64",
    "lib",
    "lib/aarch64-linux-gnu",
)

SUPPORTED_VERSIONS: dict[str, AbiName] = {"1.2.1": "1.2", "1.2.2": "1.2", "1.2.3": "1.2", "1.3.0": "1.3"}
SUPPORTED_TEXT = "1.2.1, 1.2.2, 1.2.3 or 1.3.0"

# The whole version token: digits and dots, then any suffix ("1.2.1b1", "1.3.0-rc1").
_VERSION_RE = re.compile(rb"rkllm-runtime version: ?v?(\d+(?:\.\d+)*[0-9A-Za-z.+~_-]*)")


def find_library(
    configured: str | Path | None = None,
    *,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The runtime library's path, without loading it. Raises ConfigError with one line.

    `configured` (the `rkllm_library` setting) wins; otherwise LD_LIBRARY_PATH's directories,
    then the usual places under `root`.
    """
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ConfigError(
                f"setting rkllm_library={str(configured)!r}: no such file; give the path of {LIBRARY_NAME}"
            )
        return path
    env = os.environ if environ is None else environ
    dirs = [Path(d) for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [root / d for d in SEARCH_DIRS]
    for d in dirs:
        candidate = d / LIBRARY_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{LIBRARY_NAME} not found (looked in LD_LIBRARY_PATH and /usr/lib, /usr/local/lib): install Rockchip's "
        f"RKLLM runtime {SUPPORTED_TEXT}, or set rkllm_library to its path"
    )


def read_runtime_version(path: Path) -> str | None:
    """The version of the `rkllm-runtime version: ...` string inside the file, whole, or None."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                m = _VERSION_RE.search(data)
                return m.group(1).rstrip(b".").decode("ascii") if m else None  # (a sentence's full stop)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions") from e


def choose_abi(path: Path, version: str | None, setting: str) -> AbiName:
    """The ABI for a library of `version` (None: no version string) and the `rkllm_abi` setting.

    Raises EngineError (unsupported version and no ABI set) or ConfigError (no version and no
    setting, or a setting that contradicts a supported version), each with one line. An
    unsupported version with `rkllm_abi` set to 1.2 or 1.3 is used with that ABI and a warning.
    """
    if version is not None:
        abi = SUPPORTED_VERSIONS.get(version)
        if abi is None:
            if setting in ("1.2", "1.3"):
                _LOGGER.warning(
                    "%s is RKLLM runtime %s, which rkmqtt does not support; using ABI %s because rkllm_abi=%s "
                    "says so (a wrong layout crashes on the first request)",
                    path,
                    version,
                    setting,
                    setting,
                )
                return "1.3" if setting == "1.3" else "1.2"
            raise EngineError(
                f"{path} is RKLLM runtime {version}, which rkmqtt does not support: install runtime "
                f"{SUPPORTED_TEXT} (and a .rkllm model converted for it), or set rkllm_abi to 1.2 or 1.3 "
                "if you know its ABI"
            )
        if setting not in ("auto", abi):
            raise ConfigError(
                f"setting rkllm_abi={setting} contradicts {path}, which is runtime {version} (ABI {abi}): "
                "set rkllm_abi=auto"
            )
        return abi
    if setting == "auto":
        raise ConfigError(
            f"{path} carries no 'rkllm-runtime version' string, so its ABI is unknown: set rkllm_abi to 1.2 "
            f"(runtime 1.2.1-1.2.3) or 1.3 (runtime 1.3.0)"
        )
    if setting not in ("1.2", "1.3"):
        raise ConfigError(f"setting rkllm_abi={setting!r} is not allowed: use auto, 1.2 or 1.3")
    return "1.3" if setting == "1.3" else "1.2"


@dataclass
class RuntimeLibrary:
    """A located runtime library and its ABI; `load()` opens it with ctypes (once)."""

    path: Path
    version: str | None
    abi: Abi
    _cdll: ctypes.CDLL | None = field(default=None, repr=False)
    missing: tuple[str, ...] = ()

    def load(self) -> ctypes.CDLL:
        """Load the library and declare its functions. Raises EngineError with one line."""
        if self._cdll is not None:
            return self._cdll
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise EngineError(
                f"cannot load {self.path}: {e} (it must be Rockchip's aarch64/armhf build for this board)"
            ) from e
        missing: list[str] = []
        for name, (restype, argtypes) in self.abi.functions().items():
            try:
                fn: Any = getattr(lib, name)
            except AttributeError:
                missing.append(name)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
        required = [n for n in missing if n in REQUIRED_FUNCTIONS]
        if required:
            raise EngineError(f"{self.path} lacks {', '.join(required)}: it is not an RKLLM runtime library")
        if missing:
            _LOGGER.info("%s lacks optional functions: %s", self.path, ", ".join(missing))
        self.missing = tuple(missing)
        self._cdll = lib
        return lib


def locate_runtime(
    configured: str | Path | None = None,
    abi_setting: str = "auto",
    *,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
) -> RuntimeLibrary:
    """Find the library, read its version and choose the ABI, without loading it."""
    path = find_library(configured, root=root, environ=environ)
    version = read_runtime_version(path)
    abi = choose_abi(path, version, abi_setting)
    return RuntimeLibrary(path=path, version=version, abi=ABIS[abi])
