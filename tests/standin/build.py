"""Build the stand-in RKLLM runtime (tests/standin/rkllm_standin.c) into a shared library.

One line, from the repository root:

    python tests/standin/build.py --abi 1.3 -o build/librkllmrt.so
    python tests/standin/build.py --abi 1.2 --version 1.2.1 -o build/librkllmrt.so

Importable too (tests, benchmarks/rkllm_standin.py):

    from tests.standin.build import build_standin
    lib = build_standin("1.3", tmp_path / "librkllmrt.so")

`version` is the `rkllm-runtime version: X.Y.Z` string embedded in the library's read-only data
(default 1.2.3 for ABI 1.2, 1.3.0 for ABI 1.3; a suffix such as 1.2.1b1 is allowed); `version=""`
embeds no version string at all. The source includes tests/standin/standin_json.h (the trace replay's
JSON reader).
Needs a C compiler (`cc`, or $CC) with pthreads.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("rkllm_standin.c")
ABIS = ("1.2", "1.3")


def build_standin(abi: str, out: Path, version: str | None = None, *, cc: str | None = None) -> Path:
    """Compile the stand-in for `abi` ("1.2" or "1.3") into `out`; returns `out`.

    Raises ValueError for a bad argument, RuntimeError with the compiler's output when it fails.
    """
    if abi not in ABIS:
        raise ValueError(f"abi must be one of {', '.join(ABIS)}, not {abi!r}")
    if version is not None and version != "" and not re.fullmatch(r"\d+\.\d+\.\d+[0-9A-Za-z.+-]*", version):
        raise ValueError(f"version must look like 1.2.3 (or 1.2.1b1), not {version!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler = shlex.split(cc or os.environ.get("CC") or "cc")
    cmd = [*compiler, "-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread"]
    if abi == "1.3":
        cmd.append("-DRKLLM_ABI_13")
    if version == "":
        cmd.append("-DRKLLM_STANDIN_NO_VERSION")
    elif version is not None:
        cmd.append(f'-DRKLLM_STANDIN_VERSION="{version}"')
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd += [str(SOURCE), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the RKLLM stand-in failed: {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)  # atomic: a process that has the old file loaded keeps its copy
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the stand-in librkllmrt.so (tests/standin/rkllm_standin.c).")
    parser.add_argument("--abi", choices=ABIS, default="1.3", help="struct layouts to compile in (default 1.3)")
    parser.add_argument("--version", default=None, help="embedded runtime version (default 1.2.3 / 1.3.0; '' for none)")
    parser.add_argument("-o", "--output", type=Path, default=Path("build/librkllmrt.so"), help="output file")
    args = parser.parse_args(argv)
    try:
        path = build_standin(args.abi, args.output, args.version)
    except (ValueError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
