"""A stage handed to a GPU worker runs the pipeline's commit: the worker's checkout is moved to it (fetched from
its remote), or the hand-over stops before anything runs."""

import os
import subprocess

import pytest
from conftest import IDENTITY

from tasks.source import SourceError, check_out, pipeline_commit


def git(root, *args) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True,
                          env={**os.environ, **IDENTITY}).stdout.strip()


def commit(root, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def machines(tmp_path):
    """The pipeline's checkout and a worker's clone of it, the worker one commit behind."""
    pipeline, worker = tmp_path / "pipeline", tmp_path / "worker"
    pipeline.mkdir()
    git(pipeline, "init", "-q")
    commit(pipeline, {"aesr1/rl.py": "lr = 1\n", "params.yaml": "a: 1\n", "dvc.lock": "v1\n",
                      "metrics/rl.json": "{}\n"}, "first")
    git(tmp_path, "clone", "-q", str(pipeline), str(worker))
    newer = commit(pipeline, {"aesr1/rl.py": "lr = 2\n"}, "the code the pipeline runs")
    return pipeline, worker, newer


def test_the_worker_runs_the_pipelines_commit_fetched_from_its_remote(machines):
    pipeline, worker, newer = machines
    (worker / "params.yaml").write_text("a: 2\n")  # the last request's params and lock, the stage's metrics
    (worker / "dvc.lock").write_text("v2\n")
    (worker / "metrics/rl.json").write_text('{"steps": 1}\n')
    (pipeline / "params.yaml").write_text("a: 3\n")  # params travel with the request: not a code change
    assert pipeline_commit(pipeline) == newer
    check_out(worker, newer)
    assert git(worker, "rev-parse", "HEAD") == newer and (worker / "aesr1/rl.py").read_text() == "lr = 2\n"
    check_out(worker, newer)  # already there: nothing to do


def test_uncommitted_code_on_either_side_stops_the_hand_over(machines):
    pipeline, worker, newer = machines
    (pipeline / "aesr1/rl.py").write_text("lr = 3\n")
    with pytest.raises(SourceError, match=r"uncommitted changes \(aesr1/rl.py\).*commit them"):
        pipeline_commit(pipeline)
    (worker / "aesr1/rl.py").write_text("lr = 4\n")
    with pytest.raises(SourceError, match=r"at [0-9a-f]{12} with local changes \(aesr1/rl.py\)"):
        check_out(worker, newer)
    assert (worker / "aesr1/rl.py").read_text() == "lr = 4\n"  # nothing lost


def test_a_commit_the_worker_cannot_fetch_is_named(machines, tmp_path):
    _, worker, _ = machines
    unpushed = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(SourceError, match="commit 0123456789ab is neither in the worker's checkout"):
        check_out(worker, unpushed)
    with pytest.raises(SourceError, match="not a git checkout with a commit"):
        pipeline_commit(tmp_path)
