"""docker/Dockerfile.gpu and docker/Dockerfile.cpu: pinned, non-root, and in
agreement with pyproject.toml (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pytest
from dockerparse import (
    DOCKER,
    REPO,
    expand,
    global_args,
    instructions,
    pyproject,
    requirement,
    stage_args,
    stage_env,
    stages,
)
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DOCKERFILES = ["Dockerfile.gpu", "Dockerfile.cpu"]
# image[:tag][@sha256:digest]; a tag is required, a digest optional.
PINNED = re.compile(r"^(?P<repo>[a-z0-9./_-]+):(?P<tag>[A-Za-z0-9._-]+)(@sha256:[0-9a-f]{64})?$")


def _runtime(name: str):
    return stages(instructions(DOCKER / name))[-1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_tag(name):
    insts = instructions(DOCKER / name)
    all_stages = stages(insts)
    names = {s.name for s in all_stages if s.name}
    external = 0
    for stage in all_stages:
        if "$" in stage.image:
            # A stage chosen by a build arg: its default and its alternatives are
            # stages of this file, each pinned on its own FROM line.
            assert expand(stage.image, global_args(insts)) in names, f"{name}: FROM {stage.image}"
            pattern = re.sub(r"\\\$\\\{\w+\\\}", ".+", re.escape(stage.image))
            assert len({n for n in names if re.fullmatch(pattern, n)}) >= 2
            continue
        image = stage.image
        if image in names:
            continue
        external += 1
        m = PINNED.match(image)
        assert m, f"{name}: FROM {image} must be pinned as image:tag[@sha256:...]"
        assert m["tag"] != "latest", f"{name}: FROM {image} uses the moving 'latest' tag"
        # A tag with a full version, not a moving major/minor alias like 'python:3.11-slim'.
        assert re.match(r"^\d+\.\d+\.\d+", m["tag"]), f"{name}: {image}: pin a full version"
    assert external >= 1


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_unprivileged_numeric_user(name):
    runtime = _runtime(name)
    users = [i.args for i in runtime.instructions if i.cmd == "USER"]
    assert users, f"{name}: no USER: the container would run as root"
    user = expand(users[-1], stage_args(runtime))
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it.
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user} must be a non-zero uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_gpu_image_switches_cuda_major_with_one_build_arg():
    insts = instructions(DOCKER / "Dockerfile.gpu")
    assert global_args(insts).get("CUDA_MAJOR") == "12", "CUDA 12 must be the default"
    by_name = {s.name: s for s in stages(insts)}
    assert stages(insts)[-1].image == "cuda${CUDA_MAJOR}"
    extras = pyproject()["project"]["optional-dependencies"]
    expected = {
        "cuda12": ("dali", "nvidia-dali-cuda120"),
        "cuda13": ("dali-cu13", "nvidia-dali-cuda130"),
    }
    for stage_name, (extra, package) in expected.items():
        stage = by_name[stage_name]
        env = stage_env(stage)
        major = stage_name.removeprefix("cuda")
        tag = stage.image.split(":", 1)[1]
        cuda_version = tag.split("-", 1)[0]  # "12.6.3-base-ubuntu24.04" -> "12.6.3"
        assert cuda_version.split(".")[0] == major, f"{stage_name} starts from {stage.image}"
        # PyTorch's wheel index for exactly this CUDA major.minor (cu126 <-> 12.6.x).
        major_minor = "".join(cuda_version.split(".")[:2])
        assert (
            env["SHARDFLOW_TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{major_minor}"
        )
        assert env["SHARDFLOW_DALI_EXTRA"] == extra and extra in extras
        assert env["SHARDFLOW_DALI_PACKAGE"] == package
        assert requirement(extra, package).name == package


def test_cpu_image_uses_cpu_wheels_and_the_dali_extra():
    env = stage_env(_runtime("Dockerfile.cpu"))
    assert env["SHARDFLOW_TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert env["SHARDFLOW_DALI_EXTRA"] == "dali"
    assert requirement("dali", env["SHARDFLOW_DALI_PACKAGE"])


def test_pinned_versions_agree_with_pyproject_and_each_other():
    gpu, cpu = stage_args(_runtime("Dockerfile.gpu")), stage_args(_runtime("Dockerfile.cpu"))
    for key in ("TORCH_VERSION", "TORCHVISION_VERSION", "DALI_VERSION", "USER_UID"):
        assert gpu[key] == cpu[key], f"{key}: GPU image {gpu[key]}, CPU image {cpu[key]}"
    assert Version(gpu["TORCH_VERSION"]) in requirement(None, "torch").specifier
    assert Version(gpu["TORCHVISION_VERSION"]) in requirement(None, "torchvision").specifier
    for extra, package in (("dali", "nvidia-dali-cuda120"), ("dali-cu13", "nvidia-dali-cuda130")):
        assert Version(gpu["DALI_VERSION"]) in requirement(extra, package).specifier


def test_python_versions_are_within_requires_python():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    gpu_python = stage_args(_runtime("Dockerfile.gpu"))["PYTHON_VERSION"]
    assert Version(gpu_python) in requires
    cpu_base = _runtime("Dockerfile.cpu").image  # python:3.11.14-slim-bookworm
    assert cpu_base.startswith("python:")
    assert Version(cpu_base.split(":")[1].split("-")[0]) in requires


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_project_from_pyproject_with_its_dali_extra(name):
    runtime = _runtime(name)
    runs = " ".join(i.args for i in runtime.instructions if i.cmd == "RUN")
    assert "git clone" not in runs, "the image must install the copied source, not a clone"
    installs = re.findall(r"pip install \"\.\[([^\]]*)\]\"", runs)
    assert len(installs) == 1, f'{name}: expected one `pip install ".[extras]"`, found {installs}'
    extra_expr = installs[0]
    assert extra_expr.startswith("${SHARDFLOW_DALI_EXTRA}")
    # Every heavy package pinned earlier is one that pyproject's dependencies name.
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', runs)
    assert re.search(r'"torchvision==\$\{TORCHVISION_VERSION\}"', runs)
    assert re.search(r'"\$\{SHARDFLOW_DALI_PACKAGE\}==\$\{DALI_VERSION\}"', runs)
    assert '--index-url "${SHARDFLOW_TORCH_INDEX_URL}"' in runs
    # EXTRAS defaults to none: a plain build installs exactly [dali] / [dali-cu13].
    assert stage_args(runtime).get("EXTRAS", "") == ""


def _copies(name: str) -> list[tuple[list[str], str]]:
    result = []
    for inst in _runtime(name).instructions:
        if inst.cmd == "COPY":
            words = [w for w in shlex.split(inst.args) if not w.startswith("--")]
            result.append((words[:-1], words[-1]))
    return result


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        parts = path.split("/")
        # A pattern matching a parent folder matches everything below it.
        if any(
            fnmatch.fnmatch("/".join(parts[:n]), pat)
            or fnmatch.fnmatch(path, pat.replace("**/", ""))
            for n in range(1, len(parts) + 1)
        ):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_package_is_copied_and_sent_in_the_build_context(name):
    sources = [src for srcs, _ in _copies(name) for src in srcs]
    packages = pyproject()["tool"]["setuptools"]["packages"]
    readme = pyproject()["project"]["readme"]
    for needed in [*packages, "pyproject.toml", readme]:
        assert needed in sources, f"{name} does not COPY {needed}: `pip install .` would fail"
    ignore = DOCKER / f"{name}.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for src in sources:
        assert (REPO / src).exists(), f"{name}: COPY {src}: no such file in the repository"
        assert not _ignored(src, patterns), f"{ignore.name} leaves {src} out of the build context"
    for heavy in (".venv", ".git", "runs", "tests"):
        assert _ignored(heavy, patterns), f"{ignore.name} sends {heavy} to the builder"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_runs_torchrun_by_default(name):
    runtime = _runtime(name)
    copies = {dest: srcs for srcs, dest in _copies(name)}
    entry = [i for i in runtime.instructions if i.cmd == "ENTRYPOINT"][-1]
    cmd = [i for i in runtime.instructions if i.cmd == "CMD"][-1]
    entry_argv, cmd_argv = json.loads(entry.args), json.loads(cmd.args)
    assert copies[entry_argv[0]] == ["docker/entrypoint.sh"]
    # The entrypoint hands arguments that start with '-' to torchrun.
    assert cmd_argv[0].startswith("-") and "-m" in cmd_argv and "train" in cmd_argv


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_credentials_in_the_image(name):
    for inst in instructions(DOCKER / name):
        if inst.cmd in ("ENV", "ARG"):
            assert not re.search(r"SECRET|ACCESS_KEY|PASSWORD|TOKEN", inst.args), (
                f"{name}:{inst.line}: credentials belong in run-time env or secrets, not {inst.cmd}"
            )
