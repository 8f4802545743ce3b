"""AesCoT: the output format, the three filters, the analytic teacher, review decisions."""

import math
import random

import numpy as np
import pandas as pd
import pytest

from aesr1.aescot import review
from aesr1.aescot.claims import BY_ID, DIMENSIONS, dimensions_addressed
from aesr1.aescot.critique_filters import FilterConfig, align_errors, check, fact_errors, leak_errors
from aesr1.aescot.distill import DistillConfig, distill
from aesr1.aescot.filter import FilterStageConfig, filter_corpus
from aesr1.aescot.measure import measure, measure_file
from aesr1.aescot.teacher_analytic import AnalyticTeacher, AnalyticTeacherConfig
from aesr1.data.synth import SplitSize, SynthConfig, generate
from aesr1.stage import Recorder
from aesr1.trajectory import band_of, make_trajectory, parse_score

CLEAN = ("Lighting: Directional light falls from the left and the subject stands out from the background. "
         "Emotion & narrative: The scene reads as one calm place. Composition: The subject sits near a third. "
         "Color: The palette is harmonious. Exposure: The image is well exposed. Overall, a compelling image.")


def stats_of(rgb):
    return measure(np.asarray(rgb, np.float32))


def flat_image(value, size=48):
    return np.full((size, size, 3), value, np.float32)


def test_trajectory_format_round_trip():
    text = make_trajectory("A critique.", 0.6234)
    assert text == "<think>A critique.</think><answer>0.62</answer>"
    assert parse_score(text) == 0.62
    assert parse_score("<think>x</think>\n<answer> 1 </answer>") == 1.0
    for broken in ("no tags at all 0.5", "<think>x</think><answer>high</answer>", "<think>x</think><answer>7</answer>",
                   "<answer>0.5</answer>", "<think>x</think><answer>0.5</answer> trailing"):
        assert math.isnan(parse_score(broken)), broken
    assert [band_of(s) for s in (0.0, 0.39, 0.4, 0.69, 0.7, 1.0)] == ["bad", "bad", "fair", "fair", "good", "good"]


@pytest.mark.parametrize("critique, kind", [
    ("The image deserves a 0.62 for its light.", "number"),
    ("I would give it 7/10.", "fraction"),
    ("It lands at six out of ten.", "fraction"),
    ("Its rating should be high given the colour.", "score talk"),
    ("Overall, this is a good photo.", "band verdict"),
    ("The result is fair.", "band verdict"),
])
def test_leak_filter_catches_score_reveals(critique, kind):
    assert any(e.startswith(kind) for e in leak_errors(critique)), leak_errors(critique)


def test_leak_filter_passes_clean_critiques():
    assert leak_errors(CLEAN) == []
    assert leak_errors("A good deal of the frame is sky, and the rule of thirds holds.") == []


def test_align_filter_uses_polarity_with_negation():
    cfg = FilterConfig()
    glowing = "Beautiful, harmonious colour, striking light and a compelling, polished, memorable scene."
    damning = "Murky, cluttered and flat; the colours clash and the subject is lost. The image struggles."
    assert align_errors(glowing, "bad", cfg) and not align_errors(glowing, "good", cfg)
    assert align_errors(damning, "good", cfg) and not align_errors(damning, "bad", cfg)
    # "not distracting" and "nothing distracts" are praise
    assert not align_errors("The frame is not distracting and nothing distracts from the subject.", "good", cfg)
    evidence = align_errors(glowing, "bad", cfg)[0]
    assert "polarity" in evidence and "per dimension" in evidence


def test_fact_filter_checks_claims_against_pixels():
    bright = stats_of(flat_image(0.92))
    dark = stats_of(flat_image(0.08))
    assert fact_errors("The frame is underexposed and murky.", bright)
    assert not fact_errors("The frame is underexposed and murky.", dark)
    assert fact_errors("The frame is overexposed with blown-out highlights.", dark)
    grey = stats_of(flat_image(0.5))
    assert fact_errors("Vivid, rich colours fill the frame.", grey)
    red = np.zeros((48, 48, 3), np.float32)
    red[..., 0] = 0.9
    assert not fact_errors("Vivid, rich colours fill the frame.", stats_of(red))
    # light direction: a left-to-right ramp is lit from the right
    ramp = np.repeat(np.linspace(0.1, 0.9, 48, dtype=np.float32)[None, :, None], 48, 0).repeat(3, 2)
    assert fact_errors("Directional light falls from the left.", stats_of(ramp))
    assert not fact_errors("Directional light falls from the right.", stats_of(ramp))


@pytest.fixture(scope="module")
def synth_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("aescot")
    sizes = {"ava": SplitSize(80, 0), "tad66k": SplitSize(80, 0), "flickr_aes": SplitSize(40, 0)}
    generate(SynthConfig(out_dir=str(root / "raw"), sizes=sizes, fault_fraction=0, workers=1))
    latent = pd.read_csv(root / "raw" / "aessynth_latent.csv", dtype={"name": str})
    folders = {"ava": "AVA/images", "tad66k": "TAD66K/images", "flickr_aes": "FLICKR-AES/40K"}
    manifest = pd.DataFrame({
        "image_id": latent.dataset + "/" + latent.name,
        "dataset": latent.dataset,
        "image_path": [str(root / "raw" / folders[d] / (n + ".jpg" if d == "ava" else n))
                       for d, n in zip(latent.dataset, latent.name)],
        "score": latent.latent_score,
    })
    manifest.to_parquet(root / "train.parquet")
    return root


def test_analytic_teacher_output_passes_fact_and_leak_filters(synth_train):
    manifest = pd.read_parquet(synth_train / "train.parquet")
    teacher = AnalyticTeacher(AnalyticTeacherConfig())
    counts = {"leak": 0, "align": 0, "fact": 0}
    critiques = []
    for row in manifest.itertuples():
        band = band_of(row.score)
        text = teacher.critique(row.image_path, band, row.image_id).text
        critiques.append(text)
        for kind, errors in check(text, band, measure_file(row.image_path), FilterConfig()).items():
            counts[kind] += bool(errors)
        assert dimensions_addressed(text) == list(DIMENSIONS)
    assert counts == {"leak": 0, "align": 0, "fact": 0}
    assert len(set(critiques)) > 0.9 * len(critiques)  # varied wording, not one sentence per case
    # deterministic for a seed
    first = manifest.iloc[0]
    again = AnalyticTeacher(AnalyticTeacherConfig()).critique(first.image_path, band_of(first.score),
                                                              first.image_id).text
    assert again == critiques[0]


def test_inverted_claims_are_caught_by_the_fact_filter(synth_train):
    manifest = pd.read_parquet(synth_train / "train.parquet")
    teacher = AnalyticTeacher(AnalyticTeacherConfig())
    inverted_total, caught = 0, 0
    for row in manifest.itertuples():
        stats = measure_file(row.image_path)
        chosen = teacher.choose_claims(stats, "fair")
        flipped = {dim: [BY_ID[c.opposite] for c in claims if c.opposite] for dim, claims in chosen.items()}
        if not any(flipped.values()):
            continue
        inverted_total += 1
        text = teacher.write(flipped, stats, "fair", random.Random(0))
        caught += bool(fact_errors(text, stats))
    assert inverted_total > 50
    assert caught / inverted_total > 0.95


def test_filter_stage_rejects_with_evidence_and_honours_review(tmp_path, synth_train):
    out = tmp_path / "aescot"
    distill(DistillConfig(train_manifest=str(synth_train / "train.parquet"), out_dir=str(out)), Recorder())
    distilled = pd.read_parquet(out / "distilled.parquet")
    # plant one error of each kind
    distilled.loc[0, "critique"] = distilled.loc[0, "critique"] + " I would rate it 7/10."
    brightness = pd.Series([measure_file(p).brightness for p in distilled.image_path], index=distilled.index)
    bright = brightness.drop(0).idxmax()
    assert brightness[bright] > 0.45  # bright enough that "underexposed" contradicts it
    distilled.loc[bright, "critique"] += " The frame is underexposed and murky."
    bad = distilled[distilled.band == "bad"].index.drop([0, bright], errors="ignore")[0]
    distilled.loc[bad, "critique"] = CLEAN.replace("a compelling image", "a beautiful, striking, polished image")
    distilled.to_parquet(out / "distilled.parquet")

    cfg = FilterStageConfig(distilled=str(out / "distilled.parquet"), out_dir=str(out),
                            review_decisions=str(tmp_path / "decisions.csv"))
    metrics = filter_corpus(cfg, Recorder())
    rejected = pd.read_parquet(out / "filtered_out.parquet").set_index("image_id")
    assert rejected.loc[distilled.image_id[0], "kind"] == "leak"
    assert "7/10" in rejected.loc[distilled.image_id[0], "evidence"]
    assert rejected.loc[distilled.image_id[bright], "kind"] == "fact"
    assert "align" in rejected.loc[distilled.image_id[bad], "kinds"]
    assert metrics["corpus_size"] + metrics["filtered_out"] == len(distilled)

    # a reviewer overrules the filter on the align sample and rejects a passed one
    review_csv = tmp_path / "review.csv"
    exported = review.export(cfg, review_csv, passed_sample=5)
    assert (exported.status == "flagged").sum() == len(rejected) and review_csv.with_suffix(".html").is_file()
    assert "data:image/jpeg;base64," in review_csv.with_suffix(".html").read_text()
    filled = pd.read_csv(review_csv, dtype=str, keep_default_na=False)
    filled.loc[filled.image_id == distilled.image_id[bad], "decision"] = "keep"
    passed_id = filled[filled.status == "passed"].image_id.iloc[0]
    filled.loc[filled.image_id == passed_id, "decision"] = "reject"
    filled.to_csv(review_csv, index=False)
    assert review.apply(cfg, review_csv)["applied"] == 2

    metrics = filter_corpus(cfg, Recorder())
    corpus = pd.read_parquet(out / "corpus.parquet")
    assert distilled.image_id[bad] in set(corpus.image_id) and passed_id not in set(corpus.image_id)
    assert metrics["review"] == {"kept_by_reviewer": 1, "rejected_by_reviewer": 1}
    rejected = pd.read_parquet(out / "filtered_out.parquet").set_index("image_id")
    assert rejected.loc[passed_id, "kind"] == "manual"


def test_review_apply_refuses_unknown_decisions(tmp_path):
    cfg = FilterStageConfig(review_decisions=str(tmp_path / "d.csv"))
    (tmp_path / "r.csv").write_text("image_id,critique_sha,decision,note\na,b,maybe,\n")
    with pytest.raises(ValueError, match="keep or reject"):
        review.apply(cfg, tmp_path / "r.csv")


def test_corpus_check_refuses_a_kept_leak(tmp_path, synth_train):
    """A reviewer may overrule align/fact flags, but the corpus check never lets a leak through."""
    from aesr1.checks import DataCheckError

    out = tmp_path / "aescot"
    distill(DistillConfig(train_manifest=str(synth_train / "train.parquet"), out_dir=str(out)), Recorder())
    distilled = pd.read_parquet(out / "distilled.parquet")
    distilled.loc[0, "critique"] += " I would rate it 7/10."
    distilled.to_parquet(out / "distilled.parquet")
    from aesr1.aescot.filter import critique_sha
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(f"image_id,critique_sha,decision,note\n{distilled.image_id[0]},"
                         f"{critique_sha(distilled.critique[0])},keep,\n")
    cfg = FilterStageConfig(distilled=str(out / "distilled.parquet"), out_dir=str(out), review_decisions=str(decisions))
    with pytest.raises(DataCheckError, match="expect_column_values_to_not_match_regex"):
        filter_corpus(cfg, Recorder())
