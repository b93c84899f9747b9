"""The trainer as users run it (one process): outputs, evaluation CLI, resume, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from traintest_helpers import audit_steps, check, env, events, final_weights, run_train


def _args(train, out, *extra):
    return ["--data", train, "--backend", "torch", "--num-workers", "0", "--out", out,
            "--batch-size", "20", "--lr", "0.05", "--log-every-steps", "2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_train, tiny_val, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = check(
        run_train(
            _args(tiny_train, out, "--val-data", tiny_val, "--epochs", "2", "--ema-decay", "0.9")
        )
    )
    return out, proc


def test_run_outputs(finished_run, tiny_val):
    out, proc = finished_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 4 and cfg["data"]["image_size"] == 32  # resolved values
    start = events(out, "start")[0]
    assert start["environment"]["torch"] == torch.__version__ and "git_sha" in start["environment"]
    assert start["steps_per_epoch"] == 5 and start["total_steps"] == 10
    # the loader's own choices where the config left them to it (CPU defaults here)
    assert start["loader"]["prefetch"] == 2 and start["loader"]["read_ahead"] == 2
    train_rows = events(out, "train")
    assert [r["step"] for r in train_rows] == [2, 4, 5, 6, 8, 10]
    for r in train_rows:
        assert {
            "loss",
            "lr",
            "img_per_s",
            "img_per_s_per_rank",
            "data_wait_frac",
            "peak_mem_mb",
        } <= set(r)
        assert 0 <= r["data_wait_frac"] <= 1
    epochs = events(out, "epoch")
    assert [
        (e["samples_seen"], e["repeated"], e["corrupt"], e["read_retries"]) for e in epochs
    ] == [(100, 0, 0, 0)] * 2
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [5, 10]
    assert all(e["samples"] == 40 and "ema_top1" in e for e in evals)
    summary = events(out, "summary")[0]
    assert summary["step"] == 10 and summary["top1"] == evals[-1]["top1"]
    assert "train: done: 10 steps" in proc.stdout
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000000005.pt", "step-000000010.pt"]


def test_evaluate_cli_matches_training_eval(finished_run, tiny_val):
    out, _ = finished_run
    ckpt = out / "checkpoints" / "step-000000010.pt"
    args = [
        "--checkpoint",
        ckpt,
        "--data",
        tiny_val,
        "--backend",
        "torch",
        "--num-workers",
        "0",
        "--batch-size",
        "16",
    ]
    proc = check(run_train(args, module="train.evaluate"))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    last = events(out, "eval")[-1]
    assert result["samples"] == 40 and result["step"] == 10
    assert result["top1"] == pytest.approx(last["top1"]) and result["loss"] == pytest.approx(
        last["loss"], rel=1e-4
    )
    ema = json.loads(
        check(run_train([*args, "--ema"], module="train.evaluate")).stdout.strip().splitlines()[-1]
    )
    assert ema["top1"] == pytest.approx(last["ema_top1"])


def test_resume_auto_of_a_finished_run_does_nothing(finished_run, tiny_train, tiny_val):
    out, _ = finished_run
    proc = check(run_train(_args(tiny_train, out, "--val-data", tiny_val, "--epochs", "2", "--ema-decay", "0.9",
                                 "--resume", "auto")))  # fmt: skip
    assert "resumed from" in proc.stdout and "train: done: 10 steps" in proc.stdout


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("dali-cpu", marks=pytest.mark.dali)],
)
def test_killed_run_resumes_exactly(tiny_train, tmp_path, backend):
    """One process: SIGKILL after step 7 (checkpoint at 6), resume, compare with an unbroken run."""
    common = ["--epochs", "2", "--ckpt-every-steps", "3", "--audit-keys", "--deterministic",
              "--backend", backend, "--num-workers", "1" if backend == "dali-cpu" else "0"]  # fmt: skip
    ref = tmp_path / "ref"
    check(run_train(_args(tiny_train, ref, *common)))
    cut = tmp_path / "cut"
    killed = run_train(_args(tiny_train, cut, *common), env=env(SHARDFLOW_FAULT_KILL="0:7"))
    assert killed.returncode == -9
    assert max(audit_steps(cut, 0)) == 7
    # torchrun sets this on a restart; here the test plays torchrun.
    check(run_train(_args(tiny_train, cut, *common, "--resume", "auto"),
                    env=env(TORCHELASTIC_RESTART_COUNT="1", SHARDFLOW_FAULT_KILL="0:7")))  # fmt: skip
    assert audit_steps(cut, 0) == audit_steps(ref, 0)
    if backend == "dali-cpu":
        # The DALI backend seeds its augmentation from the step an iteration starts at,
        # so a mid-epoch resume sees the same samples with other random crops/flips:
        # weights are not bit-identical to the unbroken run's (the torch backend's are).
        return
    a, b = final_weights(ref), final_weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _format_1(state: dict) -> dict:
    """The checkpoint as the format-1 trainer wrote it: the same parts, but step, epoch and
    step_in_epoch at the top instead of a progress part."""
    old = {k: v for k, v in state.items() if k != "progress"}
    old.update(state["progress"])
    old["format"] = 1
    return old


def test_a_format_1_checkpoint_resumes_exactly(tiny_train, tmp_path):
    """A run resumed from a checkpoint in the earlier format ends bit-identical to the
    unbroken run, like one resumed from today's."""
    from train import checkpoint

    common = ["--epochs", "2", "--ckpt-every-steps", "3", "--keep-checkpoints", "9",
              "--audit-keys", "--deterministic"]  # fmt: skip
    ref = tmp_path / "ref"
    check(run_train(_args(tiny_train, ref, *common)))
    saved = torch.load(ref / "checkpoints" / "step-000000006.pt", weights_only=True)
    assert saved["format"] == checkpoint.FORMAT == 2 and saved["progress"]["step"] == 6
    old_run = tmp_path / "old"
    (old_run / "checkpoints").mkdir(parents=True)
    torch.save(_format_1(saved), old_run / "checkpoints" / "step-000000006.pt")
    assert checkpoint.upgrade(_format_1(saved)).keys() == saved.keys()
    proc = check(run_train(_args(tiny_train, old_run, *common, "--resume", "auto")))
    assert "resumed from" in proc.stdout and "step 6" in proc.stdout
    assert {s: k for s, k in audit_steps(old_run, 0).items() if s > 6} == {
        s: k for s, k in audit_steps(ref, 0).items() if s > 6
    }
    a, b = final_weights(ref), final_weights(old_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _one_error_line(proc, *, rc=1):
    assert proc.returncode == rc, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_bad_input_in_a_real_process(tmp_path):
    line = _one_error_line(run_train(_args(tmp_path / "no-such-dataset", tmp_path / "r1")))
    assert line.startswith("train: error: no manifest.json under")
    line = _one_error_line(run_train(["--bogus"]), rc=2)
    assert line == "train: error: unrecognized arguments: --bogus (see --help)"


def _in_process(main, argv, capsys, *, rc=1):
    assert main([str(a) for a in argv]) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# @record installs a fault handler on stderr's fd, which pytest's capture does not have.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_bad_input_is_one_clear_line(
    tiny_train, tiny_val, three_class, other_four, finished_run, tmp_path, capsys
):
    from train.__main__ import main
    from train.evaluate import main as evaluate_main

    out, _ = finished_run
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00 not a checkpoint")
    line = _in_process(main, _args(tiny_train, tmp_path / "r2", "--resume", junk), capsys)
    assert line.startswith("train: error: checkpoint") and "is unreadable" in line
    line = _in_process(evaluate_main, ["--checkpoint", junk, "--data", tiny_train], capsys)
    assert "is unreadable" in line

    ckpt = out / "checkpoints" / "step-000000010.pt"
    line = _in_process(main, _args(three_class, tmp_path / "r3", "--resume", ckpt), capsys)
    assert "trained for 4 classes but the data has 3" in line
    line = _in_process(evaluate_main, ["--checkpoint", ckpt, "--data", three_class], capsys)
    assert "has 4 classes but" in line and "has 3" in line

    line = _in_process(main, _args(tiny_train, tmp_path / "r4", "--num-classes", "5"), capsys)
    assert "--num-classes 5 disagrees with the 4 classes" in line
    line = _in_process(
        main, _args(tiny_train, tmp_path / "r5", "--batch-size", "7", "--grad-accum", "2"), capsys
    )
    assert "not divisible" in line
    line = _in_process(main, _args(tiny_train, tmp_path / "r6", "--val-data", three_class), capsys)
    assert "has 3 classes but the training data" in line
    line = _in_process(main, _args(tiny_train, tmp_path / "r6b", "--val-data", other_four), capsys)
    assert "label classes differently (class00, class01, class02...)" in line
    line = _in_process(evaluate_main, ["--checkpoint", ckpt, "--data", other_four], capsys)
    assert "label classes differently" in line
    line = _in_process(main, _args(tiny_train, tmp_path / "r7", "--backend", "dali-gpu"), capsys)
    assert "needs a GPU" in line
    missing = tmp_path / "missing-shard"
    shutil.copytree(tiny_val, missing)
    (missing / "shard-000001.tar").unlink()
    line = _in_process(
        evaluate_main,
        ["--checkpoint", ckpt, "--data", missing, "--backend", "torch", "--num-workers", "0"],
        capsys,
    )
    assert "cannot read shard shard-000001.tar" in line
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in _args(tiny_train, tmp_path / "r8", "--optimizer", "lamb")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("train: error: argument --optimizer: invalid choice")
