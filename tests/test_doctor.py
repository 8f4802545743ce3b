"""``aesr1 doctor``: the checks on this CPU machine, each failure clear and fast (``--smoke``: tests/test_smoke.py).

No test sends traffic beyond loopback: the hub is pointed at a closed 127.0.0.1 port (HF_ENDPOINT), the
teacher and the MLflow and Prefect servers at a stub on 127.0.0.1 or a closed loopback port, and proxies are
cleared. (Against real MLflow and Prefect servers with authentication: tests/test_orchestration.py and
tests/test_schedule.py.)
"""

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, project

from aesr1.doctor import checks, cli, plan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

KEY = "sk-doctor-test-0123456789abcdef"  # a fake secret that must never appear in the output
ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch, tmp_path):
    """No proxy may route a loopback request elsewhere; the hub is a closed loopback port."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PREFECT_AUTH = "aesr1:prefect-doctor-test-auth-string"
NO_EXPERIMENT = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"}).encode()


class Stub:
    """A loopback OpenAI-compatible ``GET /v1/models``, an MLflow ``GET /health`` and experiment lookup (answered
    ``mlflow_answer``: by default no such experiment), and Prefect's ``GET /api/admin/version`` behind the auth
    string ``PREFECT_AUTH`` (tests/chat_server.py answers POST chat completions only)."""

    def __init__(self, models=("stub-model",), mlflow_answer=(404, NO_EXPERIMENT)):
        self.auth: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, b"OK")
                stub.auth.append(self.headers.get("Authorization", ""))
                if self.path.startswith("/api/2.0/mlflow/experiments/get-by-name"):
                    return self._send(*mlflow_answer)
                if self.path == "/api/admin/version":
                    expected = f"Basic {base64.b64encode(PREFECT_AUTH.encode()).decode()}"
                    if self.headers.get("Authorization") != expected:
                        return self._send(401, b'{"exception_message": "Unauthorized"}')
                    return self._send(200, b'"3.8.8"')
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


def check(name: str, params: Path, timeout: float = 10.0) -> checks.Check:
    return checks.run_check(name, checks.Context(params, timeout))


@pytest.mark.skipif(ON_GPU, reason="the CPU-only expectations")
def test_the_embedded_default_passes_on_this_cpu_machine_as_json_and_as_a_table(capsys):
    status = cli.main(["--params", str(REPO / "params.yaml"), "--json"])
    report = json.loads(capsys.readouterr().out)
    found = {c["name"]: c for c in report["checks"]}
    assert status == 0 and report["ok"] is True, report
    assert list(found) == list(checks.CHECKS)
    assert found["torch"]["ok"] is True and torch.__version__ in found["torch"]["detail"]
    assert found["cuda"]["ok"] is None and "CUDA not available" in found["cuda"]["detail"]  # reported, not failed
    assert found["backbone"]["ok"] is True and found["backbone"]["detail"].startswith("tiny")
    assert found["params"]["ok"] and found["launcher"]["ok"] and found["disk"]["ok"] and found["mlflow"]["ok"]
    assert "2 resumable checkpoints at once" in found["disk"]["detail"]  # the rule is stated
    assert found["teacher"]["ok"] is None and found["vllm"]["ok"] is None and found["deepspeed"]["ok"] is None
    assert found["dvc_remote"]["ok"] in (True, None)

    assert cli.main(["--params", str(REPO / "params.yaml"), "--skip", "dvc_remote,params"]) == 0
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
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", "dtype": "bfloat16"}))
    other = check("backbone", tmp_path / "params.yaml")
    assert other.ok is False and "model_type llava: not a family the policy code handles" in other.detail


def test_the_tiny_backbone_check_names_its_family(tmp_path):
    gemma = check("backbone", project(tmp_path, **{"backbone.tiny.family": "gemma3"}))
    assert gemma.ok is True and "the embedded Gemma 3" in gemma.detail


def test_a_hub_backbone_offline_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # HF_ENDPOINT: a closed loopback port
    params = project(tmp_path, recipe="custom", **{"backbone.name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"})
    started = time.monotonic()
    result = check("backbone", params, timeout=5)
    assert time.monotonic() - started < 5
    assert result.ok is False and "cannot reach the hub at http://127.0.0.1:" in result.detail
    assert "backbone.name_or_path" in result.detail
    disk = check("disk", params)  # the size still comes without the network: the 7B's known shape
    assert "8.29B" in disk.detail and "its shape: its config.json, known" in disk.detail


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
        assert cli.main(["--params", str(params), "--skip", "params,dvc_remote,disk"]) == 1
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
    status = cli.main(["--params", str(params), "--json", "--skip", "params,dvc_remote,disk"])
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


def test_the_mlflow_check_names_the_server_the_status_and_what_to_set_when_refused(tmp_path, monkeypatch):
    """/health answers anyone; the check asks what a stage asks first, with the credentials of the environment."""
    params = project(tmp_path)
    with Stub(mlflow_answer=(401, b"You are not authenticated.")) as stub:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stub.base)
        anonymous = check("mlflow", params)
        assert anonymous.ok is False and anonymous.detail == (
            f"MLflow server {stub.base} refused (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            f"(or MLFLOW_TRACKING_TOKEN)")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", KEY)
        wrong = check("mlflow", params)
        assert wrong.ok is False and "refused (HTTP 401): it does not accept user 'alice'" in wrong.detail
        assert stub.auth[-1] == f"Basic {base64.b64encode(f'alice:{KEY}'.encode()).decode()}"  # MLflow's client sent it
    with Stub(mlflow_answer=(403, b"Permission denied")) as stub:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stub.base)
        denied = check("mlflow", params)
    assert denied.ok is False and denied.detail.startswith(
        f"MLflow server {stub.base} refused (HTTP 403): user 'alice' lacks permission on experiment 'aesr1' (EDIT "
        f"needed): ask the server's admin to grant it")
    assert KEY not in anonymous.detail + wrong.detail + denied.detail


def test_the_prefect_check_sends_the_auth_string_and_names_it_when_refused(tmp_path, monkeypatch):
    params = project(tmp_path)
    unset = check("prefect", params)
    assert unset.ok is None and "PREFECT_API_URL is not set" in unset.detail
    with Stub() as stub:
        monkeypatch.setenv("PREFECT_API_URL", f"{stub.base}/api")
        anonymous = check("prefect", params)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", PREFECT_AUTH[::-1])
        wrong = check("prefect", params)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", PREFECT_AUTH)
        right = check("prefect", params)
    assert anonymous.ok is False and anonymous.detail == (
        f"Prefect server {stub.base}/api refused (HTTP 401): set PREFECT_API_AUTH_STRING (the server's "
        f"PREFECT_SERVER_API_AUTH_STRING)")
    assert wrong.ok is False and "does not accept the auth string in PREFECT_API_AUTH_STRING" in wrong.detail
    assert right.ok is True and right.detail == (f"Prefect server {stub.base}/api: version 3.8.8, with the auth string "
                                                 f"in PREFECT_API_AUTH_STRING")
    assert not any(PREFECT_AUTH in c.detail or PREFECT_AUTH[::-1] in c.detail for c in (anonymous, wrong, right))
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port()}/api")
    closed = check("prefect", params)
    assert closed.ok is False and "cannot connect" in closed.detail


EIGHT_GPUS = checks.CudaInfo(True, 8, [{"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1,
                                        "capability": "sm_90"} for i in range(8)], True, "12.4")


# accelerate configs as a user of `accelerate launch` writes them (the project's own launcher is torchrun)
ACCELERATE_CONFIGS = {
    "zero3.yaml": {"distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 8,
                   "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "none"}},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "num_processes": 2},
}


@pytest.mark.parametrize("launcher, gpus, ok", [
    ("torchrun --nproc_per_node gpu", 8, True),
    ("torchrun --standalone --nproc_per_node 8", 8, True),
    ("torchrun --nproc-per-node=4", 8, False),
    ("accelerate launch --config_file accelerate/zero3.yaml", 8, True),
    ("accelerate launch --config_file accelerate/zero3.yaml", 1, False),
    ("accelerate launch --config_file accelerate/multi_gpu.yaml --num_processes 1", 1, True),
    ("accelerate launch --config_file accelerate/missing.yaml", 8, False),
    ("torchrun --standalone --nproc_per_node 2", 0, True),  # the embedded default on CPUs
    ("accelerate launch --config_file accelerate/zero3.yaml", 0, False),  # GPUs asked, none there
])
def test_the_launcher_starts_one_process_per_visible_gpu(tmp_path, launcher, gpus, ok):
    (tmp_path / "accelerate").mkdir()
    for name, conf in ACCELERATE_CONFIGS.items():
        (tmp_path / "accelerate" / name).write_text(yaml.safe_dump(conf))
    ctx = checks.Context(project(tmp_path, launcher=launcher))
    ctx.cuda = checks.CudaInfo(True, gpus, EIGHT_GPUS.gpus[:gpus], True, "12.4") if gpus else checks.CudaInfo(False)
    result = checks.run_check("launcher", ctx)
    assert result.ok is ok, result.detail


def test_the_gpu_memory_check_is_the_planners_verdict(tmp_path, monkeypatch):
    reference = checks.Context(project(tmp_path, recipe="qwen2.5-vl-7b"))
    reference.cuda = EIGHT_GPUS
    fits = checks.run_check("gpu_memory", reference)
    assert fits.ok is True and "on 8 x 79.1 GiB" in fits.detail and "RL generation 40.5" in fits.detail
    no_deepspeed = {"sft.train.trl": {"deepspeed": None}, "rl.grpo.trl": {"deepspeed": None}}
    replicated = checks.Context(project(tmp_path, recipe="qwen2.5-vl-7b", **no_deepspeed))  # every GPU holds all
    replicated.cuda = EIGHT_GPUS
    too_big = checks.run_check("gpu_memory", replicated)
    assert too_big.ok is False and "does not fit" in too_big.detail
    assert 'sft.train.trl.deepspeed: "configs/deepspeed/zero3.json"' in too_big.detail  # the first change: ZeRO-3
    one_gpu = checks.CudaInfo(True, 1, EIGHT_GPUS.gpus[:1], True, "12.4")
    for host_gib, ok in ((64.0, False), (256.0, True)):  # the offloaded optimizer's 113.5 GiB in this machine's
        monkeypatch.setattr(plan, "machine_memory_gib", lambda gib=host_gib: gib)
        offloaded = checks.Context(project(tmp_path, recipe="qwen2.5-vl-7b-1gpu"))
        offloaded.cuda = one_gpu
        result = checks.run_check("gpu_memory", offloaded)
        assert result.ok is ok and f"113.5 GiB of this machine's {host_gib:.0f} GiB" in result.detail
    unknown = checks.Context(project(tmp_path, recipe="custom", **{"backbone.name_or_path": "org/unknown-vlm"}))
    unknown.cuda = EIGHT_GPUS
    skipped = checks.run_check("gpu_memory", unknown)
    assert skipped.ok is None and "shape is unknown" in skipped.detail


def test_the_disk_check_counts_the_two_checkpoints_that_coexist_while_saving(tmp_path, monkeypatch):
    """The Trainer writes the next checkpoint before it deletes the last (save_total_limit 1): a 7B full fine-tune
    needs 2 x 100.6 GiB (bf16 weights, fp32 master and AdamW moments of the 7.6B trained parameters) + 2 x 15.4
    GiB (the bf16 sft and rl policies) + 1 GiB. 200 GiB free passed the old one-checkpoint rule (8.29B x (16 + 4 +
    4) B + 1 GiB ~ 186 GiB)."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 200 * 2 ** 30}
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: usage(10 ** 13, 0, free["bytes"]))
    full = project(tmp_path, recipe="qwen2.5-vl-7b")
    disk = check("disk", full)
    assert disk.ok is False and "need ~233.0 GiB (NOT ENOUGH)" in disk.detail and "full 100.6 GiB" in disk.detail
    free["bytes"] = 300 * 2 ** 30
    assert check("disk", full).ok is True
    lora = check("disk", project(tmp_path, recipe="qwen2.5-vl-3b-24gb"))  # adapters: the bf16 policies dominate
    assert lora.ok is True and "need ~15.8 GiB" in lora.detail and "lora 0.4 GiB" in lora.detail


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
