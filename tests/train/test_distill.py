"""Knowledge distillation: the loss against a hand computation, and a run with a teacher."""

from __future__ import annotations

import math

import pytest
import torch

from train.__main__ import main
from train.distill import kd_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([0])
    alpha, temp = 0.25, 2.0
    # By hand: CE = -log softmax(s)[0] = log(1 + e^-2).
    ce = math.log(1 + math.exp(-2))
    # Softened: student s/T = (1, 0), teacher t/T = (0, 1).
    ps = [math.e / (math.e + 1), 1 / (math.e + 1)]
    pt = [1 / (math.e + 1), math.e / (math.e + 1)]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    expected = (1 - alpha) * ce + alpha * temp**2 * kl
    got = kd_loss(s, t, labels, alpha=alpha, temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Here KL = (pt1 - pt0) * ln(pt1 / pt0) = tanh(1/2) = 0.462117, CE = 0.126928.
    assert expected == pytest.approx(0.75 * 0.126928 + 0.25 * 4 * 0.462117, rel=1e-5)


def test_kd_loss_edges():
    s = torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.3, 0.2]])
    labels = torch.tensor([2, 1])
    ce = torch.nn.functional.cross_entropy(s, labels)
    assert kd_loss(
        s, torch.randn(2, 3), labels, alpha=0.0, temperature=3.0
    ).item() == pytest.approx(ce.item())
    # A teacher equal to the student adds nothing.
    assert kd_loss(s, s.clone(), labels, alpha=1.0, temperature=3.0).item() == pytest.approx(
        0.0, abs=1e-6
    )


def _train(tmp_path, data, out, *extra) -> int:
    return main(["--data", str(data), "--backend", "torch", "--num-workers", "0",
                 "--epochs", "1", "--batch-size", "20", "--out", str(tmp_path / out),
                 "--log-every-steps", "100", *map(str, extra)])  # fmt: skip


def test_training_with_a_teacher(tmp_path, tiny_train, three_class, capsys):
    assert _train(tmp_path, tiny_train, "teacher", "--model", "cifar_fast") == 0
    teacher = sorted((tmp_path / "teacher" / "checkpoints").glob("step-*.pt"))[-1]
    assert _train(tmp_path, tiny_train, "student", "--teacher", teacher, "--kd-alpha", 0.7) == 0
    assert (tmp_path / "student" / "checkpoints").exists()
    # A teacher for another class count is refused in one line.
    capsys.readouterr()
    assert _train(tmp_path, three_class, "bad", "--teacher", teacher) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicts 4 classes" in err[0]
