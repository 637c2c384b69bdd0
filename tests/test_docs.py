"""The README's reference and config.yaml are generated from the models and must not drift; every
JSON example in the README validates against the wire model of its section."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tools import reference

from rkmqtt.cli.main import build_parser
from rkmqtt.engines.numpy.gguf_file import GGUFFile, default_model_path
from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.protocol import ErrorReply, Info, OkReply, RequestPayload, Stats, StreamChunk
from rkmqtt.settings import MODEL_DEFAULTED, Settings, find_config_file, load_settings
from tests.mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_config_yaml_is_generated_from_settings() -> None:
    assert (REPO / "config.yaml").read_text() == reference.render_config_yaml(), "run ./dev docs"


def test_readme_reference_is_generated_from_models() -> None:
    assert README == reference.render_readme(README), "run ./dev docs"
    assert README.count("<!-- generated:settings -->\n| setting") == 1
    assert README.count("<!-- generated:topics -->\n`P`") == 1


def field_rows(text: str) -> list[tuple[str, str, str]]:
    """(field, type, notes) of every row of the generated field tables."""
    section = text.split("<!-- generated:topics -->")[1].split("<!-- /generated -->")[0]
    return re.findall(r"(?m)^\| `(\w+)` \| (.*?) \| (.*?) \|$", section)


def test_the_generated_tables_have_every_type_and_description() -> None:
    """No type lost in rendering (a Literal once came out as "one of ,"), and a note for every field."""
    rendered = reference.render_topic_reference()
    assert not re.search(r"one of\s*(?:[,|]|$)", rendered, re.M)
    rows = field_rows(README)
    assert len(rows) >= 40
    for name, typ, notes in rows:
        assert typ.strip() and "Literal" not in typ and "typing" not in typ and "[" not in typ, (name, typ)
        assert notes.strip(), f"{name}: no description"
    types = {name: typ for name, typ, _ in rows}
    assert types["finish_reason"] == "one of `stop`, `length`, `cancelled`"
    assert types["batching"] == "one of `static`, `continuous`"
    assert types["v"] == "`1`"
    assert "| `status` | `ok` |" in README and "| `status` | `error` |" in README
    for line in ("- `usage`: ", "- `timing`: ", "- `batch`: ", "- `error`: ", "- `limits`: "):
        assert line in README, line


def test_an_empty_one_of_fails_the_drift_check() -> None:
    broken = README.replace("one of `stop`, `length`, `cancelled`", "one of ", 1)
    assert broken != README and reference.render_readme(broken) != broken


def test_reference_writes_only_into_a_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It never guesses where the sources are (an installed package has no README beside it)."""
    assert reference.main(["--root", str(tmp_path)]) == 2
    assert "is not the top of an rkmqtt checkout" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    (tmp_path / "README.md").write_text("x")
    assert reference.main(["--write", "--root", str(tmp_path)]) == 2
    assert not (tmp_path / "config.yaml").exists()
    assert reference.main(["--root", str(REPO)]) == 0, "the committed files are up to date"
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (copy / name).write_text((REPO / name).read_text())
    assert reference.main(["--root", str(copy)]) == 1  # no config.yaml there yet
    assert reference.main(["--write", "--root", str(copy)]) == 0
    assert (copy / "config.yaml").read_text() == (REPO / "config.yaml").read_text()


def test_config_yaml_lists_every_setting_with_its_default() -> None:
    text = (REPO / "config.yaml").read_text()
    data = yaml.safe_load(text)
    assert list(data) == [n for n in Settings.model_fields if n not in MODEL_DEFAULTED]
    for name in MODEL_DEFAULTED:  # shown, but commented out: a copy must not pin them
        assert re.search(rf"(?m)^# {name}: \S", text), name
    assert load_settings(config_file=REPO / "config.yaml") == load_settings()


def test_the_repositorys_config_yaml_is_what_dev_run_reads(tmp_path: Path) -> None:
    """`./dev run` runs in the repository's top folder, where `rkmqtt run` finds config.yaml; a folder
    without one has none, and --config wins."""
    assert find_config_file(folder=REPO) == REPO / "config.yaml"
    assert find_config_file(folder=tmp_path) is None
    assert find_config_file(tmp_path / "mine.yaml", folder=REPO) == tmp_path / "mine.yaml"
    assert (
        'cd "$(dirname "$0")"' in (REPO / "dev").read_text()
        and 'exec "$VENV/bin/rkmqtt" run' in (REPO / "dev").read_text()
    )


def test_the_request_table_says_stream_is_on_unless_turned_off() -> None:
    assert "| `stream` | bool, optional | publish token chunks on .../stream; default `true` |" in README
    assert RequestPayload(prompt="x").stream is True


def test_the_readmes_memory_row_of_the_built_in_model_is_what_its_file_says() -> None:
    """The README's memory table works the figures out from each model's architecture: for the built-in
    model they must be what its GGUF file says (weights as float32, K and V per slot in float32)."""
    gguf = GGUFFile(default_model_path())
    cfg, params = gguf.config(), gguf.n_parameters()
    kv_slot = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2048 * 4
    row = (f"| SmolLM2-135M-Instruct (built in) | {params / 1e6:.0f} M | {params * 4 / 1e9:.2f} GB | "
           f"{kv_slot / 2**20:.0f} MiB | {(params * 4 + 4 * kv_slot) / 1e9:.1f} GB |")  # fmt: skip
    assert row in README


def test_every_setting_is_a_flag_and_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {s for a in run._actions for s in a.option_strings}
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in flags
    monkeypatch.setenv("RKMQTT_TOPIC_PREFIX", "from/env")
    assert load_settings().topic_prefix == "from/env"
    assert load_settings({"topic_prefix": "from-flag"}).topic_prefix == "from-flag"


MODELS = {"request": RequestPayload, "final reply (ok)": OkReply, "final reply (error)": ErrorReply,
          "chunk": StreamChunk, "P/node/<node>/stats": Stats, "P/node/<node>/info": Info}  # fmt: skip


def test_every_json_example_in_the_readme_validates() -> None:
    section = README.split("<!-- generated:topics -->")[1].split("<!-- /generated -->")[0]
    seen = set()
    for heading, body in re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", section, re.S | re.M):
        model = next(m for key, m in MODELS.items() if key in heading)
        for block in re.findall(r"```json\n(.*?)\n```", body, re.S):
            model.model_validate_json(block)
            json.loads(block)
            seen.add(model)
    assert seen == set(MODELS.values())


def doc_files() -> list[Path]:
    """What a user reads or runs: Markdown, the Dockerfiles, shell scripts and ./dev."""
    found = [*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("addon/**/*.md"), *REPO.glob("**/Dockerfile")]
    found += [*REPO.glob("addon/**/*.sh"), REPO / "dev"]
    return [p for p in found if ".venv" not in p.parts]


def test_no_doc_offers_rkmqtt_from_a_package_index() -> None:
    """rkmqtt is not published on a package index: `pip install rkmqtt` cannot work (the top-level
    Dockerfile's `--no-index --find-links=/wheels rkmqtt` installs the wheel its build stage made)."""
    by_name = re.compile(r"pip3? install(?:\s+-\S+)*\s+[\"']?rkmqtt(?:[=<>~!\[\s\"']|$)", re.M)
    offers = [
        f"{p.relative_to(REPO)}: {m[0]}"
        for p in doc_files()
        for m in by_name.finditer(p.read_text())
        if "--no-index" not in m[0]
    ]
    assert offers == []
    assert by_name.search("sudo /opt/rkmqtt/bin/pip install -U rkmqtt\n")
    assert not by_name.search("sudo /opt/rkmqtt/bin/pip install ./rkmqtt\n")


def test_commands_say_python3() -> None:
    """Debian and Ubuntu have `python3` and no `python` (the venv's `.venv/bin/python` is fine)."""
    bare = re.compile(r"(?<![\w/.-])python(?=\s)")
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in [REPO / "README.md", *REPO.glob("docs/*.md")]
             for n, line in enumerate(p.read_text().splitlines(), 1) if bare.search(line)]  # fmt: skip
    assert found == []
    assert bare.search("run python -m x") and not bare.search(".venv/bin/python -m x")


def test_the_readmes_stand_in_commands_run_the_bridge(mosquitto: Mosquitto, prefix: str, tmp_path: Path) -> None:
    """No board: the README's three lines build the stand-in runtime, make its model file and run
    the bridge on the RKLLM engine (here with a test broker added), which answers."""
    block = README.split("No board at hand?")[1].split("```sh\n")[1].split("```")[0]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 3 and lines[2].startswith("./dev run --engine rkllm ")
    (tmp_path / "tests").symlink_to(REPO / "tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKMQTT_")}
    env["RKMQTT_STATE_DIR"] = str(tmp_path / "state")
    for line in lines[:2]:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, line + "\n" + done.stderr
    flags = shlex.split(lines[2])[2:]
    test_broker = ["--broker", mosquitto.url, "--topic-prefix", prefix, "--no-discovery"]
    rkmqtt = [sys.executable, "-m", "rkmqtt"]
    proc = subprocess.Popen([*rkmqtt, "run", *flags, *test_broker], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    status = Probe(mosquitto.url, [f"{prefix}/node/+/status"])
    try:
        status.wait_for(lambda m: m.payload == b"online", 60)
        ask = subprocess.run([*rkmqtt, "ask", "Hello there", "--tokens", "8", "--broker", mosquitto.url,
                              "--topic-prefix", prefix], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert ask.returncode == 0, ask.stderr
        assert ask.stdout.startswith("Hello there Hello"), ask.stdout  # "answers by repeating your prompt"
        assert "answers by repeating your prompt" in README
        assert "[stop;" in ask.stderr or "[length;" in ask.stderr
    finally:
        status.close()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "RKLLM runtime 1.3.0 (ABI 1.3) from build/librkllmrt.so" in out


SOURCES = [*REPO.glob("src/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("tests/standin/*.[ch]")]


def test_every_document_the_code_cites_exists() -> None:
    cited = {m for path in SOURCES for m in re.findall(r"\bdocs/[\w./-]+?\.md\b", path.read_text())}
    assert "docs/rkllm-runtime.md" in cited
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert missing == []


def test_every_section_of_the_rkllm_facts_the_code_cites_is_there() -> None:
    doc = (REPO / "docs/rkllm-runtime.md").read_text()
    headings = [h.strip() for h in re.findall(r"^#+ (.+)$", doc, re.M)]
    cited = set()
    for path in SOURCES:
        pattern = r'docs/rkllm-runtime\.md,\s*("[^"\n]+"(?:\s+and\s+"[^"\n]+")*)'
        for block in re.findall(pattern, path.read_text()):
            cited.update(re.findall(r'"([^"]+)"', block))
    assert {"Struct layouts", "Functions", "Batched inference", "LLMCallState", "Probe traces"} <= cited
    assert sorted(c for c in cited if not any(h.startswith(c) for h in headings)) == []


def test_the_rkllm_layout_tables_are_the_documents() -> None:
    """tests/rkllm_layout_tables.py (what the binding and the stand-in are checked against) says what
    the facts document's tables say."""
    from tests.rkllm_layout_tables import LAYOUTS

    doc = (REPO / "docs/rkllm-runtime.md").read_text().split("## Struct layouts", 1)[1]
    parts = dict(zip(("1.3", "1.2"), re.split(r"^### Runtime .*$", doc, flags=re.M)[1:], strict=True))
    for abi, text in parts.items():
        parsed: dict[str, tuple[int, int, list[tuple[str, int, int]]]] = {}
        heading = r"^#### (\w+) — size (\d+), align (\d+)\n(.*?)(?=^#|\Z)"
        for name, size, align, body in re.findall(heading, text, re.M | re.S):
            rows = re.findall(r"^\| (\w+) \| `[^`]*` \| (\d+) \| (\d+) \|$", body, re.M)
            parsed[name] = (int(size), int(align), [(f, int(o), int(n)) for f, o, n in rows])
        assert parsed == LAYOUTS[abi], abi
