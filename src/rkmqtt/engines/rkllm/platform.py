"""Board checks for `rkmqtt check` and `engine: auto`: is this a Rockchip NPU board that can run
RKLLM? (main thread; reads a few files under a given root, loads nothing; a failed check says how
to fix it.)"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rkmqtt.engines.rkllm.library import SUPPORTED_TEXT, find_library, locate_runtime
from rkmqtt.errors import RkmqttError

if TYPE_CHECKING:
    from rkmqtt.settings import Settings

SUPPORTED_SOCS = {
    "rockchip,rk3588": "RK3588",
    "rockchip,rk3588s": "RK3588S",
    "rockchip,rk3576": "RK3576",
    "rockchip,rk3562": "RK3562",
}
# The cores the runtime's CPU part uses when rkllm_cpus is auto: the big cores. RK3588(S): four
# Cortex-A76 at CPU4-CPU7; RK3576: four Cortex-A72 at CPU4-CPU7 (its A53s are CPU0-CPU3); RK3562:
# four Cortex-A53, CPU0-CPU3, its only cores. Off a board (the stand-in): RK3588's.
DEFAULT_CPUS: dict[str, tuple[int, ...]] = {
    "RK3588": (4, 5, 6, 7),
    "RK3588S": (4, 5, 6, 7),
    "RK3576": (4, 5, 6, 7),
    "RK3562": (0, 1, 2, 3),
}
MIN_DRIVER = (0, 9, 8)
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    name: str
    message: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


def read_compatible(root: Path = Path("/")) -> list[str]:
    """The device tree's `compatible` strings ([] when there is no device tree)."""
    try:
        data = (root / "proc/device-tree/compatible").read_bytes()
    except OSError:
        return []
    return [s.decode("ascii", "replace") for s in data.split(b"\0") if s]


def find_soc(root: Path = Path("/")) -> str | None:
    """ "RK3588", "RK3576"... when the device tree names a supported Rockchip SoC."""
    for entry in read_compatible(root):
        if entry in SUPPORTED_SOCS:
            return SUPPORTED_SOCS[entry]
    return None


def runtime_cpus(setting: str, root: Path = Path("/")) -> list[int]:
    """The CPU numbers for `enabled_cpus_mask` from the `rkllm_cpus` setting ("auto" or "4,5,6,7")."""
    if setting == "auto":
        return list(DEFAULT_CPUS[find_soc(root) or "RK3588"])
    return sorted({int(c) for c in setting.split(",")})


def check_platform(root: Path = Path("/")) -> CheckResult:
    compatible = read_compatible(root)
    soc = find_soc(root)
    if soc is not None:
        board = compatible[0] if compatible else "?"
        return CheckResult(True, "platform", f"{soc} ({board})")
    if not compatible:
        return CheckResult(
            False,
            "platform",
            f"no device tree at {root / 'proc/device-tree/compatible'}: this is not a Rockchip board; "
            "use engine=numpy (the CPU engine)",
        )
    return CheckResult(
        False,
        "platform",
        f"the device tree says {', '.join(compatible)}: RKLLM needs an RK3588/RK3588S/RK3576/RK3562; "
        "use engine=numpy (the CPU engine)",
    )


def read_driver_version(root: Path = Path("/")) -> str | None:
    """The RKNPU driver's version ("0.9.8"), or None when it cannot be read."""
    try:
        text = (root / "sys/kernel/debug/rknpu/version").read_text(errors="replace")
    except OSError:
        return None
    m = _VERSION_RE.search(text)
    return ".".join(m.groups()) if m else None


def check_driver(root: Path = Path("/")) -> CheckResult:
    path = root / "sys/kernel/debug/rknpu/version"
    need = ".".join(map(str, MIN_DRIVER))
    try:
        text = path.read_text(errors="replace")
    except PermissionError:
        return CheckResult(
            False, "npu driver", f"cannot read {path} (permission denied): run `sudo rkmqtt check` to see the version"
        )
    except OSError:
        return CheckResult(
            False,
            "npu driver",
            f"{path} not found: the RKNPU driver is not loaded or debugfs is not mounted; use a vendor kernel "
            f"with RKNPU driver {need} or newer (`dmesg | grep -i rknpu`; `mount -t debugfs none /sys/kernel/debug`)",
        )
    m = _VERSION_RE.search(text)
    if not m:
        return CheckResult(False, "npu driver", f"{path} says {text.strip()!r}: no version found; RKLLM needs {need}")
    version = tuple(int(g) for g in m.groups())
    shown = ".".join(m.groups())
    if version < MIN_DRIVER:
        return CheckResult(
            False,
            "npu driver",
            f"RKNPU driver {shown} is too old: RKLLM needs {need} or newer; update the board's kernel "
            "(your distribution's vendor kernel, e.g. Armbian/Joshua Riek's Ubuntu rockchip kernels)",
        )
    return CheckResult(True, "npu driver", f"RKNPU driver {shown}")


def _drm_driver(root: Path, name: str) -> str | None:
    dev = root / "sys/class/drm" / name / "device"
    link = dev / "driver"
    try:
        return Path(os.readlink(link)).name
    except OSError:
        pass
    try:
        for line in (dev / "uevent").read_text(errors="replace").splitlines():
            if line.startswith("DRIVER="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def check_device(root: Path = Path("/")) -> CheckResult:
    candidates: list[Path] = []
    dri = root / "dev/dri"
    if dri.is_dir():
        for node in sorted(dri.glob("renderD*")):
            if _drm_driver(root, node.name) == "rknpu":
                candidates.append(node)
    legacy = root / "dev/rknpu"
    if legacy.exists():
        candidates.append(legacy)
    if not candidates:
        return CheckResult(
            False,
            "npu device",
            "no NPU device node (no /dev/dri/renderD* of driver rknpu, no /dev/rknpu): the RKNPU driver is not "
            "loaded; use a vendor kernel with the rknpu driver (in Docker: --device /dev/dri)",
        )
    node = candidates[0]
    if not os.access(node, os.R_OK | os.W_OK):
        return CheckResult(
            False,
            "npu device",
            f"{node} exists but this user cannot open it: add the user to its group "
            f"(`sudo usermod -aG render $USER`, then log in again) or run as root",
        )
    return CheckResult(True, "npu device", str(node))


def check_library(settings: Settings, root: Path = Path("/"), environ: Mapping[str, str] | None = None) -> CheckResult:
    try:
        rt = locate_runtime(settings.rkllm_library, settings.rkllm_abi, root=root, environ=environ)
    except RkmqttError as e:
        return CheckResult(False, "runtime library", str(e))
    version = rt.version or f"unknown version, ABI {rt.abi.name} from setting rkllm_abi"
    return CheckResult(True, "runtime library", f"{rt.path}: runtime {version} (ABI {rt.abi.name})")


def check_model(settings: Settings) -> CheckResult:
    if not settings.model:
        return CheckResult(
            False, "model", "no model set: set model to a .rkllm file converted by rkllm-toolkit for this runtime"
        )
    path = Path(settings.model)
    if not path.is_file():
        return CheckResult(False, "model", f"{path}: no such file; set model to the path of a .rkllm file")
    if not os.access(path, os.R_OK):
        return CheckResult(False, "model", f"{path}: not readable by this user; fix its permissions")
    size = path.stat().st_size
    if size == 0:
        return CheckResult(False, "model", f"{path} is empty: copy the model again")
    if path.suffix != ".rkllm":
        return CheckResult(
            False, "model", f"{path} is not a .rkllm file: convert the model with rkllm-toolkit {SUPPORTED_TEXT}"
        )
    return CheckResult(True, "model", f"{path} ({size / 2**20:.0f} MiB)")


def run_checks(
    settings: Settings, root: Path = Path("/"), environ: Mapping[str, str] | None = None
) -> list[CheckResult]:
    """Every board check, in the order `rkmqtt check` prints them."""
    return [
        check_platform(root),
        check_driver(root),
        check_device(root),
        check_library(settings, root, environ),
        check_model(settings),
    ]


def looks_like_rockchip_npu_board(
    settings: Settings, root: Path = Path("/"), environ: Mapping[str, str] | None = None
) -> bool:
    """For `engine=auto`: a supported Rockchip SoC whose RKLLM runtime library can be found."""
    if find_soc(root) is None:
        return False
    try:
        find_library(settings.rkllm_library, root=root, environ=environ)
    except RkmqttError:
        return False
    return True


def check_report(settings: Settings, root: Path = Path("/"), environ: Mapping[str, str] | None = None) -> list[str]:
    """Lines for `rkmqtt check`: one line off a board, else one line per check."""
    if find_soc(root) is None:
        compatible = read_compatible(root)
        what = f"device tree: {', '.join(compatible)}" if compatible else "no Rockchip device tree"
        return [
            f"rkllm: not a Rockchip RK3588/RK3576 board ({what}); the NPU engine cannot run here: "
            "use engine=numpy (the CPU engine)"
        ]
    return [f"rkllm {r.line()}" for r in run_checks(settings, root, environ)]
