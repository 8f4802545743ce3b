"""``aesr1 doctor``: the checks on this CPU machine, each failure clear and fast, and ``--smoke --cpu``.

No test sends traffic beyond loopback: the hub is pointed at a closed 127.0.0.1 port (HF_ENDPOINT), the
teacher and the MLflow server at a stub on 127.0.0.1 or a closed loopback port, and proxies are cleared.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, with_venv

from aesr1 import doctor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

KEY = "sk-doctor-test-0123456789abcdef"  # a fake secret that must never appear in the output
ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """No proxy may route a loopback request elsewhere; the hub is a closed loopback port."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stub:
    """A loopback OpenAI-compatible ``GET /v1/models`` and an MLflow ``GET /health`` (tests/chat_server.py
    answers POST chat completions only)."""

    def __init__(self, models=("stub-model",)):
        self.auth: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, b"OK")
                stub.auth.append(self.headers.get("Authorization", ""))
                if self.path != "/v1/models":
                    return self._send(404, b'{"error": "no such route"}')
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, b'{"error": {"message": "invalid key"}}')
                self._send(200, json.dumps({"object": "list", "data": [{"id": m} for m in models]}).encode())

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def project(tmp_path: Path, **changes) -> Path:
    """A params file in tmp_path: the repository's, with ``changes`` (dotted keys) and its recipes beside it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in changes.items():
        holder = params
        *parents, last = key.split(".")
        for part in parents:
            holder = holder.setdefault(part, {})
        holder[last] = value
    for folder in ("recipes", "accelerate"):
        target = tmp_path / "configs" / folder
        target.mkdir(parents=True, exist_ok=True)
        for source in (REPO / "configs" / folder).glob("*.yaml"):
            (target / source.name).write_text(source.read_text())
    (tmp_path / "configs" / "deepspeed").mkdir(exist_ok=True)
    (tmp_path / "configs" / "deepspeed" / "zero3.json").write_text(json.dumps(doctor.ZERO3))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def check(name: str, params: Path, timeout: float = 10.0) -> doctor.Check:
    return doctor.run_check(name, doctor.Context(params, timeout))


@pytest.mark.skipif(ON_GPU, reason="the CPU-only expectations")
def test_the_embedded_default_passes_on_this_cpu_machine_as_json_and_as_a_table(capsys):
    status = doctor.main(["--params", str(REPO / "params.yaml"), "--json"])
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert status == 0 and report["ok"] is True, report
    assert list(checks) == list(doctor.CHECKS)
    assert checks["torch"]["ok"] is True and torch.__version__ in checks["torch"]["detail"]
    assert checks["cuda"]["ok"] is None and "CUDA not available" in checks["cuda"]["detail"]  # reported, not failed
    assert checks["backbone"]["ok"] is True and checks["backbone"]["detail"].startswith("tiny")
    assert checks["params"]["ok"] and checks["launcher"]["ok"] and checks["disk"]["ok"] and checks["mlflow"]["ok"]
    assert "16 B" in checks["disk"]["detail"]  # the rule is stated
    assert checks["teacher"]["ok"] is None and checks["vllm"]["ok"] is None and checks["deepspeed"]["ok"] is None
    assert checks["dvc_remote"]["ok"] in (True, None)

    assert doctor.main(["--params", str(REPO / "params.yaml"), "--skip", "dvc_remote,params"]) == 0
    out = capsys.readouterr().out
    assert "no check failed" in out and "skipped (--skip)" in out and "CUDA not available" in out


@pytest.mark.skipif(ON_GPU, reason="the CPU-only expectations")
def test_a_real_backbone_on_a_cpu_only_machine_fails_the_cuda_check(tmp_path):
    params = project(tmp_path, recipe="qwen2.5-vl-7b")
    result = check("cuda", params)
    assert result.ok is False and "need a GPU" in result.detail and "Qwen/Qwen2.5-VL-7B-Instruct" in result.detail


def test_a_missing_or_incomplete_local_backbone_folder_fails_with_what_is_missing(tmp_path):
    missing = check("backbone", project(tmp_path, recipe="custom", **{"backbone.name_or_path": "./models/vlm"}))
    assert missing.ok is False and "no such folder" in missing.detail and "models/vlm" in missing.detail

    folder = tmp_path / "models" / "vlm"
    folder.mkdir(parents=True)
    empty = check("backbone", tmp_path / "params.yaml")
    assert empty.ok is False and "no config.json" in empty.detail
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "dtype": "bfloat16"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 2000)
    unprocessed = check("backbone", tmp_path / "params.yaml")
    assert unprocessed.ok is False and "no processor" in unprocessed.detail
    (folder / "preprocessor_config.json").write_text("{}")
    complete = check("backbone", tmp_path / "params.yaml")
    assert complete.ok is True and "model_type qwen2_5_vl" in complete.detail


def test_a_hub_backbone_offline_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # HF_ENDPOINT: a closed loopback port
    params = project(tmp_path, recipe="custom", **{"backbone.name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"})
    started = time.monotonic()
    result = check("backbone", params, timeout=5)
    assert time.monotonic() - started < 5
    assert result.ok is False and "cannot reach the hub at http://127.0.0.1:" in result.detail
    assert "backbone.name_or_path" in result.detail
    disk = check("disk", params)  # the size still comes without the network: the 7B's known count
    assert "8.29B" in disk.detail and "the known size" in disk.detail


def test_the_teacher_check_asks_the_endpoint_once_with_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOCTOR_TEACHER_KEY", KEY)
    with Stub() as stub:
        teacher = {"kind": "openai", "base_url": f"{stub.base}/v1", "model": "stub-model",
                   "api_key_env": "DOCTOR_TEACHER_KEY"}
        result = check("teacher", project(tmp_path, **{"distill.teacher": teacher}))
        assert result.ok is True and "HTTP 200" in result.detail and "'stub-model'" in result.detail
        assert stub.auth == [f"Bearer {KEY}"]

        params = project(tmp_path, **{"distill.teacher": {**teacher, "model": "gpt-4.1"}})
        unserved = check("teacher", params)
        assert unserved.ok is False and "does not serve 'gpt-4.1'" in unserved.detail

        monkeypatch.setenv("DOCTOR_TEACHER_KEY", KEY[::-1])  # a key the endpoint rejects
        assert doctor.main(["--params", str(params), "--skip", "params,dvc_remote,disk"]) == 1
        out = capsys.readouterr()
        assert "rejects the key in DOCTOR_TEACHER_KEY" in out.out
        assert KEY not in out.out + out.err and KEY[::-1] not in out.out + out.err


def test_the_teacher_check_fails_fast_on_a_closed_port_and_without_its_key(tmp_path, monkeypatch, capsys):
    teacher = {"kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
               "api_key_env": "DOCTOR_TEACHER_KEY"}
    params = project(tmp_path, **{"distill.teacher": teacher})
    monkeypatch.setenv("DOCTOR_TEACHER_KEY", KEY)
    started = time.monotonic()
    closed = check("teacher", params)
    assert time.monotonic() - started < 5
    assert closed.ok is False and "cannot connect" in closed.detail and KEY not in closed.detail

    monkeypatch.delenv("DOCTOR_TEACHER_KEY")
    status = doctor.main(["--params", str(params), "--json", "--skip", "params,dvc_remote,disk"])
    report = json.loads(capsys.readouterr().out)
    teacher_record = next(c for c in report["checks"] if c["name"] == "teacher")
    assert status == 1 and report["ok"] is False
    assert teacher_record["ok"] is False and "DOCTOR_TEACHER_KEY is not set" in teacher_record["detail"]


def test_the_mlflow_check_writes_sqlite_and_asks_a_server_its_health(tmp_path, monkeypatch):
    params = project(tmp_path)
    assert check("mlflow", params).ok is True  # conftest's SQLite store in tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    down = check("mlflow", params)
    assert down.ok is False and "cannot connect" in down.detail and time.monotonic() - started < 5
    with Stub() as stub:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stub.base)
        assert check("mlflow", params).ok is True


EIGHT_GPUS = doctor.CudaInfo(True, 8, [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1,
                                        "capability": "sm_90"} for i in range(8)], True, "12.4")


@pytest.mark.parametrize("launcher, gpus, ok", [
    ("torchrun --nproc_per_node gpu", 8, True),
    ("torchrun --standalone --nproc_per_node 8", 8, True),
    ("torchrun --nproc-per-node=4", 8, False),
    ("accelerate launch --config_file configs/accelerate/zero3.yaml", 8, True),
    ("accelerate launch --config_file configs/accelerate/zero3.yaml", 1, False),
    ("accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 1", 1, True),
    ("accelerate launch --config_file configs/accelerate/missing.yaml", 8, False),
    ("torchrun --standalone --nproc_per_node 2", 0, True),  # the embedded default on CPUs
    ("accelerate launch --config_file configs/accelerate/zero3.yaml", 0, False),  # GPUs asked, none there
])
def test_the_launcher_starts_one_process_per_visible_gpu(tmp_path, launcher, gpus, ok):
    ctx = doctor.Context(project(tmp_path, launcher=launcher))
    ctx.cuda = doctor.CudaInfo(True, gpus, EIGHT_GPUS.gpus[:gpus], True, "12.4") if gpus else doctor.CudaInfo(False)
    result = doctor.run_check("launcher", ctx)
    assert result.ok is ok, result.detail


def test_gpu_memory_and_disk_rules_for_a_7b_full_fine_tune(tmp_path, monkeypatch):
    import collections

    seven_b = {"recipe": "custom", "backbone.name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",
               "launcher": "torchrun --standalone --nproc_per_node gpu"}
    zero3 = {"sft.train.trl": {"deepspeed": "configs/deepspeed/zero3.json"},
             "rl.grpo.trl": {"deepspeed": "configs/deepspeed/zero3.json"}}
    sharded = doctor.Context(project(tmp_path, **seven_b, **zero3))
    sharded.cuda = EIGHT_GPUS
    fits = doctor.run_check("gpu_memory", sharded)
    assert fits.ok is True and "ZeRO-3 over 8" in fits.detail  # 8.29B x 16 B / 8 GPUs ~ 15 GiB per GPU
    replicated = doctor.Context(project(tmp_path, **seven_b))  # plain data parallel: all of it on every GPU
    replicated.cuda = EIGHT_GPUS
    too_big = doctor.run_check("gpu_memory", replicated)
    assert too_big.ok is False and "use ZeRO-3" in too_big.detail

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 150 * 2 ** 30))
    disk = doctor.run_check("disk", sharded)  # 8.29B x (16 + 4 + 4) B + 1 GiB ~ 186 GiB
    assert disk.ok is False and "NOT ENOUGH" in disk.detail and "16 B" in disk.detail


def test_a_missing_deepspeed_config_fails_the_deepspeed_check(tmp_path):
    params = project(tmp_path, recipe="custom", **{"sft.train.trl": {"deepspeed": "configs/deepspeed/absent.json"}})
    result = check("deepspeed", params)
    assert result.ok is False and "configs/deepspeed/absent.json not found" in result.detail


def test_the_deepspeed_check_runs_the_stages_own_checks_of_their_trl_configs(tmp_path):
    """The recipe's ZeRO-3 file passes; an option DeepSpeed refuses fails the check with the stage's message
    (the same words `dvc repro` would stop with, before the model loads)."""
    pytest.importorskip("deepspeed")
    zero3 = {"sft.train.trl": {"deepspeed": "configs/deepspeed/zero3.json"},
             "rl.grpo.trl": {"deepspeed": "configs/deepspeed/zero3.json"}}
    passed = check("deepspeed", project(tmp_path, recipe="custom", **zero3))
    assert passed.ok is True and "pass DeepSpeed's checks" in passed.detail
    refused = {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}
    failed = check("deepspeed", project(tmp_path, recipe="custom", **{"rl.grpo.trl": {"deepspeed": refused}}))
    assert failed.ok is False and "rl.grpo.trl.deepspeed (the mapping given): DeepSpeed refuses" in failed.detail
    assert "offload_param.device" in failed.detail and "sft.train" not in failed.detail


def test_qwen_parameter_formula_matches_the_built_model():
    s = doctor.QWEN25_VL_3B
    assert doctor.qwen25vl_parameters(s.vocab_size, s.hidden_size, s.intermediate_size, s.layers, s.heads,
                                      s.kv_heads, s.vision_hidden_size, s.vision_depth, s.vision_intermediate_size,
                                      s.patch_size) == doctor.KNOWN_SIZES["qwen2.5-vl-3b"]


@pytest.mark.skipif(ON_GPU, reason="on a GPU machine --smoke runs")
def test_smoke_without_a_gpu_says_so_and_exits_2(capsys):
    assert doctor.main(["--smoke"]) == 2
    out = capsys.readouterr()
    assert "needs a CUDA GPU" in out.err and json.loads(out.out)["ok"] is False
    assert doctor.main(["--cpu"]) == 2  # --cpu alone is a usage error


def test_smoke_cpu_trains_saves_reloads_and_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards (--cpu sets it for the process)
    started = time.monotonic()
    status = doctor.main(["--smoke", "--cpu", "--smoke-dir", str(tmp_path / "smoke")])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["ok"] is True, report.get("error")
    assert time.monotonic() - started < 60
    assert report["device"] == "cpu" and report["world_size"] == 1 and report["zero3"] is False
    s = doctor.TINY_SHAPE
    assert report["parameters"] == doctor.qwen25vl_parameters(
        s.vocab_size, s.hidden_size, s.intermediate_size, s.layers, s.heads, s.kv_heads, s.vision_hidden_size,
        s.vision_depth, s.vision_intermediate_size, s.patch_size)
    assert len(report["sft"]["step_s"]) == 1 and report["sft"]["loss"] > 0 and report["sft"]["save_s"] >= 0
    assert len(report["rl"]["step_s"]) == 1 and report["rl"]["train_s"] > 0
    generated = report["generate"]
    assert generated["model_class"] == "Qwen2_5_VLForConditionalGeneration" and generated["completions"] == 2
    assert generated["tokens"] > 0 and generated["generate_s"] > 0
    assert report["memory"][0]["device"] == "cpu" and report["memory"][0]["peak_rss_gib"] > 0
    assert "not yet been run" in report["note"]
    for saved in ("random", "sft", "rl"):
        assert (tmp_path / "smoke" / saved / "config.json").is_file()


def test_smoke_cpu_under_zero3_runs_both_trainers_through_deepspeed(tmp_path):
    """The GPU path's ZeRO-3 plumbing (the Trainer's deepspeed argument, 16-bit gathered saves, the reload
    outside ZeRO-3) on DeepSpeed's CPU accelerator, one process, in its own interpreter (DeepSpeed leaves its
    process group and environment behind)."""
    pytest.importorskip("deepspeed")
    env = with_venv({**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "aesr1.doctor", "--smoke", "--cpu", "--zero3", "on", "--smoke-dir",
                           str(tmp_path / "smoke")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["zero3"] is True
    assert report["sft"]["zero_stage"] == 3 and report["rl"]["zero_stage"] == 3  # as the trainers ran
    assert report["generate"]["model_class"] == "Qwen2_5_VLForConditionalGeneration"


def test_smoke_stops_at_its_time_limit_with_the_report_so_far(tmp_path):
    env = with_venv({**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    done = subprocess.run([sys.executable, "-m", "aesr1.doctor", "--smoke", "--cpu", "--smoke-timeout", "1",
                           "--smoke-dir", str(tmp_path / "smoke")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    report = json.loads(done.stdout)
    assert done.returncode == 124 and report["ok"] is False and "timed out after 1 s in phase" in report["error"]
