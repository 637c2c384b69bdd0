"""The package's shape, as docs/architecture.md promises it: checked on the source, so it cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rkmqtt"

# What the scheduling side must not know: it drives the engine whichever door a request came through.
TRANSPORT = ("paho", "aiohttp", "rkmqtt.mqtt", "rkmqtt.http", "rkmqtt.topics")
MAX_TOP_LEVEL_MODULES = 16
MAX_DOCSTRING_LINES = 6


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_scheduling_side_imports_no_transport() -> None:
    found = {
        f"{p.relative_to(PACKAGE)}: {name}"
        for p in (PACKAGE / "sched").rglob("*.py")
        for name in _imports(p)
        if name.startswith(TRANSPORT)
    }
    assert found == set()
    # The check sees what it looks for: the MQTT door does import paho.
    assert any(n.startswith("paho") for n in _imports(PACKAGE / "mqtt" / "bridge.py"))


def test_the_top_level_holds_the_shared_vocabulary_only() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_module_docstrings_are_short() -> None:
    """What a module holds and which thread runs it; the reasons live in docs/ (they go stale in code)."""
    long = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(p.read_text()), clean=False)
        if doc is not None and len(doc.strip().splitlines()) > MAX_DOCSTRING_LINES:
            long[str(p.relative_to(PACKAGE))] = len(doc.strip().splitlines())
    assert long == {}


def test_every_module_says_what_it_holds() -> None:
    missing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py" and ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert missing == []
