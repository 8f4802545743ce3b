"""What produced a run: the git commit, the code a stage runs (its import closure) and its hash.

The import closure is also what ``dvc.yaml`` must list as a stage's code deps
(``tests/test_dvc.py`` compares them), so MLflow's code hash and DVC's reruns see the same files.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the aesr1 package
# tracked files the pipeline itself rewrites (DVC's lock, the stages' metrics): a change there is the run's own
# doing, not the user's, so it does not make a run "dirty"
PIPELINE_WRITTEN = ("dvc.lock", "metrics")


def module_file(name: str) -> Path | None:
    for path in (PACKAGE_ROOT / f"{name.replace('.', '/')}.py", PACKAGE_ROOT / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The aesr1 modules a file imports anywhere (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "aesr1"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "aesr1":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def import_closure(entries: list[str]) -> list[str]:
    """Package-relative files of every aesr1 module reachable from ``entries`` (package docstrings left out)."""
    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name))
    files = {module_file(m) for m in seen}
    return sorted(str(f.relative_to(PACKAGE_ROOT)) for f in files if f.name != "__init__.py")


def code_digest(files: list[str]) -> str:
    """md5 over the files' names and contents: changes exactly when the code a stage runs changes."""
    digest = hashlib.md5()
    for name in files:
        digest.update(name.encode() + b"\0" + (PACKAGE_ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()


def changed_files(root: Path, also_excluded: tuple[str, ...] = ()) -> list[str]:
    """Tracked files that differ from the commit, other than what the pipeline writes (``PIPELINE_WRITTEN``) and
    ``also_excluded``; raises OSError or a SubprocessError outside a git checkout or without git."""
    excluded = [f":(exclude){name}" for name in (*PIPELINE_WRITTEN, *also_excluded)]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                            cwd=root, capture_output=True, text=True, timeout=30, check=True).stdout
    return [line[3:] for line in status.splitlines() if line.strip()]


def git_state(root: Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the repository at ``root``; None outside a git checkout or without git.

    Dirty: a tracked file differs from the commit, other than what the pipeline writes (``PIPELINE_WRITTEN``).
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = changed_files(root)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(changed)
