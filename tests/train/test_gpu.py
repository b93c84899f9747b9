"""GPU paths (skipped without CUDA): bf16 autocast, nccl, the fast CIFAR net."""

from __future__ import annotations

import pytest
from traintest_helpers import check, events, run_train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("extra", [[], ["--compile"]], ids=["eager", "compile"])
def test_cifar_fast_bf16_on_gpu(tmp_path, extra):
    out = tmp_path / "run"
    check(run_train(["--backend", "synthetic", "--num-classes", "10", "--model", "cifar_fast",
                     "--batch-size", "512", "--synthetic-samples", "10240", "--epochs", "1",
                     "--out", out, "--log-every-steps", "5", *extra]))  # fmt: skip
    start = events(out, "start")[0]
    assert start["environment"]["device"].startswith("cuda")
    rows = events(out, "train")
    assert rows[-1]["step"] == 20 and rows[-1]["peak_mem_mb"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.multiproc
def test_nccl_two_ranks_on_one_gpu_or_more(tmp_path):
    import torch

    n = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    check(run_train(["--backend", "synthetic", "--num-classes", "10", "--model", "resnet18", "--cifar-stem",
                     "--batch-size", "128", "--synthetic-samples", "1280", "--epochs", "1", "--out", out],
                    torchrun=["--standalone", "--nproc-per-node", str(n)]))  # fmt: skip
    assert events(out, "start")[0]["environment"]["dist_backend"] == ("nccl" if n > 1 else "none")
