"""The stage pattern: params section in, files out, a metrics file and an MLflow run.

A stage is a function ``fn(cfg, recorder) -> metrics`` over its config dataclass.
:func:`run_stage` loads the config from params.yaml, opens the stage's MLflow run,
calls the function, writes ``metrics/<stage>.json`` and logs params, metrics and the
artifacts the stage registered. Artifacts are logged even when the stage fails, so a
failed data check's report is in MLflow next to the error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, TypeVar

import mlflow

from aesr1.config import flatten, load_section
from aesr1.tracking import stage_run

T = TypeVar("T")
log = logging.getLogger("aesr1")


class Recorder:
    """Collects the files a stage wants in MLflow (logged when the stage ends, pass or fail)."""

    def __init__(self) -> None:
        self.artifacts: list[tuple[Path, str | None]] = []
        self.params: dict[str, str] = {}
        self.tables: dict[str, object] = {}

    def param(self, name: str, value: object) -> None:
        """A run parameter the stage learns while running (e.g. a prompt's content hash)."""
        self.params[name] = str(value)

    def table(self, name: str, frame) -> None:
        """A DataFrame to browse in the MLflow UI (``mlflow.log_table``)."""
        self.tables[name] = frame

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.artifacts.append((Path(path), folder))


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers of a nested metrics dict, with dotted names (MLflow metrics)."""
    flat = flatten(metrics)
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _strict_json(value):
    """NaN and infinities become null: strict JSON, which every metrics reader parses."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict_json(metrics), indent=2, allow_nan=False) + "\n")


def run_stage(name: str, params_path: str | Path, cls: type[T], fn: Callable[[T, Recorder], dict],
              metrics_dir: str | Path = "metrics") -> dict:
    cfg = load_section(params_path, name, cls)
    recorder = Recorder()
    with stage_run(name, flatten(dataclasses.asdict(cfg))):
        start = time.perf_counter()
        try:
            metrics = fn(cfg, recorder)
            metrics_path = Path(metrics_dir) / f"{name}.json"
            write_metrics(metrics_path, metrics)
            mlflow.log_metrics(numeric_metrics(metrics))
            mlflow.log_metric("stage_seconds", time.perf_counter() - start)
            recorder.artifact(metrics_path)
        finally:
            if recorder.params:
                mlflow.log_params(recorder.params)
            for table_name, frame in recorder.tables.items():
                mlflow.log_table(frame, artifact_file=table_name)
            for path, folder in recorder.artifacts:
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=folder or path.name)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path=folder)
    log.info("%s: done in %.1f s -> %s", name, time.perf_counter() - start, Path(metrics_dir) / f"{name}.json")
    return metrics
