"""The SLURM script and the Kubernetes manifests: valid, and describing one
consistent multi-node torchrun job."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest
from dockerparse import DOCKER, instructions, stage_args, stages, torchrun_options

yaml = pytest.importorskip("yaml", reason="PyYAML parses the Kubernetes manifests")

SBATCH = DOCKER / "slurm" / "train.sbatch"


def _image_uid() -> int:
    runtime = stages(instructions(DOCKER / "Dockerfile.gpu"))[-1]
    return int(stage_args(runtime)["USER_UID"])


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_sbatch_script_launches_one_torchrun_per_node_with_rendezvous_on_the_first():
    text = SBATCH.read_text()
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in text.splitlines()
        if line.startswith("#SBATCH --")
    )
    assert directives["ntasks-per-node"] == "1"
    # Directives are read only before the first command.
    first_command = next(
        i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
    )
    assert all(
        i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")
    )
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert 'head_node="${nodes[0]}"' in text
    for flag in (
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$head_node:$RDZV_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
        '--max-restarts="$MAX_RESTARTS"',
        '--nnodes="$num_nodes"',
    ):
        assert flag in text, f"torchrun in the sbatch script lacks {flag}"
    assert 'srun_args=(--nodes="$num_nodes" --ntasks-per-node=1' in text
    assert 'exec srun "${srun_args[@]}" "${launch[@]}"' in text
    assert "--resume auto" in text


def test_sbatch_script_outside_slurm_says_how_to_run_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "sbatch" in proc.stderr


def test_sbatch_script_requires_data_and_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "OUT")}
    env["SLURM_JOB_NODELIST"] = "node[1-2]"
    proc = subprocess.run(
        ["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert "DATA" in proc.stderr and proc.stderr.strip().count("\n") == 0


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCKER / "k8s" / name).read_text()) if d]


def _container_env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _check_pod_spec(pod: dict, container: dict, nproc: str) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _image_uid()
    env = _container_env(container)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], f"{key} must come from a Secret"
        assert "value" not in env[key]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(nproc)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/runs", "/cache"} <= mounts
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_indexed_job_and_headless_service_agree():
    docs = _docs("indexed-job.yaml")
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["bash", "-c"]
    script = args[2]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    words = shlex.split(script.split("exec ", 1)[1])
    assert words[0] == "torchrun"
    opts, rest = torchrun_options(words[1:])
    assert int(opts["nnodes"]) == spec["completions"]
    assert opts["node-rank"] == "$JOB_COMPLETION_INDEX"
    assert opts["rdzv-backend"] == "c10d"
    # Pod 0's stable DNS name through the headless service.
    job_name, svc_name = job["metadata"]["name"], service["metadata"]["name"]
    host, port = opts["rdzv-endpoint"].split(":")
    assert host == f"{job_name}-0.{svc_name}"
    assert (
        int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    )
    assert opts["rdzv-conf"] == "is_host=$is_host"
    assert int(opts["max-restarts"]) >= 1
    assert rest[:2] == ["-m", "train"]
    _check_pod_spec(pod, container, opts["nproc-per-node"])


def test_pytorchjob_matches_what_the_operator_expects():
    (job,) = _docs("pytorchjob.yaml")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    elastic = job["spec"]["elasticPolicy"]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert elastic["rdzvBackend"] == "c10d"
    assert elastic["minReplicas"] == elastic["maxReplicas"] == worker["replicas"]
    assert elastic["maxRestarts"] >= 1
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    assert container["ports"][0]["name"] == "pytorchjob-port"
    # Arguments starting with '-' go to torchrun through the image's entrypoint;
    # the rendezvous comes from the operator's PET_* variables.
    opts, rest = torchrun_options(container["args"])
    assert "rdzv-endpoint" not in opts and rest[:2] == ["-m", "train"]
    _check_pod_spec(pod, container, opts["nproc-per-node"])


def test_cluster_examples_use_the_same_training_command():
    (job,) = _docs("pytorchjob.yaml")
    pyt = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    _, pyt_train = torchrun_options(pyt["args"])
    docs = _docs("indexed-job.yaml")
    script = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][
        0
    ]["args"][2]
    _, idx_train = torchrun_options(shlex.split(script.split("exec ", 1)[1])[1:])
    assert pyt_train == idx_train
    assert pyt["image"] == "shardflow:gpu"
