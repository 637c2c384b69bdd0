"""Pulling models from a Hugging Face–compatible endpoint the tests serve on 127.0.0.1 (HF_ENDPOINT),
through the real huggingface_hub: `rkmqtt pull` and `rkmqtt models`, a transfer cut midway and resumed,
a corrupted file refused, the file picked from a repository, and each failure's one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkmqtt.engines.numpy.gguf_file import DEFAULT_MODEL_FILE, default_model_path
from rkmqtt.errors import ConfigError, PullError
from rkmqtt.models.choose import Target
from rkmqtt.models.pull import Puller, PullProgress
from rkmqtt.models.reference import parse_reference
from rkmqtt.models.store import ModelStore
from rkmqtt.mqtt.broker import free_port
from tests.hf_endpoint import SMOLLM_REPO, HfEndpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM_REF = f"hf://{SMOLLM_REPO}/{DEFAULT_MODEL_FILE}"


def puller(root: Path, engine: str = "numpy", soc: str | None = None, runtime: str | None = None) -> Puller:
    return Puller(ModelStore(root), Target(engine, soc, runtime))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rkmqtt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    return subprocess.run(
        [sys.executable, "-m", "rkmqtt", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )  # fmt: skip


def test_rkmqtt_pull_shows_progress_then_models_lists_it(hub: HfEndpoint, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    env = {"HF_ENDPOINT": hub.url}
    out = rkmqtt("pull", SMOLLM_REF, "--models-dir", str(models_dir), env=env)
    assert out.returncode == 0, out.stderr
    # Not a terminal: progress as log lines, every few percent, then the file and how to serve it.
    progress = [line for line in out.stderr.splitlines() if f"downloading {DEFAULT_MODEL_FILE}" in line]
    assert len(progress) >= 5 and "100%" in progress[-1], out.stderr
    assert "verifying" in out.stderr
    local = models_dir / "hf" / SMOLLM_REPO / DEFAULT_MODEL_FILE
    assert sha256(local) == sha256(default_model_path())
    assert f"serve it: rkmqtt run --model {SMOLLM_REF}" in out.stdout

    listed = rkmqtt("models", "--models-dir", str(models_dir))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("SmolLM2-135M-Instruct.Q4_1 "))
    assert row.split()[1:4] == ["numpy", "98.4", "MB"] and row.endswith(SMOLLM_REF)

    # Pulled again: it is there whole, so nothing is downloaded.
    gets = len(hub.log.gets(DEFAULT_MODEL_FILE))
    again = rkmqtt("pull", SMOLLM_REF, "--models-dir", str(models_dir), env=env)
    assert again.returncode == 0 and len(hub.log.gets(DEFAULT_MODEL_FILE)) == gets

    gone = rkmqtt("models", "--models-dir", str(models_dir), "--delete", "SmolLM2-135M-Instruct.Q4_1")
    assert gone.returncode == 0 and not local.exists()


def test_a_transfer_cut_midway_resumes_where_it_stopped(hub: HfEndpoint, tmp_path: Path) -> None:
    size = default_model_path().stat().st_size
    hub.cut_after[DEFAULT_MODEL_FILE] = size // 2
    seen: list[PullProgress] = []
    model = puller(tmp_path).pull(SMOLLM_REF, seen.append)
    ranges = hub.log.gets(DEFAULT_MODEL_FILE)
    # huggingface_hub asked for the rest with a Range request, from where its file ended.
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=")
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2
    assert sha256(model.path) == sha256(default_model_path())
    done = [p for p in seen if p.status == "downloading"]
    assert done[-1].completed == size and seen[-1].status == "done"


def test_a_corrupted_download_is_refused_and_nothing_is_left_for_a_model(hub: HfEndpoint, tmp_path: Path) -> None:
    hub.corrupt.add(DEFAULT_MODEL_FILE)
    store = ModelStore(tmp_path)
    seen: list[PullProgress] = []
    with pytest.raises(PullError) as e:
        puller(tmp_path).pull(SMOLLM_REF, seen.append)
    assert "checksum mismatch" in str(e.value) and "pull it again" in str(e.value)
    assert seen[-1].status == "failed" and seen[-1].message == str(e.value)
    assert store.list() == []
    assert not [p for p in tmp_path.rglob("*.gguf")]  # no half or bad file anywhere, staging included
    hub.corrupt.clear()
    assert sha256(puller(tmp_path).pull(SMOLLM_REF).path) == sha256(default_model_path())


def test_a_repository_reference_picks_the_file_for_the_engine(hub: HfEndpoint, tmp_path: Path) -> None:
    blob = os.urandom(4096)
    hub.repos["bartowski/Qwen2.5-0.5B-Instruct-GGUF"] = {
        f"Qwen2.5-0.5B-Instruct-{q}.gguf": blob + q.encode() for q in ("IQ4_XS", "Q2_K", "Q4_K_M", "Q8_0", "f16")
    } | {"Qwen2.5-0.5B-Instruct-Q8_0-00001-of-00002.gguf": blob}
    p = puller(tmp_path / "a")
    assert p.pull("hf://bartowski/Qwen2.5-0.5B-Instruct-GGUF").path.name == "Qwen2.5-0.5B-Instruct-Q8_0.gguf"
    # Ollama's own way of naming one: the quantisation as the tag.
    tagged = p.pull("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")
    assert tagged.path.name == "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"
    # Served again without the network: the pick is remembered.
    hub.close()
    again = p.local(parse_reference("hf://bartowski/Qwen2.5-0.5B-Instruct-GGUF"))
    assert again is not None and again.path.name == "Qwen2.5-0.5B-Instruct-Q8_0.gguf"


def test_an_rkllm_repository_gives_this_boards_file_and_its_tokenizer_beside_it(
    hub: HfEndpoint, tmp_path: Path
) -> None:
    stand_in = b"stand-in .rkllm\n" * 100
    hub.repos["owner/Qwen2.5-1.5B-Instruct-rk"] = {
        "Qwen2.5-1.5B-Instruct_w8a8_RK3576_v1.2.1.rkllm": stand_in + b"3576",
        "Qwen2.5-1.5B-Instruct_w8a8_RK3588_v1.1.4.rkllm": stand_in + b"114",
        "Qwen2.5-1.5B-Instruct_w8a8_RK3588_v1.2.1.rkllm": stand_in + b"121",
        "README.md": b"no tokenizer here",
    }
    hub.cards["owner/Qwen2.5-1.5B-Instruct-rk"] = {"base_model": "Qwen/Qwen2.5-1.5B-Instruct"}
    template = '{"chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"}'
    hub.repos["Qwen/Qwen2.5-1.5B-Instruct"] = {
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "tokenizer_config.json": template.encode(),
        "model-00001-of-00002.safetensors": b"weights",
    }
    model = puller(tmp_path, "rkllm", "RK3588S", "1.2.1").pull("hf://owner/Qwen2.5-1.5B-Instruct-rk")
    assert model.path.name == "Qwen2.5-1.5B-Instruct_w8a8_RK3588_v1.2.1.rkllm" and model.engine == "rkllm"
    # The base model's tokenizer files (its card names it) went beside the .rkllm, checked like it.
    assert (model.path.parent / "tokenizer_config.json").read_text() == template
    assert (model.path.parent / "tokenizer.json").is_file()
    assert not (model.path.parent / "model-00001-of-00002.safetensors").exists()
    with pytest.raises(ConfigError, match=r"has no \.rkllm for RK3562"):
        puller(tmp_path, "rkllm", "RK3562", "1.2.1").pull("hf://owner/Qwen2.5-1.5B-Instruct-rk")


def test_each_failure_is_one_line_naming_the_fix(
    hub: HfEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = puller(tmp_path)
    cases = {
        "hf://nobody/nothing": "no repository nobody/nothing",
        f"hf://{SMOLLM_REPO}/missing.gguf": f"no file 'missing.gguf' in {SMOLLM_REPO} (its model files: "
        f"{DEFAULT_MODEL_FILE})",
        "hf://a": "expected hf://owner/repo",
        "ftp://x/y": "unknown scheme",
        str(tmp_path / "nope.gguf"): "no such file",
    }
    for ref, wanted in cases.items():
        with pytest.raises((PullError, ConfigError)) as e:
            p.pull(ref)
        assert wanted in str(e.value) and "\n" not in str(e.value), (ref, str(e.value))
    hub.claimed_size[DEFAULT_MODEL_FILE] = 10**15  # a petabyte: no disk has room
    with pytest.raises(PullError, match=r"not enough disk space .* free some space, or set models_dir"):
        p.pull(SMOLLM_REF)
    assert hub.log.gets(DEFAULT_MODEL_FILE) == []  # refused before a byte was fetched
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PullError, match=r"cannot reach http://127\.0\.0\.1:\d+ .*check the network"):
        p.pull(SMOLLM_REF)


def test_check_says_a_reference_that_is_not_here_yet_needs_a_pull(tmp_path: Path) -> None:
    out = rkmqtt("check", "--engine", "numpy", "--model", "hf://owner/repo", "--models-dir", str(tmp_path),
                 "--broker", f"mqtt://127.0.0.1:{free_port()}")  # fmt: skip
    assert out.returncode == 1
    assert "[FAIL] model: model hf://owner/repo is not here yet: rkmqtt pull hf://owner/repo" in out.stdout


def test_references_as_users_write_them_and_the_names_they_get() -> None:
    from rkmqtt.models.catalog import name_of
    from rkmqtt.models.reference import HubRef

    assert parse_reference("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF") == HubRef("Qwen", "Qwen2.5-0.5B-Instruct-GGUF")
    assert parse_reference("hf://o/r/sub/m.gguf") == HubRef("o", "r", "sub/m.gguf")
    assert parse_reference("hf.co/o/r:Q4_K_M") == HubRef("o", "r", None, "Q4_K_M")
    assert parse_reference("huggingface.co/o/r:latest") == HubRef("o", "r")
    assert parse_reference("/models/x.rkllm") == Path("/models/x.rkllm")
    for bad in ("hf://o", "hf://o/r/../etc/passwd", "hf://-o/r", "hf://o/r//m.gguf", "hf.co/o/r/file.gguf", "s3://o/r"):
        with pytest.raises(ConfigError):
            parse_reference(bad)
    assert name_of("hf://o/r/sub/Qwen2.5-0.5B-Instruct-Q8_0.gguf") == "Qwen2.5-0.5B-Instruct-Q8_0"
    assert name_of("hf.co/o/Llama-3.2-1B-Instruct-GGUF:Q4_K_M") == "Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    assert name_of("/m/SmolLM2.gguf") == "SmolLM2"
