"""`ray job submit` of jobs/condense.py to a head started with `ray start --head` (token auth on),
and the pipeline's custom metrics on that head's Prometheus endpoint."""
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tiny import free_ports

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head on its own ports and temp dir, in its own process group (never `ray stop`: that would
    stop every Ray instance of the machine)."""
    gcs, dashboard, metrics, agent, agent_grpc, runtime_env, client = free_ports(7)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_metrics_report_interval_ms="500",  # export metrics every 0.5 s instead of 10 s
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # as in an activated venv
    temp_dir = f"/tmp/ray-edc-{secrets.token_hex(3)}"  # short: Unix socket paths are limited
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
         f"--temp-dir={temp_dir}"],
        env=env, cwd=tmp_path_factory.mktemp("head"), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 300  # a loaded 2-core machine can take minutes to start a head
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answered (401: the token is required), so it is up
            break
        except OSError:
            time.sleep(1)
    yield {"address": address, "env": env, "metrics": metrics}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def job_config(tmp_path) -> str:
    cfg = {
        "data": {"root": str(tmp_path / "digits"), "source": "digits", "shard_size": 500},
        "observers": {"models": [{"arch": "convnet_d2"}], "epochs": 1, "crop_padding": 0, "flip": False},
        "init": {"candidates_per_class": 20},
        "synthesis": {"ipc": 1, "classes_per_unit": 5, "iterations": 5},
        "evaluation": {"students": ["convnet_d2"], "epochs": 4, "batch_size": 5, "eval_every": 1,
                       "random_baseline": False},
        # A joined cluster may grow: its local paths must be declared shared (here: one machine).
        "ray": {"address": "auto", "synthesis_actors": 2, "actor_cpus": 0.5, "train_worker_cpus": 0.5,
                "shared_paths": [str(tmp_path)]},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return ""


def job_status(head: dict, job: str) -> str:
    """The job's status from the Jobs REST API, authenticated with the cluster token."""
    request = urllib.request.Request(f"{head['address']}/api/jobs/{job}",
                                     headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["status"]


def test_job_submit_runs_the_pipeline_on_the_head(ray_head, tmp_path):
    runtime_env = json.dumps({"working_dir": REPO, "excludes": [".venv", "data", "runs", ".git"]})
    ray_cli = [RAY, "job"]
    submit = subprocess.run(
        ray_cli + ["submit", "--no-wait", "--submission-id", "edc-test", "--address", ray_head["address"],
                   "--runtime-env-json", runtime_env, "--",
                   "python", "jobs/condense.py", "--config", job_config(tmp_path)],
        env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    # While the job runs, the head's Prometheus endpoint (what the dashboard reads) carries its metrics.
    wanted = {"ray_edc_synthesis_units", "ray_edc_synthesis_images", "ray_edc_synthesis_loss",
              "ray_edc_eval_top1"}
    seen, status, deadline = set(), "", time.time() + 600
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
        text = scrape(ray_head["metrics"])
        seen |= {name for name in wanted if name in text}
        status = job_status(ray_head, "edc-test")
    logs = subprocess.run(ray_cli + ["logs", "edc-test", "--address", ray_head["address"]],
                          env=ray_head["env"], capture_output=True, text=True, timeout=120).stdout
    assert "SUCCEEDED" in status, logs[-4000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    started = {w["name"] for w in report["synthesis"]["workers"]}  # units never wait for an actor to start
    assert {r["worker"] for r in report["synthesis"]["units_run"]} <= started <= {"SynthesisWorker-0",
                                                                                   "SynthesisWorker-1"}
    assert 0.0 <= report["evaluation"][0]["final_top1"] <= 100.0
    assert seen == wanted, wanted - seen


def test_job_submit_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token either
    refused = subprocess.run([RAY, "job", "list", "--address", ray_head["address"]], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "authentication" in (refused.stdout + refused.stderr).lower()
