"""Just enough parsing of Dockerfiles, pyproject.toml and command lines for the
consistency tests of docker/ (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    cmd: str  # upper case: FROM, RUN, ...
    args: str
    line: int  # 1-based line where it starts


@dataclass(frozen=True)
class Stage:
    image: str  # as written after FROM (may hold ${ARG})
    name: str | None
    instructions: tuple[Instruction, ...]


def instructions(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile; comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if not buf:
            start = lineno
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        text = " ".join(part for part in buf if part)
        buf = []
        cmd, _, args = text.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
    assert not buf, f"{path}: the last instruction ends with a line continuation"
    return out


def global_args(insts: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    found: dict[str, str] = {}
    for inst in insts:
        if inst.cmd == "FROM":
            break
        if inst.cmd == "ARG":
            found.update(_arg(inst.args))
    return found


def stages(insts: list[Instruction]) -> list[Stage]:
    """The build stages in order, each with its instructions."""
    result: list[Stage] = []
    current: tuple[str, str | None] | None = None
    body: list[Instruction] = []
    for inst in insts:
        if inst.cmd == "FROM":
            if current:
                result.append(Stage(current[0], current[1], tuple(body)))
            words = [w for w in inst.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            current, body = (words[0], name), []
        elif current:
            body.append(inst)
    if current:
        result.append(Stage(current[0], current[1], tuple(body)))
    return result


def _arg(text: str) -> dict[str, str]:
    name, _, default = text.partition("=")
    return {name.strip(): shlex.split(default)[0] if default.strip() else ""}


def stage_args(stage: Stage) -> dict[str, str]:
    """ARG defaults declared inside a stage."""
    found: dict[str, str] = {}
    for inst in stage.instructions:
        if inst.cmd == "ARG":
            found.update(_arg(inst.args))
    return found


def stage_env(stage: Stage) -> dict[str, str]:
    """ENV values set in a stage (KEY=VALUE form)."""
    found: dict[str, str] = {}
    for inst in stage.instructions:
        if inst.cmd == "ENV":
            for word in shlex.split(inst.args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {inst.args!r}: use KEY=VALUE"
                found[key] = value
    return found


def expand(text: str, values: dict[str, str]) -> str:
    """Substitute ${NAME} and $NAME from VALUES (unknown names are left as they are)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(extra_or_main: str | None, name: str) -> Requirement:
    """The requirement for package NAME in pyproject's dependencies (None) or an extra."""
    project = pyproject()["project"]
    reqs = (
        project["dependencies"]
        if extra_or_main is None
        else project["optional-dependencies"][extra_or_main]
    )
    for text in reqs:
        req = Requirement(text)
        if req.name.lower() == name.lower():
            return req
    raise AssertionError(f"{name} is not in pyproject's {extra_or_main or 'dependencies'}")


def flags_after(marker: str, text: str) -> list[str]:
    """Long options (--name) in the shell command that follows each MARKER in TEXT,
    up to the end of that command (a line without a trailing backslash, `&&`, `;`)."""
    found: list[str] = []
    for m in re.finditer(re.escape(marker) + r"\b", text):
        rest = text[m.end() :]
        command = re.split(r"(?<!\\)\n|&&|;|\|", rest, maxsplit=1)[0]
        found += re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command)
    return found


def torchrun_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split a torchrun argument list at `-m MODULE`: (launcher options, the rest)."""
    opts: dict[str, str] = {}
    words = list(argv)
    while words and words[0] != "-m":
        word = words.pop(0)
        assert word.startswith("--"), f"unexpected torchrun argument {word!r}"
        if "=" in word:
            key, value = word[2:].split("=", 1)
        elif words and not words[0].startswith("-"):
            key, value = word[2:], words.pop(0)
        else:
            key, value = word[2:], ""
        opts[key.replace("_", "-")] = value
    return opts, words


def option_values(argv: list[str], name: str) -> list[str]:
    """Values of NAME (`--name value` or `--name=value`) in an argument list."""
    values = []
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif word.startswith(name + "="):
            values.append(word.split("=", 1)[1])
    return values
