"""Security: secrets stay secret, wrong credentials write nothing, hostile inputs are refused.

The credential checks run against their own SeaweedFS server whose access key
and secret are distinctive strings, so a leak is found by a plain byte search
of every output: stdout/stderr of `shard` and `train`, every object the runs
wrote (shards, indexes, manifest, rejected list, metrics, config, checkpoints)
and the text of the exceptions a library user sees.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from pipeline import LoaderConfig, World, build_loader
from shard_tools import s3_server as srv
from shard_tools.cli import main as shard_main
from shard_tools.format import MANIFEST_NAME, TABLE_NAME, ManifestError, read_manifest
from shard_tools.format.table import COLUMNS, ShardTable, TextColumn
from shard_tools.synth import make_image_folder
from tests.faults.faulthelpers_rw import REPO, child_env, jpeg, one_line_error, run_shard
from train import checkpoint

ACCESS_KEY = "FAULTKEY7Q2XW9ZP"
SECRET_KEY = "fault-secret-5b1e9c0d7a34e6f1"
WRONG_SECRET = "wrong-secret-0c8f4a1d2e93b7a5"
NEEDLES = (ACCESS_KEY, SECRET_KEY, WRONG_SECRET)


@pytest.fixture(scope="module")
def secret_server(tmp_path_factory):
    """A server that accepts only ACCESS_KEY / SECRET_KEY (the session one has plain ones)."""
    try:
        srv.weed_binary()
    except srv.S3ServerError as exc:
        pytest.fail(f"{exc} (the dev extra installs it)")
    data = tmp_path_factory.mktemp("secret-s3")
    server = srv.start(data, bucket="secrets", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    yield server
    srv.stop(server)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    src = make_image_folder(
        tmp_path_factory.mktemp("sec-src") / "src", num_classes=2, per_class=8, size=32, seed=2
    )
    (src / "class00" / "broken.jpg").write_bytes(b"\xff\xd8 nope")  # a rejected.jsonl row
    return src


def _env(server, **overrides: str) -> dict[str, str]:
    env = child_env(**{**server.env(), **overrides})
    env.pop("FSSPEC_S3_ENDPOINT_URL", None)
    return env


def _leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [n for n in NEEDLES if n.encode() in data]


def _run(cmd: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _objects(server, prefix: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3", **server.storage_options(), skip_instance_cache=True)
    return {p: fs.cat_file(p) for p in fs.find(f"{server.bucket}/{prefix}")}


@pytest.mark.s3
@pytest.mark.multiproc
def test_credentials_never_appear_in_outputs(secret_server, images, tmp_path, figures):
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    ds, run_dir = f"s3://secrets/{prefix}/ds", f"s3://secrets/{prefix}/run"
    env = _env(secret_server)
    texts: dict[str, str] = {}
    for name, args in {
        "shard pack": ["pack", images, ds, "--max-count", "5", "--workers", "2", "--json"],
        "shard verify": ["verify", ds, "--decode"],
        "shard inspect": ["inspect", ds],
    }.items():
        proc = run_shard(args, env=env)
        assert proc.returncode == 0, proc.stderr
        texts[name] = proc.stdout + proc.stderr
    train = [sys.executable, "-m", "train", "--data", ds, "--backend", "torch", "--num-workers",
             "0", "--out", run_dir, "--batch-size", "4", "--epochs", "1", "--max-steps", "3",
             "--ckpt-every-steps", "2", "--val-data", ds]  # fmt: skip
    proc = _run(train, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts["train"] = proc.stdout + proc.stderr

    # A library user: the loader with explicit storage options; reprs and exception text.
    opts = secret_server.storage_options()
    cfg = LoaderConfig(data=ds, batch_size=4, image_size=32, recipe="small", num_workers=0,
                       storage_options=opts, retries=0)  # fmt: skip
    loader = build_loader(cfg, World())
    next(iter(loader))
    texts["loader repr"] = f"{cfg!r} {loader.dataset!r}"
    fs = fsspec.filesystem("s3", **opts, skip_instance_cache=True)
    fs.rm(f"secrets/{prefix}/ds/shard-000001.tar")
    bad = build_loader(cfg, World())
    with pytest.raises(Exception) as caught:  # noqa: PT011 - its text is what is checked
        bad.dataset.read_samples(1, np.arange(2))
    texts["loader exception"] = str(caught.value)
    wrong = dataclasses.replace(
        cfg, storage_options=secret_server.storage_options(secret_key=WRONG_SECRET)
    )
    with pytest.raises(Exception) as caught:  # noqa: PT011
        build_loader(wrong, World())
    texts["loader exception (wrong secret)"] = f"{type(caught.value).__name__}: {caught.value}"

    objects = _objects(secret_server, prefix)
    names = sorted(p.rsplit("/", 1)[-1] for p in objects)
    assert MANIFEST_NAME in names and "rejected.jsonl" in names and "metrics.jsonl" in names
    assert any(n.endswith(".pt") for n in names) and "config.json" in names
    ckpt = next(data for path, data in objects.items() if path.endswith(".pt"))
    loaded = torch.load(io.BytesIO(ckpt), weights_only=True)
    texts["checkpoint (loaded, as text)"] = json.dumps(loaded, default=str)

    found = {name: _leaks(text) for name, text in texts.items()}
    found |= {f"object {p.split('/', 2)[-1]}": _leaks(data) for p, data in objects.items()}
    leaked = {k: v for k, v in found.items() if v}
    figures(
        "security",
        "credentials in outputs",
        outcome=f"searched {len(found)} outputs ({len(objects)} objects, "
        f"{len(texts)} texts) for the access key and secret: "
        + ("none found" if not leaked else f"FOUND in {sorted(leaked)}"),
    )
    assert not leaked


@pytest.mark.s3
def test_wrong_credentials_fail_clearly_and_write_nothing(secret_server, images, figures):
    prefix = f"wrong-{uuid.uuid4().hex[:8]}"  # shown as <prefix> in the report
    env = _env(secret_server, AWS_SECRET_ACCESS_KEY=WRONG_SECRET)
    proc = run_shard(["pack", images, f"s3://secrets/{prefix}/ds", "--workers", "1"], env=env)
    line = one_line_error(proc.stderr, "shard pack: error: ")
    assert proc.returncode == 1
    assert f"s3://secrets/{prefix}/ds" in line  # where it was refused, not just "Forbidden"
    assert not _leaks(proc.stdout + proc.stderr)
    cmd = [sys.executable, "-m", "train", "--data", f"s3://secrets/{prefix}/ds", "--backend",
           "torch", "--out", f"s3://secrets/{prefix}/run", "--max-steps", "1"]  # fmt: skip
    trained = _run(cmd, env)
    train_line = one_line_error(trained.stderr, "train: error: ")
    assert trained.returncode == 1 and not _leaks(trained.stdout + trained.stderr)
    written = _objects(secret_server, prefix)
    line, train_line = (t.replace(prefix, "<prefix>") for t in (line, train_line))
    figures(
        "security",
        "wrong secret: shard pack",
        outcome=f"exit {proc.returncode}, '{line}'; objects written: {len(written)}",
    )
    figures(
        "security",
        "wrong secret: train",
        outcome=f"exit {trained.returncode}, '{train_line}'; objects written: {len(written)}",
    )
    assert written == {}
    with pytest.raises(ManifestError) as caught:  # the library's view of the same problem
        build_loader(
            LoaderConfig(data=f"s3://secrets/{prefix}/ds", batch_size=4, num_workers=0,
                         storage_options=secret_server.storage_options(secret_key=WRONG_SECRET)),
            World(),
        )  # fmt: skip
    loader_msg = str(caught.value).replace(prefix, "<prefix>")
    figures("security", "wrong secret: loader", outcome=f"ManifestError '{loader_msg}'")
    for text in (line, train_line, loader_msg):
        assert "denied" in text and "credentials" in text and "\n" not in text, text
        assert not _leaks(text)


# -- hostile tar members ------------------------------------------------------------


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes | None = None) -> None:
    good = jpeg(1)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, payload in (("a.jpg", good), ("a.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        tf.addfile(member, io.BytesIO(data) if data is not None else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


HOSTILE = {
    "member '../escape.jpg'": (_member("../escape.jpg", size=4), b"evil", "unsafe member name"),
    "member '/tmp/abs.jpg'": (_member("/tmp/abs.jpg", size=4), b"evil", "unsafe member name"),
    "member 'x/../../up.jpg'": (_member("x/../../up.jpg", size=4), b"evil", "unsafe member"),
    "symlink member to /etc/passwd": (
        _member("b.jpg", tarfile.SYMTYPE, link="/etc/passwd"),
        None,
        "is a link",
    ),
    "hard link member": (_member("c.jpg", tarfile.LNKTYPE, link="a.jpg"), None, "is a link"),
    "FIFO member": (_member("d.jpg", tarfile.FIFOTYPE), None, "not a regular file"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tar_members_are_refused(case, tmp_path, capsys, figures):
    member, data, reason = HOSTILE[case]
    work = tmp_path / "in" / "deeper"
    work.mkdir(parents=True)
    tar = work / "evil.tar"
    _tar_with(tar, member, data)
    dest = tmp_path / "out"
    status = shard_main(["pack", str(tar), str(dest), "--workers", "1"])
    err = capsys.readouterr().err
    line = one_line_error(err, "shard pack: error: ")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != tar]
    figures(
        "security", f"tar {case}", outcome=f"exit {status}, '{line.replace(str(tmp_path), '')}'"
    )
    assert status == 1 and reason in line
    assert written == [] and not (dest / MANIFEST_NAME).exists()


# -- checkpoints are data, never code ------------------------------------------------


class _Payload:
    """Unpickling this runs os.mkdir(MARKER): what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_malicious_checkpoint_is_refused(tmp_path, figures):
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    evil = run_dir / "checkpoints" / "step-000000007.pt"
    torch.save({"format": checkpoint.FORMAT, "model": _Payload(marker), "step": 7}, evil)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(str(evil))
    message = str(caught.value)
    assert "\n" not in message and "unreadable" in message and "weights" in message.lower()
    assert checkpoint.load_latest(str(run_dir)) is None  # --resume auto skips it
    assert not marker.exists()  # the payload never ran
    # Every torch.load in the product goes through checkpoint.load (weights_only=True).
    uses = [
        (p.relative_to(REPO), line)
        for pkg in ("shard_tools", "pipeline", "train", "benchmarks")
        for p in (REPO / pkg).rglob("*.py")
        for line in p.read_text().splitlines()
        if "torch.load(" in line and not line.lstrip().startswith(("#", "containers"))
    ]
    assert all("weights_only=True" in line for _, line in uses), uses
    figures(
        "security",
        "checkpoint with a pickle payload (reduce -> os.mkdir)",
        outcome=f"refused: '{message.replace(str(tmp_path), '')[:160]}'; payload ran: no; "
        f"torch.load calls in the product: {len(uses)}, all weights_only=True",
    )


# -- manifests of another version, or not JSON ---------------------------------------


def _bad_manifest(root: Path, how: str) -> None:
    path = root / MANIFEST_NAME
    if how == "malformed JSON":
        path.write_text(path.read_text()[:-30])
        return
    table = root / TABLE_NAME
    if how == "shard table missing":
        table.unlink()
        return
    if how == "shard table truncated":
        table.write_bytes(table.read_bytes()[:-5])
        return
    data = json.loads(path.read_text())
    if how == "format version 99":
        data["format_version"] = 99
    else:  # a bad value written into the shard table as a writer would, hashes and all
        column, row, value = {
            "shard name '../../x.tar'": ("name", 0, "../../x.tar"),
            "index name '../../x.idx'": ("index", 0, "../../x.idx"),
            "index name 'sub/x.idx'": ("index", -1, "sub/x.idx"),
        }[how]
        shards = read_manifest(str(root)).shards
        cols = {c: shards.column(c) for c in COLUMNS}
        values = list(cols[column])
        values[row] = value
        cols[column] = TextColumn.of(values)
        raw, data["shard_table"] = ShardTable(len(shards), cols).encode()
        table.write_bytes(raw)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, images) -> Path:
    dest = tmp_path_factory.mktemp("sec-packed") / "ds"
    assert shard_main(["pack", str(images), str(dest), "--workers", "1", "--max-count", "8"]) == 0
    return dest


BAD_MANIFESTS = {
    "format version 99": "format version 99",
    "malformed JSON": "not valid JSON",
    "shard name '../../x.tar'": "shard name must be a plain file name",
    "index name '../../x.idx'": "index name must be a plain file name",
    "index name 'sub/x.idx'": "index name must be a plain file name",
    "shard table missing": "manifest.shards, which is missing beside it",
    "shard table truncated": "does not match the manifest",
}


@pytest.mark.parametrize("how", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_by_verify_and_loader(packed, tmp_path, how, capsys, figures):
    root = tmp_path / "ds"
    shutil.copytree(packed, root)
    _bad_manifest(root, how)
    capsys.readouterr()
    status = shard_main(["verify", str(root)])
    line = one_line_error(capsys.readouterr().err, "shard verify: error: ")
    with pytest.raises(ManifestError) as caught:
        build_loader(LoaderConfig(data=str(root), batch_size=4, num_workers=0), World())
    loader_msg = str(caught.value)
    figures(
        "security",
        f"manifest: {how}",
        outcome=f"shard verify exit {status}: '{line.replace(str(root), '<ds>')}'; "
        f"loader: ManifestError '{loader_msg.replace(str(root), '<ds>')}'",
    )
    assert status == 1 and "\n" not in loader_msg
    want = BAD_MANIFESTS[how]
    assert want in line and want in loader_msg
    # Every refusal names the file it read (root/manifest.json), the shard-name one included.
    assert f"{root}/manifest.json" in line and f"{root}/manifest.json" in loader_msg
    if how.startswith("format"):
        assert "upgrade shardflow or re-pack" in loader_msg  # says what to do


# -- credentials written into URLs -----------------------------------------------------

URL_USER, URL_PASSWORD = "reader", "url-password-7d2c91e04b"


@pytest.fixture
def basic_auth_server(images):
    """A loopback HTTP server that serves IMAGES' folder only with URL_USER:URL_PASSWORD."""
    import base64
    import functools
    import http.server
    import threading

    token = "Basic " + base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def _allowed(self) -> bool:
            if self.headers.get("Authorization") == token:
                return True
            self.send_error(401)
            return False

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self._allowed():
                super().do_GET()

        def do_HEAD(self):  # noqa: N802
            if self._allowed():
                super().do_HEAD()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(images))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_credentials_in_urls_are_redacted_or_refused(basic_auth_server, images, tmp_path, figures):
    """http(s)://user:password@ sources are read with their credentials, which then appear
    nowhere (manifest, rejected.jsonl, tar members, output); s3://key:secret@ is refused."""
    host = f"http://{URL_USER}:{URL_PASSWORD}@{basic_auth_server}"
    rows = ["path,label"] + [
        f"{host}/{p.relative_to(images)},{p.parent.name}" for p in sorted(images.rglob("*.jpg"))
    ]
    rows.append(f"{host}/class01/missing.jpg,class01")
    (images / "remote.csv").write_text("\n".join(rows) + "\n")
    dest = tmp_path / "ds"
    proc = run_shard(
        ["pack", f"{host}/remote.csv", dest, "--workers", "1", "--json"], env=child_env()
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["samples"] == 16 and summary["rejected"] == 2  # broken.jpg and missing.jpg
    outputs = {p.name: p.read_bytes() for p in dest.iterdir()}
    outputs["output"] = (proc.stdout + proc.stderr).encode()
    leaked = sorted(name for name, data in outputs.items() if URL_PASSWORD.encode() in data)
    manifest = json.loads(outputs[MANIFEST_NAME])
    assert manifest["options"]["src"] == f"http://***@{basic_auth_server}/remote.csv"
    assert b"http://***@" in outputs["rejected.jsonl"]

    refused = {}
    for cmd in (["pack", images, f"s3://AKIAX:{URL_PASSWORD}@bucket/ds"],
                ["pack", f"s3://AKIAX:{URL_PASSWORD}@bucket/in/*.tar", tmp_path / "x"]):  # fmt: skip
        p = run_shard(cmd, env=child_env())
        refused[cmd[-1 if "s3://" in str(cmd[-1]) else 1]] = (p.returncode, p.stderr)
    with pytest.raises(ValueError) as caught:
        LoaderConfig(data=f"s3://AKIAX:{URL_PASSWORD}@bucket/ds", batch_size=4)
    figures(
        "security",
        "credentials inside URLs",
        outcome=f"http basic-auth SRC packed {summary['samples']} samples; the password found in "
        f"{leaked or 'none'} of {len(outputs)} outputs; s3://key:secret@ refused with exit "
        f"{sorted({rc for rc, _ in refused.values()})}",
    )
    assert not leaked
    for status, err in refused.values():
        assert status == 2 and URL_PASSWORD not in err and "credentials in s3:// URLs" in err
        assert len(err.strip().splitlines()) == 1
    assert URL_PASSWORD not in str(caught.value) and "s3://***@bucket/ds" in str(caught.value)
