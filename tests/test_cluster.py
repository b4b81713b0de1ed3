"""Cluster configs in cluster/: the AWS launcher YAML against Ray's own schema, the KubeRay manifests,
the runtime env, the project image and the Grafana dashboard. Static checks only: no network, no cloud,
no Ray cluster (the autoscaler checks call Ray's own scheduling functions on the configs)."""
from __future__ import annotations

import collections
import copy
import functools
import glob
import inspect
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

import ray.autoscaler

from edc_ray.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
AWS_YAML = os.path.join(CLUSTER, "aws.yaml")
RAYCLUSTER_YAML = os.path.join(CLUSTER, "kuberay", "raycluster.yaml")
RAYJOB_YAML = os.path.join(CLUSTER, "kuberay", "rayjob.yaml")
RUNTIME_ENV_YAML = os.path.join(CLUSTER, "runtime_env.yaml")
DOCKERFILE = os.path.join(CLUSTER, "Dockerfile")
GRAFANA_JSON = os.path.join(CLUSTER, "grafana", "edc-ray-dashboard.json")


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


def aws_worker_types(config, gpu: bool) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and (t["resources"].get("GPU", 0) > 0) == gpu}


def test_aws_has_cpu_head_and_gpu_workers_autoscaled_from_zero():
    config = load(AWS_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    (gpu,) = aws_worker_types(config, gpu=True).values()
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    assert 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_aws_has_a_cpu_worker_type_autoscaled_from_zero_without_gpus():
    config = load(AWS_YAML)
    cpu_types = aws_worker_types(config, gpu=False)
    assert list(cpu_types) == ["cpu_worker"]
    cpu = cpu_types["cpu_worker"]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1
    assert set(cpu["resources"]) == {"CPU"} and cpu["resources"]["CPU"] >= 8  # declared, no GPU
    assert not cpu["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU instance family
    assert not cpu.get("docker", {}).get("worker_image", "").endswith("-gpu")
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]  # every type can reach its max


# --- Ray's own autoscaler on our node types: which types a demand starts -----------------------------

def launched_types(config: dict, bundle: dict, count: int, version: str) -> tuple[dict, int]:
    """Node types (and counts) Ray's autoscaler `version` (v1 or v2) starts for `count` x `bundle` on an
    autoscaling `config` (launcher form), the head already taken; and how many bundles it could not place."""
    head = config["head_node_type"]
    if version == "v1":
        from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
        from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

        types = {k: v for k, v in config["available_node_types"].items() if k != head}
        scorer = functools.partial(_default_utilization_scorer,
                                   node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
        added, residual = get_nodes_for(types, {}, head, config["max_workers"], [dict(bundle)] * count, scorer)
        return dict(added), len(residual)
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    v2 = AutoscalingConfig(configs=config, skip_content_hash=True)
    types = {k: v for k, v in v2.get_node_type_configs().items() if k != head}
    reply = ResourceDemandScheduler().schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=types, max_num_nodes=v2.get_max_num_worker_nodes(),
        resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(bundle), count=count)]))
    added = collections.Counter()
    for launch in reply.to_launch:
        added[launch.instance_type] += launch.count
    return dict(added), len(reply.infeasible_resource_requests)


def autoscaling_configs() -> dict:
    """Our node layouts as Ray's autoscaler sees them: aws.yaml after `ray up`'s prepare_config, and the
    RayCluster translated by the KubeRay autoscaler's own converter."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import prepare_config

    cr = load(RAYCLUSTER_YAML)
    cr["metadata"].setdefault("namespace", "default")
    return {"aws": prepare_config(load(AWS_YAML)), "kuberay": _derive_autoscaling_config_from_ray_cr(cr)}


def gpu_type_names(config: dict) -> set:
    return {k for k, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def cpu_only_demands() -> list[tuple[str, dict, int]]:
    """The statistics stage of every shipped preset that keeps it on CPUs (ray.stats_gpus 0), plus a burst
    of export tasks (1 CPU each)."""
    demands = [("export", {"CPU": 1.0}, 8)]
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*", "edc_ipc*.yaml"))):
        r = load_config(path).ray  # (the ray section comes from the dataset's base.yaml)
        if r.address == "auto" and not r.stats_gpus:
            demands.append((os.path.relpath(path, ROOT), {"CPU": r.stats_cpus}, r.stats_tasks))
    return demands


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["aws", "kuberay"])
def test_cpu_only_work_starts_cpu_workers_never_gpu_workers(layout, version):
    config = autoscaling_configs()[layout]
    gpu_types = gpu_type_names(config)
    demands = cpu_only_demands()
    assert any(name.startswith("configs") for name, _, _ in demands)  # the cloud presets were found
    for name, bundle, count in demands:
        added, infeasible = launched_types(config, bundle, count, version)
        assert added and not infeasible, (name, added, infeasible)
        assert not set(added) & gpu_types, (name, added)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["aws", "kuberay"])
def test_gpu_actors_start_gpu_workers_only(layout, version):
    config = autoscaling_configs()[layout]
    preset = load_config(os.path.join(ROOT, "configs", "cifar10", "edc_ipc10.yaml")).ray
    bundle = {"CPU": preset.actor_cpus, "GPU": preset.actor_gpus}
    added, infeasible = launched_types(config, bundle, preset.synthesis_actors, version)
    assert not infeasible and set(added) <= gpu_type_names(config), added
    assert sum(added.values()) == preset.synthesis_actors  # one 1-GPU node per actor


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
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    rules = job["spec"]["deletionStrategy"]["deletionRules"]
    # The cluster goes after success and after any failure (app failed, a deadline passed, submission).
    assert {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 600}} in rules
    assert any(r["policy"] == "DeleteCluster" and r["condition"].get("jobDeploymentStatus") == "Failed"
               for r in rules)


def test_rayjob_deletion_rules_follow_kuberays_validation():
    # What KubeRay's CRD and ValidateRayJobSpec enforce (ray-operator/apis/ray/v1/rayjob_types.go,
    # controllers/ray/utils/validation.go, v1.6): rules exclude shutdownAfterJobFinishes and a global TTL.
    spec = load(RAYJOB_YAML)["spec"]
    strategy = spec["deletionStrategy"]
    assert set(strategy) == {"deletionRules"}  # not mixed with the legacy onSuccess/onFailure
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    seen = set()
    for rule in strategy["deletionRules"]:
        assert set(rule) == {"policy", "condition"}
        assert rule["policy"] in ("DeleteCluster", "DeleteSelf", "DeleteNone")  # DeleteWorkers: not with autoscaling
        cond = rule["condition"]
        assert set(cond) - {"ttlSeconds"} in ({"jobStatus"}, {"jobDeploymentStatus"})
        assert cond.get("jobStatus", "SUCCEEDED") in ("SUCCEEDED", "FAILED")
        assert cond.get("jobDeploymentStatus", "Failed") == "Failed"
        assert isinstance(cond.get("ttlSeconds", 0), int) and cond.get("ttlSeconds", 0) >= 0
        key = (cond.get("jobStatus"), cond.get("jobDeploymentStatus"), rule["policy"])
        assert key not in seen, key
        seen.add(key)


def test_rayjob_has_deadlines_and_autoscaler_v2():
    spec = load(RAYJOB_YAML)["spec"]
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] >= 3600
    assert isinstance(spec["preRunningDeadlineSeconds"], int) and 0 < spec["preRunningDeadlineSeconds"] < spec[
        "activeDeadlineSeconds"]
    cluster = spec["rayClusterSpec"]
    assert cluster["autoscalerOptions"]["version"] == "v2"
    # KubeRay refuses autoscalerOptions.version together with the env switch, and v2 with restartPolicy
    # other than Never.
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert not any(v["name"] == "RAY_enable_autoscaler_v2" for v in head["containers"][0].get("env", []))
    for pod in [head] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        assert pod.get("restartPolicy", "Never") == "Never"


def test_rayjob_metadata_tells_runs_apart():
    spec = load(RAYJOB_YAML)["spec"]
    metadata = spec["metadata"]
    assert {"job_name", "run_dir", "method", "dataset", "ipc"} <= set(metadata)
    assert all(isinstance(v, str) for v in metadata.values())  # map[string]string in the CRD
    entrypoint = shlex.split(spec["entrypoint"])
    sets = dict(entrypoint[i + 1].split("=", 1) for i, t in enumerate(entrypoint) if t == "--set")
    assert metadata["run_dir"] == sets["output.run_dir"]
    config = entrypoint[entrypoint.index("--config") + 1].split("/edc-ray/", 1)[1]  # configs/<dataset>/...
    preset = load_config(os.path.join(ROOT, config))
    assert metadata["method"] == preset.method
    assert metadata["dataset"] == config.split("/")[1]
    assert metadata["ipc"] == str(preset.synthesis.ipc)


def kuberay_groups(spec, gpu: bool) -> list:
    def has_gpu(group):
        (worker,) = group["template"]["spec"]["containers"]
        return bool(worker["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    return [g for g in spec["workerGroupSpecs"] if has_gpu(g) == gpu]


def test_kuberay_gpu_worker_group_autoscales_from_zero():
    spec = load(RAYCLUSTER_YAML)["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = kuberay_groups(spec, gpu=True)
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML], ids=["raycluster", "rayjob"])
def test_kuberay_has_a_cpu_worker_group_autoscaled_from_zero(path):
    doc = load(path)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    (group,) = kuberay_groups(spec, gpu=False)
    assert group["groupName"] == "cpu"
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    assert float(worker["resources"]["limits"]["cpu"]) >= 1
    assert not any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))
    assert group["rayStartParams"]["metrics-export-port"] == "8080"  # scraped like every other node


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

    overrides = [entrypoint[i + 1] for i, t in enumerate(entrypoint) if t == "--set"]
    load_config(config, overrides)  # the config with the job's --set overrides loads (unknown keys would not)


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


# --- Grafana dashboard -----------------------------------------------------------------------------

# Labels Ray puts on every custom metric (seen on a Ray 2.60 /metrics endpoint) and the one KubeRay's
# PodMonitors add; a dashboard may group or filter by these besides a metric's own tag keys.
RAY_LABELS = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version", "ray_io_cluster"}
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "last_over_time",
                "max_over_time", "topk", "bottomk", "or", "and", "unless", "label_values", "query_result"}


def exported_metrics() -> dict[str, set]:
    """{name on the /metrics endpoint: tag keys} of every metric edc_ray/pipeline/metrics.py registers,
    found by calling each of its public functions with stand-in Gauge and Counter classes. Ray prefixes
    `ray_`; Prometheus appends `_total` to a counter."""
    from edc_ray.pipeline import metrics

    seen = {}

    def stand_in(kind):
        class Metric:
            def __init__(self, name, description="", tag_keys=()):
                seen[f"ray_{name}{'_total' if kind == 'counter' else ''}"] = set(tag_keys)

            def set(self, value, tags=None):
                pass

            inc = set
        return Metric

    examples = {"str": "x", "int": 1, "float": 1.0}
    caches = [f for f in vars(metrics).values() if hasattr(f, "cache_clear")]
    functions = [f for name, f in inspect.getmembers(metrics, inspect.isfunction)
                 if f.__module__ == metrics.__name__ and not name.startswith("_")]
    assert functions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "Gauge", stand_in("gauge"))
        mp.setattr(metrics, "Counter", stand_in("counter"))
        for cache in caches:
            cache.cache_clear()
        try:
            for f in functions:
                params = inspect.signature(f).parameters.values()
                f(*[examples[str(p.annotation)] for p in params])
        finally:
            for cache in caches:  # drop the stand-ins: later callers get real metrics again
                cache.cache_clear()
    return seen


def grafana_expressions(dashboard) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def promql_metric_names(expr: str) -> set:
    """Metric names in a PromQL (or Grafana label_values/query_result) expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                       # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                      # range selectors
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)       # grouping labels
    expr = re.sub(r"label_values\(([^,()]*),[^)]*\)", r"\1", expr)  # label_values(metric, label)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if w not in PROMQL_WORDS}


def promql_labels(expr: str) -> set:
    grouped = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
    matched = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", expr)
    labels = {w.strip() for g in grouped for w in g.split(",") if w.strip()} | set(matched)
    labels |= set(re.findall(r"label_values\([^,()]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", expr))
    return labels


def test_metric_names_match_what_ray_exports():
    # Checked against a live Ray 2.60 endpoint: a Counter "edc_synthesis_images" is scraped as
    # ray_edc_synthesis_images_total, gauges as ray_<name>.
    names = exported_metrics()
    assert "ray_edc_synthesis_images_total" in names
    assert all(n.startswith("ray_edc_") for n in names)


def test_grafana_dashboard_parses_and_is_well_formed():
    with open(GRAFANA_JSON) as f:
        dashboard = json.load(f)
    assert dashboard["title"] and dashboard["uid"] and 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    (source,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, var["name"]


def test_grafana_queries_name_only_metrics_that_edc_ray_exports():
    with open(GRAFANA_JSON) as f:
        dashboard = json.load(f)
    exported = exported_metrics()
    used = set()
    for expr in grafana_expressions(dashboard):
        names = promql_metric_names(expr)
        assert names and names <= set(exported), (expr, names - set(exported))
        allowed = RAY_LABELS.union(*(exported[n] for n in names))
        assert promql_labels(expr) <= allowed, (expr, promql_labels(expr) - allowed)
        used |= names
    assert used == set(exported)  # a panel for every metric
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= promql_labels(target["expr"]), (panel["title"], legend_labels)
