"""The published run: a fresh clone pulls its files from the repository's own DVC store, `dvc metrics diff` has a
baseline, and the figures the README and the run's page quote are the ones in its report and predictions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

PUBLISHED = ["metrics/evaluate.json", "metrics/evaluate_summary.json", "metrics/sft.json", "metrics/rl.json",
             "data/evaluate"]
QUOTING = ["README.md", "docs/results/2026-12-06-default-run.md"]
# what a clone of the repository has that `dvc pull` reads: the pipeline, its lock and params, the DVC config, the store
CLONE = ["dvc.yaml", "dvc.lock", "params.yaml", ".dvc/config", "published"]


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A checkout with the repository's pipeline files and nothing DVC has cached: the published files pulled."""
    root = tmp_path_factory.mktemp("clone")
    for name in CLONE:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "published"], root)
    run(["dvc", "pull", "-q", "-r", "published", *PUBLISHED], root)
    return root


def table_rows(markdown: str, header_start: str) -> list[str]:
    """The body rows of the first table whose header row starts with ``header_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_a_fresh_clone_pulls_the_published_files(clone):
    for path in PUBLISHED:
        assert (clone / path).exists(), path
    assert (clone / "data/evaluate/report.md").is_file() and (clone / "data/evaluate/gallery.html").is_file()
    summary = json.loads((clone / "metrics/evaluate_summary.json").read_text())
    assert {"sft/plcc", "rapo/plcc", "rapo/srcc_se"} <= set(summary)


def test_dvc_metrics_diff_compares_a_new_run_with_the_published_one(clone):
    summary_path = clone / "metrics/evaluate_summary.json"
    published = json.loads(summary_path.read_text())
    summary_path.unlink()  # a DVC output is a read-only link to the cache: write a new file, as a stage does
    summary_path.write_text(json.dumps({**published, "rapo/plcc": published["rapo/plcc"] + 0.1}))
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", "--targets", "metrics/evaluate_summary.json"], clone))
    change = diff["metrics/evaluate_summary.json"]["rapo/plcc"]
    assert change["old"] == pytest.approx(published["rapo/plcc"]) and change["diff"] == pytest.approx(0.1)


def test_the_quoted_table_is_the_published_reports(clone):
    report = (clone / "data/evaluate/report.md").read_text()
    main = table_rows(report, "| model | ava PLCC / SRCC")
    assert [row.split("|")[1].strip() for row in main] == ["backbone", "sft", "rapo"]
    for page in QUOTING:
        quoted = table_rows((REPO / page).read_text(), "| model | ava PLCC / SRCC")
        assert quoted == main, f"{page}'s table is not the published report's main table"
    differences = " ".join(row for row in table_rows(report, "| models | readout") if row.startswith("| rapo - sft"))
    readme = (REPO / "README.md").read_text()
    quoted_gain = re.search(r"RAPO minus SFT[^:]*:(.*?)\. The paper", readme, re.S).group(1)
    gains = re.findall(r"\+(\d\.\d{3} ± \d\.\d{3})", quoted_gain)
    assert len(gains) == 4 and all(f"{gain} (" in differences for gain in gains), (gains, differences)


def test_the_readme_example_is_the_published_runs(clone):
    """The README's example: its image is the test image it names, and each model's words are that model's
    completion in the published predictions, with the true score beside them."""
    readme = (REPO / "README.md").read_text()
    example = readme[readme.index("<!-- example:begin -->"):readme.index("<!-- example:end -->")]
    image_id = re.search(r"test image `([^`]+)`", example).group(1)
    predictions = pd.read_parquet(clone / "data/evaluate/predictions.parquet")
    rows = predictions[predictions.image_id == image_id].set_index("model")
    assert f"true score **{rows.score.iloc[0]:.3f}**" in example
    for model in ("sft", "rapo"):
        assert rows.completion[model].strip() in example, model
