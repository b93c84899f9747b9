"""docker/entrypoint.sh and docker/s3/start-seaweedfs.sh, run for real on this
machine (the venv stands in for the image's /opt/venv), and the compose data
job's own command against a SeaweedFS started by that script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dockerparse import DOCKER

ENTRYPOINT = DOCKER / "entrypoint.sh"
START_S3 = DOCKER / "s3" / "start-seaweedfs.sh"
VENV_BIN = str(Path(sys.executable).parent)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "SHARDFLOW_", "FSSPEC_S3_"))
    }
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _run(args, env, timeout=120):
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_flags_go_to_torchrun():
    proc = _run(["--help"], _env())
    assert proc.returncode == 0, proc.stderr
    assert "torchrun" in proc.stdout and "--nproc-per-node" in proc.stdout


def test_other_commands_run_as_given():
    proc = _run(["python", "-c", "import sys; print(sys.argv[1:])", "a b", "c"], _env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['a b', 'c']"


def test_secret_files_become_variables(tmp_path):
    key, secret = tmp_path / "key", tmp_path / "secret"
    key.write_text("AKID-123\n")  # as `echo KEY > file` leaves it
    secret.write_text("s3cr3t/with+chars=\n")
    code = (
        "import os; print(os.environ['AWS_ACCESS_KEY_ID'] + '|' + os.environ['AWS_SECRET_ACCESS_KEY'] "
        "+ '|' + str('AWS_ACCESS_KEY_ID_FILE' in os.environ))"
    )
    env = _env(AWS_ACCESS_KEY_ID_FILE=str(key), AWS_SECRET_ACCESS_KEY_FILE=str(secret))
    proc = _run(["python", "-c", code], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "AKID-123|s3cr3t/with+chars=|False"


def test_two_sources_for_one_secret_are_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("AKID")
    proc = _run(["true"], _env(AWS_ACCESS_KEY_ID="other", AWS_ACCESS_KEY_ID_FILE=str(key)))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "AWS_ACCESS_KEY_ID_FILE" in proc.stderr


def test_missing_secret_file_is_one_clear_line(tmp_path):
    proc = _run(["true"], _env(AWS_SECRET_ACCESS_KEY_FILE=str(tmp_path / "nope")))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a readable file" in proc.stderr


@pytest.mark.s3
def test_waits_for_the_bucket_and_creates_it(s3_server):
    import s3fs

    bucket = f"wait-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    env = _env(**s3_server.env(), SHARDFLOW_WAIT_FOR_S3=f"s3://{bucket}/some/prefix")
    proc = _run(["true"], env)
    assert proc.returncode == 0, proc.stderr
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    assert fs.exists(bucket)


@pytest.mark.s3
def test_wait_gives_up_with_one_line_on_a_wrong_secret(s3_server):
    env = _env(
        **{**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"},
        SHARDFLOW_WAIT_FOR_S3=f"s3://{s3_server.bucket}",
        SHARDFLOW_WAIT_TIMEOUT_S="2",
    )
    proc = _run(["true"], env)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"s3://{s3_server.bucket} did not answer within 2 s" in proc.stderr


def test_s3_start_script_refuses_missing_or_unsafe_keys(tmp_path):
    key, secret = tmp_path / "key", tmp_path / "secret"
    base = {
        "S3_ACCESS_KEY_FILE": str(key),
        "S3_SECRET_KEY_FILE": str(secret),
        "S3_DATA_DIR": str(tmp_path / "data"),
        "S3_STATE_DIR": str(tmp_path / "state"),
        "WEED": "/nonexistent/weed",  # never reached
    }
    proc = subprocess.run(["sh", str(START_S3)], env=_env(**base), capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    key.write_text('bad"key\n')
    secret.write_text("secret\n")
    proc = subprocess.run(["sh", str(START_S3)], env=_env(**base), capture_output=True, text=True)
    assert proc.returncode == 2 and "keys may hold only" in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.fixture
def compose_s3(tmp_path):
    """docker/s3/start-seaweedfs.sh run as the compose `s3` service runs it, on loopback."""
    from shard_tools import s3_server as srv

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "aws_access_key_id").write_text("compose-key\n")
    (secrets / "aws_secret_access_key").write_text("compose-secret-0123456789\n")
    port = srv.free_port_pair()
    env = _env(
        S3_ACCESS_KEY_FILE=str(secrets / "aws_access_key_id"),
        S3_SECRET_KEY_FILE=str(secrets / "aws_secret_access_key"),
        S3_BUCKET="shardflow",
        S3_PORT=str(port),
        S3_BIND="127.0.0.1",
        S3_DATA_DIR=str(tmp_path / "data"),
        S3_STATE_DIR=str(tmp_path / "state"),
        WEED=srv.weed_binary(),
    )
    log = open(tmp_path / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["sh", str(START_S3)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client_env = {
        # What compose gives the clients: key files, region, endpoint.
        "AWS_ACCESS_KEY_ID_FILE": str(secrets / "aws_access_key_id"),
        "AWS_SECRET_ACCESS_KEY_FILE": str(secrets / "aws_secret_access_key"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    yield proc, client_env, tmp_path
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        # weed's volume server can hang on SIGTERM; nothing here needs a clean stop.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.mark.s3
def test_compose_data_job_packs_into_the_compose_s3_server(compose_s3):
    """The `data` service's command, unchanged but for its scratch folder, through the
    image entrypoint, against SeaweedFS started by the `s3` service's script."""
    import yaml

    from shard_tools.format import read_manifest

    proc, client_env, tmp_path = compose_s3
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["data"]
    script = service["command"][-1].replace("/tmp/synth", str(tmp_path / "synth"))
    env = _env(
        **client_env,
        SHARDFLOW_WAIT_FOR_S3=service["environment"]["SHARDFLOW_WAIT_FOR_S3"],
        SHARDFLOW_WAIT_TIMEOUT_S="60",
    )
    run = _run(service["command"][:-1] + [script], env, timeout=300)
    assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-2000:]
    assert run.returncode == 0, run.stderr[-2000:]

    options = {
        "key": "compose-key",
        "secret": "compose-secret-0123456789",
        "client_kwargs": {
            "endpoint_url": client_env["AWS_ENDPOINT_URL_S3"],
            "region_name": "us-east-1",
        },
    }
    train = read_manifest("s3://shardflow/synth/train", storage_options=options)
    val = read_manifest("s3://shardflow/synth/val", storage_options=options)
    assert (train.samples, len(train.classes), len(train.shards)) == (2000, 10, 8)
    assert (val.samples, len(val.classes), len(val.shards)) == (500, 10, 2)
    assert train.rejected == val.rejected == 0

    # The identities file is enforced: another secret is refused.
    import s3fs

    wrong = s3fs.S3FileSystem(
        key="compose-key",
        secret="not-the-secret",
        client_kwargs=options["client_kwargs"],
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        wrong.ls("shardflow/synth/train")
