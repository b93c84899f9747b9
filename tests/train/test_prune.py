"""Pruning: global magnitude masks through fine-tuning and resume; structured channels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from traintest_helpers import REPO, env

from train import prune
from train.__main__ import main
from train.models import build_model
from train.transfer import model_from_checkpoint


def _train(tmp_path, data, out, *extra) -> int:
    return main(["--data", str(data), "--backend", "torch", "--num-workers", "0",
                 "--batch-size", "20", "--out", str(tmp_path / out),
                 "--log-every-steps", "100", *map(str, extra)])  # fmt: skip


def _ckpts(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*.pt"))


def _prune_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.prune", *map(str, args)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_train):
    root = tmp_path_factory.mktemp("trained")
    assert _train(root, tiny_train, "run", "--epochs", "1") == 0
    return _ckpts(root / "run")[-1]


def test_global_magnitude_masks_hit_the_sparsity():
    model = build_model("seed_cnn", 10)
    params = prune.prunable(model, "seed_cnn", include_head=False)
    assert "fc3.weight" not in params and "conv1.weight" in params
    masks = prune.global_magnitude_masks(params, 0.5)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept / total - 0.5) < 0.01


def test_masks_survive_fine_tuning_and_resume(tmp_path, trained, tiny_train):
    pruned = tmp_path / "pruned.pt"
    r = _prune_cli("--checkpoint", trained, "--method", "global-magnitude", "--sparsity", "0.5",
                   "--out", pruned, "--bench-seconds", "0", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    masks = torch.load(pruned, weights_only=True)["masks"]
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}

    def zeros_kept(sd):
        for k, m in masks.items():
            assert torch.count_nonzero(sd[k][~m]) == 0, k
            assert torch.count_nonzero(sd[k][m]) > 0.9 * int(m.sum()), k

    run = tmp_path / "ft"
    args = ["--init-from", pruned, "--keep-masks", "--epochs", "2", "--max-steps", "7",
            "--ckpt-every-steps", "2"]  # fmt: skip
    assert _train(tmp_path, tiny_train, "ft", *args) == 0
    saved = torch.load(_ckpts(run)[-1], weights_only=True)
    assert saved["progress"]["step"] == 7  # checkpoint format 2: the progress part
    zeros_kept(saved["model"])
    assert set(saved["masks"]) == set(masks)
    for k in masks:
        assert torch.equal(saved["masks"][k], masks[k])
    # Resume from a mid-run checkpoint: the masks come back and keep holding.
    for c in _ckpts(run)[-2:]:
        c.unlink()
    assert _train(tmp_path, tiny_train, "ft", *args, "--resume", "auto", "--epochs", "3",
                  "--max-steps", "10") == 0  # fmt: skip
    resumed = torch.load(_ckpts(run)[-1], weights_only=True)
    assert resumed["progress"]["step"] == 10
    zeros_kept(resumed["model"])
    # Without --keep-masks the pruned weights grow back.
    assert _train(tmp_path, tiny_train, "free", "--init-from", pruned, "--max-steps", "3") == 0
    free = torch.load(_ckpts(tmp_path / "free")[-1], weights_only=True)["model"]
    assert torch.count_nonzero(free["fc1.weight"][~masks["fc1.weight"]]) > 0


def test_structured_pruning_makes_a_smaller_working_model(tmp_path, trained, tiny_train):
    out = tmp_path / "slim.pt"
    r = _prune_cli("--checkpoint", trained, "--method", "structured-channels", "--sparsity", "0.3",
                   "--out", out, "--bench-seconds", "0.2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    for side in ("before", "after"):
        assert {"params", "nonzero", "macs", "cpu_img_per_s"} <= set(summary[side])
    assert summary["widths"] == [4, 11]
    assert summary["after"]["params"] < summary["before"]["params"]
    assert summary["after"]["macs"] < summary["before"]["macs"]
    state = torch.load(out, weights_only=True)
    slim = model_from_checkpoint(state, str(out))
    assert slim.conv1.out_channels == 4 and slim.conv2.out_channels == 11
    x = torch.randn(5, 3, 32, 32)
    assert slim(x).shape == (5, 4)
    # The slim net computes what the dense net does with the dropped filters zeroed.
    dense = model_from_checkpoint(torch.load(trained, weights_only=True), str(trained))
    with torch.no_grad():
        for conv, kept in ((dense.conv1, slim.conv1), (dense.conv2, slim.conv2)):
            keep = {int((conv.bias == b).nonzero()[0]) for b in kept.bias}
            for k in set(range(conv.out_channels)) - keep:
                conv.weight[k] = 0
                conv.bias[k] = 0
        torch.testing.assert_close(slim(x), dense.eval()(x), rtol=1e-5, atol=1e-5)
    # The trainer rebuilds and fine-tunes the smaller architecture from the stored widths.
    assert _train(tmp_path, tiny_train, "slimft", "--init-from", out, "--max-steps", "2") == 0
    saved = torch.load(_ckpts(tmp_path / "slimft")[-1], weights_only=True)
    assert saved["meta"]["widths"] == [4, 11]
    assert saved["model"]["conv2.weight"].shape == (11, 4, 5, 5)
    # python -m train.evaluate rebuilds the slim architecture too.
    from train import evaluate

    result = evaluate.run(
        evaluate._parse(["--checkpoint", str(_ckpts(tmp_path / "slimft")[-1]),
                         "--data", str(tiny_train), "--backend", "torch", "--num-workers", "0",
                         "--batch-size", "20", "--device", "cpu"])
    )  # fmt: skip
    assert result["samples"] > 0 and 0.0 <= result["top1"] <= 1.0


def test_prune_cli_errors_are_one_line(tmp_path, trained):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    cases = [
        ("--checkpoint", bad, "--method", "global-magnitude", "--sparsity", "0.5"),
        (
            "--checkpoint",
            tmp_path / "missing.pt",
            "--method",
            "global-magnitude",
            "--sparsity",
            "0.5",
        ),
        ("--checkpoint", trained, "--method", "global-magnitude", "--sparsity", "1.5"),
    ]
    for args in cases:
        r = _prune_cli(*args, "--out", tmp_path / "x.pt", "--bench-seconds", "0")
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prune: error:"), lines


def test_structured_cifar_fast_is_the_dense_net_minus_its_weakest_channels(tmp_path, tiny_train):
    assert _train(tmp_path, tiny_train, "fast", "--model", "cifar_fast_s", "--max-steps", "2") == 0
    src = _ckpts(tmp_path / "fast")[-1]
    out = tmp_path / "slim.pt"
    r = _prune_cli("--checkpoint", src, "--method", "structured-channels", "--sparsity", "0.3",
                   "--out", out, "--bench-seconds", "0.1", "--bench-repeats", "1", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    # cifar_fast_s convs are 32, 32, 64, 64, 128, 128 wide: each loses round(30%).
    assert summary["widths"] == [22, 22, 45, 45, 90, 90]
    assert summary["after"]["macs"] < 0.6 * summary["before"]["macs"]
    slim = model_from_checkpoint(torch.load(out, weights_only=True), str(out)).eval()
    dense = model_from_checkpoint(torch.load(src, weights_only=True), str(src)).eval()
    # Zero a dropped channel's filter and its batch norm's scale and shift: GELU(0) = 0,
    # so nothing downstream sees it. That dense net must compute what the slim one does.
    with torch.no_grad():
        for d_group, s_group in zip(dense.layers, slim.layers, strict=True):
            for conv_i, bn_i in ((0, 2), (4, 5)):
                d_bn, s_bn = d_group[bn_i], s_group[bn_i]
                kept = {int((d_bn.running_mean == v).nonzero()[0]) for v in s_bn.running_mean}
                assert len(kept) == s_bn.num_features
                for k in set(range(d_bn.num_features)) - kept:
                    d_group[conv_i].weight[k] = 0
                    d_bn.weight[k] = 0
                    d_bn.bias[k] = 0
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(slim(x), dense(x), rtol=1e-4, atol=1e-5)
    # Fine-tuning rebuilds the slim net from the stored widths and keeps them.
    assert _train(tmp_path, tiny_train, "slimft", "--model", "cifar_fast_s", "--init-from", out,
                  "--max-steps", "1") == 0  # fmt: skip
    saved = torch.load(_ckpts(tmp_path / "slimft")[-1], weights_only=True)
    assert saved["meta"]["widths"] == [22, 22, 45, 45, 90, 90]
    assert saved["model"]["layers.1.4.weight"].shape == (45, 45, 3, 3)
    # A second structured pass over a pruned checkpoint is refused, not compounded.
    r = _prune_cli("--checkpoint", out, "--method", "structured-channels", "--sparsity", "0.3",
                   "--out", tmp_path / "x.pt", "--bench-seconds", "0")  # fmt: skip
    assert r.returncode == 1 and "channel-pruned already" in r.stderr


def test_structured_refuses_other_models(tmp_path, tiny_train):
    from train.checkpoint import CheckpointError

    with pytest.raises(ValueError, match="residual"):
        payload = {"meta": {"model": "resnet18", "num_classes": 3, "cifar_stem": True},
                   "model": build_model("resnet18", 3, cifar_stem=True).state_dict()}  # fmt: skip
        torch.save(payload, tmp_path / "r.pt")
        prune.prune_checkpoint(str(tmp_path / "r.pt"), method="structured-channels", sparsity=0.3)
    with pytest.raises(CheckpointError, match="6 positive ints"):
        prune.build_slim("cifar_fast_s", 10, [4, 11])
