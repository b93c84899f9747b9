"""Packing to S3 (a real SeaweedFS server on loopback) writes the same bytes as a local pack."""

from __future__ import annotations

import json

import fsspec
import pytest
from shardtest_helpers import assert_s3_pack_equals_local

from shard_tools.cli import main
from shard_tools.config import PackConfig
from shard_tools.format import read_manifest
from shard_tools.pack import pack
from shard_tools.verify import verify

pytestmark = pytest.mark.s3


def test_s3_pack_equals_local_pack(small_src, tmp_path, s3_server, s3_prefix):
    opts = s3_server.storage_options()
    cfg = dict(src=str(small_src), max_count=8, shuffle=True, seed=2, workers=2)
    local = pack(PackConfig(dest=str(tmp_path / "local"), **cfg), progress=False).manifest
    remote = pack(PackConfig(dest=s3_prefix, **cfg), storage_options=opts, progress=False).manifest
    assert_s3_pack_equals_local(local, remote, s3_prefix, opts)
    fs = fsspec.filesystem("s3", **opts)
    for s in local.shards:
        assert fs.cat_file(f"{s3_prefix}/{s.index}") == (tmp_path / "local" / s.index).read_bytes()
    assert verify(s3_prefix, decode=True, storage_options=opts).ok


def test_cli_with_aws_env_and_remote_source(small_src, tmp_path, s3_env, s3_prefix, capsys):
    dest = f"{s3_prefix}/a"
    assert (
        main(["pack", str(small_src), dest, "--max-count", "10", "--json", "--workers", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert json.loads(out)["samples"] == 30
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in out
    assert main(["verify", dest]) == 0
    assert main(["inspect", dest]) == 0
    # Re-shard straight from the S3 tars into another prefix, and index remote tars.
    assert (
        main(["pack", f"{dest}/shard-{{000000..000002}}.tar", f"{s3_prefix}/b", "--workers", "2"])
        == 0
    )
    assert main(["index", f"{dest}/shard-*.tar"]) == 0
    capsys.readouterr()
    fs = fsspec.filesystem("s3")
    assert read_manifest(f"{s3_prefix}/b").samples == 30
    assert fs.cat_file(f"{dest}/shard-000001.idx")[:7] == b"v1.2 10"


def test_interrupted_s3_upload_leaves_no_object(s3_server, s3_prefix):
    from shard_tools.storage import Destination

    dest = Destination(s3_prefix, s3_server.storage_options())
    with pytest.raises(RuntimeError), dest.atomic_writer("shard-000000.tar") as f:
        f.write(b"x" * (20 * 2**20))  # more than one multipart part
        raise RuntimeError("crash mid-shard")
    assert not dest.exists("shard-000000.tar")
    dest.write_bytes("small.bin", b"abc")
    assert dest.read_bytes("small.bin") == b"abc"


def test_endpoint_url_option_with_credentials_from_env(
    small_src, s3_server, s3_prefix, monkeypatch, capsys
):
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    argv = [
        "pack",
        str(small_src),
        s3_prefix,
        "--endpoint-url",
        s3_server.endpoint_url,
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    assert main(["verify", s3_prefix, "--endpoint-url", s3_server.endpoint_url]) == 0
    out, err = capsys.readouterr()
    assert s3_server.secret_key not in out + err


def test_unreachable_endpoint_is_one_line_error(small_src, s3_server, monkeypatch, capsys):
    import socket

    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once closed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast: s3fs retries on its own too
    s3fs.S3FileSystem.clear_instance_cache()
    argv = ["pack", str(small_src), "s3://nowhere/ds", "--endpoint-url", dead, "--workers", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("shard pack: error: storage: ")
    assert "--resume" in err and s3_server.secret_key not in err
