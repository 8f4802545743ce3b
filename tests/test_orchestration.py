"""Scale-out on loopback: a real Prefect server with cpu and gpu pools and workers, the rl stage
handed to the gpu pool through a DVC remote, a worker dying mid-run, and an MLflow tracking server with
basic auth (credentials from the environment, refusals in one line, no secret anywhere)."""

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import mlflow
import pandas as pd
import psutil
import pytest
import yaml
from chat_server import ChatServer
from conftest import (
    IDENTITY,
    cli_env,
    planted_secrets,
    project,
    repo_copy,
    run,
    secrets_found,
    shrink_params,
    with_venv,
    write_jpeg,
)

from aesr1 import cli, environment

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited: {process.stdout.read()[-3000:] if process.stdout else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up")


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=with_venv(env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**cli_env(home), "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=home, env=with_venv(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", server)
        yield env
    finally:
        stop(server)


def flow_run_state(env: dict, flow_run_id: str, until: set[str], timeout_s: float = 600) -> dict:
    """Poll the server until the flow run's state type is one of ``until``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{flow_run_id}", timeout=10).json()["state"]
        if state and state["type"] in until:
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not reach {until}")


def trigger(env: dict, root: Path, deployment: str, parameters: dict) -> str:
    out = run(["prefect", "deployment", "run", deployment, "--params", json.dumps(parameters)], root, env)
    return next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line)


def test_gpu_pool_runs_rl_through_a_dvc_remote_and_a_dead_worker_fails_the_run_visibly(prefect_server, tmp_path):
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    remote = tmp_path / "dvc-remote"
    # both machines hold the project's git history; a stage handed to the gpu worker runs the pipeline's commit
    cpu = shrink_params(repo_copy(tmp_path / "cpu-machine"))
    run(["git", "add", "-A"], cpu, env)
    run(["git", "commit", "-qm", "small"], cpu, {**env, **IDENTITY})
    gpu = tmp_path / "gpu-machine"
    run(["git", "clone", "-q", str(cpu), str(gpu)], tmp_path, env)
    run(["git", "commit", "-qm", "the code the pipeline runs", "--allow-empty"], cpu, {**env, **IDENTITY})
    for machine in (cpu, gpu):
        run(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], machine, env)

    assert "cpu, gpu" in run(["python", "-m", "flows.pools"], cpu, env)
    run(["prefect", "--no-prompt", "deploy", "--all"], cpu, env)
    pool = httpx.get(f"{env['PREFECT_API_URL']}/work_pools/gpu", timeout=10).json()
    # nobody counts GPUs: the gpu pool's runs see every GPU of their machine, and the launcher starts one
    # process per GPU it sees
    assert "CUDA_VISIBLE_DEVICES" not in pool["base_job_template"]["variables"]["properties"]["env"]["default"]
    workers = [start(["prefect", "worker", "start", "--pool", pool_name, "--type", "process"], machine,
                     {**env, environment.REPO: str(machine)}, tmp_path / f"worker-{pool_name}.log")
               for pool_name, machine in (("cpu", cpu), ("gpu", gpu))]
    try:
        # a worker's flow-run process dies mid-stage: the run fails visibly; a second run completes it
        flow_run = trigger(env, cpu, "aesr1-pipeline/nightly", {"stages": ["synth", "ingest"]})
        victim = _wait_for_process("--single-item ingest")
        os.killpg(os.getpgid(victim.pid), signal.SIGKILL)  # the flow run's whole process group dies
        state = flow_run_state(env, flow_run, {"CRASHED", "FAILED", "COMPLETED"})
        assert state["type"] in {"CRASHED", "FAILED"}, state
        synth_output = cpu / "data/aessynth/aessynth_latent.csv"
        built = synth_output.stat().st_mtime_ns
        retry = trigger(env, cpu, "aesr1-pipeline/nightly", {"stages": ["synth", "ingest"]})
        assert flow_run_state(env, retry, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "COMPLETED"
        assert synth_output.stat().st_mtime_ns == built and (cpu / "data/ingest/train.parquet").is_file()

        # the whole pipeline, rl on the gpu pool: inputs and outputs travel through the DVC remote
        only_rl = {"remote_stages": {"rl": "aesr1-remote-stage/gpu-stage"}}  # the deployment sends sft and evaluate too
        flow_run = trigger(env, cpu, "aesr1-pipeline/nightly-gpu", only_rl)
        state = flow_run_state(env, flow_run, {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=900)
        assert state["type"] == "COMPLETED", (state, (tmp_path / "worker-cpu.log").read_text()[-4000:],
                                              (tmp_path / "worker-gpu.log").read_text()[-4000:])
    finally:
        for worker in workers:
            stop(worker)
    assert (gpu / "data/models/rapo/training_history.csv").is_file()  # trained on the gpu machine
    assert (cpu / "data/models/rapo/training_history.csv").read_bytes() == \
        (gpu / "data/models/rapo/training_history.csv").read_bytes()  # restored here, not retrained
    assert json.loads((cpu / "metrics/rl.json").read_text()) == json.loads((gpu / "metrics/rl.json").read_text())
    assert (cpu / "metrics/evaluate.json").is_file()
    assert "rl:" in (cpu / "dvc.lock").read_text()
    assert "Flow run 'rl'" in (tmp_path / "worker-gpu.log").read_text()  # the gpu worker ran it
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cpu, capture_output=True, text=True).stdout.strip()
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=gpu, capture_output=True, text=True).stdout.strip() == head

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["aesr1"], filter_string="tags.`aesr1.role` = 'stage'")
    pipeline_runs = runs[runs["tags.mlflow.runName"] == "evaluate"]["tags.aesr1.pipeline_id"]
    rl = runs[runs["tags.mlflow.runName"] == "rl"]
    assert len(rl) == 1 and rl["tags.aesr1.pipeline_id"].iloc[0] == pipeline_runs.iloc[0]  # one pipeline run


def _wait_for_process(marker: str, timeout_s: float = 300) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if marker in " ".join(process.info["cmdline"] or []):
                return process
        time.sleep(0.2)
    raise AssertionError(f"no process with {marker!r} appeared")


@dataclass
class AuthServer:
    """An MLflow server with basic auth: its URI, its folder (stores, user database, log), the values planted in every
    secret variable (``MLFLOW_TRACKING_PASSWORD`` is alice's password) and the users' passwords."""

    uri: str
    folder: Path
    planted: dict[str, str]
    passwords: dict[str, str]

    def login(self, user: str) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": self.passwords[user]}


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on loopback (it starts only with the mlflow[auth] extra's Flask-WTF),
    its admin password and CSRF key from the environment, and two users made by the admin: alice and bob (neither
    an admin; default permission READ)."""
    folder = tmp_path_factory.mktemp("mlflow-auth")
    planted = planted_secrets()
    # auth_cache_ttl_seconds: a signed-in user's password is hashed once a minute, not on each of a stage's requests
    (folder / "basic_auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
                                           f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                                           f"auth_cache_ttl_seconds = 60\n")
    port = free_port()
    env = {**cli_env(folder), **planted, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini")}
    server = start(["mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
                    f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], folder, env, folder / "server.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", server)
        passwords = {"alice": planted["MLFLOW_TRACKING_PASSWORD"], "bob": f"bob-{secrets.token_hex(12)}"}
        for user, password in passwords.items():
            made = httpx.post(f"{uri}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                              auth=("admin", planted["MLFLOW_AUTH_ADMIN_PASSWORD"]), timeout=30)
            assert made.status_code == 200, made.text
        yield AuthServer(uri, folder, planted, passwords)
    finally:
        stop(server)


def tiny_policy(folder: Path) -> Path:
    """A small random policy saved as the backbone stage saves one (its processor's pixel budget included)."""
    from aesr1.backbone.backbone import BackboneConfig, with_pixel_budget
    from aesr1.backbone.tiny import TinyModelConfig, build_tiny

    tiny = TinyModelConfig(vocab_size=600, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64,
                           vision_depth=1, vision_hidden_size=32, vision_heads=2, patch_size=8, image_size=32)
    model, processor = build_tiny(tiny)
    with_pixel_budget(processor, BackboneConfig(tiny=tiny))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_an_mlflow_server_with_basic_auth_tracks_stages_with_credentials_and_gives_anonymous_clients_nothing(
        mlflow_auth_server, tmp_path, monkeypatch, capfd, caplog):
    """Anonymous: 401 from the API and the UI. As alice, with a distinct value planted in every secret variable: the
    synth (`aesr1 synth`), distill (the OpenAI-compatible teacher) and evaluate stages log their runs into the
    server's artifact store, evaluate registers the policy and `aesr1 score` scores through the registry; then no
    planted value is in any file the runs or the server wrote, nor in anything printed or logged."""
    from aesr1.aescot.distill import DistillConfig, distill
    from aesr1.evaluation.evaluate import EvaluateConfig, evaluate
    from aesr1.stage import run_stage

    server = mlflow_auth_server
    caplog.set_level(logging.INFO)  # every library's INFO records too, for the search below
    for path in ("/api/2.0/mlflow/experiments/search?max_results=1", "/ajax-api/2.0/mlflow/experiments/search", "/"):
        anonymous = httpx.get(server.uri + path, timeout=10)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == 'Basic realm="mlflow"', path
    assert httpx.get(f"{server.uri}/health", timeout=10).status_code == 200  # probes only

    for name, value in {**server.planted, **server.login("alice")}.items():
        monkeypatch.setenv(name, value)
    root = shrink_params(repo_copy(tmp_path / "repo"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"]["sizes"] = {name: {"train": 4, "test": 4} for name in params["synth"]["sizes"]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    assert cli.main(["synth"]) == 0  # as `aesr1 synth` in the repository

    monkeypatch.chdir(tmp_path)
    rows = [{"image_id": f"{d}/{i}", "dataset": d, "score": (i + 1) / 4,
             "image_path": str(write_jpeg(tmp_path / "images" / f"{d}-{i}.jpg", value=40 + 60 * i + 7 * k))}
            for k, d in enumerate(("ava", "para")) for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    with ChatServer() as teacher:
        (tmp_path / "distill.yaml").write_text(yaml.safe_dump({"distill": {
            "train_manifest": str(tmp_path / "test.parquet"), "out_dir": str(tmp_path / "aescot"),
            "teacher": {"kind": "openai", "base_url": teacher.url, "model": "test-vlm", "api_key_env": "OPENAI_API_KEY",
                        "cache_dir": str(tmp_path / "teacher-cache")}}}))
        run_stage("distill", tmp_path / "distill.yaml", DistillConfig, distill, metrics_dir=tmp_path / "metrics")
    assert set(teacher.auth_headers) == {f"Bearer {server.planted['OPENAI_API_KEY']}"}

    evaluated = project(tmp_path, **{"evaluate.models": {"rapo": str(tiny_policy(tmp_path / "policy"))},
                                     "evaluate.test_manifest": str(tmp_path / "test.parquet"),
                                     "evaluate.latent_scores": None, "evaluate.rl_history": None,
                                     "evaluate.out_dir": str(tmp_path / "evaluate"), "evaluate.compare": [],
                                     "evaluate.test_sets": ["ava", "para"], "evaluate.in_domain": [],
                                     "evaluate.bootstrap": 10, "evaluate.gallery_size": 2,
                                     "evaluate.decoding": {"max_new_tokens": 8, "batch_size": 8}})
    run_stage("evaluate", evaluated, EvaluateConfig, evaluate, metrics_dir=tmp_path / "metrics")
    capfd.readouterr()
    image = rows[0]["image_path"]
    assert cli.main(["score", image, "--json", "--greedy", "--model", "models:/aesr1-policy/1",
                     "--params", str(evaluated)]) == 0
    (scored,) = json.loads(capfd.readouterr().out)
    assert scored["image"] == image and scored["completion"]

    client = mlflow.MlflowClient(server.uri)  # as alice
    stages = client.search_runs([client.get_experiment_by_name("aesr1").experiment_id],
                                "tags.`aesr1.role` = 'stage'")
    assert sorted(run.info.run_name for run in stages) == ["distill", "evaluate", "synth"]
    assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in stages)  # proxied by the server
    assert client.get_model_version("aesr1-policy", "1").tags["policy"] == "rapo"
    stored = server.folder / "artifacts"
    assert list(stored.rglob("synth.json")) and list(stored.rglob("report.md")) and list(stored.rglob("gallery.html"))
    assert list(stored.rglob("MLmodel")) and not (root / "mlartifacts").exists()

    secret = {**server.planted, **{f"{user}'s password": value for user, value in server.passwords.items()},
              "alice's basic-auth header": f"alice:{server.passwords['alice']}"}
    found = secrets_found(secret, [tmp_path, server.folder], {"the output": "".join(capfd.readouterr()),
                                                              "the log": caplog.text})
    assert not found, found
    assert secrets_found(secret, [], {"a canary": f"key={server.planted['OPENAI_API_KEY']}"})  # the search finds one


def test_a_client_without_credentials_or_permission_is_refused_before_the_stage_runs(mlflow_auth_server, tmp_path,
                                                                                    monkeypatch, capsys):
    """One line naming the server, the HTTP status and what to set (401) or the user and experiment (403), from a
    stage (before it writes anything), from `aesr1 doctor` and from `aesr1 score` with a registry URI."""
    from aesr1.doctor import checks
    from aesr1.tracking import TrackingAccessError, check_can_register

    server = mlflow_auth_server
    experiment = f"owned-by-alice-{secrets.token_hex(4)}"
    with mock.patch.dict(os.environ, server.login("alice")):
        owner = mlflow.MlflowClient(server.uri)
        owner.create_experiment(experiment)
        owner.create_registered_model(experiment)
    params = project(tmp_path, **{"synth.out_dir": str(tmp_path / "aessynth")})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("AESR1_EXPERIMENT", experiment)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    anonymous = (f"MLflow server {server.uri} refused (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                 f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    denied = (f"MLflow server {server.uri} refused (HTTP 403): user 'bob' lacks permission on experiment "
              f"'{experiment}' (EDIT needed): ask the server's admin to grant it (docs/deployment.md), or set "
              f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to a user who has it")

    def outcome(command: list[str]) -> tuple[int, str]:
        status = cli.main(command)
        return status, capsys.readouterr().err

    def doctor() -> str:
        record = checks.run_check("mlflow", checks.Context(params, 10.0))
        assert record.ok is False
        return record.detail

    assert outcome(["synth", "--params", str(params)]) == (2, f"aesr1 synth: error: {anonymous}\n")
    assert doctor() == anonymous
    assert outcome(["score", str(write_jpeg(tmp_path / "photo.jpg")), "--model", "models:/aesr1-policy/1"]) == (
        2, f"aesr1 score: error: {anonymous}\n")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.passwords["bob"])
    assert outcome(["synth", "--params", str(params)]) == (2, f"aesr1 synth: error: {denied}\n")  # reads, cannot write
    assert doctor() == denied
    with pytest.raises(TrackingAccessError, match=rf"user 'bob' lacks permission on registered model '{experiment}'"):
        check_can_register(experiment)  # the evaluate stage asks this before it evaluates
    assert not (tmp_path / "aessynth").exists() and not (tmp_path / "metrics").exists()  # the stage never ran

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.passwords["alice"])  # bob with a wrong password
    status, err = outcome(["synth", "--params", str(params)])
    assert status == 2 and err.endswith("refused (HTTP 401): it does not accept user 'bob' with that password: set "
                                        "the user's password in MLFLOW_TRACKING_PASSWORD\n")
    assert server.passwords["alice"] not in err
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    owned = checks.run_check("mlflow", checks.Context(params, 10.0))
    assert owned.ok is True and owned.detail == (f"MLflow server {server.uri}: /health OK; user 'alice' may write to "
                                                 f"experiment '{experiment}'")
