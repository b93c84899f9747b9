"""Every `shard`, `train` and `torchrun` option written in docker/ (compose,
SLURM, Kubernetes, Dockerfile defaults, README commands) exists in the real
command-line interfaces, so the examples do not rot when a flag is renamed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from functools import cache

import pytest
from dockerparse import DOCKER, flags_after, instructions

yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose and Kubernetes files")

SHARD_COMMANDS = ("pack", "synth", "verify", "inspect", "index")
LAUNCHERS = ("torchrun", "shardflow:gpu", "shardflow:cpu")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _join_continuations(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _block(text: str, name: str) -> str:
    """The body of a bash array assignment NAME=( ... ) spanning several lines."""
    m = re.search(rf"^{name}=\(\n(.*?)^\)", text, re.M | re.S)
    assert m, f"no {name}=( ... ) block"
    return " ".join(line.strip() for line in m.group(1).splitlines())


def commands() -> dict[str, list[str]]:
    """Command lines written in docker/, by file."""
    found: dict[str, list[str]] = {}
    for name in ("compose.yaml", "compose.gpu.yaml"):
        compose = yaml.safe_load((DOCKER / name).read_text())
        found[name] = []
        for service in compose["services"].values():
            command = service.get("command")
            if isinstance(command, list):
                found[name].append(" ".join(command))
    sbatch = (DOCKER / "slurm" / "train.sbatch").read_text()
    found["slurm/train.sbatch"] = [
        _block(sbatch, "launch"),
        "-m train " + _block(sbatch, "train_args"),
    ]
    for name in ("indexed-job.yaml", "pytorchjob.yaml"):
        for doc in yaml.safe_load_all((DOCKER / "k8s" / name).read_text()):
            if not doc or doc["kind"] == "Service":
                continue
            spec = doc["spec"]
            template = spec.get("template") or spec["pytorchReplicaSpecs"]["Worker"]["template"]
            for container in template["spec"]["containers"]:
                found.setdefault(f"k8s/{name}", []).append(" ".join(container["args"]))
    for dockerfile in ("Dockerfile.gpu", "Dockerfile.cpu"):
        cmd = [i for i in instructions(DOCKER / dockerfile) if i.cmd == "CMD"][-1]
        found[dockerfile] = [" ".join(json.loads(cmd.args))]
    readme = (DOCKER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", readme, re.S)
    found["README.md"] = [line for block in blocks for line in _join_continuations(block)]
    return found


def _torchrun_flags(command: str) -> list[str]:
    if "-m train" not in command:
        return []
    before = command[: command.index("-m train")]
    starts = [before.rindex(word) + len(word) for word in LAUNCHERS if word in before]
    return FLAG.findall(before[max(starts) :] if starts else before)


@cache
def _help_flags(*argv: str) -> frozenset[str]:
    proc = subprocess.run(
        [sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return frozenset(FLAG.findall(proc.stdout))


def _used(kind: str) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for source, lines in commands().items():
        for line in lines:
            if kind == "train":
                flags = flags_after("-m train", line)
            elif kind == "torchrun":
                flags = _torchrun_flags(line)
            else:
                flags = flags_after(f"shard {kind}", line)
            for flag in flags:
                used.setdefault(flag, set()).add(source)
    return used


def test_examples_use_the_trainer_and_the_packer():
    assert {"--data", "--backend", "--out", "--resume"} <= set(_used("train"))
    assert {"--max-count", "--executor"} <= set(_used("pack"))
    assert {"--rdzv-backend", "--max-restarts", "--nnodes"} <= set(_used("torchrun"))


def test_trainer_flags_exist():
    if importlib.util.find_spec("train.__main__") is None:
        pytest.skip("the trainer has no `python -m train` entry point yet")
    known = _help_flags("-m", "train")
    unknown = {flag: sorted(src) for flag, src in _used("train").items() if flag not in known}
    assert not unknown, f"`python -m train` has no such options: {unknown}"


@pytest.mark.parametrize("sub", SHARD_COMMANDS)
def test_shard_flags_exist(sub):
    if importlib.util.find_spec("shard_tools.cli") is None:
        pytest.skip("the `shard` command does not exist yet")
    used = _used(sub)
    if not used:
        return
    known = _help_flags("-m", "shard_tools.cli", sub)
    unknown = {flag: sorted(src) for flag, src in used.items() if flag not in known}
    assert not unknown, f"`shard {sub}` has no such options: {unknown}"


def test_torchrun_flags_exist():
    known = _help_flags("-m", "torch.distributed.run")
    unknown = {flag: sorted(src) for flag, src in _used("torchrun").items() if flag not in known}
    assert not unknown, f"torchrun has no such options: {unknown}"
