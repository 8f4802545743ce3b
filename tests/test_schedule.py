"""A deployment's schedule fires on a real Prefect server: its scheduler service creates the flow run
by itself (no `prefect deployment run`) and a real cpu-pool worker runs it to completion.

`prefect_test_harness` runs no scheduler, so only this test sees a scheduler that fails on every loop
(prefect 3.8 with SQLAlchemy 2.1: "Can't evaluate bulk DML statement", hence sqlalchemy<2.1).

The server asks for an auth string (docs/deployment.md): a worker without it cannot pull work, one with it
completes the run, and no value planted in a secret variable reaches the run's parameters, its logs or any file.
"""

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import cli_env, planted_secrets, repo_copy, run, secrets_found, shrink_params, with_venv
from test_orchestration import free_port, start, stop, wait_for

from aesr1 import environment
from aesr1.doctor import checks

pytestmark = pytest.mark.slow

INTERVAL_S = 10  # the schedule added to prefect.yaml's `nightly` (its cron one stays, next due at 02:00 UTC)
SCHEDULED_WITHIN_S, COMPLETED_WITHIN_S = 45, 120  # after the deployment, then after its first scheduled run
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _tail(log: Path, chars: int = 4000) -> str:
    """The end of a log, without the API server's access lines (the worker polls every 2 s)."""
    if not log.is_file():
        return f"({log} missing)"
    lines = [line for line in log.read_text(errors="replace").splitlines() if '"POST /api/' not in line
             and '"GET /api/' not in line and '"PATCH /api/' not in line]
    return "\n".join(lines)[-chars:]


def _first_error(log: Path) -> str:
    """The first error line in a log (the scheduler's exception), for the assertion message."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return next((line for line in lines if "Error" in line and "sqlalchemy" in line.lower()),
                next((line for line in lines if "Error" in line), "(no error line)"))


def _stop_tree(process) -> None:
    """Stop a process started in its own session: SIGINT, then SIGKILL its group and any descendants left."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop(process)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _poll(probe, timeout_s: float, processes, logs):
    """``probe()`` every 2 s until it returns something truthy (returned) or ``timeout_s`` passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"{process.args} exited ({process.returncode}){logs()}"
        if found := probe():
            return found
        time.sleep(2)
    return None


def _flow_runs(api: str, deployment_id: str, auth: dict) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    response = httpx.post(f"{api}/flow_runs/filter", json=body, headers=auth, timeout=10)
    response.raise_for_status()
    return response.json()


def test_the_server_scheduler_creates_nightly_runs_and_a_worker_completes_one(tmp_path, monkeypatch):
    home = tmp_path / "prefect-home"
    home.mkdir()
    root = shrink_params(repo_copy(tmp_path / "repo"))
    lock_before = (root / "dvc.lock").read_text()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    planted = planted_secrets()  # in every process's environment; the server's auth string is the clients'
    planted["PREFECT_SERVER_API_AUTH_STRING"] = planted["PREFECT_API_AUTH_STRING"]
    auth = {"Authorization": f"Basic {base64.b64encode(planted['PREFECT_API_AUTH_STRING'].encode()).decode()}"}
    env = {**cli_env(tmp_path), **planted, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_SERVER_LOGGING_LEVEL": "INFO"}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"

    def logs() -> str:
        return (f"\nscheduler error: {_first_error(server_log)}"
                f"\n--- server log (tail) ---\n{_tail(server_log)}\n--- worker log (tail) ---\n{_tail(worker_log)}")

    server = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], home, env, server_log)
    worker = None
    try:
        try:
            wait_for(f"{api}/health", server, timeout_s=60)
        except AssertionError as error:
            raise AssertionError(f"{error}{logs()}") from None
        assert httpx.get(f"{api}/deployments/filter", timeout=10).status_code == 401  # an anonymous client: nothing
        assert "cpu, gpu" in run(["python", "-m", "flows.pools"], root, env)
        # the project's own prefect.yaml and `nightly` deployment, with an interval schedule added and one quick stage
        run(["prefect", "--no-prompt", "deploy", "--name", "nightly", "--interval", str(INTERVAL_S),
             "--params", json.dumps({"stages": ["synth"]})], root, env)
        deployment = httpx.get(f"{api}/deployments/name/aesr1-pipeline/nightly", headers=auth, timeout=10).json()
        assert sorted(s["schedule"].get("interval") or 0 for s in deployment["schedules"]) == [0, INTERVAL_S], \
            deployment["schedules"]

        # the scheduler's recent-deployments loop (every 5 s) schedules a new deployment's runs at once
        runs = _poll(lambda: _flow_runs(api, deployment["id"], auth), SCHEDULED_WITHIN_S, (server,), logs)
        assert runs, f"the scheduler created no run of nightly in {SCHEDULED_WITHIN_S} s{logs()}"
        worker_env = {**env, environment.REPO: str(root), "PREFECT_WORKER_QUERY_SECONDS": "2"}
        worker_command = ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--limit", "1"]
        unauthenticated = subprocess.run(worker_command, cwd=root, capture_output=True, text=True, timeout=120,
                                         env=with_venv({k: v for k, v in worker_env.items()
                                                        if k != "PREFECT_API_AUTH_STRING"}))
        assert unauthenticated.returncode != 0 and "401 Unauthorized" in unauthenticated.stdout + unauthenticated.stderr
        assert {r["state"]["type"] for r in _flow_runs(api, deployment["id"], auth)} == {"SCHEDULED"}  # none pulled
        for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):  # `aesr1 doctor`, with and without the string
            monkeypatch.setenv(name, env[name])
        assert checks.run_check("prefect", checks.Context(root / "params.yaml", 10.0)).ok is True
        monkeypatch.delenv("PREFECT_API_AUTH_STRING")
        refused = checks.run_check("prefect", checks.Context(root / "params.yaml", 10.0))
        assert refused.detail == (f"Prefect server {api} refused (HTTP 401): set PREFECT_API_AUTH_STRING (the "
                                  f"server's PREFECT_SERVER_API_AUTH_STRING)")
        worker = start(worker_command, root, worker_env, worker_log)

        def first_completed():
            runs[:] = _flow_runs(api, deployment["id"], auth)
            ended = [r for r in runs if r["state"] and r["state"]["type"] in FINAL - {"COMPLETED"}]
            assert not ended, f"flow run {ended[0]['name']} ended {ended[0]['state']}{logs()}"
            return next((r for r in runs if r["state"]["type"] == "COMPLETED"), None)

        completed = _poll(first_completed, COMPLETED_WITHIN_S, (server, worker), logs)
        assert completed is not None, (f"no run of nightly completed in {COMPLETED_WITHIN_S} s: "
                                       f"{[(r['name'], r['state']['type']) for r in runs[:5]]}{logs()}")
        logged = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}},
                            headers=auth, timeout=10)
        run_logs = "\n".join(record["message"] for record in logged.json())
        assert "synth: done" in run_logs  # the stage's own log lines, streamed into the flow run's
    finally:
        for process in (worker, server):
            if process is not None:
                _stop_tree(process)

    # every run came from the scheduler, and the completed one from the added interval schedule
    interval_schedule = next(s["id"] for s in deployment["schedules"] if s["schedule"].get("interval"))
    assert all(r["auto_scheduled"] and (r["created_by"] or {}).get("type") == "SCHEDULE" for r in runs), \
        [(r["name"], r["auto_scheduled"], r["created_by"]) for r in runs]
    assert completed["created_by"]["id"] == interval_schedule and completed["parameters"] == {"stages": ["synth"]}
    assert (root / "data/aessynth/aessynth_latent.csv").is_file()  # the worker ran synth in the copy
    assert (root / "dvc.lock").read_text() != lock_before  # synth reproduced with the shrunk params
    assert completed["name"] in worker_log.read_text()
    # no planted value in the runs' parameters, their logs, the worker's output or any file written (the repository
    # copy, the MLflow store, Prefect's home and database, the server's and worker's logs)
    printed = {"the flow runs' parameters": json.dumps([r["parameters"] for r in runs]),
               "the flow runs' logs": run_logs,
               "the unauthenticated worker's output": unauthenticated.stdout + unauthenticated.stderr}
    found = secrets_found(planted, [tmp_path], printed)
    assert not found, found
