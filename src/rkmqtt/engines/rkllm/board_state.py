"""What `rkmqtt probe` records about the board around its runs: clocks, NPU memory, peak RSS
(the probe's main thread, parent and child processes; reads a few files, writes none; why and
which files: docs/rkllm-runtime.md, "The probe's parts")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNREADABLE = "unreadable"
CPUFREQ_FIELDS = ("scaling_governor", "scaling_cur_freq", "scaling_min_freq", "scaling_max_freq", "related_cpus")
DEVFREQ_FIELDS = ("governor", "cur_freq", "min_freq", "max_freq")
# The RKNPU driver's debugfs files that tell the NPU's memory and load (root only).
NPU_FILES = ("sys/kernel/debug/rknpu/mm", "sys/kernel/debug/rknpu/load", "sys/kernel/debug/rknpu/version")
MAX_LINES = 40


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return UNREADABLE


def _fields(directory: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {name: _read(directory / name) for name in names if (directory / name).exists()}


def read_clocks(root: Path = Path("/")) -> dict[str, Any]:
    """CPU frequency policies and NPU (and DDR) devfreq devices: governor and frequencies, as read."""
    cpufreq = root / "sys/devices/system/cpu/cpufreq"
    policies = sorted(cpufreq.glob("policy*")) if cpufreq.is_dir() else []
    if not policies:  # kernels without policy directories: one per CPU
        policies = sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq"))
    cpu = {(p.name if p.name != "cpufreq" else p.parent.name): _fields(p, CPUFREQ_FIELDS) for p in policies}
    devfreq_dir = root / "sys/class/devfreq"
    devices = sorted(devfreq_dir.iterdir()) if devfreq_dir.is_dir() else []
    devfreq = {d.name: _fields(d, DEVFREQ_FIELDS) for d in devices if "npu" in d.name.lower() or d.name == "dmc"}
    return {
        "cpu": cpu or "no cpufreq in sysfs",
        "devfreq": devfreq or "no NPU devfreq device in sysfs",
    }


def read_npu_memory(root: Path = Path("/")) -> dict[str, str]:
    """The RKNPU driver's debugfs files that exist, their first lines each (or "unreadable")."""
    out: dict[str, str] = {}
    for name in NPU_FILES:
        path = root / name
        try:
            present = path.exists()
        except OSError:  # debugfs itself can be closed to the user
            present = False
        if present:
            out["/" + name] = "\n".join(_read(path).splitlines()[:MAX_LINES])
    return out or {"/sys/kernel/debug/rknpu": UNREADABLE}


def peak_rss_mb(status: Path = Path("/proc/self/status")) -> float | None:
    """This process's peak resident set size (VmHWM) in MiB, or None where /proc does not tell."""
    for line in _read(status).splitlines():
        if line.startswith("VmHWM:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return round(int(parts[1]) / 1024.0, 1)
    return None
