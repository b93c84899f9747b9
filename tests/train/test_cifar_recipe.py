"""The CPU goal: CIFAR-10, seed_cnn, 2 ranks, dali-cpu, >= 60% test accuracy (recipe file)."""

from __future__ import annotations

import time

import pytest
from traintest_helpers import REPO, check, events, run_train

from shard_tools.pack import PackConfig, pack


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.dali
@pytest.mark.timeout(1500)
def test_cifar10_seed_cnn_recipe(cifar_root, tmp_path):
    data = {}
    for split in ("train", "test"):
        dest = tmp_path / split
        # Shuffled packing: CIFAR's folders are class-sorted, and the loader's shard
        # shuffle + sample buffer cannot mix 5,000-image single-class shards.
        pack(PackConfig(src=str(cifar_root / split), dest=str(dest), max_count=5000, shuffle=True, seed=0,
                        workers=2), progress=False)  # fmt: skip
        data[split] = dest
    out = tmp_path / "run"
    t0 = time.perf_counter()
    check(
        run_train(
            [
                "--config",
                REPO / "train" / "recipes" / "cifar_seed_cnn.toml",
                "--data",
                data["train"],
                "--val-data",
                data["test"],
                "--out",
                out,
            ],
            torchrun=["--standalone", "--nproc-per-node", "2"],
            timeout=1400,
        )  # fmt: skip
    )
    wall_s = time.perf_counter() - t0
    curve = [(e["epoch"], round(100 * e["top1"], 2)) for e in events(out, "eval")]
    print(f"\nCIFAR-10 seed_cnn dali-cpu x2: {wall_s:.0f} s wall; top-1 by epoch {curve}")
    assert len(curve) == 8 and all(e["samples"] == 10_000 for e in events(out, "eval"))
    assert events(out, "summary")[0]["top1"] >= 0.60
