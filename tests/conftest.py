import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Each test tracks into its own SQLite store, never the repository's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("AESR1_PIPELINE_ID", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


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
    env.pop("AESR1_PIPELINE_ID", None)
    return env
