"""Killed processes: SIGKILL the packer at random points, SIGKILL a training rank mid-epoch.

Packer: a child `shard pack` counts the points where a kill can land (before
each sample is written, before each fsync, before each rename that publishes
a shard, index, journal entry, rejected.jsonl or the manifest) and SIGKILLs
itself at one drawn from a seeded RNG (a kind of point, then one of its
occurrences). Nothing under a final name may be
partial, and `--resume` must give the bytes of an uninterrupted pack.

Trainer: `torchrun --max-restarts 1` with 2 gloo ranks; one rank SIGKILLs
itself after a drawn step. The restarted job must resume from the newest
checkpoint and hand every rank exactly the keys an uninterrupted run sees,
ending with bit-identical weights (deterministic mode).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shard_tools.config import PackConfig
from shard_tools.format import MANIFEST_NAME
from shard_tools.pack import pack
from shard_tools.synth import make_image_folder
from tests.faults.faulthelpers_rw import REPO, child_env, run_shard, tree_digest

TRIALS = 10

# `shard pack` that SIGKILLs itself just before the K-th (from 0) event of kind
# KIND: "sample" (a sample is written into the open shard), "fsync" or "rename"
# (storage.py making a shard, index, journal entry, rejected.jsonl or the
# manifest durable / visible). KIND "count" kills nothing and writes the number
# of events of each kind to LOG. argv: KIND K LOG shard-args...
KILLER = """
import json, os, signal, sys, threading
from shard_tools import cli, storage, tarwrite
kind, k, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
counts, lock = {"sample": 0, "fsync": 0, "rename": 0}, threading.Lock()

def point(what, name=""):
    with lock:
        n = counts[what]
        counts[what] += 1
    if what == kind and n == k:
        print(f"killed before {what} #{n} {name}".strip(), file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

class Os:
    # storage.py's view of `os`: every fsync and rename is a kill point
    def __getattr__(self, name):
        return getattr(os, name)
    def fsync(self, fd):
        point("fsync", "(" + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) + ")")
        return os.fsync(fd)
    def replace(self, a, b):
        point("rename", "(" + os.path.basename(b) + ")")
        return os.replace(a, b)

storage.os = Os()
add_chunk = tarwrite.ShardTarWriter.add_chunk
def add(self, chunk):
    point("sample")
    return add_chunk(self, chunk)
tarwrite.ShardTarWriter.add_chunk = add
status = cli.main(sys.argv[4:])
if kind == "count":
    with open(log, "w") as f:
        json.dump(counts, f)
sys.exit(status)
"""

PACK_ARGS = ["--max-count", "5", "--shuffle", "--seed", "4"]


@pytest.fixture(scope="module")
def pack_src(tmp_path_factory) -> Path:
    src = make_image_folder(
        tmp_path_factory.mktemp("killed") / "src", num_classes=3, per_class=12, size=16, seed=9
    )
    (src / "class01" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return src


def _killer(kind: str, k: int, log: Path, src: Path, dest: Path, workers: int) -> tuple[int, str]:
    """Run KILLER; return its exit status and stderr.

    Output goes to a file, not a pipe: pool workers of a killed packer keep a
    pipe open until the packer is reaped (they poll whether it still exists,
    and a zombie does), while a pipe reader would wait for that pipe to close.
    """
    args = ["pack", str(src), str(dest), *PACK_ARGS, "--workers", str(workers)]
    err = log.with_suffix(".stderr")
    with open(err, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, kind, str(k), str(log), *args],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
            timeout=120,
        )
    return proc.returncode, err.read_text()


def test_sigkill_packer_at_random_points_then_resume(pack_src, tmp_path, figures):
    ref = tmp_path / "ref"
    log = tmp_path / "points.txt"
    status, stderr = _killer("count", 0, log, pack_src, ref, workers=1)
    assert status == 0, stderr
    counts = json.loads(log.read_text())
    reference = tree_digest(ref)
    # Each trial draws a kind of event, then one of its occurrences: a third of
    # the kills land while samples are written, two thirds while files are published.
    rng = random.Random(8)
    points: list[tuple[str, int]] = []
    while len(points) < TRIALS:
        kind = rng.choice(sorted(counts))
        point = (kind, rng.randrange(counts[kind]))
        if point not in points:
            points.append(point)
    identical, killed_before, partial_visible = 0, [], 0
    for trial, (kind, k) in enumerate(points):
        dest = tmp_path / f"trial{trial}"
        workers = 1 + trial % 2  # half the trials with a worker pool
        status, stderr = _killer(kind, k, log, pack_src, dest, workers)
        assert status == -signal.SIGKILL, stderr
        said = [ln for ln in stderr.splitlines() if ln.startswith("killed before ")]
        killed_before.append(said[-1].removeprefix("killed before "))
        # Nothing under a final name is partial; the manifest is never there.
        assert not (dest / MANIFEST_NAME).exists()
        for name, digest in tree_digest(dest).items():
            if "/" not in name:
                partial_visible += digest != reference[name]
        resumed = run_shard(["pack", pack_src, dest, *PACK_ARGS, "--workers", workers, "--resume"])
        assert resumed.returncode == 0, resumed.stderr
        identical += tree_digest(dest) == reference
    figures(
        "killed",
        "shard pack SIGKILLed, then --resume",
        trials=TRIALS,
        kill_points=f"{sum(counts.values())} possible ({counts}); killed before: "
        + ", ".join(killed_before),
        partial_files_visible=partial_visible,
        identical_outputs=identical,
    )
    assert partial_visible == 0
    assert identical == TRIALS


# -- a training rank killed mid-epoch -------------------------------------------------

STEPS_PER_EPOCH, EPOCHS, CKPT_EVERY = 6, 2, 3  # 48 samples, global batch 8


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("killed-train")
    src = make_image_folder(root / "src", num_classes=4, per_class=12, size=32, seed=5)
    pack(PackConfig(src=str(src), dest=str(root / "ds"), max_count=12, workers=1), progress=False)
    return root / "ds"


def _train(ds: Path, out: Path, *extra: str, kill: str = "") -> subprocess.CompletedProcess:
    args = ["--data", ds, "--backend", "torch", "--num-workers", "0", "--out", out,
            "--batch-size", "8", "--epochs", EPOCHS, "--ckpt-every-steps", CKPT_EVERY,
            "--lr", "0.05", "--deterministic", "--resume", "auto", "--audit-keys",
            "--dist-timeout-s", "30", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "train", *map(str, args)]  # fmt: skip
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=child_env(SHARDFLOW_FAULT_KILL=kill),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _audit(out: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (out / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines()
    return [(row["step"], row["keys"]) for row in map(json.loads, lines)]


def _events(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == kind]


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigkill_one_rank_then_resume_at_exact_position(train_ds, tmp_path, figures):
    ref = tmp_path / "ref"
    proc = _train(train_ds, ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = STEPS_PER_EPOCH * EPOCHS
    expected = {r: dict(_audit(ref, r)) for r in (0, 1)}
    assert all(sorted(expected[r]) == list(range(1, total + 1)) for r in (0, 1))
    final = [json.loads((ref / "audit" / f"final-rank{r}.json").read_text()) for r in (0, 1)]
    # Kill after a step that is not a checkpoint step: a checkpoint still being
    # written by rank 0 when rank 1 dies would make the resume point a race.
    candidates = [(s, r) for s in range(CKPT_EVERY + 1, total) if s % CKPT_EVERY for r in (0, 1)]
    trials = random.Random(3).sample(candidates, TRIALS)
    exact, identical, points = 0, 0, []
    for n, (kill_step, kill_rank) in enumerate(trials):
        out = tmp_path / f"trial{n}"
        proc = _train(train_ds, out, kill=f"{kill_rank}:{kill_step}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        # The kill really happened (torchrun may report the peer's failure, not the -9).
        assert f"fault injection: SIGKILL rank {kill_rank} after step {kill_step}" in proc.stderr
        resumed = _events(out, "resume")[-1]
        want = kill_step - kill_step % CKPT_EVERY  # the newest checkpoint before the kill
        points.append(f"rank {kill_rank} after step {kill_step} (resumed at {resumed['step']})")
        at_checkpoint = resumed["step"] == want and resumed["epoch"] == want // STEPS_PER_EPOCH
        same_keys = True
        for rank in (0, 1):
            rows = _audit(out, rank)
            steps = [s for s, _ in rows]
            cut = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
            assert cut is not None, f"rank {rank} never restarted: {steps}"
            # First attempt: steps 1.. up to (about) the kill; after the restart: exactly
            # the steps after the checkpoint, so those in between ran twice.
            assert steps[:cut] == list(range(1, cut + 1)) and cut >= want, (rank, steps)
            assert steps[cut:] == list(range(want + 1, total + 1)), (rank, steps)
            same_keys &= all(keys == expected[rank][s] for s, keys in rows)
        exact += at_checkpoint and same_keys
        finals = [json.loads((out / "audit" / f"final-rank{r}.json").read_text()) for r in (0, 1)]
        identical += finals == final
    figures(
        "killed",
        "training rank SIGKILLed mid-epoch (torchrun --max-restarts 1, 2 ranks, gloo)",
        trials=TRIALS,
        kill_points="; ".join(points),
        resumed_at_exact_position=exact,
        identical_final_weights=identical,
    )
    assert exact == TRIALS
    assert identical == TRIALS
