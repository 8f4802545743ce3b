"""The ingest stage on AesSynth and on broken inputs: mix, splits, quarantine, data checks."""

import dataclasses
import hashlib
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import REPO

from aesr1 import environment
from aesr1.checks import DataCheckError, validate
from aesr1.data.ingest import IngestConfig, IngestError, ingest, mix_quotas
from aesr1.data.synth import LATENT_FILE, POPULATIONS, SplitSize, SynthConfig, generate
from aesr1.stage import Recorder, run_stage

SMALL = {"ava": SplitSize(60, 20), "tad66k": SplitSize(60, 20), "flickr_aes": SplitSize(30, 20),
         "para": SplitSize(0, 20), "aadb": SplitSize(0, 20)}


def default_ingest(tmp_path, **overrides) -> IngestConfig:
    """The repository's ingest params, pointed at tmp_path."""
    section = yaml.safe_load((REPO / "params.yaml").read_text())["ingest"]
    section.update(raw_root=str(tmp_path / "raw"), out_dir=str(tmp_path / "ingest"), **overrides)
    return IngestConfig(**section)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "raw"
    generate(SynthConfig(out_dir=str(root), sizes=SMALL, fault_fraction=0.05, workers=1))
    return root


@pytest.fixture
def raw(tmp_path, synth_root):
    (tmp_path / "raw").symlink_to(synth_root)
    return tmp_path / "raw"


def annotation_rows(raw: Path) -> dict[str, int]:
    """Lines/rows in each source's annotation files, as the params list them."""
    def count(path, header):
        return sum(1 for line in path.read_text().splitlines() if line.strip()) - header
    return {
        "ava": count(raw / "AVA/AVA.txt", 0),
        "tad66k": count(raw / "TAD66K/labels/train.csv", 1) + count(raw / "TAD66K/labels/test.csv", 1),
        # worker lines are rejections too when their rating is out of scale
        "flickr_aes": count(raw / "FLICKR-AES/FLICKR-AES_image_score.txt", 0),
        "para": count(raw / "PARA/annotation/PARA-GiaaTest.csv", 1),
        "aadb": count(raw / "AADB/imgListTestNewRegression_score.txt", 0),
    }


def test_mix_quotas_keep_the_ratio():
    quotas, scale = mix_quotas({"ava": 1000, "tad66k": 1000, "flickr_aes": 1000},
                               {"ava": 2, "tad66k": 2, "flickr_aes": 1}, 1500)
    assert quotas == {"ava": 600, "tad66k": 600, "flickr_aes": 300} and scale == 1.0
    # FLICKR-AES has only 150: every quota halves so 2:2:1 holds
    quotas, scale = mix_quotas({"ava": 1000, "tad66k": 1000, "flickr_aes": 150},
                               {"ava": 2, "tad66k": 2, "flickr_aes": 1}, 1500)
    assert scale == 0.5 and quotas == {"ava": 300, "tad66k": 300, "flickr_aes": 150}


def test_ingest_aessynth_end_to_end(tmp_path, raw):
    cfg = default_ingest(tmp_path, train_size=100, min_test_per_dataset=5, max_reject_rate=0.5)
    metrics = ingest(cfg, Recorder())
    out = tmp_path / "ingest"
    train, test = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "test.parquet")
    rejected = pd.read_parquet(out / "rejected.parquet")

    assert len(train) == 100
    assert train.dataset.value_counts().to_dict() == {"ava": 40, "tad66k": 40, "flickr_aes": 20}
    assert set(test.dataset) == {"ava", "tad66k", "flickr_aes", "para", "aadb"}
    assert not set(train.image_id) & set(test.image_id)
    assert train.score.between(0, 1).all() and test.score.between(0, 1).all()
    assert all(Path(p).is_file() for p in pd.concat([train, test]).image_path)
    # every planted fault is quarantined with a reason
    assert {"malformed_line", "score_nan", "missing_image", "unreadable_image", "duplicate_id",
            "score_out_of_scale", "path_escape", "rating_out_of_scale"} <= set(rejected.reason)
    assert rejected.source_file.notna().all() and (rejected.line > 0).all()
    # nothing lost: every annotation row is accepted or rejected (FLICKR worker rows aside)
    for name, rows in annotation_rows(raw).items():
        src = metrics["sources"][name]
        worker_rejects = src["rejected_by_reason"].get("rating_out_of_scale", 0)
        assert src["accepted"] + src["rejected"] - worker_rejects == rows, name
    assert metrics["train_size"] + metrics["test_size"] + metrics["unused_rows"] == sum(
        s["accepted"] for s in metrics["sources"].values())
    report = json.loads((out / "checks/ingest.json").read_text())
    assert report["success"] is True
    assert (out / "checks/docs/index.html").is_file()


def test_too_many_rejections_fail_with_the_reasons(tmp_path, raw):
    cfg = default_ingest(tmp_path, max_reject_rate=0.001)
    with pytest.raises(IngestError, match=r"rejection rate above max_reject_rate.*\n.*ava: .*rejected"):
        ingest(cfg, Recorder())
    assert (tmp_path / "ingest/rejected.parquet").is_file()  # written before failing, for inspection
    assert not (tmp_path / "ingest/train.parquet").exists()


def test_failed_expectation_fails_the_stage(tmp_path, raw):
    cfg = default_ingest(tmp_path, train_size=100, max_reject_rate=0.5, min_test_per_dataset=1000)
    with pytest.raises(DataCheckError, match=r"summary: expect_column_values_to_be_between\(column='test_rows'"):
        ingest(cfg, Recorder())
    report = json.loads((tmp_path / "ingest/checks/ingest.json").read_text())
    assert report["success"] is False and len(report["failures"]) == 1
    assert not (tmp_path / "ingest/train.parquet").exists()


def test_manifest_checks_catch_bad_rows(tmp_path):
    import great_expectations.expectations as gxe

    frame = pd.DataFrame({"image_id": ["a", "a", "b"], "score": [0.2, 1.4, None]})
    checks = [gxe.ExpectColumnValuesToBeUnique(column="image_id"),
              gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0, max_value=1),
              gxe.ExpectColumnValuesToNotBeNull(column="score")]
    with pytest.raises(DataCheckError) as err:
        validate({"manifest": (frame, checks)}, "bad", tmp_path)
    message = str(err.value)
    assert "expect_column_values_to_be_unique(column='image_id')" in message
    assert "expect_column_values_to_be_between(column='score'" in message and "[1.4]" in message
    assert "expect_column_values_to_not_be_null(column='score')" in message


def test_sources_without_a_split_rule_are_refused(tmp_path, raw):
    cfg = default_ingest(tmp_path)
    cfg.sources["ava"] = dataclasses.replace(cfg.sources["ava"], test_ids=None)
    with pytest.raises(IngestError, match="set test_ids or test_fraction"):
        ingest(cfg, Recorder())


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_aessynth_is_deterministic_for_a_seed(tmp_path):
    sizes = {"ava": SplitSize(8, 4), "para": SplitSize(0, 4), "aadb": SplitSize(0, 6)}
    generate(SynthConfig(out_dir=str(tmp_path / "a"), sizes=sizes, workers=2))
    generate(SynthConfig(out_dir=str(tmp_path / "b"), sizes=sizes, workers=1))
    generate(SynthConfig(out_dir=str(tmp_path / "c"), sizes=sizes, seed=1, workers=1))
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    latent = pd.read_csv(tmp_path / "a" / LATENT_FILE)
    assert len(latent) == 12 + 4 + 6 and latent.latent_score.between(0, 1).all()


def test_out_of_domain_sets_differ_in_factors_and_style(synth_root):
    latent = pd.read_csv(synth_root / LATENT_FILE)
    means = latent.groupby("dataset")[["exposure", "composition"]].mean()
    assert means.loc["para", "exposure"] > means.loc["ava", "exposure"] + 0.05
    assert means.loc["aadb", "exposure"] < means.loc["ava", "exposure"] - 0.05


def test_mos_tracks_the_latent_score(tmp_path, raw):
    """Raters are noisy but not random: MOS correlates with the noiseless latent score."""
    ingest(default_ingest(tmp_path, train_size=100, min_test_per_dataset=5, max_reject_rate=0.5), Recorder())
    rows = pd.concat([pd.read_parquet(tmp_path / "ingest" / f) for f in ("train.parquet", "test.parquet")])
    latent = pd.read_csv(raw / LATENT_FILE, dtype={"name": str})
    merged = rows.merge(latent, left_on=["dataset", "native_id"], right_on=["dataset", "name"])
    assert len(merged) == len(rows)
    for dataset, group in merged.groupby("dataset"):
        assert group.score.corr(group.latent_score) > 0.7, dataset


def test_stage_writes_metrics_and_a_grouped_mlflow_run(tmp_path, raw, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(raw_root=str(raw), out_dir=str(tmp_path / "ingest"), train_size=100,
                            min_test_per_dataset=5, max_reject_rate=0.5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(environment.PIPELINE_ID, "pipe-123")
    metrics = run_stage("ingest", "params.yaml", IngestConfig, ingest)
    assert json.loads((tmp_path / "metrics/ingest.json").read_text()) == metrics

    runs = mlflow.search_runs(experiment_names=["aesr1"], filter_string="tags.`aesr1.pipeline_id` = 'pipe-123'")
    by_role = runs.set_index("tags.aesr1.role")
    stage, parent = by_role.loc["stage"], by_role.loc["pipeline"]
    assert stage["tags.mlflow.parentRunId"] == parent["run_id"]
    assert stage["params.train_size"] == "100" and stage["params.sources.ava.format"] == "ava"
    assert stage["metrics.train_size"] == 100 and stage["status"] == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(stage["run_id"])}
    assert {"ingest.json", "train.parquet", "rejected.parquet", "checks"} <= artifacts


def test_a_bom_in_a_header_ingests_and_para_counts_its_raters(tmp_path, raw):
    para = tmp_path / "PARA-GiaaTest.csv"
    para.write_text((raw / "PARA/annotation/PARA-GiaaTest.csv").read_text(), encoding="utf-8-sig")
    cfg = default_ingest(tmp_path, train_size=100, min_test_per_dataset=5, max_reject_rate=0.5)
    cfg.sources["para"] = dataclasses.replace(cfg.sources["para"], files={"test": str(para)})
    metrics = ingest(cfg, Recorder())
    assert metrics["sources"]["para"]["accepted"] == 20
    test = pd.read_parquet(tmp_path / "ingest/test.parquet")
    assert test[test.dataset == "para"].n_ratings.tolist() == [POPULATIONS["para"].raters_per_image] * 20


def test_an_unreadable_source_is_named_and_the_others_are_still_read(tmp_path, raw):
    broken = tmp_path / "PARA-GiaaTest.csv"
    broken.write_text("session,imageName,aestheticScore_mean\ns1,x.jpg,3\n")
    cfg = default_ingest(tmp_path, train_size=100, min_test_per_dataset=5, max_reject_rate=0.5)
    cfg.sources["para"] = dataclasses.replace(cfg.sources["para"], files={"test": str(broken)})
    cfg.sources["aadb"] = dataclasses.replace(cfg.sources["aadb"], files={"test": "AADB/nowhere.txt"})
    with pytest.raises(IngestError) as err:
        ingest(cfg, Recorder())
    message = str(err.value)
    assert "para: unreadable, the whole source is rejected: para: " in message
    assert "lacks columns ['sessionId']" in message
    assert "aadb: unreadable" in message and "annotation file not found" in message
    assert "ava:" not in message and "tad66k:" not in message
    rejected = pd.read_parquet(tmp_path / "ingest/rejected.parquet")
    unreadable = rejected[rejected.reason == "source_unreadable"]
    assert unreadable.dataset.tolist() == ["para", "aadb"] and unreadable.source_file.iloc[0] == str(broken)
    assert {"ava", "tad66k", "flickr_aes"} <= set(rejected.dataset)  # every other source was read and checked

    del cfg.sources["para"], cfg.sources["aadb"]  # left out explicitly, the rest ingests
    metrics = ingest(cfg, Recorder())
    assert set(metrics["test_by_dataset"]) == {"ava", "tad66k", "flickr_aes"}
