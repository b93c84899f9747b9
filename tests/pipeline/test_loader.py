"""The public loader API on shards packed by the real writer, for every backend."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline import Batch, LoaderConfig, World, build_loader
from shard_tools.format import tar_samples

BATCH = 7  # 120 samples: 18 steps, 6 pad repeats on one rank

BACKENDS = {
    "torch": dict(backend="torch", num_workers=0),
    "dali-cpu": dict(backend="dali-cpu"),
    "device-cache": dict(backend="torch", cache="device"),
    "synthetic": dict(backend="synthetic"),
}
READING = ["torch", "dali-cpu", "device-cache"]


def _marks(name):
    return [pytest.mark.dali] if name == "dali-cpu" else []


def _params(names):
    return [pytest.param(n, marks=_marks(n)) for n in names]


def cfg_for(name: str, data: str, **kw) -> LoaderConfig:
    base = dict(
        data=data, batch_size=BATCH, image_size=32, recipe="small", seed=11, shuffle_buffer=20
    )
    return LoaderConfig(**{**base, **BACKENDS[name], **kw})


def all_keys(root: str) -> set[str]:
    return {s.key for p in Path(root).glob("shard-*.tar") for s in tar_samples(p.read_bytes())}


@pytest.mark.parametrize("name", _params(BACKENDS))
def test_epoch_api(name, small_ds):
    loader = build_loader(cfg_for(name, small_ds), World())
    assert len(loader) == 18
    batches = list(loader)
    assert len(batches) == 18
    for b in batches:
        assert isinstance(b, Batch) and len(b) == BATCH
        assert b.images.shape == (BATCH, 3, 32, 32) and b.images.dtype == torch.float32
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == torch.int64 and b.labels.shape == (BATCH,)
        assert int(b.labels.min()) >= 0 and int(b.labels.max()) < 4
        assert torch.isfinite(b.images).all()
    report = loader.epoch_report()
    assert report.steps == 18 and report.repeated == 6 and report.corrupt == ()
    if name != "synthetic":
        assert set(report.keys) == all_keys(small_ds)
    assert len(loader) == 18  # a finished epoch replays in full
    loader.close()


@pytest.mark.parametrize("name", _params(READING))
def test_every_backend_yields_the_same_keys(name, small_ds):
    ref = build_loader(cfg_for("torch", small_ds), World())
    ref.set_epoch(1)
    loader = build_loader(cfg_for(name, small_ds), World())
    loader.set_epoch(1)
    assert [b.keys for b in loader] == [b.keys for b in ref]
    assert [b.labels.tolist() for b in loader] == [b.labels.tolist() for b in ref]


def test_labels_follow_the_keys(small_ds):
    # The synthetic source names its images by class folder; the manifest maps them to labels.
    loader = build_loader(cfg_for("torch", small_ds), World())
    per_key = {}
    for b in loader:
        for k, lab in zip(b.keys, b.labels.tolist(), strict=True):
            assert per_key.setdefault(k, lab) == lab
    assert Counter(per_key.values()) == {0: 30, 1: 30, 2: 30, 3: 30}


@pytest.mark.parametrize("policy", ["pad", "drop"])
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_split_the_epoch(small_ds, policy, world_size):
    seen: Counter = Counter()
    lens, repeated = set(), 0
    for r in range(world_size):
        loader = build_loader(
            cfg_for("torch", small_ds, remainder=policy, batch_size=5),
            World(rank=r, world_size=world_size),
        )
        lens.add(len(loader))
        for b in loader:
            seen.update(b.keys)
        rep = loader.epoch_report()
        repeated += rep.repeated
        dropped = rep.dropped
    assert len(lens) == 1
    steps = lens.pop()
    assert sum(seen.values()) == steps * 5 * world_size
    if policy == "pad":
        assert set(seen) == all_keys(small_ds)
        assert sum(seen.values()) - len(seen) == repeated
    else:
        assert max(seen.values()) == 1 and repeated == 0
        assert len(seen) + dropped == 120


def test_same_seed_same_keys_other_seed_differs(small_ds):
    a = [b.keys for b in build_loader(cfg_for("torch", small_ds), World())]
    b = [b.keys for b in build_loader(cfg_for("torch", small_ds), World())]
    c = [b.keys for b in build_loader(cfg_for("torch", small_ds, seed=12), World())]
    assert a == b and a != c


@pytest.mark.parametrize("name", _params(BACKENDS))
def test_resume_equality(name, small_ds):
    cfg = cfg_for(name, small_ds)
    full = build_loader(cfg, World())
    full.set_epoch(3)
    expected = list(full)
    first = build_loader(cfg, World())
    first.set_epoch(3)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    first.close()
    resumed = build_loader(cfg, World())
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert len(resumed) == 13 and resumed.step == 5
    tail = list(resumed)
    got = head + tail
    assert [b.keys for b in got] == [b.keys for b in expected]
    if name in ("torch", "device-cache"):  # torch RNGs are seeded per step: same pixels too
        for x, y in zip(got, expected, strict=True):
            assert torch.equal(x.images, y.images)


def test_torch_workers_give_the_same_images(small_ds):
    inline = list(build_loader(cfg_for("torch", small_ds), World()))
    pooled = build_loader(cfg_for("torch", small_ds, num_workers=2), World())
    try:
        for x, y in zip(inline, pooled, strict=True):
            assert x.keys == y.keys and torch.equal(x.images, y.images)
    finally:
        pooled.close()


@pytest.mark.parametrize("name", _params(READING))
def test_loading_leaves_the_global_rng_alone(name, small_ds):
    """Decoding in the training process (num_workers=0) draws augmentation from the batch's
    own seed, never by reseeding torch's global RNG (the trainer's dropout stream)."""
    cfg = cfg_for(name, small_ds)  # pad + random crop + flip: random draws every batch
    torch.manual_seed(1234)
    with build_loader(cfg, World()) as loader:
        before = torch.get_rng_state()
        first = [b.images.clone() for b in loader]
        assert torch.equal(torch.get_rng_state(), before)
        torch.manual_seed(99)  # whatever the caller does with the global RNG meanwhile
        loader.set_epoch(1)
        loader.set_epoch(0)
        again = [b.images for b in loader]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


@pytest.mark.parametrize("policy", ["pad", "drop"])
def test_elastic_resume_4_to_3(small_ds, policy):
    cfg = cfg_for("torch", small_ds, batch_size=4, remainder=policy)
    seen: Counter = Counter()
    repeated = dropped = 0
    old = [build_loader(cfg, World(rank=r, world_size=4)) for r in range(4)]
    states = []
    for loader in old:
        loader.set_epoch(2)
        it = iter(loader)
        for _ in range(3):
            seen.update(next(it).keys)
        states.append(loader.state_dict())
        repeated += loader.epoch_report().repeated
    assert all(s == states[0] for s in states)  # the state is rank-independent
    new = [build_loader(cfg, World(rank=r, world_size=3)) for r in range(3)]
    lens = set()
    for loader in new:
        loader.load_state_dict(states[0])
        lens.add(len(loader))
        for b in loader:
            seen.update(b.keys)
        report = loader.epoch_report()
        repeated += report.repeated
        dropped = report.dropped
    assert len(lens) == 1
    if policy == "pad":
        assert set(seen) == all_keys(small_ds)
        assert sum(seen.values()) - len(seen) == repeated
    else:
        assert max(seen.values()) == 1
        assert len(seen) == 120 - dropped  # the report counts the drops of both splits


@pytest.mark.parametrize("name", _params(READING))
def test_corrupt_samples_are_skipped_and_counted(name, corrupt_ds):
    root, bad = corrupt_ds
    loader = build_loader(cfg_for(name, root), World())
    batches = list(loader)
    assert len(batches) == 18
    report = loader.epoch_report()
    assert set(report.corrupt) == bad
    assert not bad & set(report.keys)
    assert set(report.keys) | bad == all_keys(root)
    assert all(torch.isfinite(b.images).all() for b in batches)


def test_shards_without_index_read_the_same(small_ds, noidx_ds):
    a = build_loader(cfg_for("torch", small_ds), World(rank=1, world_size=3))
    b = build_loader(cfg_for("torch", noidx_ds), World(rank=1, world_size=3))
    assert [x.keys for x in a] == [x.keys for x in b]
    it = iter(a)
    for _ in range(2):
        next(it)
    b.load_state_dict(a.state_dict())
    c = build_loader(cfg_for("torch", small_ds), World(rank=1, world_size=3))
    c.load_state_dict(a.state_dict())
    assert [x.keys for x in b] == [x.keys for x in c]


def test_eval_order_is_pack_order(small_ds):
    loader = build_loader(
        cfg_for("torch", small_ds, train=False, remainder="drop", batch_size=10), World()
    )
    keys = [k for b in loader for k in b.keys]
    assert keys == sorted(keys) and len(keys) == 120


@pytest.mark.s3
@pytest.mark.parametrize("name", _params(BACKENDS))
def test_reads_from_s3_like_local(name, s3_ds, small_ds):
    url, options = s3_ds
    remote = build_loader(cfg_for(name, url, storage_options=options), World(rank=0, world_size=2))
    local = build_loader(cfg_for(name, small_ds), World(rank=0, world_size=2))
    assert len(remote) == len(local)
    assert [b.keys for b in remote] == [b.keys for b in local]
    remote.close()


@pytest.mark.s3
def test_s3_wrong_secret_fails_without_leaking_it(s3_server, s3_ds):
    url, _ = s3_ds
    from shard_tools.format import ManifestError

    secret = "definitely-wrong-secret"
    with pytest.raises((ManifestError, PermissionError, OSError)) as info:
        build_loader(
            cfg_for("torch", url, storage_options=s3_server.storage_options(secret_key=secret)),
            World(),
        )
    assert secret not in str(info.value)


@pytest.mark.parametrize("name", _params(READING))
def test_yielded_batches_stay_valid(name, small_ds):
    # Backends hand out views of their own buffers where that is safe (DALI's
    # outputs go through DLPack without a copy): later steps must not overwrite them.
    loader = build_loader(cfg_for(name, small_ds), World())
    kept, copies = [], []
    for b in loader:
        kept.append(b.images)
        copies.append(b.images.clone())
    assert len({t.data_ptr() for t in kept}) == len(kept)
    assert all(torch.equal(a, c) for a, c in zip(kept, copies, strict=True))


@pytest.mark.parametrize("name", _params(READING))
def test_missing_shard_stops_with_its_name(name, small_ds, tmp_path):
    import shutil

    from pipeline.storage import ShardReadError

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    (root / "shard-000004.tar").unlink()
    loader = build_loader(cfg_for(name, str(root), retries=1, retry_backoff_s=0), World())
    with pytest.raises(ShardReadError, match=r"shard-000004\.tar"):
        for _ in loader:
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_dali_gpu_without_a_gpu_says_so(small_ds):
    from pipeline.build import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        build_loader(cfg_for("dali-cpu", small_ds, backend="dali-gpu"), World())


@pytest.mark.dali
def test_hw_decoder_load_reaches_only_the_gpu_decoder(small_ds):
    # The CPU graph must not pass the GPU decoder's option (DALI would refuse it);
    # the mixed decoder gets it. Graph construction shows both without a GPU.
    from pipeline import dali_graph

    cfg = cfg_for("dali-cpu", small_ds, hw_decoder_load=0.9)
    assert "hw_decoder_load" not in dali_graph._decoder_args(cfg, "cpu")
    assert dali_graph._decoder_args(cfg, "gpu")["hw_decoder_load"] == 0.9
    # Decoder memory is preallocated the way NVIDIA's RN50 example does it, on the GPU only.
    assert dali_graph._decoder_args(cfg_for("dali-cpu", small_ds), "gpu").keys() == {
        "device", "output_type", "device_memory_padding", "host_memory_padding"}  # fmt: skip
    assert "device_memory_padding" not in dali_graph._decoder_args(cfg, "cpu")
    loader = build_loader(cfg, World())
    try:
        assert set(next(iter(loader)).keys) <= all_keys(small_ds)
    finally:
        loader.close()


def test_the_first_batch_waits_for_a_few_shards_not_a_whole_buffer(tmp_path):
    from benchmarks.scale import tiny_dataset

    root = str(tiny_dataset(tmp_path / "tiny", shards=60, per_shard=4))
    read: dict[str, list[int]] = {}
    for name, initial in (("growing", None), ("full", 200)):
        cfg = LoaderConfig(data=root, backend="torch", num_workers=0, batch_size=4, image_size=8,
                           recipe="small", shuffle_buffer=200, shuffle_initial=initial,
                           read_ahead=0)  # fmt: skip
        loader = build_loader(cfg, World())
        shards = read[name] = []
        real = loader.dataset.read_columns
        loader.dataset.read_columns = lambda s, i, real=real, shards=shards: (
            shards.append(s) or real(s, i)
        )
        first = next(iter(loader))
        assert len(first) == 4
        loader.close()
    # The reader stops once the batch's samples are in. Started at 2 batches (8 samples),
    # output k is one of the first 8 + 2k + 1 inputs: 4 shards of 4 at most for the first
    # batch. Started full, its 4 outputs are drawn from the first 204 inputs (51 shards).
    assert len(set(read["growing"])) <= 4 and len(set(read["full"])) >= 20


def test_a_state_saved_before_shuffle_initial_existed_resumes_with_a_full_buffer(small_ds):
    cfg = cfg_for("torch", small_ds, shuffle_initial=20)  # = shuffle_buffer: starts full
    full = build_loader(cfg, World())
    expected = [b.keys for b in full]
    first = build_loader(cfg, World())
    it = iter(first)
    head = [next(it).keys for _ in range(4)]
    state = first.state_dict()
    first.close()
    del state["shuffle_initial"]  # as versions before it saved their state
    resumed = build_loader(cfg, World())
    resumed.load_state_dict(state)
    assert head + [b.keys for b in resumed] == expected
    growing = build_loader(cfg_for("torch", small_ds), World())  # default: starts at 2 batches
    with pytest.raises(
        ValueError, match="shuffle_initial=20 but this loader has shuffle_initial=14"
    ):
        growing.load_state_dict(state)
