"""Object-storage faults: the loader and the packer against a real S3 server that misbehaves.

Reads: while the loader (torch and dali-cpu backends) streams an epoch from
SeaweedFS, the server is restarted, or a fault-injecting proxy in front of it
resets connections, answers 503 SlowDown or adds latency. The epoch must hand
out exactly the key sequence of a fault-free epoch (same seed, same order):
no sample lost, none repeated beyond the pad policy. Storage that stays down
longer than the retry budget must end the epoch with one line naming the shard,
in bounded time.

Writes: ``shard pack`` to s3:// through the proxy either succeeds with shards
byte-identical to a clean pack, or fails with one line and ``--resume``
completes it; no object is ever visible under a final name with partial content.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import s3fs

from pipeline import LoaderConfig, World, build_loader
from pipeline.batch import EpochReport
from pipeline.storage import ShardReadError
from shard_tools import s3_server as srv
from shard_tools.config import PackConfig
from shard_tools.format import read_manifest
from shard_tools.pack import pack
from shard_tools.synth import make_image_folder
from tests.faults.faultproxy import FaultProxy, Faults

pytestmark = pytest.mark.s3

NUM_CLASSES = 5
PER_CLASS = 50  # 250 samples
MAX_COUNT = 10  # 25 shards: 50 GETs (shard + index) per epoch
BATCH = 16  # 16 steps, the last one padded with 6 repeats
BACKENDS = [pytest.param("torch"), pytest.param("dali-cpu", marks=pytest.mark.dali)]


@dataclass
class Epoch:
    keys: list[str]
    report: EpochReport
    seconds: float


class _Fixed(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = bytes(range(256)) * 200  # 51,200 bytes

    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_fault_proxy_injects_what_it_is_told():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fixed)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def get(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/obj")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    try:
        with FaultProxy(f"http://127.0.0.1:{server.server_port}") as proxy:
            assert get(proxy.port) == (200, _Fixed.body)
            proxy.set_faults(Faults(status_prob=1.0))
            status, data = get(proxy.port)
            assert status == 503 and b"<Code>SlowDown</Code>" in data
            proxy.set_faults(Faults(reset_prob=1.0, reset_after_bytes=1000))
            with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
                get(proxy.port)
            proxy.set_faults(Faults(latency_s=0.01, after_requests=1))
            assert get(proxy.port)[0] == get(proxy.port)[0] == 200
            assert proxy.stats() | {"bytes_up": 0, "bytes_down": 0, "connections": 0} == {
                "connections": 0,
                "requests": 5,
                "reset_injected": 1,
                "status_injected": 1,
                "delayed": 1,
                "bytes_up": 0,
                "bytes_down": 0,
                "upstream_errors": 0,
            }
            # A seeded probability: the same seed injects into the same requests.
            runs = []
            for _ in range(2):
                proxy.set_faults(Faults(status_prob=0.5, seed=3))
                runs.append([get(proxy.port)[0] for _ in range(16)])
            assert runs[0] == runs[1] and 0 < runs[0].count(503) < 16
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(
        tmp_path_factory.mktemp("faults-src") / "images",
        num_classes=NUM_CLASSES,
        per_class=PER_CLASS,
        size=32,
        seed=8,
    )


@pytest.fixture(scope="module")
def dataset(s3_server, images) -> str:
    """The images packed onto the session server; returns the dataset URL."""
    url = f"s3://{s3_server.bucket}/faults-{uuid.uuid4().hex[:8]}/ds"
    pack(
        PackConfig(src=str(images), dest=url, max_count=MAX_COUNT, workers=1),
        storage_options=s3_server.storage_options(),
        progress=False,
    )
    return url


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def options_via(server, endpoint_url: str, **extra) -> dict:
    opts = server.storage_options()
    opts["client_kwargs"] = {**opts["client_kwargs"], "endpoint_url": endpoint_url}
    # A fresh client per loader: no connection pool or cached listing carried between cases.
    return {**opts, "skip_instance_cache": True, **extra}


def loader_config(backend: str, url: str, options: dict, **kw) -> LoaderConfig:
    base = dict(
        data=url,
        backend=backend,
        batch_size=BATCH,
        image_size=32,
        recipe="small",
        seed=3,
        shuffle_buffer=64,
        num_workers=0,
        num_threads=1,
        storage_options=options,
    )
    return LoaderConfig(**{**base, **kw})


def run_epoch(cfg: LoaderConfig, *, before=None, each=None) -> Epoch:
    """One epoch of CFG on a single rank; BEFORE() runs once the manifest is read,
    EACH(step) after every batch."""
    loader = build_loader(cfg, World(rank=0, world_size=1))
    try:
        if before is not None:
            before()
        keys: list[str] = []
        t0 = time.perf_counter()
        for step, batch in enumerate(loader):
            assert batch.images.shape == (BATCH, 3, 32, 32)
            keys.extend(batch.keys)
            if each is not None:
                each(step)
        seconds = time.perf_counter() - t0
        return Epoch(keys, loader.epoch_report(), seconds)
    finally:
        loader.close()


def check_exact(got: Epoch, clean: Epoch, samples: int) -> dict:
    """Assert GOT handed out the clean epoch's key sequence; return loss/duplicate figures."""
    lost = len(set(clean.keys) - set(got.keys))
    duplicated = len(got.keys) - len(set(got.keys)) - got.report.repeated
    assert len(set(clean.keys)) == samples
    assert len(got.keys) == samples + got.report.repeated  # the pad policy's repeats only
    assert lost == 0
    assert duplicated == 0
    assert got.report.corrupt == ()
    assert got.keys == clean.keys
    return {"samples_lost": lost, "samples_duplicated": duplicated}


def clean_epoch(backend: str, url: str, options: dict, before=None) -> Epoch:
    """A fault-free epoch: the reference key sequence and time of each case.

    Run twice (the first also warms caches and imports); the faster run is the
    baseline, and both must hand out the same keys.
    """
    first = run_epoch(loader_config(backend, url, options))
    epoch = run_epoch(loader_config(backend, url, options), before=before)
    assert epoch.keys == first.keys
    assert epoch.report.retries == first.report.retries == 0
    return (
        epoch if epoch.seconds <= first.seconds else Epoch(epoch.keys, epoch.report, first.seconds)
    )


FAULTS = {
    "connection resets": Faults(reset_prob=0.3, reset_after_bytes=(0, 12_000), seed=11),
    "503 SlowDown": Faults(status_prob=0.2, seed=12),
    "slow responses (+50 ms)": Faults(latency_s=0.05, seed=13),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FAULTS))
def test_epoch_through_proxy_faults(case, backend, s3_server, dataset, proxy, figures):
    options = options_via(s3_server, proxy.endpoint_url)
    # The same epoch through the proxy without faults: reference keys, time and requests.
    proxy.set_faults(Faults())
    clean = clean_epoch(backend, dataset, options, before=proxy.reset_stats)
    clean_requests = proxy.stats()["requests"]

    def faults_on():
        proxy.set_faults(FAULTS[case])
        proxy.reset_stats()

    got = run_epoch(loader_config(backend, dataset, options), before=faults_on)
    stats = proxy.stats()
    proxy.set_faults(Faults())
    exact = check_exact(got, clean, NUM_CLASSES * PER_CLASS)
    injected = stats["reset_injected"] + stats["status_injected"] + stats["delayed"]
    assert injected > 0
    figures(
        "storage",
        f"loader: {case}",
        backend=backend,
        faults_injected=injected,
        requests=stats["requests"],
        clean_requests=clean_requests,
        client_retries=stats["requests"] - clean_requests,
        loader_retries=got.report.retries,
        seconds=round(got.seconds, 2),
        clean_seconds=round(clean.seconds, 2),
        time_lost_s=round(got.seconds - clean.seconds, 2),
        **exact,
        outcome="epoch complete, keys identical",
    )


@pytest.fixture(scope="module")
def own_server(tmp_path_factory, images):
    """A server of this module's own (the restart test stops it), with the dataset on it."""
    data_dir = tmp_path_factory.mktemp("s3-restart")
    state = {"server": srv.start(data_dir, bucket="faults-restart"), "dir": data_dir}
    url = "s3://faults-restart/ds"
    pack(
        PackConfig(src=str(images), dest=url, max_count=MAX_COUNT, workers=1),
        storage_options=state["server"].storage_options(),
        progress=False,
    )
    state["url"] = url
    yield state
    srv.stop(state["server"])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_survives_a_server_restart(backend, own_server, figures):
    server = own_server["server"]
    port = int(server.endpoint_url.rsplit(":", 1)[1])
    options = options_via(server, server.endpoint_url)
    # Enough retries to outlast a restart (stop can take ~5 s, start ~2 s).
    kw = dict(retries=5, retry_backoff_s=0.5)
    clean = clean_epoch(backend, own_server["url"], options)
    stopped = threading.Event()
    outage: dict = {}

    def restart():
        t0 = time.monotonic()
        srv.stop(own_server["server"])
        stopped.set()
        try:
            own_server["server"] = srv.start(own_server["dir"], bucket="faults-restart", port=port)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outage["error"] = exc
        outage["down_s"] = time.monotonic() - t0

    worker = threading.Thread(target=restart)

    def each(step):
        if step == 2:
            worker.start()
            # Go on only once the server is down, so the next reads meet the outage.
            assert stopped.wait(30)

    got = run_epoch(loader_config(backend, own_server["url"], options, **kw), each=each)
    worker.join(60)
    assert "error" not in outage, outage.get("error")
    exact = check_exact(got, clean, NUM_CLASSES * PER_CLASS)
    figures(
        "storage",
        "loader: server restarted mid-epoch",
        backend=backend,
        faults_injected=f"restart, down {outage['down_s']:.1f} s",
        loader_retries=got.report.retries,
        seconds=round(got.seconds, 2),
        clean_seconds=round(clean.seconds, 2),
        time_lost_s=round(got.seconds - clean.seconds, 2),
        **exact,
        outcome="epoch complete, keys identical",
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("backend", "budget"),
    [
        pytest.param("torch", "small"),
        pytest.param("dali-cpu", "small", marks=pytest.mark.dali),
        pytest.param("torch", "default", marks=pytest.mark.slow),
    ],
)
def test_storage_down_beyond_retry_budget_fails_clearly(
    backend, budget, s3_server, dataset, figures
):
    # "small": the loader's own budget cut to 2 retries and botocore's to one
    # attempt per call; "default": every layer as shipped. s3fs always adds 5
    # attempts of its own (a class attribute, not an option): the layers multiply.
    with FaultProxy(s3_server.endpoint_url) as proxy:
        if budget == "small":
            options = options_via(
                s3_server, proxy.endpoint_url, config_kwargs={"retries": {"max_attempts": 1}}
            )
            cfg = loader_config(backend, dataset, options, retries=2, retry_backoff_s=0.2)
        else:
            cfg = loader_config(backend, dataset, options_via(s3_server, proxy.endpoint_url))
        loader = build_loader(cfg, World(rank=0, world_size=1))
        try:
            with pytest.raises(ShardReadError) as info:
                for step, _ in enumerate(loader):
                    if step == 1:  # the storage goes away for good
                        proxy.set_faults(Faults(reset_prob=1.0))
                        proxy.reset_stats()
                        t0 = time.monotonic()
            seconds = time.monotonic() - t0
            retries = loader.epoch_report().retries
        finally:
            loader.close()
        stats = proxy.stats()
    message = str(info.value)
    assert "\n" not in message
    assert "shard-0000" in message and f"after {cfg.retries + 1} attempt(s)" in message
    assert s3_server.secret_key not in message and s3_server.access_key not in message
    assert seconds < 120  # no hang: bounded by the retry budget
    assert retries >= cfg.retries  # the loader retried (read-ahead threads may each have)
    figures(
        "storage",
        f"loader: storage down beyond the retry budget ({budget} budget)",
        backend=backend,
        faults_injected=stats["reset_injected"],
        requests=stats["requests"],
        loader_retries=retries,
        seconds=round(seconds, 2),
        outcome=f"ShardReadError after {seconds:.1f} s: {message[:200]}",
    )


# -- write side -------------------------------------------------------------------------


def _shard_cli(args: list[str], server, endpoint_url: str, timeout_s: float = 120, **extra_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        **extra_env,
    )
    return subprocess.run(
        [sys.executable, "-m", "shard_tools.cli", *args, "--endpoint-url", endpoint_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _objects(server, url: str) -> dict[str, str]:
    """name relative to URL -> sha256 of the object, read directly from the server."""
    fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    root = url.removeprefix("s3://")
    return {
        p[len(root) + 1 :]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.find(root)
        if not p.endswith("/")
    }


@pytest.fixture(scope="module")
def clean_pack(s3_server, images, proxy):
    """A fault-free CLI pack through the proxy: object hashes and wall time."""
    url = f"s3://{s3_server.bucket}/faults-pack-{uuid.uuid4().hex[:8]}"
    proxy.set_faults(Faults())
    t0 = time.perf_counter()
    out = _shard_cli(
        ["pack", str(images), url, "--max-count", str(MAX_COUNT), "--workers", "1"],
        s3_server,
        proxy.endpoint_url,
    )
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    objects = _objects(s3_server, url)
    assert "manifest.json" in objects and not any(n.startswith(".journal") for n in objects)
    return objects, seconds


WRITE_FAULTS = {
    "connection resets": Faults(reset_prob=0.25, reset_after_bytes=(0, 20_000), seed=21),
    "503 SlowDown": Faults(status_prob=0.2, seed=22),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(WRITE_FAULTS))
def test_pack_to_s3_through_faults(case, s3_server, images, proxy, clean_pack, figures):
    expected, clean_s = clean_pack
    url = f"s3://{s3_server.bucket}/faults-pack-{uuid.uuid4().hex[:8]}"
    argv = ["pack", str(images), url, "--max-count", str(MAX_COUNT), "--workers", "1"]
    proxy.set_faults(WRITE_FAULTS[case])
    proxy.reset_stats()
    t0 = time.perf_counter()
    runs, partial, first_error = [], 0, ""
    for attempt in range(4):
        out = _shard_cli(argv + (["--resume"] if attempt else []), s3_server, proxy.endpoint_url)
        runs.append(out.returncode)
        # After every run: any object under a final name is whole (the clean pack's bytes).
        for name, digest in _objects(s3_server, url).items():
            if name.startswith(".journal/"):
                continue
            if expected.get(name) != digest:
                partial += 1
        if out.returncode == 0:
            break
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1, out.stderr
        assert "Traceback" not in out.stderr
        first_error = first_error or lines[0]
    seconds = time.perf_counter() - t0
    stats = proxy.stats()
    proxy.set_faults(Faults())
    assert partial == 0
    assert runs[-1] == 0, f"pack did not complete after {len(runs)} runs: {out.stderr}"
    final = _objects(s3_server, url)
    assert final == expected  # byte-identical shards, indexes, manifest; no journal left
    assert read_manifest(url, s3_server.storage_options()).samples == NUM_CLASSES * PER_CLASS
    figures(
        "storage",
        f"shard pack: {case}",
        backend="writer",
        faults_injected=stats["reset_injected"] + stats["status_injected"],
        requests=stats["requests"],
        seconds=round(seconds, 2),
        clean_seconds=round(clean_s, 2),
        time_lost_s=round(seconds - clean_s, 2),
        runs=len(runs),
        partial_objects_seen=partial,
        outcome=(
            "identical objects, first run succeeded"
            if len(runs) == 1
            else f"identical after --resume; first error: {first_error[:120]}"
        ),
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pack_cut_off_by_an_outage_resumes(s3_server, images, proxy, clean_pack, figures):
    expected, clean_s = clean_pack
    url = f"s3://{s3_server.bucket}/faults-pack-{uuid.uuid4().hex[:8]}"
    argv = ["pack", str(images), url, "--max-count", str(MAX_COUNT), "--workers", "1"]
    # The storage goes away after 30 requests (about 8 shards in) and stays away.
    # AWS_MAX_ATTEMPTS=1 keeps botocore from multiplying s3fs's own retries, so
    # the run gives up in seconds rather than minutes.
    proxy.set_faults(Faults(reset_prob=1.0, after_requests=30))
    proxy.reset_stats()
    t0 = time.perf_counter()
    out = _shard_cli(argv, s3_server, proxy.endpoint_url, AWS_MAX_ATTEMPTS="1")
    failed_s = time.perf_counter() - t0
    stats = proxy.stats()
    proxy.set_faults(Faults())
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert s3_server.secret_key not in out.stderr
    left = _objects(s3_server, url)
    assert "manifest.json" not in left
    partial = sum(
        1 for n, d in left.items() if not n.startswith(".journal/") and expected.get(n) != d
    )
    assert partial == 0
    shards_before = sum(n.endswith(".tar") for n in left)
    out = _shard_cli(argv + ["--resume"], s3_server, proxy.endpoint_url)
    assert out.returncode == 0, out.stderr
    assert _objects(s3_server, url) == expected
    figures(
        "storage",
        "shard pack: storage down mid-pack, then --resume",
        backend="writer",
        faults_injected=stats["reset_injected"],
        requests=stats["requests"],
        seconds=round(failed_s, 2),
        runs=2,
        partial_objects_seen=partial,
        outcome=(
            f"exit 1 after {failed_s:.1f} s with {shards_before} whole shards kept; "
            f"--resume gave identical objects; error: {lines[0][:120]}"
        ),
    )
