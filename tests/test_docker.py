"""The container images, the add-on's entry and the systemd unit, without a Docker engine (none
exists on these machines): the Dockerfiles are parsed, and the command their ENTRYPOINT and
HEALTHCHECK name is run here as a process, as the container would run it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rkmqtt.mqtt.broker import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ADDON_DOCKERFILE = ROOT / "addon" / "rkmqtt" / "Dockerfile"
RUN_SH = ROOT / "addon" / "rkmqtt" / "run.sh"
UNIT = ROOT / "deploy" / "rkmqtt.service"
SETUP_SCRIPT = "addon/rkmqtt/setup-image.sh"  # the set-up both images run, as the top-level build copies it

# -- a small Dockerfile parser --------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to; -1 before the first FROM

    def exec_form(self) -> list[str] | None:
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
            return value
        return None

    def words(self) -> list[str]:
        return self.exec_form() or shlex.split(self.args)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Dockerfile syntax 1)."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are removed
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{path}: a continuation line runs off the end"
    return out


def resolve_args(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], m[0]), text)


def global_args(ins: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for i in ins:
        if i.keyword == "ARG" and i.stage == -1 and "=" in i.args:
            k, _, v = i.args.partition("=")
            values[k.strip()] = v.strip()
    return values


def final_stage(ins: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in ins)
    return [i for i in ins if i.stage == last]


def entry_command(stage: list[Instruction]) -> list[str]:
    entry = [i for i in stage if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in stage if i.keyword == "CMD"]
    words: list[str] = []
    if entry:
        form = entry[-1].exec_form()
        assert form is not None, "ENTRYPOINT in exec form, so that signals reach rkmqtt"
        words += form
    if cmd:
        form = cmd[-1].exec_form()
        assert form is not None
        words += form
    return words


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in stage:
        if i.keyword == "ENV":
            for word in shlex.split(i.args):
                k, _, v = word.partition("=")
                env[k] = v
    return env


def setup_text(stage: list[Instruction], context: Path) -> str:
    """What the stage's RUN instructions do: their own text, and that of every file the stage copies
    in from the build context and then names in a RUN (the set-up script both images run)."""
    runs = [i.args for i in stage if i.keyword == "RUN"]
    texts = list(runs)
    for i in stage:
        if i.keyword != "COPY" or any(w.startswith("--from=") for w in i.words()):
            continue
        *sources, dest = [w for w in i.words() if not w.startswith("--")]
        if any(dest in r for r in runs):
            texts += [(context / src).read_text() for src in sources if (context / src).is_file()]
    return "\n".join(texts)


def healthcheck(stage: list[Instruction]) -> list[str]:
    [hc] = [i for i in stage if i.keyword == "HEALTHCHECK"]
    opts, _, cmd = hc.args.partition("CMD ")
    assert re.search(r"--interval=\d+s", opts) and re.search(r"--timeout=\d+s", opts)
    form = json.loads(cmd)
    assert isinstance(form, list)
    return form


@pytest.fixture(scope="module")
def top() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def addon_image() -> list[Instruction]:
    return parse_dockerfile(ADDON_DOCKERFILE)


def test_the_parser_handles_continuations_and_exec_forms(tmp_path: Path) -> None:
    f = tmp_path / "Dockerfile"
    f.write_text('ARG B=debian:12\nFROM $B AS x\nRUN a \\\n  # note\n  && b\nFROM x\nENTRYPOINT ["p", "q"]\n')
    ins = parse_dockerfile(f)
    assert [(i.keyword, i.stage) for i in ins] == [("ARG", -1), ("FROM", 0), ("RUN", 0), ("FROM", 1), ("ENTRYPOINT", 1)]
    assert ins[2].args == "a  && b"
    assert entry_command(final_stage(ins)) == ["p", "q"]
    assert resolve_args(ins[1].args, global_args(ins)) == "debian:12 AS x"


# -- the top-level image --------------------------------------------------------------------------


def test_image_is_a_slim_glibc_python_for_arm64_and_amd64(top: list[Instruction]) -> None:
    args = global_args(top)
    for f in (i for i in top if i.keyword == "FROM"):
        assert "--platform" not in f.args, "a fixed platform would break the arm64/amd64 builds"
        image = resolve_args(f.args.split()[0], args)
        if image in {i.args.split()[-1] for i in top if i.keyword == "FROM" and " AS " in i.args}:
            continue  # a previous stage
        # The official python image is published for linux/arm64 and linux/amd64; Debian is glibc.
        assert re.fullmatch(r"python:3\.\d+-slim-(bookworm|trixie)", image), image
        assert "alpine" not in image


def test_image_runs_as_an_unprivileged_user(top: list[Instruction]) -> None:
    stage = final_stage(top)
    users = [i.args for i in stage if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    user = users[-1].split(":")[0]
    runs = setup_text(stage, ROOT)
    assert re.search(rf"useradd .*\b{user}\b", runs), "the user is created in the image"


def test_image_entry_point_is_rkmqtt_run(top: list[Instruction]) -> None:
    assert entry_command(final_stage(top)) == ["rkmqtt", "run"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'(?m)^\[project\.scripts\]\s*\nrkmqtt = "rkmqtt\.cli\.main:main"$', pyproject)
    from rkmqtt.cli.main import build_parser

    assert build_parser().parse_args(["run"]).command == "run"
    assert build_parser().parse_args(["health"]).command == "health"


def test_image_healthcheck_reads_the_health_file_the_service_writes(top: list[Instruction]) -> None:
    stage = final_stage(top)
    assert healthcheck(stage) == ["rkmqtt", "health"]
    health_file = env_of(stage)["RKMQTT_HEALTH_FILE"]
    directory = str(Path(health_file).parent)
    runs = setup_text(stage, ROOT)
    assert re.search(rf"chown \S+ .*{re.escape(directory)}", runs), "the user can write the health file"


def test_image_bakes_in_no_model_or_runtime_library(top: list[Instruction]) -> None:
    for i in top:
        if i.keyword in ("COPY", "ADD"):
            words = [w for w in i.words() if not w.startswith("--")]
            sources = words[:-1]
            for src in sources:
                assert not re.search(r"\.(rkllm|gguf|so|bin|safetensors)$|models?/?$|librkllm", src), i
            if not any(w.startswith("--from=") for w in i.words()):
                assert set(sources) <= {"pyproject.toml", "README.md", "src", "./src", "src/", SETUP_SCRIPT}, i
        assert "librkllmrt" not in i.args or i.keyword not in ("COPY", "ADD", "RUN"), i


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        rx = (
            re.escape(pattern)
            .replace(r"\*\*/", "(?:.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        if any(re.fullmatch(rx, c) for c in candidates):
            excluded = not negate
    return excluded


def test_image_keeps_the_request_journal_in_a_volume_the_service_may_write(top: list[Instruction]) -> None:
    stage = final_stage(top)
    state = env_of(stage)["RKMQTT_STATE_DIR"]
    volumes = [w.strip('[]",') for i in stage if i.keyword == "VOLUME" for w in i.words()]
    assert state in volumes, "accepted requests must outlive the container"
    made = setup_text(stage, ROOT)
    assert (
        "useradd" in made
        and re.search(rf"mkdir -p [^&]*{re.escape(state)}", made)
        and re.search(rf"chown rkmqtt:rkmqtt [^&]*{state}", made)
    )


def test_dockerignore_sends_only_the_sources() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    for kept in ("pyproject.toml", "README.md", "src/rkmqtt/cli/main.py", "src/rkmqtt/engines/base.py", SETUP_SCRIPT):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_docker.py",
        "models/q.rkllm",
        "x.gguf",
        "src/rkmqtt/__pycache__/cli.cpython-311.pyc",
        "src/librkllmrt.so",
        "addon/rkmqtt/config.yaml",
    ):
        assert dockerignore_excludes(dropped, patterns), dropped


# -- the add-on image: built the same way -----------------------------------------------------------


def test_addon_image_matches_the_top_level_image(top: list[Instruction], addon_image: list[Instruction]) -> None:
    a, t = final_stage(addon_image), final_stage(top)
    assert global_args(addon_image)["PYTHON_IMAGE"] == global_args(top)["PYTHON_IMAGE"]
    assert healthcheck(a) == healthcheck(t)
    assert env_of(a)["RKMQTT_HEALTH_FILE"] == env_of(t)["RKMQTT_HEALTH_FILE"]
    runs = lambda s: [i.args for i in s if i.keyword == "RUN"]  # noqa: E731
    assert runs(a)[0] == runs(t)[0], "the same system packages and the same unprivileged user"
    # ...from one script, not a copy of it: the add-on's folder holds it (the Supervisor builds from there).
    shared = [i.words() for i in t if i.keyword == "COPY" and i.words()[-1] == "/tmp/setup-image.sh"]
    assert shared == [[SETUP_SCRIPT, "/tmp/setup-image.sh"]] and "setup-image.sh" in runs(t)[0]
    assert (ROOT / SETUP_SCRIPT).parent == ADDON_DOCKERFILE.parent
    assert entry_command(a) == ["/run.sh"]
    copies = [i.words() for i in a if i.keyword in ("COPY", "ADD")]
    assert copies == [["setup-image.sh", "/tmp/setup-image.sh"], ["dist/", "/tmp/dist/"], ["run.sh", "/run.sh"]]
    # run.sh ends in `exec ... rkmqtt run "$@"` on every path.
    execs = [ln.strip() for ln in RUN_SH.read_text().splitlines() if ln.strip().startswith("exec ")]
    assert execs and all(re.search(r'\brkmqtt run "\$@"$', e) for e in execs), execs


def copied_sources(ins: list[Instruction]) -> list[str]:
    """The build-context paths every COPY/ADD (not --from another stage) reads."""
    out = []
    for i in ins:
        if i.keyword in ("COPY", "ADD") and not any(w.startswith("--from=") for w in i.words()):
            out += [w for w in i.words() if not w.startswith("--")][:-1]
    return out


def test_every_path_the_top_level_image_copies_exists(top: list[Instruction]) -> None:
    sources = copied_sources(top)
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository does not have"


def test_dev_addon_gives_the_addon_image_everything_it_copies_and_a_wheel_that_installs(
    addon_image: list[Instruction], tmp_path: Path
) -> None:
    """`./dev addon` puts the rkmqtt wheel into the add-on's folder (the Supervisor builds from that
    folder alone); the add-on Dockerfile installs exactly that file, and it installs into a clean
    venv with a working `rkmqtt` command."""
    done = subprocess.run([str(ROOT / "dev"), "addon"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for src in copied_sources(addon_image):
        assert (ADDON_DOCKERFILE.parent / src).exists(), (
            f"the add-on Dockerfile copies {src}: missing after ./dev addon"
        )
    runs = " ".join(i.args for i in final_stage(addon_image) if i.keyword == "RUN")
    [pattern] = re.findall(r"pip install [^&]*?/tmp/dist/(\S+\.whl)", runs)
    version = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    assert version
    [wheel] = (ADDON_DOCKERFILE.parent / "dist").glob(pattern)
    assert wheel.name == f"rkmqtt-{version[1]}-py3-none-any.whl"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("RKMQTT_")}
    help_out = subprocess.run(
        [str(venv / "bin" / "rkmqtt"), "--help"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert help_out.returncode == 0, help_out.stderr
    assert "run" in help_out.stdout and "ask" in help_out.stdout


def fake_bin(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def run_entry(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(["sh", str(RUN_SH), *args], env=env, capture_output=True, text=True, timeout=30)


def test_addon_entry_execs_rkmqtt_run(tmp_path: Path) -> None:
    # No `rkmqtt` user (as on this machine): it runs `rkmqtt run` directly.
    fake_bin(tmp_path, "rkmqtt", 'echo "rkmqtt $*"\n')
    fake_bin(tmp_path, "id", 'if [ "$1" = rkmqtt ]; then exit 1; fi\nexec /usr/bin/id "$@"\n')
    done = run_entry(tmp_path, "--debug")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rkmqtt run --debug"


def test_addon_entry_drops_to_the_rkmqtt_user(tmp_path: Path) -> None:
    # As root in the add-on container: the service runs as rkmqtt via setpriv.
    fake_bin(tmp_path, "rkmqtt", 'echo "rkmqtt $*"\n')
    fake_bin(
        tmp_path,
        "id",
        'case "$*" in "-u") echo 0;; "rkmqtt") exit 0;; "-g rkmqtt") echo 10001;; *) exec /usr/bin/id "$@";; esac\n',
    )
    fake_bin(tmp_path, "setpriv", 'echo "setpriv $*" >&2\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    done = run_entry(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rkmqtt run"
    assert re.search(r"setpriv --reuid=rkmqtt --regid=rkmqtt --groups=10001\S* .*-- rkmqtt run", done.stderr)


# -- the command the container runs, run here ------------------------------------------------------


def test_entry_point_and_healthcheck_as_the_container_runs_them(
    top: list[Instruction], mosquitto: Mosquitto, tmp_path: Path, prefix: str
) -> None:
    stage = final_stage(top)
    entry, check = entry_command(stage), healthcheck(stage)
    bindir = Path(sys.executable).parent
    assert (bindir / entry[0]).exists(), "the rkmqtt console script is installed beside this Python"
    health = tmp_path / "health.json"
    env = {
        **os.environ,
        **env_of(stage),
        "RKMQTT_HEALTH_FILE": str(health),
        "RKMQTT_STATE_DIR": str(tmp_path / "state"),
        "RKMQTT_BROKER": mosquitto.url,
        "RKMQTT_TOPIC_PREFIX": prefix,
        "RKMQTT_ENGINE": "tests.fake_engine:FakeEngine",
        "RKMQTT_DISCOVERY": "false",
        "RKMQTT_GRACE_PERIOD": "2",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("SUPERVISOR_TOKEN", None)

    def probe_health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bindir / check[0]), *check[1:]], env=env, capture_output=True, text=True, timeout=30, cwd=ROOT
        )

    assert probe_health().returncode == 1, "unhealthy before the service has written anything"
    proc = subprocess.Popen(
        [str(bindir / entry[0]), *entry[1:]],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if health.exists() and json.loads(health.read_text() or "{}").get("connected"):
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        done = probe_health()
        assert done.returncode == 0, done.stdout + done.stderr
        # The broker goes away: the health check fails once the service notices.
        mosquitto.kill()
        deadline = time.monotonic() + 30
        while probe_health().returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert probe_health().returncode == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out


# -- the systemd unit -------------------------------------------------------------------------------


def unit_entries() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def test_systemd_unit_runs_rkmqtt_run_unprivileged_with_the_npu_reachable() -> None:
    e = unit_entries()
    [exec_start] = e["ExecStart"]
    words = shlex.split(exec_start)
    assert Path(words[0]).name == "rkmqtt" and words[1] == "run"
    assert e["User"] == ["rkmqtt"]
    assert "render" in e["SupplementaryGroups"][0].split()
    assert e.get("PrivateDevices", ["no"]) == ["no"], "PrivateDevices hides /dev/rknpu and /dev/dri"
    allowed = {v.split()[0] for v in e["DeviceAllow"]}
    assert {"/dev/rknpu", "char-drm"} <= allowed
    assert e["NoNewPrivileges"] == ["yes"] and e["ProtectSystem"] == ["strict"]
    assert int(e["TimeoutStopSec"][0]) >= 60
    assert e["Environment"] == ["RKMQTT_HEALTH_FILE=/run/rkmqtt/health.json"] and e["RuntimeDirectory"] == ["rkmqtt"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of systemd; install it to check the unit"
    # The unit's binary is not installed here: verify a copy that runs /bin/true instead.
    unit = tmp_path / "rkmqtt.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true run", UNIT.read_text()))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rkmqtt.service" not in done.stderr, done.stderr
