"""Shared fixtures: real data from ../shared/data, a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import shutil
import tarfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARDFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_TGZ = SHARED_DATA / "cifar10-jpeg.tar.gz"
IMAGENET_TAR = SHARED_DATA / "imagenet-sample-500.tar"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:
        return False


# The test command (scripts/test.sh) installs the dali extra and sets this: there, a
# DALI that does not import fails the run instead of quietly skipping every DALI test.
REQUIRE_DALI_ENV = "SHARDFLOW_REQUIRE_DALI"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible here")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI: pip install -e '.[dali]'")
    cuda, dali = _has_cuda(), _has_dali()
    if not dali and os.environ.get(REQUIRE_DALI_ENV) == "1":
        wanted = sum("dali" in item.keywords for item in items)
        raise pytest.UsageError(
            f"{REQUIRE_DALI_ENV}=1 but NVIDIA DALI does not import: {wanted} DALI tests would be "
            "skipped; install the dali extra (scripts/bootstrap.sh dev,dali)"
        )
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not dali:
            item.add_marker(skip_dali)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """CIFAR-10 as JPEG folders (train/<class>/*.jpg, test/<class>/*.jpg), extracted once."""
    if not CIFAR_TGZ.exists():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_TGZ}")
    dest = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR_TGZ) as tf:
        tf.extractall(dest, filter="data")
    # The archive may hold a top folder; return the folder that holds train/ and test/.
    for cand in [dest, *dest.iterdir()]:
        if (cand / "train").is_dir():
            return cand
    pytest.skip("CIFAR-10 archive has no train/ folder")


@pytest.fixture(scope="session")
def imagenet_sample_dir(tmp_path_factory) -> Path:
    """500 real ImageNet photos (one per class), extracted once; a flat folder of JPEGs."""
    if not IMAGENET_TAR.exists():
        pytest.skip(f"ImageNet sample not found at {IMAGENET_TAR}")
    dest = tmp_path_factory.mktemp("imagenet500")
    with tarfile.open(IMAGENET_TAR) as tf:
        tf.extractall(dest, filter="data")
    jpegs = sorted(dest.rglob("*.JPEG"))
    if not jpegs:
        pytest.skip("ImageNet sample holds no .JPEG files")
    return jpegs[0].parent


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session."""
    from shard_tools import s3_server as srv

    try:
        srv.weed_binary()
    except srv.S3ServerError as exc:
        pytest.fail(f"{exc} (the dev extra installs it)")
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    server = srv.start(data_dir, bucket="shardflow-test")
    yield server
    srv.stop(server)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3:// prefix per test (deleted 'folders' stay listed in SeaweedFS)."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Standard AWS variables pointing plain s3:// URLs at the test server."""
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL", raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3_server.env()
