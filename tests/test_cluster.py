"""The cluster definitions under cluster/: offline checks, no Ray instance, no cloud or Kubernetes API.

- ``cluster/aws.yaml`` and ``cluster/gcp.yaml`` go through the steps of ``ray up`` that need no cloud account:
  ``prepare_config`` (Ray's defaults merged in, setup commands merged per node type) and ``validate_config`` (Ray's
  ``ray-schema.json`` plus its own consistency checks). The provider bootstrap that follows them in ``ray up``
  talks to AWS / GCP and is left out.
- The KubeRay manifests parse, name the ray.io/v1 kinds, and agree with the project: the RayService embeds
  ``serve_apps/phi1.yaml`` verbatim, its import path imports, and the RayJob's command line is a valid job
  command line for files that exist.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from phi1_ray.serving.app import HAPROXY_ENV
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = ROOT / "serve_apps" / "phi1.yaml"
LAUNCHER = {
    # file: (provider, GPU instance type, object storage scheme)
    "aws.yaml": ("aws", "p4d.24xlarge", "s3://"),
    "gcp.yaml": ("gcp", "a2-highgpu-8g", "gs://"),
}
GPU_TYPE = "gpu_8x_a100"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one document of each file under cluster/kuberay."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, (path, len(docs))
        found[docs[0]["kind"]] = docs[0]
    return found


def ray_minor() -> str:
    """The Ray release the project pins (pyproject: ``ray[...]==2.60.*`` -> ``2.60``)."""
    match = re.search(r'"ray\[[^\]]*\]==(\d+\.\d+)\.\*"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins ray as ray[...]==X.Y.*"
    return match.group(1)


def torch_pin() -> str:
    match = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match
    return match.group(1)


def prepared(name: str) -> dict[str, Any]:
    """The config as ``ray up`` validates it: defaults and merged setup commands included."""
    config = prepare_config(copy.deepcopy(load(CLUSTER / name)))
    validate_config(config)
    return config


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray containers of a RayClusterSpec: head first, then one per worker group."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"]["containers"][0] for group in groups]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ]


# ---------------------------------------------------------------------------------------------- ray up configs


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_passes_rays_validator(name):
    config = prepared(name)
    provider, _, _ = LAUNCHER[name]
    assert config["provider"]["type"] == provider
    assert config["head_node_type"] in config["available_node_types"]


BREAKAGES = {
    # name: (what is done to a copy of the file, what the validator says)
    "misspelt top-level key": (
        lambda c: c.update(max_worker=c.pop("max_workers")),
        "'max_worker' was unexpected",
    ),
    "GPU count as a string": (
        lambda c: c["available_node_types"][GPU_TYPE]["resources"].update(GPU="8"),
        "'8' is not of type 'integer'",
    ),
    "unknown key in a node type": (
        lambda c: c["available_node_types"][GPU_TYPE].update(min_worker=0),
        "'min_worker' was unexpected",
    ),
    "head type not declared": (
        lambda c: c.update(head_node_type="ray.head.default"),
        "must be one of `available_node_types`",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_rays_validator_rejects_a_broken_copy(name, breakage):
    """The validator is not a no-op: the same file with one mistake fails it."""
    config = load(CLUSTER / name)
    mutate, message = BREAKAGES[breakage]
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_gpu_nodes_setup_and_storage(name):
    provider, instance, scheme = LAUNCHER[name]
    config = prepared(name)
    types = config["available_node_types"]
    head, gpu = types[config["head_node_type"]], types[GPU_TYPE]

    # a CPU head, and 8-GPU nodes that autoscale from zero
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] > 0
    assert gpu["resources"] == {"CPU": 96, "GPU": 8}
    assert gpu["min_workers"] in (0, 1) and gpu["max_workers"] >= 2
    node = gpu["node_config"]
    assert node.get("InstanceType", node.get("machineType")) == instance
    if provider == "gcp":
        assert node["guestAccelerators"] == [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 8}]
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
        scopes = [s for account in node["serviceAccounts"] for s in account["scopes"]]
        assert any("devstorage.read_write" in s or "cloud-platform" in s for s in scopes)
    else:
        assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")

    # the image runs the Ray release the project pins; torch pinned as in the Makefile; GPU nodes add the `gpu` extra
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_minor())}\.\d+-py311-gpu", config["docker"]["image"])
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert f'pip install -q "torch=={torch_pin()}"' in commands
        assert commands.index(f'pip install -q "torch=={torch_pin()}"') < commands.index(
            "cd ~/phi1_ray && pip install -q -e ."
        )
    assert 'cd ~/phi1_ray && pip install -q -e ".[gpu]"' in config["worker_setup_commands"]
    assert any("--no-build-isolation" in c and "flash-attn" in c for c in config["worker_setup_commands"])

    # the project and the auth token travel with `ray up`; every node starts Ray with token authentication
    assert config["file_mounts"]["~/phi1_ray"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    env = config["setup_commands"][0]
    assert "export RAY_AUTH_MODE=token" in env and "export PYTHONPATH=$HOME/phi1_ray" in env
    assert f"export {HAPROXY_ENV}=1" in env  # Serve's HAProxy ingress on every node

    # shared storage is this cloud's object storage
    text = (CLUSTER / name).read_text()
    uris = re.findall(r"\b[a-z0-9]+://YOUR-BUCKET/\S*", text)
    assert uris and all(u.startswith(scheme + "YOUR-BUCKET/phi1") for u in uris), uris
    assert f"export PHI1_CHECKPOINT={scheme}YOUR-BUCKET/phi1/export" in env


# --------------------------------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests_parse_as_ray_io_v1_kinds():
    found = manifests()
    assert set(found) == {"RayCluster", "RayJob", "RayService"}
    dockerfile = (KUBERAY / "raycluster.yaml").read_text()
    base = re.search(r"^#\s+FROM (\S+)$", dockerfile, re.MULTILINE)
    assert base and re.fullmatch(rf"rayproject/ray:{re.escape(ray_minor())}\.\d+-py311-gpu", base.group(1))
    images = set()
    for kind, doc in found.items():
        assert doc["apiVersion"] == "ray.io/v1", kind
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == base.group(1).split(":")[1].split("-")[0], kind
        assert spec["authOptions"] == {"mode": "token", "secretName": "phi1-ray-token"}, kind
        images |= {c["image"] for c in containers(spec)}
    assert images == {"YOUR-REGISTRY/phi1-ray:0.1.0"}  # the image the Dockerfile in raycluster.yaml builds


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_training_workers_are_8_gpu_pods(kind):
    spec = cluster_spec(manifests()[kind])
    head, *workers = containers(spec)
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert [w["resources"]["limits"]["nvidia.com/gpu"] for w in workers] == [8]
    assert workers[0]["resources"]["requests"]["nvidia.com/gpu"] == 8


def test_rayservice_embeds_the_serve_config_verbatim():
    spec = manifests()["RayService"]["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    assert spec["serveConfigV2"] == SERVE_CONFIG.read_text()  # comments included
    # the block as written in the manifest: the file indented by four spaces
    text = (KUBERAY / "rayservice.yaml").read_text()
    assert textwrap.indent(SERVE_CONFIG.read_text(), "    ") in text


def test_rayservice_serve_config_is_valid_for_serve_and_the_app():
    from ray.serve.schema import ServeDeploySchema

    from phi1_ray.serving.app import parse_args

    config = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        parse_args(app.args)  # every key an AppArgs field, every value valid


def test_rayservice_import_path_resolves():
    config = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert app["import_path"] == "serve_apps.phi1:app_builder"
        assert callable(getattr(importlib.import_module(module), attr))


def test_rayservice_keeps_a_gpu_pod_and_names_the_checkpoint():
    from phi1_ray.serving.app import CHECKPOINT_ENV, resolve_checkpoint

    spec = manifests()["RayService"]["spec"]["rayClusterConfig"]
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups and all(g["minReplicas"] >= 1 for g in gpu_groups)
    for container in containers(spec):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env[CHECKPOINT_ENV] == "s3://YOUR-BUCKET/phi1/export"
        assert resolve_checkpoint(env[CHECKPOINT_ENV]) == env[CHECKPOINT_ENV]  # object storage is taken as is


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_kuberay_serving_clusters_run_serves_haproxy_ingress(kind):
    spec = cluster_spec(manifests()[kind])
    for container in containers(spec):
        assert {e["name"]: e["value"] for e in container["env"]}.get(HAPROXY_ENV) == "1", container["name"]


def test_rayjob_runs_pretraining_with_checkpoints_on_object_storage(monkeypatch, capsys):
    from phi1_ray.cli import config_from_argv
    from phi1_ray.train.config import TrainJobConfig

    doc = manifests()["RayJob"]
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "jobs/pretrain.py", "--config", "configs/pretrain/phi-1.yaml"]
    assert (ROOT / argv[1]).is_file() and (ROOT / argv[3]).is_file()
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    # the job's working directory is the project in the image (WORKDIR of the Dockerfile in raycluster.yaml)
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/home/ray/phi1_ray"}
    assert "WORKDIR /home/ray/phi1_ray" in (KUBERAY / "raycluster.yaml").read_text()

    # the command line as the job reads it: the file plus the overrides, validated
    monkeypatch.chdir(ROOT)
    cfg = config_from_argv(TrainJobConfig, "pretrain", argv=argv[2:], fixed=["job=pretrain"])
    capsys.readouterr()
    assert cfg.job == "pretrain" and cfg.name == "pretrain-phi-1"
    assert cfg.storage_path == "s3://YOUR-BUCKET/phi1/checkpoints"
    assert cfg.prepared.startswith("s3://YOUR-BUCKET/phi1/")
    # one Ray Train worker per GPU of the job's cluster
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in workers
    )
    assert cfg.train.num_workers == gpus
