"""The code a stage handed to another machine runs: the pipeline's commit, checked out on the worker.

DVC finds a stage's run in its run cache by the hashes of its deps, the code among them. A
worker whose checkout holds other code would train a model the pipeline never asked for, and
after hours of GPU time the pipeline's side would fail to restore it ("was not restored from
the run cache"). So the pipeline hands over its commit, and the worker runs exactly that, or
refuses before anything runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from aesr1.errors import AesError
from aesr1.lineage import changed_files

SENT = ("params.yaml",)  # travels with the request, as dvc.lock does (a file the pipeline writes itself)


class SourceError(AesError):
    """The code a remote stage would run is not the pipeline's."""


def _git(root: str | Path, *args: str, timeout: float = 60) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                          check=True).stdout.strip()


def pipeline_commit(root: str | Path) -> str:
    """The commit a stage handed to another machine runs: HEAD, with no other code change in the checkout."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        changed = changed_files(Path(root), SENT)
    except (OSError, subprocess.SubprocessError):
        raise SourceError(f"{root} is not a git checkout with a commit: a stage handed to another machine runs the "
                          f"pipeline's commit there") from None
    if changed:
        raise SourceError(f"{root} has uncommitted changes ({', '.join(changed[:8])}): a stage handed to another "
                          f"machine runs the pipeline's commit, so commit them (and push, for the worker to fetch)")
    return commit


def check_out(root: str | Path, commit: str) -> None:
    """Put the worker's checkout at the pipeline's ``commit``, fetched from its remotes if it lacks it.

    Local changes to the code stop it (they would be lost); the files the request brings (params.yaml,
    dvc.lock) and the pipeline's own writes (metrics/) are overwritten.
    """
    head = _git(root, "rev-parse", "HEAD")
    if head == commit:
        return
    changed = changed_files(Path(root), SENT)
    if changed:
        raise SourceError(f"the worker's checkout {root} is at {head[:12]} with local changes "
                          f"({', '.join(changed[:8])}); the pipeline runs {commit[:12]}: commit or discard them there")
    if not _has_commit(root, commit):
        subprocess.run(["git", "fetch", "--quiet", "--all"], cwd=root, capture_output=True, timeout=600)
        if not _has_commit(root, commit):
            raise SourceError(f"commit {commit[:12]} is neither in the worker's checkout {root} nor in its git "
                              f"remotes: push it where the worker fetches from")
    _git(root, "checkout", "--quiet", "--force", "--detach", commit)


def _has_commit(root: str | Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root,
                          capture_output=True).returncode == 0
