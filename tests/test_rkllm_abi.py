"""The RKLLM binding's layouts and library handling, against the facts document and the C stand-in."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest

from rkmqtt.engines.rkllm.abi import ABIS, LLMCallState, LLMResultCallback, field_layout, struct_size_align
from rkmqtt.engines.rkllm.library import choose_abi, find_library, locate_runtime, read_runtime_version
from rkmqtt.errors import ConfigError, EngineError
from tests.rkllm_fixtures import Standin, make_engine, make_settings, standin_env_fixture, standin_fixture  # noqa: F401
from tests.rkllm_layout_tables import LAYOUTS
from tests.standin.build import build_standin

pytestmark = pytest.mark.usefixtures("standin_env")

_extra_libs: dict[tuple[str, str | None], Path] = {}


def extra_lib(standin: Standin, abi: str, version: str | None) -> Path:
    """A stand-in built with another embedded version ('' for none), cached for the session."""
    key = (abi, version)
    if key not in _extra_libs:
        name = f"extra-{abi}-{version or 'none'}"
        _extra_libs[key] = build_standin(abi, standin.build_dir / name / "librkllmrt.so", version)
    return _extra_libs[key]


def c_layout(lib: Path) -> dict[str, tuple[int, int, list[tuple[str, int, int]]]]:
    """sizeof/_Alignof/offsetof as the C compiler laid out the stand-in's own structs."""
    cdll = ctypes.CDLL(str(lib))
    fn = cdll.rkllm_standin_layout
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    buf = ctypes.create_string_buffer(1 << 16)
    assert fn(buf, len(buf)) < len(buf)
    sizes: dict[str, tuple[int, int]] = {}
    fields: dict[str, list[tuple[str, int, int]]] = {}
    for line in buf.value.decode().splitlines():
        name, a, b = line.split()
        if "." in name:
            struct, member = name.split(".")
            fields.setdefault(struct, []).append((member, int(a), int(b)))
        else:
            sizes[name] = (int(a), int(b))
    return {s: (size, align, fields.get(s, [])) for s, (size, align) in sizes.items()}


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_ctypes_layouts_equal_the_tables(abi: str) -> None:
    table = LAYOUTS[abi]
    structs = ABIS[abi].structs  # type: ignore[index]
    assert set(structs) == set(table)
    for name, (size, align, fields) in table.items():
        assert struct_size_align(structs[name]) == (size, align), name
        assert field_layout(structs[name]) == fields, name


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_c_standin_layouts_equal_the_tables(standin: Standin, abi: str) -> None:
    assert c_layout(standin.lib(abi)) == LAYOUTS[abi]


def test_the_tables_are_what_the_facts_document_says() -> None:
    # A few anchors from docs/rkllm-runtime.md's prose, independent of the transcribed tables.
    assert LAYOUTS["1.3"]["RKLLMParam"][0] == 184 and LAYOUTS["1.2"]["RKLLMParam"][0] == 208
    assert ("extend_param", 60, 120) in LAYOUTS["1.3"]["RKLLMParam"][2]
    assert ("extend_param", 88, 120) in LAYOUTS["1.2"]["RKLLMParam"][2]
    assert LAYOUTS["1.3"]["RKLLMInput"][0] == 160 and LAYOUTS["1.3"]["RKLLMInferParam"][0] == 40
    assert LAYOUTS["1.3"]["RKLLMCallback"][0] == 48 and LAYOUTS["1.2"]["RKLLMResult"][0] == 72


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_create_default_param_returns_the_whole_struct_by_value(standin: Standin, abi: str) -> None:
    rt = locate_runtime(standin.lib(abi))
    assert rt.abi.name == abi
    lib: Any = rt.load()
    assert lib.rkllm_createDefaultParam.restype is rt.abi.Param
    p = lib.rkllm_createDefaultParam()
    assert ctypes.sizeof(p) == LAYOUTS[abi]["RKLLMParam"][0]
    assert (p.max_context_len, p.max_new_tokens, p.top_k, p.n_keep) == (512, -1, 40, -1)
    assert p.top_p == pytest.approx(0.9) and p.repeat_penalty == pytest.approx(1.1)
    # The fields at the end of the struct prove the restype covers all of it.
    ext = p.extend_param
    assert (ext.n_batch, ext.enabled_cpus_mask, ext.enabled_cpus_num, ext.use_cross_attn) == (1, 0xF0, 4, 0)
    assert bytes(ext.reserved) == bytes(104)
    if abi == "1.2":
        assert (p.img_start, p.img_end, p.img_content) == (b"", b"", b"")


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_raw_binding_runs_a_batch_and_sees_waiting_and_per_slot_ends(standin: Standin, abi: str) -> None:
    """The binding alone (no engine): n_batch results per callback, WAITING for a split character,
    negative token_id per slot at different steps, FINISH with perf."""
    rt = locate_runtime(standin.lib(abi))
    a = rt.abi
    lib: Any = rt.load()
    p = lib.rkllm_createDefaultParam()
    model = str(standin.model).encode()
    p.model_path = model
    p.max_new_tokens = 100
    p.extend_param.n_batch = 2
    steps: list[tuple[int, list[tuple[bytes | None, int]], list[int]]] = []

    def on_result(result: Any, userdata: Any, state: int) -> int:
        slots = []
        for i in range(2):
            r = result[i]
            slots.append((ctypes.string_at(r.text) if r.text else None, r.token_id))
        perf = [result[i].perf.prefill_tokens for i in range(2)]
        steps.append((state, slots, perf))
        return 0

    cb = LLMResultCallback(on_result)
    handle = ctypes.c_void_p()
    if a.Callback is not None:
        cbs = a.Callback(result_callback=cb)
        assert lib.rkllm_init(ctypes.byref(handle), ctypes.byref(p), ctypes.byref(cbs)) == 0
    else:
        assert lib.rkllm_init(ctypes.byref(handle), ctypes.byref(p), cb) == 0
    prompts = [b"ab\xc3\xa9 @len=4", b"xyz @len=2 and more"]  # "abé": é's two bytes straddle token 1 and 2
    inputs = (a.Input * 2)()
    for i, data in enumerate(prompts):
        inputs[i].role = b"user"
        inputs[i].input_type = 0
        inputs[i].prompt_input = data
    infer = a.InferParam()
    assert lib.rkllm_run(handle, inputs, ctypes.byref(infer), None) == 0
    assert lib.rkllm_destroy(handle) == 0
    states = [s for s, _, _ in steps]
    assert states[-1] == LLMCallState.FINISH and LLMCallState.WAITING in states
    assert steps[0][1][0] == (b"ab\xc3", steps[0][1][0][1])  # first token ends inside "é"
    assert steps[0][0] == LLMCallState.WAITING
    ends = [next(i for i, (_, sl, _) in enumerate(steps) if sl[k][1] < 0 and sl[k][0] is None) for k in (0, 1)]
    assert ends[1] < ends[0]  # slot 1 ends first
    assert steps[-1][2] == [3, 5]  # FINISH perf: prefill tokens per slot, ceil(bytes / 4)


def test_version_string_is_read_from_the_file(standin: Standin) -> None:
    assert read_runtime_version(standin.lib("1.2")) == "1.2.3"
    assert read_runtime_version(standin.lib("1.3")) == "1.3.0"
    assert read_runtime_version(extra_lib(standin, "1.2", "1.2.1")) == "1.2.1"
    assert read_runtime_version(extra_lib(standin, "1.3", "")) is None


@pytest.mark.parametrize("version", ["1.1.2", "1.2.0", "1.3.1", "2.0.0", "1.2.1b1", "1.3.0rc1", "1.2.3-beta"])
def test_unsupported_versions_are_refused_in_one_line(standin: Standin, version: str) -> None:
    lib = extra_lib(standin, "1.3" if version >= "1.3" else "1.2", version)
    assert read_runtime_version(lib) == version  # read whole, suffix included
    with pytest.raises(EngineError) as e:
        make_engine(standin, "1.3", rkllm_library=str(lib))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"runtime {version}," in msg and "1.2.1, 1.2.2, 1.2.3 or 1.3.0" in msg and "rkllm_abi" in msg


def test_the_public_1_2_1b1_build_is_not_taken_for_1_2_1(standin: Standin, caplog: pytest.LogCaptureFixture) -> None:
    """1.2.1b1 has another ABI (56-byte RKLLMInput, no n_batch): reading it as 1.2.1 would crash on
    the first request. It is refused, unless rkllm_abi names an ABI, which is then used with a warning."""
    lib = extra_lib(standin, "1.2", "1.2.1b1")
    with pytest.raises(EngineError, match=r"runtime 1\.2\.1b1, which rkmqtt does not support"):
        locate_runtime(lib)
    with caplog.at_level("WARNING"):
        engine = make_engine(standin, "1.2", rkllm_library=str(lib), rkllm_abi="1.2")
    try:
        assert engine.info()["abi"] == "1.2" and engine.info()["runtime_version"] == "1.2.1b1"
        assert any("1.2.1b1" in r.getMessage() and "rkllm_abi=1.2" in r.getMessage() for r in caplog.records)
    finally:
        engine.close()


def test_a_version_followed_by_a_full_stop_or_a_comma(tmp_path: Path) -> None:
    for text, version in [
        (b"rkllm-runtime version: 1.2.3.\0", "1.2.3"),
        (b"rkllm-runtime version: 1.3.0, rknpu", "1.3.0"),
    ]:
        lib = tmp_path / "librkllmrt.so"
        lib.write_bytes(b"\0\0" + text)
        assert read_runtime_version(lib) == version


def test_abi_choice_rules(tmp_path: Path) -> None:
    p = tmp_path / "librkllmrt.so"
    assert choose_abi(p, "1.2.2", "auto") == "1.2"
    assert choose_abi(p, "1.3.0", "1.3") == "1.3"
    assert choose_abi(p, None, "1.2") == "1.2"
    with pytest.raises(ConfigError, match=r"set rkllm_abi to 1\.2"):
        choose_abi(p, None, "auto")
    with pytest.raises(ConfigError, match="contradicts"):
        choose_abi(p, "1.3.0", "1.2")
    assert choose_abi(p, "1.4.0", "1.3") == "1.3"  # an unknown version: the setting decides (with a warning)
    with pytest.raises(EngineError, match=r"runtime 1\.4\.0"):
        choose_abi(p, "1.4.0", "auto")


def test_library_without_version_uses_the_setting(standin: Standin) -> None:
    lib = extra_lib(standin, "1.3", "")
    engine = make_engine(standin, "1.3", rkllm_library=str(lib), rkllm_abi="1.3")
    try:
        assert engine.info()["abi"] == "1.3" and engine.capabilities.per_request_sampling
    finally:
        engine.close()


@pytest.mark.parametrize(("lib_abi", "binding_abi"), [("1.3", "1.2"), ("1.2", "1.3")])
def test_a_mismatched_binding_is_caught_by_the_standin(standin: Standin, lib_abi: str, binding_abi: str) -> None:
    """A library without a version string, bound with the wrong ABI: the stand-in's layout checks
    fail rkllm_init (as the real runtime does, with -1), and the engine says what to check."""
    lib = extra_lib(standin, lib_abi, "")
    with pytest.raises(EngineError, match=r"rkllm_init failed \(-1\).*driver.*rkllm-toolkit"):
        make_engine(standin, lib_abi, rkllm_library=str(lib), rkllm_abi=binding_abi)


def test_find_library_search_order(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/librkllmrt.so").write_bytes(b"x")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt/librkllmrt.so").write_bytes(b"y")
    assert find_library(None, root=tmp_path, environ={}) == tmp_path / "usr/lib/librkllmrt.so"
    assert find_library(None, root=tmp_path, environ={"LD_LIBRARY_PATH": str(tmp_path / "opt")}) == (
        tmp_path / "opt/librkllmrt.so"
    )
    with pytest.raises(ConfigError, match="no such file"):
        find_library(tmp_path / "missing.so")
    with pytest.raises(ConfigError, match="not found"):
        find_library(None, root=tmp_path / "empty", environ={})


def test_loading_a_file_that_is_not_a_library_fails_in_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "librkllmrt.so"
    fake.write_bytes(b"\x7fELF garbage rkllm-runtime version: 1.3.0 ")
    rt = locate_runtime(fake)
    with pytest.raises(EngineError, match="cannot load"):
        rt.load()


def test_settings_are_checked_before_loading(standin: Standin) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        make_engine(standin, "1.3", model=str(standin.build_dir / "missing.rkllm"))
    with pytest.raises(ConfigError, match="needs setting model"):
        from rkmqtt.engines.rkllm.engine import RkllmEngine

        RkllmEngine(make_settings(standin, "1.3", model=None))
    # One rule for n_batch: validated settings refuse 9, and so does the engine given a copy that skipped
    # validation (model_copy, as the probe makes them), with the same words.
    with pytest.raises(ValueError, match="n_batch=9 is not allowed with engine rkllm: use 1 to 8"):
        make_settings(standin, "1.3", n_batch=9)
    with pytest.raises(ConfigError, match="n_batch=9 is not allowed with engine rkllm: use 1 to 8"):
        RkllmEngine(make_settings(standin, "1.3").model_copy(update={"n_batch": 9}))
