"""The stage pattern: params section in, files out, a metrics file and an MLflow run.

A stage is a function ``fn(cfg, recorder) -> metrics`` over its config dataclass.
:func:`run_stage` loads the config from params.yaml, opens the stage's MLflow run,
calls the function, writes ``metrics/<stage>.json`` and logs params, metrics and the
artifacts the stage registered. Artifacts are logged even when the stage fails, so a
failed data check's report is in MLflow next to the error.

Launched on several processes (``accelerate launch``, ``torchrun``) every process runs
the stage function, and only the main one opens the MLflow run and writes the metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from aesr1 import distributed
from aesr1.config import ParamsError, flatten, load_section, read_params, with_recipe
from aesr1.lineage import code_digest, import_closure
from aesr1.summary import LAUNCHED_STAGES, pipeline_params
from aesr1.tracking import log_pipeline_metrics, log_pipeline_params, stage_run, ui_link

T = TypeVar("T")
log = logging.getLogger(__name__)


class Recorder:
    """Collects the files a stage wants in MLflow (logged when the stage ends, pass or fail)."""

    def __init__(self) -> None:
        self.artifacts: list[tuple[Path, str | None]] = []
        self.params: dict[str, str] = {}
        self.tables: dict[str, object] = {}
        self.datasets: list[tuple[Path, object, str]] = []
        self.summary: dict[str, float | str] = {}
        self.pipeline: dict[str, str] = {}

    def pipeline_metrics(self, metrics: dict[str, float | str]) -> None:
        """Figures that describe the whole pipeline run (:mod:`aesr1.summary`): written to the stage's
        ``<stage>_summary.json``; the numbers are logged on the pipeline run too."""
        self.summary.update(metrics)

    def pipeline_param(self, name: str, value: object) -> None:
        """A param of the whole pipeline run that a stage learns while running (the test split's fingerprint)."""
        self.pipeline[name] = str(value)

    def param(self, name: str, value: object) -> None:
        """A run parameter the stage learns while running (e.g. a prompt's content hash)."""
        self.params[name] = str(value)

    def table(self, name: str, frame) -> None:
        """A DataFrame to browse in the MLflow UI (``mlflow.log_table``)."""
        self.tables[name] = frame

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.artifacts.append((Path(path), folder))

    def dataset(self, path: str | Path, frame, context: str) -> None:
        """A table the stage read (a manifest, the corpus): an MLflow dataset input with its digest and source."""
        self.datasets.append((Path(path), frame, context))


def stage_modules(module: str) -> list[str]:
    """The modules a stage runs from: its own and the stage runner's (whose imports bring the rest)."""
    return [module, __name__, "aesr1.config"]


def log_dataset(path: Path, frame, context: str) -> None:
    import mlflow.data

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways", all of them local files
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = mlflow.data.from_pandas(frame, source=path.resolve().as_uri(), name=path.name)
    mlflow.log_input(dataset, context=context)


def params_digest(cfg) -> str:
    return hashlib.md5(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers of a nested metrics dict, with dotted names (MLflow metrics)."""
    flat = flatten(metrics)
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def strict_json(value):
    """NaN and infinities become null: strict JSON, which every metrics reader parses."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(metrics), indent=2, allow_nan=False) + "\n")


def ddp_timeout(params_path: str | Path) -> int:
    """params' top-level ``ddp_timeout``: seconds a collective waits for the slowest process."""
    value = read_params(params_path).get("ddp_timeout", distributed.DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ParamsError(f"{params_path}: ddp_timeout is {value!r}: a whole number of seconds above 0")
    return value


def run_stage(name: str, params_path: str | Path, cls: type[T], fn: Callable[[T, Recorder], dict],
              metrics_dir: str | Path = "metrics") -> dict:
    cfg = load_section(params_path, name, cls)
    distributed.set_timeout(ddp_timeout(params_path))  # before the first collective makes the process group
    if not distributed.is_main():  # the others do their share; what they would record, the main process records
        metrics = fn(cfg, Recorder())
        distributed.barrier()
        return metrics
    recorder = Recorder()
    recorder.param("processes", distributed.world_size())
    code = import_closure(stage_modules(fn.__module__))
    lineage = {"aesr1.params_md5": params_digest(cfg), "aesr1.code_md5": code_digest(code),
               "aesr1.code_files": ",".join(code)}
    pipeline = pipeline_params(with_recipe(params_path, read_params(params_path), required=False))
    if name in LAUNCHED_STAGES:
        pipeline["processes"] = str(distributed.world_size())
    with stage_run(name, flatten(dataclasses.asdict(cfg)), tags=lineage, pipeline=pipeline) as run:
        start = time.perf_counter()
        try:
            metrics = fn(cfg, recorder)
            distributed.barrier()
            metrics_path = Path(metrics_dir) / f"{name}.json"
            write_metrics(metrics_path, metrics)
            if recorder.summary:  # the few figures that compare runs (`dvc exp show`), beside the full file
                write_metrics(Path(metrics_dir) / f"{name}_summary.json", recorder.summary)
            mlflow.log_metrics(numeric_metrics(metrics))
            seconds = time.perf_counter() - start
            mlflow.log_metric("stage_seconds", seconds)
            log_pipeline_metrics(mlflow.MlflowClient(), run.data.tags[MLFLOW_PARENT_RUN_ID], name, seconds,
                                 numeric_metrics(recorder.summary))
            recorder.artifact(metrics_path)
        finally:
            if recorder.params:
                mlflow.log_params(recorder.params)
            if recorder.pipeline:
                mlflow.log_params(recorder.pipeline)
                log_pipeline_params(mlflow.MlflowClient(), run.data.tags[MLFLOW_PARENT_RUN_ID], recorder.pipeline)
            for path, frame, context in recorder.datasets:
                log_dataset(path, frame, context)
            for table_name, frame in recorder.tables.items():
                mlflow.log_table(frame, artifact_file=table_name)
            for path, folder in recorder.artifacts:
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=folder or path.name)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path=folder)
    log.info("%s: done in %.1f s -> %s; MLflow: %s", name, time.perf_counter() - start,
             Path(metrics_dir) / f"{name}.json", ui_link(run.info.experiment_id, run.data.tags[MLFLOW_PARENT_RUN_ID]))
    return metrics
