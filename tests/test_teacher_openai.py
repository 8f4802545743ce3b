"""The OpenAI-compatible teacher against a real HTTP server on loopback that injects faults."""

import base64
import email.utils
import io
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from chat_server import ChatServer
from conftest import cli_env, write_jpeg
from PIL import Image

from aesr1.aescot.distill import DistillConfig, DistillError, distill
from aesr1.aescot.teacher_openai import OpenAITeacher, OpenAITeacherConfig, retry_after, upload_bytes
from aesr1.errors import AesError
from aesr1.stage import Recorder, run_stage

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
    return OpenAITeacherConfig(**(base | overrides))


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
    for body in server.requests:
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
    with pytest.raises(AesError, match="environment variable AESR1_TEST_KEY"):
        OpenAITeacher(teacher_cfg(tmp_path, "http://127.0.0.1:9"))


def ask(tmp_path, server, items, max_pixels=262_144, **overrides) -> tuple[list, dict]:
    teacher = OpenAITeacher(teacher_cfg(tmp_path, server.url, **overrides), max_pixels)
    return teacher.critique_many(items), teacher.usage()


def images(manifest, n) -> list[tuple[str, str, str]]:
    return [(f"k{i}", path, "fair") for i, path in enumerate(pd.read_parquet(manifest).image_path[:n])]


def test_retry_after_is_honoured(tmp_path, manifest):
    with ChatServer(fault=lambda n, body: "429:0.6" if n == 0 else "ok") as server:
        (result,), usage = ask(tmp_path, server, images(manifest, 1))  # backoff alone would wait <= 0.05 s
    assert result.text and result.attempts == 2 and usage["errors_by_kind"] == {"HTTP 429": 1}
    assert server.times[1] - server.times[0] >= 0.55

    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "2"}) == 2.0
    in_30_s = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after({"retry-after": in_30_s}) <= 30
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


def test_requests_per_minute_paces_retries_too(tmp_path, manifest):
    seen: set[str] = set()

    def first_attempt_fails(n, body):
        image = body["messages"][1]["content"][1]["image_url"]["url"]
        fault = "ok" if image in seen else "500"
        seen.add(image)
        return fault

    with ChatServer(fault=first_attempt_fails) as server:
        results, usage = ask(tmp_path, server, images(manifest, 4), requests_per_minute=600)  # one per 0.1 s
    assert all(r.text for r in results) and usage["requests"] == len(server.times) == 8
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert min(gaps) > 0.07 and server.times[-1] - server.times[0] > 0.65  # 4 workers, yet evenly spaced


def test_tokens_per_minute_paces_by_usage(tmp_path, manifest):
    # each answer uses 100 + 40 tokens; 84,000 a minute is 1,400 a second: 0.1 s per request
    with ChatServer() as server:
        results, usage = ask(tmp_path, server, images(manifest, 8), tokens_per_minute=84_000, max_tokens=40)
    assert all(r.text for r in results) and usage["prompt_tokens"] + usage["completion_tokens"] == 8 * 140
    assert server.times[-1] - server.times[0] > 0.55  # unpaced, 8 requests take a few ms

    with ChatServer() as server:
        ask(tmp_path / "unpaced", server, images(manifest, 8), max_tokens=40)
    assert server.times[-1] - server.times[0] < 0.3


def test_refusal_and_truncation_fail_with_their_reason_and_are_paid(tmp_path, manifest):
    faults = ["refusal", "length", "blank", "ok"]  # one worker: requests come in item order
    with ChatServer(fault=lambda n, body: faults[n]) as server:
        results, usage = ask(tmp_path, server, images(manifest, 3), concurrency=1)
    refused, truncated, answered = results
    assert refused.error == "refused: I can't help with that." and refused.attempts == 1
    assert truncated.error.startswith("truncated:") and truncated.attempts == 1
    assert answered.text and answered.attempts == 2
    assert len(server.requests) == 4  # neither the refusal nor the truncation was retried
    assert usage["errors_by_kind"] == {"refused": 1, "truncated": 1, "malformed response": 1}
    # every answer that came back was paid for, the failed ones too
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (4 * 100, 4 * 40)
    assert (answered.prompt_tokens, answered.completion_tokens) == (200, 80)


def test_large_images_are_downscaled_before_upload(tmp_path, manifest):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1800, 3), dtype=np.uint8)).save(big)
    small = pd.read_parquet(manifest).image_path[0]

    def uploaded(server, n):
        url = server.requests[n]["messages"][1]["content"][1]["image_url"]["url"]
        return base64.b64decode(url.split(",", 1)[1])

    with ChatServer() as server:
        ask(tmp_path, server, [("big", str(big), "fair"), ("small", small, "fair")], max_image_side=600,
            max_pixels=None, concurrency=1)
        assert Image.open(io.BytesIO(uploaded(server, 0))).size == (600, 400)
        assert uploaded(server, 1) == Path(small).read_bytes()  # small enough: sent as it is
    with ChatServer() as server:  # the default: the policy's pixel budget
        ask(tmp_path / "budget", server, [("big", str(big), "fair")], max_image_side=None)
        width, height = Image.open(io.BytesIO(uploaded(server, 0))).size
        assert width * height <= 262_144 and abs(width / height - 1.5) < 0.01
    with ChatServer() as server:
        ask(tmp_path / "asis", server, [("big", str(big), "fair")], max_image_side=None, max_pixels=None)
        assert uploaded(server, 0) == big.read_bytes()


def test_downscale_applies_the_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(upload_bytes(buf.getvalue(), 150, None))).size == (100, 150)
