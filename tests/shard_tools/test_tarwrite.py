"""Tar bytes equal what tarfile writes; .idx files equal what DALI's wds2idx writes."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile

import pytest
from shardtest_helpers import wds2idx_binary

from shard_tools.cli import main
from shard_tools.config import PackConfig
from shard_tools.pack import pack
from shard_tools.tarwrite import ShardTarWriter, finished_size, sample_chunk


def _tarfile_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# The last case spans several of the writer thread's 1 MiB blocks, one sample larger than a block.
@pytest.mark.parametrize(
    "sizes", [[0, 1], [511, 512, 513], [10_000, 3, 70_000], [700_000] * 3 + [2_500_000, 5]]
)
def test_same_bytes_as_tarfile(sizes):
    samples = [
        (f"{i:010d}", [("jpg", bytes([i % 251]) * n), ("cls", str(i).encode())])
        for i, n in enumerate(sizes)
    ]
    buf = io.BytesIO()
    writer = ShardTarWriter(buf)
    predicted = 0
    for key, members in samples:
        chunk = sample_chunk(key, members)
        predicted_size = writer.size_if_added(chunk)
        writer.add(key, members)
        predicted += len(chunk.data)
        assert finished_size(predicted) == predicted_size
    writer.finish()
    expected = _tarfile_bytes([(f"{k}.{e}", d) for k, ms in samples for e, d in ms])
    assert buf.getvalue() == expected
    assert writer.bytes_written == len(expected)
    assert writer.sha256 == hashlib.sha256(expected).hexdigest()


class _FailingSink(io.BytesIO):
    """A sink whose disk fills up after LIMIT bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:
        if self.tell() + len(data) > self.limit:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_write_error_surfaces_and_close_is_quiet():
    # Written on the writer's own thread, the error must still reach the caller.
    writer = ShardTarWriter(_FailingSink(3 << 20))
    with pytest.raises(OSError, match="No space left"):
        for i in range(40):
            writer.add(f"{i:010d}", [("bin", bytes(200_000))])
        writer.finish()
    writer.close()  # abandoning the shard after the error raises nothing more
    with pytest.raises(RuntimeError, match="after finish"):
        _ = writer.sha256


def test_keys_must_be_plain():
    writer = ShardTarWriter(io.BytesIO())
    for bad in ["", "a.b", "a/b"]:
        with pytest.raises(ValueError):
            writer.add(bad, [("cls", b"0")])


def test_idx_matches_wds2idx(small_src, tmp_path):
    tool = wds2idx_binary()
    dest = tmp_path / "out"
    m = pack(
        PackConfig(src=str(small_src), dest=str(dest), max_count=12, workers=1), progress=False
    ).manifest
    assert len(m.shards) == 3
    for shard in m.shards:
        ref = tmp_path / f"ref-{shard.name}.idx"
        subprocess.run(
            [str(tool), str(dest / shard.name), str(ref)], check=True, capture_output=True
        )
        assert (dest / shard.index).read_bytes() == ref.read_bytes()


def test_index_command_on_foreign_tar(tmp_path, capsys):
    tool = wds2idx_binary()
    members = [
        ("a/x1.jpg", b"1" * 700),
        ("a/x1.cls", b"1"),
        ("b/y.seg.png", b"2" * 5),
        ("b/y.json", b"{}"),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = tmp_path / "foreign.tar"
    tar.write_bytes(buf.getvalue())
    assert main(["index", str(tar)]) == 0
    assert "2 samples" in capsys.readouterr().out
    ref = tmp_path / "ref.idx"
    subprocess.run([str(tool), str(tar), str(ref)], check=True, capture_output=True)
    assert (tmp_path / "foreign.idx").read_bytes() == ref.read_bytes()
