"""The OpenAI-compatible teacher against a real HTTP server on loopback that injects faults."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from aesr1.aescot.distill import DistillConfig, DistillError, distill
from aesr1.aescot.teachers import OpenAITeacher, TeacherConfig
from aesr1.stage import Recorder, run_stage
from chat_server import ChatServer
from conftest import cli_env, write_jpeg

SECRET = "sk-test-NEVER-LOG-7f3a9c"


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for i in range(30):
        path = write_jpeg(tmp_path / "img" / f"{i}.jpg", value=5 + 8 * i)  # distinct bytes per image
        rows.append({"image_id": f"ava/{i}", "dataset": "ava", "image_path": str(path), "score": (i % 10) / 10})
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    return tmp_path / "train.parquet"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("AESR1_TEST_KEY", SECRET)


def teacher_cfg(tmp_path, url, **overrides):
    base = dict(kind="openai", base_url=url, model="test-vlm", api_key_env="AESR1_TEST_KEY", concurrency=4,
                timeout_s=0.5, max_retries=6, backoff_base_s=0.01, backoff_max_s=0.05,
                cache_dir=str(tmp_path / "cache"))
    return TeacherConfig(**(base | overrides))


def test_faults_are_retried_and_nothing_is_lost(tmp_path, manifest):
    kinds = ["429", "500", "timeout", "malformed", "empty"]
    attempts: dict[str, int] = {}

    def first_two_attempts_fail(n, body):
        image = body["messages"][1]["content"][1]["image_url"]["url"]
        attempt = attempts[image] = attempts.get(image, -1) + 1
        return kinds[(len(attempts) + attempt) % len(kinds)] if attempt < 2 else "ok"

    with ChatServer(fault=first_two_attempts_fail, hang_s=1.5) as server:
        cfg = DistillConfig(train_manifest=str(manifest), out_dir=str(tmp_path / "out"),
                            teacher=teacher_cfg(tmp_path, server.url))
        metrics = distill(cfg, Recorder())
    distilled = pd.read_parquet(tmp_path / "out/distilled.parquet")
    assert len(distilled) == 30 and metrics["failed"] == 0
    usage = metrics["teacher_usage"]
    assert usage["requests"] == len(server.requests) == 30 * 3
    assert usage["retries"] == 30 * 2
    assert set(usage["errors_by_kind"]) == {"HTTP 429", "HTTP 500", "timeout", "malformed response"}
    assert sum(usage["errors_by_kind"].values()) == 30 * 2
    assert usage["completion_tokens"] == 40 * 30
    # the score never reaches the teacher; the band's description does
    for body, row in zip(server.requests, distilled.itertuples()):
        prompt = body["messages"][1]["content"][0]["text"]
        assert "0." not in prompt and body["messages"][1]["content"][1]["image_url"]["url"].startswith(
            "data:image/jpeg;base64,")
    assert distilled.trajectory.str.match(r"<think>.*</think><answer>\d\.\d\d</answer>$").all()


def test_retries_are_bounded_and_failures_listed(tmp_path, manifest):
    with ChatServer(fault=lambda n, body: "500") as server:
        cfg = DistillConfig(train_manifest=str(manifest), out_dir=str(tmp_path / "out"), max_failure_rate=0.5,
                            teacher=teacher_cfg(tmp_path, server.url, max_retries=2))
        with pytest.raises(DistillError, match="30/30 samples failed"):
            distill(cfg, Recorder())
    assert len(server.requests) == 30 * 3
    failures = pd.read_parquet(tmp_path / "out/distill_failures.parquet")
    assert len(failures) == 30 and failures.reason.str.contains("gave up after 3 attempts: HTTP 500").all()

    with ChatServer(fault=lambda n, body: "400") as server:
        teacher = OpenAITeacher(teacher_cfg(tmp_path, server.url))
        result = teacher.critique_many([("k", str(pd.read_parquet(manifest).image_path[0]), "fair")])[0]
    assert len(server.requests) == 1 and result.error.startswith("HTTP 400")  # a client error is not retried


def test_killed_run_resumes_from_the_cache(tmp_path, manifest):
    params = {"distill": {"train_manifest": str(manifest), "out_dir": str(tmp_path / "out"),
                          "teacher": {"kind": "openai", "model": "test-vlm", "api_key_env": "AESR1_TEST_KEY",
                                      "concurrency": 2, "timeout_s": 5, "cache_dir": str(tmp_path / "cache")}}}
    env = cli_env(tmp_path) | {"AESR1_TEST_KEY": SECRET}
    aesr1 = Path(sys.executable).parent / "aesr1"
    with ChatServer(latency_s=0.15) as server:
        params["distill"]["teacher"]["base_url"] = server.url
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.Popen([aesr1, "distill", "--params", "params.yaml"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while len(list((tmp_path / "cache").glob("*.json"))) < 8 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        paid_before = len(server.requests)
        cached = len(list((tmp_path / "cache").glob("*.json")))
        assert 8 <= cached < 30 and not (tmp_path / "out/distilled.parquet").exists()

        done = subprocess.run([aesr1, "distill", "--params", "params.yaml"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert len(pd.read_parquet(tmp_path / "out/distilled.parquet")) == 30
    # the rerun asked only for what was not cached (in-flight requests at the kill may repeat)
    assert len(server.requests) - paid_before <= 30 - cached + 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_api_key_never_reaches_logs_params_or_artifacts(tmp_path, manifest, monkeypatch, capfd, caplog):
    with ChatServer() as server:
        params = {"distill": {"train_manifest": str(manifest), "out_dir": str(tmp_path / "out"),
                              "teacher": {"kind": "openai", "base_url": server.url, "model": "test-vlm",
                                          "api_key_env": "AESR1_TEST_KEY", "cache_dir": str(tmp_path / "cache")}}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.chdir(tmp_path)
        run_stage("distill", "params.yaml", DistillConfig, distill)
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}  # the key was used...
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text  # ...and never printed
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path  # outputs, cache, MLflow db and artifacts


def test_missing_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AESR1_TEST_KEY")
    with pytest.raises(RuntimeError, match="environment variable AESR1_TEST_KEY"):
        OpenAITeacher(teacher_cfg(tmp_path, "http://127.0.0.1:9"))
