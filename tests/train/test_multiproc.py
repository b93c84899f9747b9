"""Real multi-process runs under torchrun on CPU (gloo): kill + resume, uneven data, two nodes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from traintest_helpers import (
    REPO,
    audit_steps,
    check,
    env,
    events,
    final_weights,
    free_port,
    run_train,
)

from pipeline import LoaderConfig, World, build_loader

pytestmark = pytest.mark.multiproc


def _args(data, out, *extra):
    return ["--data", data, "--backend", "torch", "--num-workers", "0", "--out", out, "--lr", "0.05",
            "--audit-keys", "--dist-timeout-s", "120", *extra]  # fmt: skip


@pytest.mark.slow
def test_sigkill_one_rank_then_resume_is_exact(tiny_train, tmp_path):
    """S = 26 steps (2 epochs). Rank 1 is SIGKILLed after step 18; torchrun restarts both
    ranks, which resume from the step-16 checkpoint: the same keys in the same order on
    every rank, and (deterministic mode) bit-identical final weights."""
    common = ["--batch-size", "8", "--epochs", "2", "--ckpt-every-steps", "4", "--deterministic",
              "--resume", "auto"]  # fmt: skip
    torchrun = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    check(run_train(_args(tiny_train, ref, *common), torchrun=torchrun))
    proc = check(run_train(_args(tiny_train, cut, *common), torchrun=torchrun,
                           env=env(SHARDFLOW_FAULT_KILL="1:18")))  # fmt: skip
    # The kill really happened (torchrun may report the peer's failure, not the -9).
    assert "fault injection: SIGKILL rank 1 after step 18" in proc.stderr
    resumed = events(cut, "resume")
    assert resumed[-1]["step"] == 16 and resumed[-1]["epoch"] == 1
    for rank in (0, 1):
        a, b = audit_steps(ref, rank), audit_steps(cut, rank)
        assert sorted(a) == list(range(1, 27))
        assert a == b  # after the resume point (17..26) and before it
        replayed = [
            json.loads(x)["step"]
            for x in (cut / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines()
        ]
        assert replayed.count(17) == 2  # step 17 ran before the kill and again after the resume
    wa, wb = final_weights(ref), final_weights(cut)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=0, atol=1e-7) for k in wa)


def test_seven_shards_on_four_ranks(tiny_train, tiny_val, tmp_path):
    """100 samples in 7 shards over 4 ranks, batch 2 per rank: every rank runs 13 steps,
    4 samples are padded, nothing is lost, and evaluation counts each image once."""
    out = tmp_path / "run"
    args = _args(tiny_train, out, "--batch-size", "8", "--epochs", "1", "--val-data", tiny_val)
    check(run_train(args, torchrun=["--standalone", "--nproc-per-node", "4"]))
    (epoch,) = events(out, "epoch")
    assert (epoch["samples_seen"], epoch["repeated"], epoch["dropped"], epoch["rank_steps"]) == (
        104,
        4,
        0,
        52,
    )
    keys = [audit_steps(out, r) for r in range(4)]
    assert all(sorted(k) == list(range(1, 14)) for k in keys)
    seen = {key for per_rank in keys for batch in per_rank.values() for key in batch}
    assert len(seen) == 100
    (ev,) = events(out, "eval")
    assert ev["samples"] == 40
    assert events(out, "summary")[0]["step"] == 13


def test_two_nodes_agree(tiny_train, tmp_path):
    """Two torchrun invocations (--nnodes 2, c10d rendezvous on 127.0.0.1) train together,
    accumulating 2 micro-batches per step (DDP no_sync on the first)."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "two-nodes", "-m", "train",
               *map(str, _args(tiny_train, out, "--batch-size", "8", "--grad-accum", "2", "--max-steps", "5"))]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    finals = [json.loads((out / "audit" / f"final-rank{r}.json").read_text()) for r in (0, 1)]
    assert finals[0] == finals[1] and finals[0]["step"] == 5
    # Each process read the share of its GLOBAL rank (both have local rank 0): exactly
    # what the loader plans for (rank, world_size 2).
    for rank in (0, 1):
        world = World(rank=rank, world_size=2, local_rank=0, local_world_size=1, node_rank=rank)
        cfg = LoaderConfig(data=str(tiny_train), backend="torch", batch_size=2, image_size=32, num_workers=0,
                           recipe="small", device="cpu")  # fmt: skip
        with build_loader(cfg, world) as loader:
            micro = [b.keys for b, _ in zip(loader, range(10), strict=False)]
        expected = [micro[i] + micro[i + 1] for i in range(0, 10, 2)]
        assert [audit_steps(out, rank)[s] for s in range(1, 6)] == expected
    assert events(out, "start")[0]["environment"]["world_size"] == 2


def _two_nodes(outs, args, port, rdzv_id):
    """Run `-m train ARGS --out OUTS[node]` as two torchrun nodes of one process each."""
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", rdzv_id, "-m", "train", *map(str, _args(args[0], outs[node], *args[1:]))]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    return results


@pytest.mark.slow
def test_resume_auto_follows_rank0_with_node_local_run_dirs(tiny_train, tmp_path):
    """Each node has its own --out (node-local disk); only rank 0 writes checkpoints, so
    only node 0 sees them. `--resume auto` resumes BOTH ranks from rank 0's choice (node 1
    reads rank 0's copy): the rest of the run equals an uninterrupted one."""
    common = ["--batch-size", "8", "--deterministic", "--schedule", "constant", "--resume", "auto"]
    ref = [tmp_path / "ref0", tmp_path / "ref1"]
    outs = [tmp_path / "node0", tmp_path / "node1"]
    _two_nodes(ref, [tiny_train, *common, "--epochs", "2"], free_port(), "ref")
    _two_nodes(outs, [tiny_train, *common, "--epochs", "1"], free_port(), "leg1")
    assert list((outs[0] / "checkpoints").glob("*.pt")) and not (outs[1] / "checkpoints").exists()
    _two_nodes(outs, [tiny_train, *common, "--epochs", "2"], free_port(), "leg2")
    resumed = events(outs[0], "resume")
    assert resumed[-1]["step"] == 13 and resumed[-1]["epoch"] == 1
    for rank in (0, 1):
        a, b = audit_steps(ref[rank], rank), audit_steps(outs[rank], rank)
        assert sorted(b) == list(range(1, 27)) and a == b
        replayed = [
            json.loads(x)["step"]
            for x in (outs[rank] / "audit" / f"keys-rank{rank}.jsonl").read_text().splitlines()
        ]
        assert replayed == list(range(1, 27))  # the second leg started at step 14 on both
        final = json.loads((outs[rank] / "audit" / f"final-rank{rank}.json").read_text())
        assert final == json.loads((ref[rank] / "audit" / f"final-rank{rank}.json").read_text())


PROBE = """
import os

class _Probe:
    # Cleared with the module dicts while the interpreter finalizes: write down the
    # threads the process still has then (builtins may be gone: os calls only).
    def __del__(self):
        names = []
        for task in os.listdir("/proc/self/task"):
            fd = os.open(f"/proc/self/task/{task}/comm", os.O_RDONLY)
            names.append(os.read(fd, 64).decode().strip())
            os.close(fd)
        fd = os.open(os.path.join(os.environ["PROBE_OUT"], f"{os.getpid()}.txt"),
                     os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, "\\n".join(names).encode())
        os.close(fd)

_probe = _Probe()
"""


def test_no_rank_finalizes_the_interpreter_with_gloo_threads_alive(tiny_train, tmp_path):
    """DDP keeps the gloo backend, and its native threads, past destroy_process_group;
    a native thread that touches the interpreter while it finalizes is ended with
    pthread_exit, which aborts C++ (exit -6 of a finished run). A rank's process must
    end after its teardown without finalizing the interpreter with those threads."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    seen = tmp_path / "seen"
    seen.mkdir()
    out = tmp_path / "run"
    args = _args(tiny_train, out, "--batch-size", "8", "--epochs", "1", "--max-steps", "3")
    extra = {"PYTHONPATH": str(probe), "PROBE_OUT": str(seen)}
    check(run_train(args, torchrun=["--standalone", "--nproc-per-node", "2"], env=env(**extra)))
    assert events(out, "summary")[0]["step"] == 3
    finalized = {p.name: p.read_text().split() for p in seen.iterdir()}
    with_gloo = {pid: names for pid, names in finalized.items() if any("gloo" in n for n in names)}
    assert not with_gloo, f"ranks finalized with gloo threads alive: {with_gloo}"
