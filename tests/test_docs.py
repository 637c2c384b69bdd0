"""The README's reference and config.yaml are generated from the models and must not drift; every
JSON example in the README validates against the wire model of its section."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from rkmqtt import reference
from rkmqtt.cli import build_parser
from rkmqtt.protocol import ErrorReply, Info, OkReply, RequestPayload, Stats, StreamChunk
from rkmqtt.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_config_yaml_is_generated_from_settings() -> None:
    assert (REPO / "config.yaml").read_text() == reference.render_config_yaml(), (
        "run python -m rkmqtt.reference --write"
    )


def test_readme_reference_is_generated_from_models() -> None:
    assert README == reference.render_readme(README), "run python -m rkmqtt.reference --write"
    assert README.count("<!-- generated:settings -->\n| setting") == 1
    assert README.count("<!-- generated:topics -->\n`P`") == 1


def test_config_yaml_lists_every_setting_with_its_default() -> None:
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    assert list(data) == list(Settings.model_fields)
    assert load_settings(config_file=REPO / "config.yaml") == load_settings()


def test_every_setting_is_a_flag_and_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {s for a in run._actions for s in a.option_strings}
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in flags
    monkeypatch.setenv("RKMQTT_TOPIC_PREFIX", "from/env")
    assert load_settings().topic_prefix == "from/env"
    assert load_settings({"topic_prefix": "from-flag"}).topic_prefix == "from-flag"


MODELS = {"request": RequestPayload, "final reply (ok)": OkReply, "final reply (error)": ErrorReply,
          "chunk": StreamChunk, "P/stats": Stats, "P/info": Info}  # fmt: skip


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
