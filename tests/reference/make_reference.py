"""Make or check tests/reference/transformers.json with Hugging Face transformers (PyTorch, CPU).

    .venv/bin/python -m tests.reference.make_reference --write    # after ./dev crosscheck installed them
    .venv/bin/python -m tests.reference.make_reference --check    # what ./dev crosscheck runs

Every case of `tests.reference` (LOGIT_CASES, TOKEN_CASES) is computed again: the tiny models are
written to a temporary folder with `tests.numpy_fixtures.write_tiny_gguf` (seeded, so the same
files every time), SmolLM2 is the packaged file. `--check` exits 1, naming the case, when the
committed file no longer agrees with transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rkmqtt.engines.numpy.gguf_file import GGUFFile
from rkmqtt.engines.numpy.tokenizer import GGUFTokenizer
from tests.numpy_fixtures import TinySpec, smollm_path, write_tiny_gguf
from tests.reference import LOGIT_CASES, REFERENCE_FILE, TOKEN_CASES, TOP_K, Logits, assert_close

#: Agreement the check asks of the committed values (rounded to 6 digits) with transformers today.
CHECK_REL = 1e-5


class Models:
    """Model files by case model: the packaged SmolLM2, or tiny ones written once each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str | TinySpec, Path] = {}

    def path(self, model: str | TinySpec) -> Path:
        if model == "smollm2":
            return smollm_path()
        assert isinstance(model, TinySpec)
        if model not in self.paths:
            self.paths[model] = write_tiny_gguf(self.folder / f"m{len(self.paths)}.gguf", model)
        return self.paths[model]

    def encode(self, model: str | TinySpec, text: str) -> list[int]:
        path = self.path(model)
        f = GGUFFile(path)
        try:
            return GGUFTokenizer(f.metadata, str(path)).encode(text)
        finally:
            f.close()


def compute(models: Models) -> dict[str, Any]:
    from tests.reference.hf import hf_logits, hf_model, hf_token_ids

    out: dict[str, Any] = {"logits": {}, "tokens": {}}
    loaded: dict[tuple[Path, str], Any] = {}
    for name, case in LOGIT_CASES.items():
        ids = models.encode(case.model, case.text) if case.text is not None else list(case.ids)
        key = (models.path(case.model), json.dumps(case.rope))
        if key not in loaded:
            loaded[key] = hf_model(key[0], case.rope)
        full = hf_logits(loaded[key], ids)
        out["logits"][name] = (Logits.from_full(ids, full), full)
        print(f"{name}: {len(ids)} positions", file=sys.stderr)
    for name, tcase in TOKEN_CASES.items():
        out["tokens"][name] = {
            "text": tcase.text,
            "ids": hf_token_ids(models.path(tcase.model), tcase.text, tcase.digits_first),
        }
    return out


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def render(computed: dict[str, Any]) -> str:
    """One case a line, so that a change shows as a change of the cases it touches."""
    head = {
        "about": "Hugging Face transformers' logits (top_k per position) and token ids for the numpy engine's "
        "tests; see tests/reference/__init__.py",
        "made_by": ".venv/bin/python -m tests.reference.make_reference --write",
        "versions": versions(),
        "top_k": TOP_K,
    }
    lines = ["{"]
    lines += [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    for section in ("logits", "tokens"):
        entries = computed[section]
        lines.append(f'"{section}": {{')
        for i, (name, value) in enumerate(entries.items()):
            data = value[0].to_json() if section == "logits" else value
            comma = "," if i < len(entries) - 1 else ""
            lines.append(f"{json.dumps(name)}: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}{comma}")
        lines.append("}," if section == "logits" else "}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def check(computed: dict[str, Any]) -> list[str]:
    committed = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    problems = []
    if committed["top_k"] != TOP_K:
        problems.append(f"top_k {committed['top_k']}, the tests use {TOP_K}")
    for name, (fresh, full) in computed["logits"].items():
        if name not in committed["logits"]:
            problems.append(f"logits {name}: not in the file")
            continue
        ref = Logits.from_json(committed["logits"][name])
        if ref.ids != fresh.ids:
            problems.append(f"logits {name}: other input ids")
            continue
        try:
            assert_close(full, ref, CHECK_REL)
        except AssertionError as e:
            problems.append(f"logits {name}: {e}")
    for name, fresh_tokens in computed["tokens"].items():
        if committed["tokens"].get(name) != fresh_tokens:
            problems.append(f"tokens {name}: transformers gives other ids now")
    problems += [
        f"{s} {n}: no such case any more" for s in ("logits", "tokens") for n in committed[s] if n not in computed[s]
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.reference.make_reference", description=__doc__.split("\n\n")[0]
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help=f"rewrite {REFERENCE_FILE.name}")
    what.add_argument("--check", action="store_true", help=f"exit 1 when {REFERENCE_FILE.name} disagrees")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rkmqtt-reference-") as tmp:
        computed = compute(Models(Path(tmp)))
    if args.write:
        REFERENCE_FILE.write_text(render(computed), encoding="utf-8")
        print(f"wrote {REFERENCE_FILE} ({REFERENCE_FILE.stat().st_size} bytes)")
        return 0
    problems = check(computed)
    for p in problems:
        print(f"make_reference: {p}", file=sys.stderr)
    if problems:
        print(f"make_reference: regenerate with --write, then review the diff of {REFERENCE_FILE}", file=sys.stderr)
        return 1
    print(f"{REFERENCE_FILE} agrees with transformers {versions()['transformers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
