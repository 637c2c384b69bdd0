"""Board checks (`rkmqtt check`, engine=auto) against fake /proc, /sys and /dev trees in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rkmqtt.engines.rkllm.platform import (
    check_device,
    check_driver,
    check_library,
    check_model,
    check_platform,
    check_report,
    looks_like_rockchip_npu_board,
    read_driver_version,
    run_checks,
    runtime_cpus,
)
from rkmqtt.settings import Settings
from tests.rkllm_fixtures import Standin, standin_fixture  # noqa: F401


def board(
    root: Path,
    *,
    compatible: bytes = b"radxa,rock-5b\0rockchip,rk3588\0",
    driver: str | None = "RKNPU driver: v0.9.8",
    render: str | None = "rknpu",
    legacy_node: bool = False,
    library: Path | None = None,
) -> Path:
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/compatible").write_bytes(compatible)
    if driver is not None:
        (root / "sys/kernel/debug/rknpu").mkdir(parents=True)
        (root / "sys/kernel/debug/rknpu/version").write_text(driver + "\n")
    (root / "dev/dri").mkdir(parents=True)
    (root / "dev/dri/renderD128").write_bytes(b"")  # the GPU, driver panfrost
    drm = root / "sys/class/drm"
    (drm / "renderD128/device").mkdir(parents=True)
    (root / "sys/bus/platform/drivers/panfrost").mkdir(parents=True)
    os.symlink(root / "sys/bus/platform/drivers/panfrost", drm / "renderD128/device/driver")
    if render is not None:
        (root / "dev/dri/renderD129").write_bytes(b"")
        (drm / "renderD129/device").mkdir(parents=True)
        (drm / "renderD129/device/uevent").write_text(f"DRIVER={render}\nOF_NAME=npu\n")
    if legacy_node:
        (root / "dev/rknpu").write_bytes(b"")
    if library is not None:
        (root / "usr/lib").mkdir(parents=True)
        (root / "usr/lib/librkllmrt.so").write_bytes(library.read_bytes())
    return root


def settings_for(model: Path | None, **kw: object) -> Settings:
    return Settings(model=str(model) if model else None, **kw)  # type: ignore[arg-type]


def test_a_good_board_passes_every_check(tmp_path: Path, standin: Standin) -> None:
    root = board(tmp_path, library=standin.lib("1.3"))
    results = run_checks(settings_for(standin.model), root=root, environ={})
    assert [r.name for r in results] == ["platform", "npu driver", "npu device", "runtime library", "model"]
    assert all(r.ok for r in results), [r.line() for r in results]
    assert results[0].message.startswith("RK3588 (radxa,rock-5b)")
    assert results[2].message.endswith("dev/dri/renderD129")
    assert "runtime 1.3.0 (ABI 1.3)" in results[3].message
    assert looks_like_rockchip_npu_board(settings_for(None), root=root, environ={})
    lines = check_report(settings_for(standin.model), root=root, environ={})
    assert len(lines) == 5 and all(line.startswith("rkllm ok") for line in lines)


@pytest.mark.parametrize(
    ("text", "ok", "needle"),
    [
        ("RKNPU driver: v0.9.8", True, "RKNPU driver 0.9.8"),
        ("RKNPU driver: v0.9.9", True, "0.9.9"),
        ("RKNPU driver: v0.9.6", False, "too old: RKLLM needs 0.9.8 or newer"),
        ("RKNPU driver: v0.8.2", False, "too old"),
        ("garbage", False, "no version found"),
    ],
)
def test_driver_version(tmp_path: Path, text: str, ok: bool, needle: str) -> None:
    root = board(tmp_path, driver=text)
    r = check_driver(root)
    assert r.ok is ok and needle in r.message


def test_driver_missing_says_how_to_fix(tmp_path: Path) -> None:
    r = check_driver(board(tmp_path, driver=None))
    assert not r.ok and "not loaded or debugfs is not mounted" in r.message and "0.9.8" in r.message
    assert read_driver_version(tmp_path) is None


def test_driver_version_path_that_is_not_a_file(tmp_path: Path) -> None:
    root = board(tmp_path, driver=None)
    (root / "sys/kernel/debug/rknpu/version").mkdir(parents=True)
    assert not check_driver(root).ok and read_driver_version(root) is None


def test_device_node_found_by_driver_name_or_legacy(tmp_path: Path) -> None:
    assert not check_device(board(tmp_path / "gpu-only", render=None)).ok
    assert "no NPU device node" in check_device(tmp_path / "gpu-only").message
    r = check_device(board(tmp_path / "other", render="lima"))
    assert not r.ok
    r = check_device(board(tmp_path / "legacy", render=None, legacy_node=True))
    assert r.ok and r.message.endswith("dev/rknpu")


@pytest.mark.parametrize(
    ("compatible", "soc"),
    [
        (b"radxa,rock-5b\0rockchip,rk3588\0", "RK3588"),
        (b"xunlong,orangepi-5\0rockchip,rk3588s\0", "RK3588S"),
        (b"rockchip,rk3576-evb\0rockchip,rk3576\0", "RK3576"),
    ],
)
def test_supported_platforms(tmp_path: Path, compatible: bytes, soc: str) -> None:
    r = check_platform(board(tmp_path, compatible=compatible))
    assert r.ok and r.message.startswith(soc)


def test_other_platform_is_refused_with_the_cpu_engine_suggested(tmp_path: Path) -> None:
    root = board(tmp_path, compatible=b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    r = check_platform(root)
    assert not r.ok and "brcm,bcm2712" in r.message and "engine=numpy" in r.message
    lines = check_report(settings_for(None), root=root, environ={})
    assert len(lines) == 1 and "not a Rockchip" in lines[0] and "engine=numpy (the CPU engine)" in lines[0]


def test_off_a_board_one_line(tmp_path: Path) -> None:
    lines = check_report(settings_for(None), root=tmp_path, environ={})
    assert lines == [
        "rkllm: not a Rockchip RK3588/RK3576 board (no Rockchip device tree); the NPU engine cannot run here: "
        "use engine=numpy (the CPU engine)"
    ]
    assert not looks_like_rockchip_npu_board(settings_for(None), root=tmp_path, environ={})


def test_board_without_runtime_library(tmp_path: Path) -> None:
    root = board(tmp_path)
    s = settings_for(None)
    assert not looks_like_rockchip_npu_board(s, root=root, environ={})
    r = check_library(s, root=root, environ={})
    assert not r.ok and "not found" in r.message and "1.2.1, 1.2.2, 1.2.3 or 1.3.0" in r.message


def test_library_of_unsupported_version(tmp_path: Path) -> None:
    lib = tmp_path / "librkllmrt.so"
    lib.write_bytes(b"\0rkllm-runtime version: 1.1.4\0")
    r = check_library(settings_for(None, rkllm_library=str(lib)), root=tmp_path, environ={})
    assert not r.ok and "runtime 1.1.4" in r.message and "does not support" in r.message


def test_model_checks(tmp_path: Path) -> None:
    assert "no model set" in check_model(settings_for(None)).message
    assert "no such file" in check_model(settings_for(tmp_path / "nope.rkllm")).message
    empty = tmp_path / "empty.rkllm"
    empty.write_bytes(b"")
    assert "is empty" in check_model(settings_for(empty)).message
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    r = check_model(settings_for(gguf))
    assert not r.ok and "not a .rkllm file" in r.message
    good = tmp_path / "good.rkllm"
    good.write_bytes(b"x" * 10)
    assert check_model(settings_for(good)).ok


@pytest.mark.parametrize(
    ("compatible", "cpus"),
    [
        (b"radxa,rock-5b\0rockchip,rk3588\0", [4, 5, 6, 7]),  # four Cortex-A76 at CPU4-CPU7
        (b"xunlong,orangepi-5\0rockchip,rk3588s\0", [4, 5, 6, 7]),
        (b"rockchip,rk3576-evb\0rockchip,rk3576\0", [4, 5, 6, 7]),  # four Cortex-A72 at CPU4-CPU7
        (b"rockchip,rk3562-evb\0rockchip,rk3562\0", [0, 1, 2, 3]),  # four Cortex-A53, its only cores
    ],
)
def test_rkllm_cpus_auto_is_the_socs_big_cores(tmp_path: Path, compatible: bytes, cpus: list[int]) -> None:
    assert runtime_cpus("auto", board(tmp_path, compatible=compatible)) == cpus


def test_rkllm_cpus_explicit_and_off_a_board(tmp_path: Path) -> None:
    assert runtime_cpus("auto", tmp_path) == [4, 5, 6, 7]  # no device tree: RK3588's (the stand-in)
    assert runtime_cpus("2,0,2", tmp_path) == [0, 2]
    assert Settings().rkllm_cpus == "auto"
    with pytest.raises(ValueError, match="rkllm_cpus"):
        Settings(rkllm_cpus="8")


def test_the_engine_gives_the_runtime_the_socs_cores(tmp_path: Path, standin: Standin) -> None:
    from rkmqtt.engines.rkllm.engine import RkllmEngine
    from tests.rkllm_fixtures import describe, make_settings

    root = board(tmp_path, compatible=b"rockchip,rk3562-evb\0rockchip,rk3562\0")
    engine = RkllmEngine(make_settings(standin, "1.3"), root=root)
    engine.load()
    try:
        info = describe(standin.lib("1.3"))
        assert (info["enabled_cpus_mask"], info["enabled_cpus_num"]) == ("15", "4")
        assert engine.info()["cpus"] == [0, 1, 2, 3]
    finally:
        engine.close()
