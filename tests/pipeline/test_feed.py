"""The DALI feed: per-sample augmentation, one pipeline per loader, the reader process."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pipeline import World, build_loader
from tests.pipeline.test_loader import all_keys, cfg_for

pytestmark = pytest.mark.dali

AUGMENTATIONS = {
    # CIFAR's recipe: resize, pad, random crop, flips
    "small": dict(recipe="small", vflip=0.5),
    # the ImageNet recipe with every per-sample draw it has
    "imagenet": dict(
        recipe="imagenet",
        image_size=24,
        scale=(0.3, 1.0),
        rotate_deg=20,
        translate=0.1,
        brightness=0.3,
        contrast=0.3,
        saturation=0.3,
    ),  # fmt: skip
}


def _pixels(loader, steps: int | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    # islice stops before taking batch STEPS: the loader's state then is step STEPS
    for batch in itertools.islice(loader, steps):
        for key, image in zip(batch.keys, batch.images, strict=True):
            if key in out:  # a pad repeat: its sample, drawn again, gives the same pixels
                assert torch.equal(out[key], image), key
            out[key] = image.clone()
    return out


@pytest.mark.parametrize("aug", AUGMENTATIONS)
def test_resumed_pixels_equal_the_uninterrupted_run_on_another_world_size(small_ds, aug):
    cfg = cfg_for("dali-cpu", small_ds, batch_size=4, **AUGMENTATIONS[aug])
    expected: dict[str, torch.Tensor] = {}
    for rank in range(2):
        with build_loader(cfg, World(rank=rank, world_size=2)) as loader:
            loader.set_epoch(1)
            expected.update(_pixels(loader))
    assert set(expected) == all_keys(small_ds)

    got: dict[str, torch.Tensor] = {}
    states = []
    for rank in range(2):  # 3 steps on 2 ranks, then a checkpoint
        with build_loader(cfg, World(rank=rank, world_size=2)) as loader:
            loader.set_epoch(1)
            got.update(_pixels(loader, steps=3))
            states.append(loader.state_dict())
    assert states[0] == states[1] and len(got) == 2 * 3 * 4
    for rank in range(3):  # the rest on 3 ranks
        with build_loader(cfg, World(rank=rank, world_size=3)) as loader:
            loader.load_state_dict(states[0])
            got.update(_pixels(loader))
    assert set(got) == set(expected)
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} resumed samples got other pixels: {differ[:5]}"

    # The draws are real: the next epoch crops and flips the same samples otherwise.
    with build_loader(cfg, World()) as loader:
        loader.set_epoch(2)
        other = _pixels(loader)
    same = sum(torch.equal(other[k], expected[k]) for k in expected)
    assert same < len(expected) // 4


def test_one_pipeline_per_loader_across_epochs_resume_and_decoder_errors(corrupt_ds):
    from pipeline.dali_backend import DaliBackend

    root, bad = corrupt_ds
    cfg = cfg_for("dali-cpu", root)
    before = DaliBackend.builds
    with build_loader(cfg, World()) as loader:
        skipped = set()
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                skipped.update(batch.skipped)
            assert set(loader.epoch_report().corrupt) == bad
        assert skipped == bad  # the undefined-quant-table JPEG is refused by DALI itself
        loader.set_epoch(1)
        it = iter(loader)
        next(it), next(it)
        state = loader.state_dict()
        it.close()
        loader.load_state_dict(state)
        loader.set_epoch(1)
        assert len(list(loader)) == 18 - 2
    assert DaliBackend.builds - before == 1


def _epoch(loader, epoch: int | None = None) -> list[tuple[str, torch.Tensor]]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return [(k, im.clone()) for b in loader for k, im in zip(b.keys, b.images, strict=True)]


def _same(got, want) -> bool:
    return [k for k, _ in got] == [k for k, _ in want] and all(
        torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("reader", ["process", "thread"])
def test_the_next_epoch_is_made_ahead_and_anything_else_is_made_afresh(small_ds, reader):
    # When an epoch's last batch is fed, the feeder goes on with the next epoch: its
    # first batches are finished before the loop asks for them. What is then iterated
    # (that epoch, another one, a replay, a resume, an epoch left early) must be exactly
    # what a loader that never went ahead gives.
    cfg = cfg_for("dali-cpu", small_ds, batch_size=4, reader=reader, **AUGMENTATIONS["small"])
    fresh = build_loader(dataclasses.replace(cfg, reader="thread"), World())
    with build_loader(cfg, World()) as loader, fresh:
        assert _same(_epoch(loader, 0), _epoch(fresh, 0))
        stream = loader.backend._stream
        loader.backend.wait_ahead(timeout=30)
        assert stream._ready.qsize() == loader.cfg.prefetch  # epoch 1's first batches, done
        assert stream._planned.epoch == 1 and stream._planned.start == 0
        assert _same(_epoch(loader, 1), _epoch(fresh, 1))  # the epoch made ahead
        assert loader.backend._stream is stream  # taken from the same feeder
        assert _same(_epoch(loader, 3), _epoch(fresh, 3))  # not the one made ahead
        assert loader.backend._stream is not stream
        assert _same(_epoch(loader), _epoch(fresh, 3))  # a replay of the same epoch
        fresh.set_epoch(4)
        it = iter(fresh)
        next(it), next(it)
        state = fresh.state_dict()
        rest = _epoch(fresh)
        loader.load_state_dict(state)  # a resume while epoch 4 is made ahead
        assert _same(_epoch(loader), rest)
        loader.set_epoch(5)
        it = iter(loader)
        b = next(it)
        first = [(k, im.clone()) for k, im in zip(b.keys, b.images, strict=True)]
        it.close()  # left early: the feeder stops; the rest of epoch 5 is made afresh
        assert loader.backend._stream is None
        assert _same(first + _epoch(loader), _epoch(fresh, 5))


def test_a_stream_nobody_comes_back_to_stops_and_lets_its_loader_go(small_ds, monkeypatch):
    # The feeder goes on into the next epoch; a loop that does not ask for it (training
    # over, a loader dropped without close()) must not keep the feeder, its batches and
    # the reader process alive. Asked for later, the epoch is made afresh, the same.
    import gc

    from pipeline import stream

    monkeypatch.setattr(stream, "AHEAD_FOR_S", 0.5)
    cfg = cfg_for("dali-cpu", small_ds, batch_size=4, **AUGMENTATIONS["small"])
    with build_loader(dataclasses.replace(cfg, reader="thread"), World()) as fresh:
        want = _epoch(fresh, 1)
    loader = build_loader(cfg, World())
    _epoch(loader, 0)
    ahead = loader.backend._stream
    ahead._thread.join(timeout=30)
    assert not ahead._thread.is_alive() and ahead._ready.qsize() == 0
    assert _same(_epoch(loader, 1), want)
    assert loader.backend._stream is not ahead
    pid = _reader_pid(loader)
    loader.backend._stream._thread.join(timeout=30)
    del loader, ahead
    gc.collect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the dropped loader's reader process {pid} is still running")


@pytest.mark.parametrize("hand_over", ["files", "buffer"])
def test_both_hand_overs_from_the_reader_process_give_the_thread_readers_pixels(
    small_ds, corrupt_ds, hand_over
):
    """A batch from the reader process reaches DALI as one buffer cut in DALI (small
    images) or image by image (photos): the same pixels as the thread reader's, also for
    a batch rebuilt after a decoder error."""
    for root in (small_ds, corrupt_ds[0]):
        cfg = cfg_for("dali-cpu", root, batch_size=4, hand_over=hand_over,
                      **AUGMENTATIONS["small"])  # fmt: skip
        fresh = build_loader(dataclasses.replace(cfg, reader="thread"), World())
        with build_loader(cfg, World()) as loader, fresh:
            got, want = _epoch(loader, 1), _epoch(fresh, 1)
            assert loader.backend._packed == (hand_over == "buffer")
            assert loader.backend._reader._files._maps or hand_over == "buffer"
            assert _same(got, want)
            corrupt = loader.epoch_report().corrupt
            assert corrupt == fresh.epoch_report().corrupt
            assert set(corrupt) == (corrupt_ds[1] if root == corrupt_ds[0] else set())


@pytest.mark.parametrize("which", ["indexed", "no-idx"])
def test_images_handed_over_as_spans_of_the_shard_files_equal_the_copies(small_ds, noidx_ds,
                                                                         which):  # fmt: skip
    """share_files: the reader process sends where each image lies in its shard file and
    writes no shared memory; the parent's views of the files are the bytes the copying
    hand-over gives. Shards read whole (no .idx) are copied as before."""
    from pipeline.loader import Job
    from pipeline.readerproc import ReaderProcess

    root = small_ds if which == "indexed" else noidx_ds
    with build_loader(cfg_for("dali-cpu", root, batch_size=3), World()) as loader:
        job = Job(cfg=loader.cfg, world=loader.world, epoch=0, plan=loader.plan(), start=0,
                  dataset=loader.dataset, device=loader.device)  # fmt: skip
        readers = [ReaderProcess(loader.cfg, slots=3, share_files=s) for s in (False, True)]
        try:
            copied, shared = (
                [
                    (enc.keys, [bytes(i) for i in enc.images], enc.origin is None)
                    for enc, _ in r.batches(job, keep=2)
                ]
                for r in readers
            )
            segments = glob.glob(f"/dev/shm/shardflow-{readers[1].token}-*")
        finally:
            for r in readers:
                r.close()
    assert [(k, i) for k, i, _ in shared] == [(k, i) for k, i, _ in copied]
    assert all(no_origin for *_, no_origin in copied)
    if which == "indexed":
        assert not any(no_origin for *_, no_origin in shared) and not segments
    else:
        assert all(no_origin for *_, no_origin in shared) and segments


def test_a_shard_shorter_than_when_it_was_read_is_a_clear_error(small_ds, tmp_path):
    import shutil

    import numpy as np

    from pipeline.readerproc import _ShardFiles
    from pipeline.storage import Dataset, ShardDataError

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    with build_loader(cfg_for("dali-cpu", str(root)), World()) as loader:
        ds: Dataset = loader.dataset
        size = os.path.getsize(ds.shard_path(0))
        files = _ShardFiles()
        (view,) = files.images(ds, np.array([[0, size - 10, 10]]))
        with open(ds.shard_path(0), "rb") as f:
            assert bytes(view) == f.read()[-10:]
        del view  # read past the new end, it would be a SIGBUS
        files.clear()
        os.truncate(ds.shard_path(0), size - 1024)
        with pytest.raises(ShardDataError, match="changed in place"):
            files.images(ds, np.array([[0, size - 10, 10]]))


def _reader_pid(loader) -> int:
    reader = loader.backend._reader
    assert reader is not None, "the shard reader does not run in a process of its own"
    return reader.pid


def _segments(loader) -> list[str]:
    return glob.glob(f"/dev/shm/shardflow-{loader.backend._reader.token}-*")


def test_the_reader_runs_in_its_own_process_and_leaves_nothing_behind(small_ds):
    cfg = cfg_for("dali-cpu", small_ds)
    loader = build_loader(cfg, World())
    it = iter(loader)
    next(it)
    pid = _reader_pid(loader)
    assert pid != os.getpid() and _segments(loader)
    token = loader.backend._reader.token
    it.close()  # an abandoned iteration: the next one goes on in the same process
    keys = [b.keys for b in loader]
    assert len(keys) == 18 - 1 and _reader_pid(loader) == pid
    with build_loader(cfg, World()) as reference:
        assert keys == [b.keys for b in reference][1:]
    loader.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not glob.glob(f"/dev/shm/shardflow-{token}-*")


def test_a_killed_reader_process_is_a_clear_error_and_is_cleaned_up(small_ds):
    from pipeline.readerproc import ReaderProcessError

    loader = build_loader(cfg_for("dali-cpu", small_ds, prefetch=1), World())
    it = iter(loader)
    next(it)
    pid, token = _reader_pid(loader), loader.backend._reader.token
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ReaderProcessError, match=r"killed by SIGKILL \(the out-of-memory"):
        for _ in it:
            pass
    loader.close()
    assert not glob.glob(f"/dev/shm/shardflow-{token}-*")


def test_a_reader_killed_while_its_batch_is_held_is_a_clear_error(small_ds):
    # The consumer hands a slot back after each batch: a child that died meanwhile is
    # a broken pipe on that send, which must read like any other death of the reader.
    from pipeline.loader import Job
    from pipeline.readerproc import ReaderProcess, ReaderProcessError

    with build_loader(cfg_for("dali-cpu", small_ds, prefetch=1), World()) as loader:
        reader = ReaderProcess(loader.cfg, slots=2)
        try:
            job = Job(cfg=loader.cfg, world=loader.world, epoch=0, plan=loader.plan(), start=0,
                      dataset=loader.dataset, device=loader.device)  # fmt: skip
            batches = reader.batches(job)
            next(batches)
            os.kill(reader.pid, signal.SIGKILL)
            reader._proc.join(timeout=10)
            with pytest.raises(ReaderProcessError, match=r"killed by SIGKILL"):
                for _ in batches:
                    pass
        finally:
            token = reader.token
            reader.close()
    assert not glob.glob(f"/dev/shm/shardflow-{token}-*")


def test_a_batch_stays_in_place_while_the_batches_after_it_are_taken(small_ds):
    # The DALI feeder has two batches in DALI at once and may feed a failed one again,
    # image by image, after taking the next: KEEP batches' slots stay untouched.
    from pipeline.loader import Job
    from pipeline.reader import encoded_batches
    from pipeline.readerproc import ReaderProcess

    with build_loader(cfg_for("dali-cpu", small_ds, batch_size=3), World()) as loader:
        job = Job(cfg=loader.cfg, world=loader.world, epoch=0, plan=loader.plan(), start=0,
                  dataset=loader.dataset, device=loader.device)  # fmt: skip
        expected = [[bytes(i) for i in enc.images] for enc in encoded_batches(job)]
        reader = ReaderProcess(loader.cfg, slots=3)
        try:
            with pytest.raises(ValueError, match="keep=3"):
                next(reader.batches(job, keep=3))
            taken = []
            for step, (enc, _) in enumerate(reader.batches(job, keep=2)):
                taken.append(enc)
                if step >= 1:  # the batch before this one: still its own bytes
                    assert [bytes(i) for i in taken[step - 1].images] == expected[step - 1]
                assert [bytes(i) for i in enc.images] == expected[step]
            assert len(taken) == len(expected) > 4
        finally:
            reader.close()


def test_the_last_batches_of_an_epoch_stay_in_place_while_the_next_is_read(small_ds):
    # The feeder asks for the next epoch while the last one's last batches are still in
    # DALI: the child must not write the new epoch into their slots before the consumer
    # has taken KEEP batches of it.
    from pipeline.loader import Job
    from pipeline.readerproc import ReaderProcess

    with build_loader(cfg_for("dali-cpu", small_ds, batch_size=3), World()) as loader:

        def job(epoch):
            loader.set_epoch(epoch)
            return Job(cfg=loader.cfg, world=loader.world, epoch=epoch, plan=loader.plan(),
                       start=0, dataset=loader.dataset, device=loader.device)  # fmt: skip

        reader = ReaderProcess(loader.cfg, slots=3)
        try:
            taken = [enc for enc, _ in reader.batches(job(0), keep=2)]
            last = [bytes(i) for i in taken[-1].images]
            epoch1 = reader.batches(job(1), keep=2)
            first = next(epoch1)[0]
            time.sleep(1.0)  # the child writes what it can of epoch 1 meanwhile
            assert [bytes(i) for i in taken[-1].images] == last
            rest = [enc.keys for enc, _ in epoch1]
            assert len(first.keys) + sum(map(len, rest)) == sum(len(e.keys) for e in taken)
        finally:
            reader.close()


@pytest.mark.parametrize("end", ["killed", "exits without close()"])
def test_the_reader_process_ends_with_its_parent(small_ds, tmp_path, end):
    # A training process killed outright, or one that never closes its loader: its
    # reader must not live on, nor leave its shared memory behind.
    script = tmp_path / "victim.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        from pipeline import LoaderConfig, World, build_loader

        if __name__ == "__main__":
            cfg = LoaderConfig(data={small_ds!r}, backend="dali-cpu", batch_size=7,
                               image_size=32, recipe="small")
            loader = build_loader(cfg, World())
            next(iter(loader))
            print(loader.backend._reader.pid, loader.backend._reader.token, flush=True)
            if sys.argv[1] == "killed":
                time.sleep(60)
    """)
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), end.split()[0]], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        pid, token = proc.stdout.readline().split()
        if end == "killed":
            proc.kill()
        assert proc.wait(timeout=60) in (0, -signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            import time

            time.sleep(0.1)
        else:
            pytest.fail(f"reader process {pid} outlived its parent")
        assert not glob.glob(f"/dev/shm/shardflow-{token}-*")
    finally:
        proc.kill()


def test_reading_from_top_level_code_falls_back_to_threads(small_ds, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(f"""
        from pipeline import LoaderConfig, World, build_loader

        cfg = LoaderConfig(data={small_ds!r}, backend="dali-cpu", batch_size=7, image_size=32,
                           recipe="small")
        loader = build_loader(cfg, World())
        print(sum(len(b.keys) for b in loader), loader.backend._reader)
    """)
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["126", "None"]
    assert "shard reader runs in threads of this process" in done.stderr
