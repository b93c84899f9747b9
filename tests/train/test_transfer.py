"""Transfer learning: head replacement, frozen backbone, backbone lr, incompatible sources."""

from __future__ import annotations

import pytest
import torch

from train import transfer
from train.__main__ import main
from train.checkpoint import CheckpointError
from train.models import build_model


def _train(tmp_path, data, out, *extra) -> int:
    return main(["--data", str(data), "--backend", "torch", "--num-workers", "0",
                 "--epochs", "1", "--batch-size", "20", "--out", str(tmp_path / out),
                 "--log-every-steps", "100", *map(str, extra)])  # fmt: skip


def _final(run_dir) -> dict:
    ckpt = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_train):
    """A seed_cnn trained one epoch on the 4-class data."""
    root = tmp_path_factory.mktemp("src")
    assert _train(root, tiny_train, "src") == 0
    return sorted((root / "src" / "checkpoints").glob("step-*.pt"))[-1]


def test_head_replaced_on_class_count_change(source):
    src = transfer.read_source(str(source), "seed_cnn")
    model = build_model("seed_cnn", 3)
    head_before = model.fc3.weight.clone()
    assert transfer.load_backbone(model, "seed_cnn", src) is False
    assert model.fc3.out_features == 3 and torch.equal(model.fc3.weight, head_before)
    assert torch.equal(model.conv1.weight, src.weights["conv1.weight"])
    same = build_model("seed_cnn", 4)
    assert transfer.load_backbone(same, "seed_cnn", src) is True
    assert torch.equal(same.fc3.weight, src.weights["fc3.weight"])


def test_features_mode_trains_only_the_classifier(tmp_path, source, three_class):
    assert (
        _train(tmp_path, three_class, "feat", "--init-from", source, "--transfer", "features") == 0
    )
    src = torch.load(source, weights_only=True)["model"]
    out = _final(tmp_path / "feat")
    assert out["meta"]["num_classes"] == 3
    for k, v in out["model"].items():
        if k.startswith("fc3."):
            assert v.shape[0] == 3
        elif k.startswith(("fc1.", "fc2.")):  # seed_cnn's classifier starts from the source
            assert v.shape == src[k].shape and not torch.equal(v, src[k]), k
        else:
            assert torch.equal(v, src[k]), k


def test_features_mode_keeps_bn_statistics(tmp_path, tiny_train, three_class):
    assert _train(tmp_path, tiny_train, "fast", "--model", "cifar_fast", "--max-steps", "2") == 0
    src_url = sorted((tmp_path / "fast" / "checkpoints").glob("step-*.pt"))[-1]
    args = [
        "--model",
        "cifar_fast",
        "--init-from",
        src_url,
        "--transfer",
        "features",
        "--max-steps",
        "2",
    ]
    assert _train(tmp_path, three_class, "feat", *args) == 0
    src = torch.load(src_url, weights_only=True)["model"]
    out = _final(tmp_path / "feat")["model"]
    for k, v in out.items():
        if not k.startswith("fc."):
            assert torch.equal(v, src[k]), k  # includes running_mean/var
    assert not torch.equal(out["fc.weight"], torch.zeros_like(out["fc.weight"]))


def test_finetune_scales_backbone_lr(source):
    model = build_model("seed_cnn", 3)
    transfer.load_backbone(model, "seed_cnn", transfer.read_source(str(source), "seed_cnn"))
    plan = transfer.prepare(model, "seed_cnn", "finetune", 0.1)
    from train.config import OptimConfig
    from train.optim import build_optimizer, param_groups

    opt = build_optimizer(
        param_groups(model, 5e-4, lr_mult_of=plan.lr_mult_of), OptimConfig(lr=0.2)
    )
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.fc3.weight)] == pytest.approx(0.2)
    assert lr_of[id(model.fc1.weight)] == pytest.approx(0.2)  # seed_cnn's classifier
    assert lr_of[id(model.conv1.weight)] == pytest.approx(0.02)
    assert len(lr_of) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("mode", ["features", "finetune"])
def test_head_lr_mult_scales_the_classifier(source, mode):
    from train.config import OptimConfig
    from train.optim import build_optimizer, param_groups

    model = build_model("seed_cnn", 3)
    transfer.load_backbone(model, "seed_cnn", transfer.read_source(str(source), "seed_cnn"))
    plan = transfer.prepare(model, "seed_cnn", mode, 0.1, head_lr_mult=10)
    opt = build_optimizer(
        param_groups(model, 5e-4, lr_mult_of=plan.lr_mult_of), OptimConfig(lr=0.2)
    )
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for layer in (model.fc1, model.fc2, model.fc3):
        assert lr_of[id(layer.weight)] == pytest.approx(2.0)
    if mode == "features":  # the convs are frozen: not in the optimizer at all
        assert id(model.conv1.weight) not in lr_of and not model.conv1.weight.requires_grad
    else:
        assert lr_of[id(model.conv1.weight)] == pytest.approx(0.02)


def test_finetune_run_changes_backbone(tmp_path, source, three_class):
    args = ["--init-from", source, "--transfer", "finetune", "--backbone-lr-mult", "0.5"]
    assert _train(tmp_path, three_class, "ft", *args) == 0
    src = torch.load(source, weights_only=True)["model"]
    assert not torch.equal(_final(tmp_path / "ft")["model"]["conv1.weight"], src["conv1.weight"])


def test_plain_state_dict_and_incompatible_sources(tmp_path, source, three_class, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(build_model("seed_cnn", 10).state_dict(), plain)
    assert _train(tmp_path, three_class, "plain", "--init-from", plain) == 0
    bad = {
        "arch": ("--model", "cifar_fast", "--init-from", source),
        "shape": ("--model", "resnet18", "--cifar-stem", "--init-from", plain),
        "unreadable": ("--init-from", tmp_path / "plain.txt"),
    }
    (tmp_path / "plain.txt").write_text("not a checkpoint")
    for name, args in bad.items():
        capsys.readouterr()
        assert _train(tmp_path, three_class, name, *args) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train: error:"), (name, err)
    with pytest.raises(CheckpointError, match="does not fit"):
        transfer.load_backbone(
            build_model("cifar_fast", 3),
            "cifar_fast",
            transfer.read_source(str(plain), "cifar_fast"),
        )
