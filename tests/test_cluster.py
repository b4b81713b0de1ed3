"""Cluster configs in cluster/: the AWS launcher YAML against Ray's own schema, the KubeRay manifests,
the runtime env and the project image. Static checks only: no network, no cloud, no Ray cluster."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

import ray.autoscaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
AWS_YAML = os.path.join(CLUSTER, "aws.yaml")
RAYCLUSTER_YAML = os.path.join(CLUSTER, "kuberay", "raycluster.yaml")
RAYJOB_YAML = os.path.join(CLUSTER, "kuberay", "rayjob.yaml")
RUNTIME_ENV_YAML = os.path.join(CLUSTER, "runtime_env.yaml")
DOCKERFILE = os.path.join(CLUSTER, "Dockerfile")


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def ray_schema():
    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    if not os.path.isfile(path):
        pytest.fail(f"Ray's cluster config schema not found at {path} (ray {ray.__version__})")
    with open(path) as f:
        return json.load(f)


def pinned_ray_version():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))
    return pins["ray"]


def image_workdir():
    with open(DOCKERFILE) as f:
        return [line.split()[1] for line in f if line.startswith("WORKDIR ")][-1]


# --- AWS cluster launcher --------------------------------------------------------------------------

def test_aws_config_validates_against_rays_shipped_schema():
    jsonschema.validate(load(AWS_YAML), ray_schema())


def test_aws_config_passes_rays_own_prepare_and_validate():
    # What `ray up` runs before it talks to AWS: merge with ray/autoscaler/aws/defaults.yaml, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(AWS_YAML))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"]["gpu_worker"]["min_workers"] == 0


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", "zero"),
    lambda c: c.__setitem__("gpu_workers_please", 4),
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", -1),
    lambda c: c["available_node_types"]["head"].pop("node_config"),
], ids=["min_workers-not-int", "unknown-top-level-key", "negative-gpu", "missing-node_config"])
def test_rays_schema_rejects_a_broken_aws_config(mutate):
    config = copy.deepcopy(load(AWS_YAML))
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_aws_has_cpu_head_and_gpu_workers_autoscaled_from_zero():
    config = load(AWS_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    assert 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_aws_installs_the_repo_with_the_pinned_set():
    config = load(AWS_YAML)
    assert config["file_mounts"]["~/edc-ray"] == "."
    assert any("pip install" in c and "-c constraints.txt -e ." in c and "~/edc-ray" in c
               for c in config["setup_commands"])
    for excluded in (".venv", "data", "runs", ".git"):
        assert excluded in config["rsync_exclude"]
    images = [config["docker"]["head_image"], config["docker"]["worker_image"]]
    assert all(img.startswith(f"rayproject/ray:{pinned_ray_version()}-py311") for img in images)


def test_aws_keeps_token_auth_on_with_one_shared_token():
    config = load(AWS_YAML)
    assert config["file_mounts"]["~/.edc-ray-token"] == "~/.edc-ray-token"  # the token only, not ~/.ray
    assert not any(remote.startswith("~/.ray") for remote in config["file_mounts"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.edc-ray-token/auth_token ray start" in c
                              for c in starts)
    text = open(AWS_YAML).read()
    assert "RAY_AUTH_MODE=disabled" not in text


def test_aws_opens_only_ssh_from_a_given_range_to_the_outside():
    rules = load(AWS_YAML)["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")]
    assert [ip["CidrIp"] for ip in rules[0]["IpRanges"]] == ["YOUR-ADMIN-CIDR"]  # never 0.0.0.0/0


def test_aws_placeholders_are_marked():
    text = open(AWS_YAML).read()
    for placeholder in ("YOUR-AWS-REGION", "YOUR-DLAMI-AMI-ID", "YOUR-ACCOUNT-ID"):
        lines = [line for line in text.splitlines() if placeholder in line and not line.lstrip().startswith("#")]
        assert lines and all("PLACEHOLDER" in line for line in lines), placeholder


# --- KubeRay ---------------------------------------------------------------------------------------

def test_kuberay_manifests_have_expected_kinds_and_ray_version():
    with open(RAYCLUSTER_YAML) as f:
        clusters = [d for d in yaml.safe_load_all(f) if d]
    with open(RAYJOB_YAML) as f:
        jobs = [d for d in yaml.safe_load_all(f) if d]
    assert [(d["apiVersion"], d["kind"]) for d in clusters] == [("ray.io/v1", "RayCluster")]
    assert [(d["apiVersion"], d["kind"]) for d in jobs] == [("ray.io/v1", "RayJob")]
    assert clusters[0]["spec"]["rayVersion"] == pinned_ray_version() == "2.60.0"


def test_rayjob_runs_on_the_same_cluster_spec_and_shuts_down():
    cluster, job = load(RAYCLUSTER_YAML), load(RAYJOB_YAML)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_kuberay_gpu_worker_group_autoscales_from_zero():
    spec = load(RAYCLUSTER_YAML)["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kuberay_keeps_token_auth_on():
    spec = load(RAYCLUSTER_YAML)["spec"]
    assert spec["authOptions"]["mode"] == "token"


def test_kuberay_credentials_come_from_secrets_only():
    spec = load(RAYCLUSTER_YAML)["spec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                if var["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                   "AWS_ENDPOINT_URL", "RAY_AUTH_TOKEN"):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var


def test_no_literal_secrets_anywhere_in_cluster():
    for folder, _, files in os.walk(CLUSTER):
        for name in files:
            text = open(os.path.join(folder, name)).read()
            assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text), name
            assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), name
            assert not re.search(r"(?i)RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-f]{32,}", text), name


def test_rayjob_entrypoint_names_existing_job_and_config():
    entrypoint = shlex.split(load(RAYJOB_YAML)["spec"]["entrypoint"])
    assert not {"&&", ";", "|"} & set(entrypoint)  # KubeRay would run anything after these outside the cluster
    workdir = image_workdir().rstrip("/") + "/"

    def in_repo(path):
        assert path.startswith(workdir) or not os.path.isabs(path), path
        return os.path.join(ROOT, path[len(workdir):] if path.startswith(workdir) else path)

    assert entrypoint[0] == "python"
    script = in_repo(entrypoint[1])
    assert os.path.relpath(script, ROOT) == os.path.join("jobs", "condense.py") and os.path.isfile(script)
    config = in_repo(entrypoint[entrypoint.index("--config") + 1])
    assert os.path.relpath(config, ROOT).startswith("configs" + os.sep) and os.path.isfile(config)

    preset = load(config)  # each --set names a key the preset has (edc_ray.config rejects unknown keys)
    for tok in (entrypoint[i + 1] for i, t in enumerate(entrypoint) if t == "--set"):
        section, key = tok.split("=", 1)[0].split(".")
        assert key in preset[section], tok


# --- runtime env and image -------------------------------------------------------------------------

def test_runtime_env_is_accepted_by_ray_and_excludes_local_state():
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV_YAML)
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    for excluded in (".venv", "data", "runs", ".git"):
        assert excluded in env["excludes"]
    packages = env["pip"]["packages"]
    assert "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt" in packages


def test_dockerfile_builds_on_the_pinned_ray_image_and_installs_with_constraints():
    text = open(DOCKERFILE).read()
    assert f"rayproject/ray:{pinned_ray_version()}-py311" in text
    assert "pip install" in text and "-c constraints.txt" in text
    for name in ("jobs", "configs", "edc_ray"):
        assert re.search(rf"^COPY .*\b{name}\b", text, re.M), name
