"""The SeaweedFS helper gives tests and users a real S3 endpoint on loopback."""

from __future__ import annotations

import hashlib
import os

import fsspec
import pytest
import s3fs

from shard_tools import s3_server

pytestmark = pytest.mark.s3


def _fs(server, **kw) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**server.storage_options(**kw), skip_instance_cache=True)


def test_multi_megabyte_object_round_trip(s3_server, s3_prefix):
    payload = os.urandom(24 << 20)  # 24 MiB: several multipart chunks in s3fs
    fs = _fs(s3_server)
    path = s3_prefix.removeprefix("s3://") + "/big.bin"
    with fs.open(path, "wb") as f:
        f.write(payload)
    assert fs.size(path) == len(payload)
    back = fs.cat(path)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    # Ranged reads are what the pipeline's read-ahead issues.
    assert (
        fs.cat_file(path, start=5 << 20, end=(5 << 20) + 4096)
        == payload[5 << 20 : (5 << 20) + 4096]
    )


def test_plain_s3_urls_work_from_standard_env(s3_env, s3_server, s3_prefix):
    url = s3_prefix + "/hello.txt"
    with fsspec.open(url, "wt") as f:
        f.write("hello")
    with fsspec.open(url, "rt") as f:
        assert f.read() == "hello"


def test_wrong_secret_is_refused(s3_server, s3_prefix):
    path = s3_prefix.removeprefix("s3://") + "/secret.txt"
    _fs(s3_server).pipe(path, b"data")
    bad = _fs(s3_server, secret_key="not-the-secret")
    with pytest.raises(PermissionError):
        bad.cat(path)
    with pytest.raises(PermissionError):
        bad.pipe(s3_prefix.removeprefix("s3://") + "/intruder.txt", b"x")
    assert not _fs(s3_server).exists(s3_prefix.removeprefix("s3://") + "/intruder.txt")


def test_objects_survive_a_server_restart(tmp_path):
    server = s3_server.start(tmp_path / "s3", bucket="restart-test")
    try:
        payload = os.urandom(3 << 20)
        _fs(server).pipe("restart-test/keep/obj.bin", payload)
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        s3_server.stop(server)
        server = s3_server.start(tmp_path / "s3", bucket="restart-test", port=port)
        assert _fs(server).cat("restart-test/keep/obj.bin") == payload
    finally:
        s3_server.stop(server)


def test_invalid_bucket_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="invalid S3 bucket name"):
        s3_server.start(tmp_path / "s3", bucket="b1")


def test_cli_start_env_stop(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shard_tools.s3_server",
            "start",
            "--dir",
            str(tmp_path),
            "--bucket",
            "cli-test",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    try:
        assert env["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        server = s3_server.load(tmp_path)
        assert server.endpoint_url == env["AWS_ENDPOINT_URL_S3"]
        assert _fs(server).ls("cli-test") == []
    finally:
        subprocess.run(
            [sys.executable, "-m", "shard_tools.s3_server", "stop", "--dir", str(tmp_path)],
            check=True,
        )
