"""Data checks with Great Expectations: validate a DataFrame, write the result and Data Docs.

Stages build a list of expectations and call :func:`validate`; a failed expectation
raises :class:`DataCheckError` naming each failure, after the JSON result and the HTML
Data Docs are written (so they can be inspected and logged to MLflow either way).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from aesr1.errors import AesError


class DataCheckError(AesError):
    """One or more expectations failed."""


@dataclass
class CheckReport:
    success: bool
    failures: list[str]
    result_path: Path
    docs_dir: Path


def _describe(result) -> str:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    info = result.result or {}
    seen = info.get("observed_value")
    examples = info.get("partial_unexpected_list")
    detail = (f"observed {seen!r}" if seen is not None
              else f"{info.get('unexpected_count')} unexpected, e.g. {examples[:5]!r}")
    return f"{cfg.type}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {detail}"


def validate(frames: dict[str, tuple[pd.DataFrame, list]], name: str, out_dir: Path) -> CheckReport:
    """Validate each ``{asset: (frame, expectations)}``; write ``<name>.json`` and ``docs/`` in out_dir.

    Raises DataCheckError if any expectation fails.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # slow import (~3 s): only where checks run

    logging.getLogger("great_expectations").setLevel(logging.WARNING)

    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = (out_dir / "docs").resolve()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    context.add_data_docs_site(site_name="aesr1", site_config={
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    })
    source = context.data_sources.add_pandas(name)
    definitions = []
    batches = {}
    for asset_name, (frame, expectations) in frames.items():
        batch = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{name}.{asset_name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}.{asset_name}", data=batch, suite=suite)))
        batches[asset_name] = frame

    results = {}
    failures = []
    for definition, (asset_name, frame) in zip(definitions, batches.items()):
        result = definition.run(batch_parameters={"dataframe": frame})
        results[asset_name] = result.to_json_dict()
        failures += [f"{asset_name}: {_describe(r)}" for r in result.results if not r.success]
    context.build_data_docs(site_names=["aesr1"])

    result_path = out_dir / f"{name}.json"
    result_path.write_text(json.dumps({"success": not failures, "failures": failures, "results": results},
                                      indent=1, default=str))
    report = CheckReport(not failures, failures, result_path, docs_dir)
    if failures:
        raise DataCheckError(f"data checks '{name}' failed ({len(failures)}):\n  " + "\n  ".join(failures)
                             + f"\nfull result: {result_path}")
    return report
