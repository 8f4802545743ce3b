"""Scale-out on loopback: a real Prefect server with cpu and gpu pools and workers, the rl stage
handed to the gpu pool through a DVC remote, a worker dying mid-run, and an MLflow tracking server."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
import yaml
from conftest import IDENTITY, cli_env, repo_copy, run, shrink_params, with_venv

from aesr1 import environment

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


def test_stages_track_into_an_mlflow_server_and_its_artifact_store(tmp_path):
    port = free_port()
    artifacts = tmp_path / "artifact-store"
    env = {**cli_env(tmp_path), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    server = start(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                    "--workers", "1"], tmp_path, env, tmp_path / "mlflow-server.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        root = shrink_params(repo_copy(tmp_path / "repo"))
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["synth"]["sizes"] = {name: {"train": 4, "test": 4} for name in params["synth"]["sizes"]}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["aesr1", "synth"], root, env)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        (stage,) = mlflow.search_runs(experiment_names=["aesr1"], filter_string="tags.`aesr1.role` = 'stage'",
                                      output_format="list")
        assert stage.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        logged = [a.path for a in mlflow.MlflowClient().list_artifacts(stage.info.run_id)]
    finally:
        stop(server)
    assert "synth.json" in logged
    assert list(artifacts.rglob("synth.json"))  # the files sit in the server's artifact store
    assert not (root / "mlartifacts").exists()
