import base64
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from aesr1 import environment

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"GIT_AUTHOR_NAME": "aesr1 tests", "GIT_AUTHOR_EMAIL": "tests@aesr1.invalid",  # for test commits
            "GIT_COMMITTER_NAME": "aesr1 tests", "GIT_COMMITTER_EMAIL": "tests@aesr1.invalid"}


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Each test tracks into its own SQLite store, never the repository's, nor a server an earlier test stopped:
    ``mlflow.set_tracking_uri`` (which a stage calls) is process-global and wins over the variable, so a stage run
    in-process against a test's server would leave the next in-process training (transformers' MLflow callback)
    retrying that closed port for minutes."""
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv(environment.PIPELINE_ID, raising=False)
    monkeypatch.delenv(environment.DVC_ROOT, raising=False)


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that builds a trainer under DeepSpeed makes a one-process group in this process (launcher
    variables set, a port held): end it afterwards, so the stages later tests start as subprocesses do not
    inherit a launcher's environment whose port is taken."""
    before = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    yield
    if "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized():
        sys.modules["torch"].distributed.destroy_process_group()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def write_jpeg(path: Path, value: int = 128, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def repo_copy(dest: Path) -> Path:
    """A copy of the repository's tracked and untracked-but-not-ignored files, as a fresh clone has."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def cli_env(tmp_path: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop(environment.PIPELINE_ID, None)
    return env


def with_venv(env: dict) -> dict:
    """``env`` with this interpreter's folder first on PATH (dvc, aesr1, prefect, mlflow commands)."""
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def run(cmd, root, env) -> str:
    done = subprocess.run(cmd, cwd=root, env=with_venv(env), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


SMALL_SIZES = {"ava": {"train": 50, "test": 15}, "tad66k": {"train": 50, "test": 15},
               "flickr_aes": {"train": 25, "test": 15}, "para": {"train": 0, "test": 15},
               "aadb": {"train": 0, "test": 15}}


def shrink_params(root: Path) -> Path:
    """Shrink every stage's params in a repository copy so the whole pipeline runs in a few minutes (the tiny
    recipe's values are overridden from params.yaml, as a user overrides a recipe)."""
    params = yaml.safe_load((root / "params.yaml").read_text())

    def override(dotted: str, **values) -> None:
        holder = params
        for part in dotted.split("."):
            holder = holder.setdefault(part, {})
        holder.update(values)

    params["launcher"] = "torchrun --standalone --nproc_per_node 2"  # sft, rl, evaluate on two processes (gloo)
    params["synth"]["sizes"] = SMALL_SIZES
    override("ingest", train_size=100, min_test_per_dataset=5, max_reject_rate=0.2)
    override("backbone.tiny", hidden_size=64, intermediate_size=128, layers=2, vision_hidden_size=32, vision_heads=2,
             image_size=32)
    override("backbone.pretrain", samples=32)
    override("backbone.pretrain.train", epochs=1)
    override("sft.train", epochs=1)
    override("sft.heldout", samples=8, max_new_tokens=24)
    override("rl.grpo", max_steps=2, images_per_device=2, max_completion_length=16)
    override("rl.heldout", samples=8, max_new_tokens=24)
    override("evaluate", max_per_test_set=6)
    override("evaluate.decoding", max_new_tokens=24, batch_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def project(tmp_path: Path, **changes) -> Path:
    """A params file in tmp_path: the repository's, with ``changes`` (dotted keys) and its configs beside it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in changes.items():
        holder = params
        *parents, last = key.split(".")
        for part in parents:
            holder = holder.setdefault(part, {})
        holder[last] = value
    for folder in ("recipes", "deepspeed"):
        target = tmp_path / "configs" / folder
        target.mkdir(parents=True, exist_ok=True)
        for source in (REPO / "configs" / folder).glob("*.*"):
            (target / source.name).write_text(source.read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# every secret the project, its libraries or its servers read from the environment: the MLflow client's password and
# token, the MLflow server's admin password and CSRF key, Prefect's auth string (client and server), the teacher's
# API key (distill.teacher.api_key_env), the hub token and a DVC remote's S3 keys
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD",
                    "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
                    "OPENAI_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def planted_secrets() -> dict[str, str]:
    """A distinct value for every secret variable, to search for in everything a run wrote."""
    return {name: f"planted-{name.lower().replace('_', '-')}-{secrets.token_hex(8)}" for name in SECRET_VARIABLES}


def secrets_found(planted: dict[str, str], folders: list[Path], texts: dict[str, str]) -> list[str]:
    """Where a planted value, or its base64 (as an ``Authorization: Basic`` header carries it), appears: in any file
    under ``folders`` (read whole, as bytes) or in one of the named ``texts``."""
    forms = {}
    for name, value in planted.items():
        forms[value.encode()] = forms[base64.b64encode(value.encode())] = name
    pattern = re.compile(b"|".join(map(re.escape, forms)))

    def hits(source: str, data: bytes) -> set[str]:
        return {f"{forms[match.group()]} in {source}" for match in pattern.finditer(data)}

    found = set()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                found |= hits(str(path), path.read_bytes())
    for label, text in texts.items():
        found |= hits(label, text.encode())
    return sorted(found)
