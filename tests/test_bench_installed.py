"""`rkmqtt bench` as a user installs it (the wheel, without this repository beside it): against a
bridge that runs, over MQTT and over its HTTP API; and the package names no file of tests/."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from rkmqtt.mqtt.broker import Mosquitto, free_port
from rkmqtt.service import Service
from tests.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "rkmqtt"


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)
    }


def test_the_package_loads_nothing_from_the_repository() -> None:
    """No import of the repository's tests, benchmarks or tools, and no string naming a path under
    tests/ (docstrings aside): what needs the repository lives in benchmarks/ and tools/."""
    offenders: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = []
            offenders += [f"{where} imports {n}" for n in names if n.split(".")[0] in ("tests", "benchmarks", "tools")]
            text = node.value if isinstance(node, ast.Constant) and id(node) not in docs else None
            if isinstance(text, str) and re.search(r"(^|[/\\])tests([/\\]|$)", text):
                offenders.append(f"{where} names {text!r}")
    assert offenders == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of what a source distribution holds, installed with --target
    (its dependencies are this environment's): the folder to put on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "src" / "rkmqtt", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp / "dist").glob("rkmqtt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
    assert tops == {"rkmqtt", wheel.name.split("-py3")[0] + ".dist-info"}, tops  # the package and its metadata only
    site = tmp / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def test_rkmqtt_bench_runs_from_an_installed_wheel(
    installed: Path,
    tmp_path: Path,
    mosquitto: Mosquitto,
    prefix: str,
    start_bridge: Callable[..., Service],
) -> None:
    port = free_port()
    start_bridge(FakeEngine(n_batch=2, step_s=0.002), rate_limit=0, http_listen=f"127.0.0.1:{port}",
                 http_tokens="bench:bench-s3cret")  # fmt: skip
    # Only the installed copy on the path, run from elsewhere: neither src/ nor tests/ can be found.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    env["PYTHONPATH"] = str(installed)
    where = subprocess.run([sys.executable, "-c", "import rkmqtt, importlib.util as u; print(rkmqtt.__file__, "
                            "u.find_spec('tests'))"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert where.stdout.split() == [str(installed / "rkmqtt" / "__init__.py"), "None"], where.stdout + where.stderr
    out = tmp_path / "out"
    args = ["bench", "--broker", mosquitto.url, "--topic-prefix", prefix, "--http-url", f"http://127.0.0.1:{port}"]
    args += ["--http-token", "bench-s3cret", "--devices", "3", "--requests", "6", "--tokens", "8", "--warmup", "0"]
    args += ["--no-progress", "--no-plot", "--out", str(out)]
    done = subprocess.run([str(installed / "bin" / "rkmqtt"), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((out / "bench.json").read_text())
    points = {p["mode"]: p for p in data["points"]}
    assert set(points) == {"mqtt", "http"}
    for p in points.values():
        m = p["median"]
        assert m["requests"] == m["ok"] == 6 and m["errors"] == 0 and m["completion_tokens"] > 0, (p["mode"], m)
        assert p["n_batch"] == 2 and p["bridge_info"]["engine"] == "fake"
    assert data["command"][:2] == ["rkmqtt", "bench"] and data["bridge"].startswith("running bridge")
    assert "| HTTP vs MQTT |" in (out / "bench.md").read_text()
