"""Evaluation metrics, the unparseable rule, critique quality, the report, and scoring inputs."""

import base64
import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import write_jpeg

from aesr1.aescot.critique_filters import FilterConfig
from aesr1.aescot.measure import ImageStats
from aesr1.errors import AesError
from aesr1.evaluation.evaluate import critique_quality, noise_ceilings, score_metrics, summarise
from aesr1.evaluation.gallery import write_gallery
from aesr1.evaluation.plots import history_curves
from aesr1.evaluation.report import write_report
from aesr1.inference import decode_image, image_files, image_scores
from aesr1.stage import write_metrics
from aesr1.trajectory import make_trajectory


def test_unparseable_outputs_get_the_documented_score_and_are_counted():
    truth = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    predicted = np.array([0.1, 0.2, np.nan, 0.4, np.nan])
    m = score_metrics(truth, predicted, unparseable_score=0.5)
    assert m["n"] == 5 and m["n_parsed"] == 3 and m["unparseable_rate"] == pytest.approx(0.4)
    ruled = np.array([0.1, 0.2, 0.5, 0.4, 0.5])
    assert m["plcc"] == pytest.approx(np.corrcoef(ruled, truth)[0, 1])
    assert m["plcc_parsed"] == pytest.approx(1.0) and m["srcc_parsed"] == pytest.approx(1.0)
    assert m["mean_predicted"] == pytest.approx(0.7 / 3)


def test_a_model_that_never_parses_correlates_zero_not_randomly():
    m = score_metrics(np.linspace(0, 1, 10), np.full(10, np.nan), unparseable_score=0.5)
    assert m["plcc"] == 0.0 and m["srcc"] == 0.0 and m["unparseable_rate"] == 1.0
    assert math.isnan(m["plcc_parsed"]) and m["n_parsed"] == 0


def test_several_samples_per_image_average_their_parseable_scores():
    texts = [make_trajectory("a", 0.2), make_trajectory("b", 0.4),  # image 1: both parse
             "garbage", make_trajectory("c", 0.9),                   # image 2: one parses
             "no", "<answer>0.5</answer>"]                            # image 3: none parses
    scores = image_scores(texts, samples_per_image=2)
    assert scores[0] == pytest.approx(0.3) and scores[1] == pytest.approx(0.9) and math.isnan(scores[2])


def _stats(brightness):
    return ImageStats(brightness=brightness, clip_dark=0.0, clip_bright=0.0, contrast=0.1, light_strength=0.0,
                      light_from="left", saturation=0.3, harmony=0.5, warmth=0.0, subject_x=0.33, subject_y=0.33,
                      thirds_distance=0.0, centre_distance=0.24, subject_separation=0.1, clutter=0,
                      fragmentation=5.0)


def test_critique_quality_applies_the_aescot_filters_to_the_models_own_critiques():
    good = ("Lighting: the light is pleasing. Emotion & narrative: a calm mood. Composition: balanced framing. "
            "Color: a harmonious palette. Exposure: well exposed.")
    leaky = "Lighting: fine. This deserves a score of 0.9 easily."
    wrong_fact = "Exposure: the frame is far too dark and underexposed."  # exposure and composition ("frame")
    completions = pd.DataFrame({
        "image_path": ["a", "b", "c", "d"],
        "completion": [make_trajectory(good, 0.9), make_trajectory(leaky, 0.8), make_trajectory(wrong_fact, 0.2),
                       "not a trajectory"],
        "predicted": [0.9, 0.8, 0.2, np.nan]})
    measures = {p: _stats(0.5) for p in "abcd"}
    q = critique_quality(completions, measures, FilterConfig())
    assert q["critiques"] == 3  # the unparseable completion has no critique
    assert q["leak_rate"] == pytest.approx(1 / 3)
    assert q["fact_error_rate"] == pytest.approx(1 / 3)  # "too dark" on a mid-bright image
    assert q["dimension_coverage"] == pytest.approx((5 + 1 + 2) / 15)
    assert q["all_dimensions_rate"] == pytest.approx(1 / 3)
    assert q["align_error_rate"] == pytest.approx(1 / 3)  # the leaky one: neutral words for a good score


def test_averages_cover_the_five_sets_and_compare_with_the_noise_ceiling():
    metrics = {t: {"plcc": p, "srcc": p, "n": 10, "unparseable_rate": 0.0}
               for t, p in {"ava": 0.8, "tad66k": 0.6, "flickr_aes": 0.4, "para": 0.3, "aadb": 0.1}.items()}
    ceilings = {t: {"plcc": 0.8} for t in metrics}
    avg = summarise(metrics, list(metrics), ["ava", "tad66k", "flickr_aes"], ceilings)
    assert avg["plcc"] == pytest.approx(0.44) and avg["in_domain_plcc"] == pytest.approx(0.6)
    assert avg["out_of_domain_plcc"] == pytest.approx(0.2)
    assert avg["in_domain_ceiling_ratio"] == pytest.approx(0.75)
    assert avg["out_of_domain_ceiling_ratio"] == pytest.approx(0.25)


def test_noise_ceiling_joins_the_latent_sidecar_by_native_name(tmp_path):
    rng = np.random.default_rng(0)
    latent = rng.random(30)
    test = pd.DataFrame({"dataset": "ava", "native_id": [f"{i:03d}" for i in range(30)],
                         "score": latent + rng.normal(0, 0.05, 30)})
    pd.DataFrame({"dataset": "ava", "name": test.native_id, "latent_score": latent}).to_csv(
        tmp_path / "latent.csv", index=False)
    ceilings = noise_ceilings(test, str(tmp_path / "latent.csv"))
    assert ceilings["ava"]["n"] == 30 and 0.9 < ceilings["ava"]["plcc"] < 1.0
    assert noise_ceilings(test, None) == {}  # real data: no latent score, no ceiling


def test_metrics_file_is_strict_json_and_the_report_has_the_main_table(tmp_path):
    result = {"ava": {"plcc": 0.5, "srcc": float("nan"), "n": 3},
              "average": {"plcc": 0.5, "srcc": float("nan"), "in_domain_plcc": 0.5, "out_of_domain_plcc": math.nan,
                          "unparseable_rate": 0.0},
              "critique": {"critiques": 0}, "entropy": 0.3}
    write_metrics(tmp_path / "evaluate.json", {"rapo": result})
    loaded = json.loads((tmp_path / "evaluate.json").read_text())
    assert loaded["rapo"]["ava"]["srcc"] is None
    silent = {"ava": {"plcc": 0.0, "srcc": 0.0, "n": 3, "unparseable_rate": 1.0},
              "average": {"plcc": 0.0, "srcc": 0.0, "in_domain_plcc": 0.0, "out_of_domain_plcc": math.nan,
                          "unparseable_rate": 1.0},
              "critique": {"critiques": 0}, "entropy": 0.3}
    write_report(tmp_path / "report.md", {"backbone": silent, "rapo": result}, {}, ["ava"],
                 {"rapo": ("Aes-R1", 0.6337, 0.6186)}, "0123456789abcdef",
                 {"backbone": ("b", "the policy prompt", [0, 1], "x"), "rapo": ("r", "the policy prompt", [0, 1], "x")})
    report = (tmp_path / "report.md").read_text()
    assert "| rapo | 0.500 / - | **0.500 / -** | 0.0% |" in report
    assert "| rapo | 0.500 | - | 0.0% | Aes-R1 | 0.634 | 0.619 |" in report
    # a model that never wrote a parseable score has no correlation, not 0
    assert "| backbone | n/a: 100% unparseable | **n/a: 100% unparseable** | 100.0% |" in report
    assert "| backbone | n/a: 100% unparseable | n/a: 100% unparseable | 100.0% |" in report
    lines = report.splitlines()
    assert lines[2].startswith("PLCC (Pearson) and SRCC (Spearman)") and "noise ceiling" in lines[2]
    assert "Test split `0123456789abcdef`" in report


def test_a_model_that_never_parses_has_no_correlation_in_the_run_summary():
    from aesr1.summary import model_metrics

    silent = {"average": {"plcc": 0.0, "srcc": 0.0, "unparseable_rate": 1.0},
              "ava": {"n": 3, "plcc": 0.0, "srcc": 0.0, "unparseable_rate": 1.0},
              "tad66k": {"n": 3, "plcc": 0.2, "srcc": 0.1, "unparseable_rate": 0.5},
              "readouts": {"expected": {"average": {"plcc": 0.0, "srcc": 0.0, "unparseable_rate": 1.0}}}}
    figures = model_metrics({"backbone": silent})
    assert figures["backbone/all_unparseable"] == figures["backbone/ava_all_unparseable"] == 1.0
    assert figures["backbone/expected_all_unparseable"] == 1.0 and figures["backbone/unparseable"] == 1.0
    assert figures["backbone/tad66k_plcc"] == 0.2  # a set with parsed scores keeps its figure
    assert not {"backbone/plcc", "backbone/srcc", "backbone/ava_plcc", "backbone/expected_plcc"} & set(figures)


def test_the_test_split_fingerprint_follows_ids_file_contents_and_scores(tmp_path):
    from aesr1.evaluation.evaluate import file_digest, split_fingerprint

    paths = [write_jpeg(tmp_path / f"{i}.jpg", 40 * i) for i in range(3)]
    test = pd.DataFrame({"image_id": ["ava/0", "ava/1", "ava/2"], "image_path": [str(p) for p in paths],
                         "score": [0.1, 0.5, 0.9]})
    digests = {str(p): file_digest(p) for p in paths}
    fingerprint = split_fingerprint(test, digests)
    assert len(fingerprint) == 16 and split_fingerprint(test.iloc[::-1], digests) == fingerprint  # row order
    assert split_fingerprint(test.assign(score=[0.1, 0.5, 0.8]), digests) != fingerprint
    assert split_fingerprint(test.assign(image_id=["ava/0", "ava/1", "ava/3"]), digests) != fingerprint
    write_jpeg(paths[2], 41)  # the same id, a different file
    assert split_fingerprint(test, {**digests, str(paths[2]): file_digest(paths[2])}) != fingerprint


def test_rl_curves_keep_the_steps_that_logged_rewards():
    history = pd.DataFrame({"step": [1, 2, 3, 4], "reward": [1.0, np.nan, 1.2, np.nan],
                            "entropy": [0.4, 0.41, 0.42, 0.43], "kl": [0.0, 0.01, 0.02, 0.03]})
    curves = history_curves(history)
    assert list(curves.step) == [1, 3] and list(curves.columns) == ["step", "reward", "entropy", "kl"]


def test_score_inputs_are_files_folders_or_base64(tmp_path):
    a = write_jpeg(tmp_path / "imgs" / "a.jpg", 10)
    b = write_jpeg(tmp_path / "imgs" / "sub" / "b.png", 200)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert image_files([str(tmp_path / "imgs")]) == [a, b]
    with pytest.raises(AesError, match="no such image"):
        image_files([str(tmp_path / "missing.jpg")])
    encoded = base64.b64encode(a.read_bytes()).decode()
    assert decode_image(encoded).size == (16, 16) and decode_image(str(b)).getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(AesError, match="base64"):
        decode_image("definitely not an image")
    (tmp_path / "broken.jpg").write_bytes(a.read_bytes()[:40])
    with pytest.raises(AesError, match="cannot read image"):
        decode_image(str(tmp_path / "broken.jpg"))


def _digit_logits(steps: int, **at: dict[int, float]):
    import torch

    logits = torch.full((steps, 10), -30.0)
    for step, probs in at.items():
        for digit, p in probs.items():
            logits[int(step.removeprefix("s")), digit] = math.log(p)
    return logits


def test_the_expected_score_reads_the_policys_digit_distribution_at_its_answer():
    from aesr1.policy.generation import expected_answer

    pieces = ["<think>", "fine", "</think>", "<answer>", "0", ".", "6", "2", "</answer>"]
    # leading digit: 0 with 0.9, 1 with 0.1; tenths: 5, 6, 7 equally; hundredths: 2 for sure
    logits = _digit_logits(len(pieces), s4={0: 0.9, 1: 0.1}, s6={5: 1 / 3, 6: 1 / 3, 7: 1 / 3}, s7={2: 1.0})
    assert expected_answer(pieces, logits) == pytest.approx(0.1 * 1.0 + 0.9 * (0.6 + 0.02), abs=1e-6)
    spaced = ["<think>", "x", "</think>", "<", "answer", ">", " ", "0", ".", "3", "</answer>"]
    assert expected_answer(spaced, _digit_logits(len(spaced), s7={0: 1.0}, s9={3: 0.5, 5: 0.5})) == \
        pytest.approx(0.4, abs=1e-6)  # tenths 3 or 5: 0.4
    for unreadable in (["<think>x</think>", "<answer>", "1", ".", "0", "</answer>"],  # a "1." path
                       ["<think>x</think>", "<answer>", "0", "</answer>"],  # no decimal
                       ["<think>x</think>", "<answer>", "0.5", "</answer>"],  # digits not single tokens
                       ["no answer at all"]):
        assert math.isnan(expected_answer(unreadable, _digit_logits(len(unreadable))))


def test_readouts_first_sample_expected_and_mean():
    from aesr1.evaluation.evaluate import readout_scores

    texts = [make_trajectory("a", 0.2), make_trajectory("b", 0.4), "garbage", make_trajectory("c", 0.9)]
    expected = np.array([0.25, np.nan, 0.1, 0.8])  # the third has an expectation but no parseable score
    scores = readout_scores(texts, expected, samples_per_image=2)
    assert scores["sampled"] == pytest.approx([0.2, np.nan], nan_ok=True)
    assert scores["expected"] == pytest.approx([(0.25 + 0.4) / 2, 0.8])  # written score where no expectation
    assert scores["mean"] == pytest.approx([0.3, 0.9])
    assert set(readout_scores(texts[:2], expected[:2], 1)) == {"sampled", "expected"}


def test_standard_errors_and_paired_differences():
    from aesr1.evaluation.evaluate import EvaluateConfig, comparisons, readout_metrics, summarise

    rng = np.random.default_rng(0)
    n = 200
    test = pd.DataFrame({"dataset": np.repeat(["ava", "para"], n // 2), "score": rng.random(n)})
    base = test.score.to_numpy() + rng.normal(0, 0.4, n)
    better = base + 0.6 * (test.score.to_numpy() - base)  # the same errors, shrunk: clearly better
    cfg = EvaluateConfig(test_sets=["ava", "para"], in_domain=["ava"], bootstrap=400)
    metrics = {}
    for name, predicted in (("sft", base), ("rapo", better)):
        per_set = readout_metrics(test, {"sampled": predicted}, cfg)["sampled"]
        per_set["average"] = summarise(per_set, cfg.test_sets, cfg.in_domain, {},
                                       {t: per_set[t]["replicates"] for t in cfg.test_sets})
        metrics[name] = {"readouts": {"sampled": per_set}}
        for t in cfg.test_sets:  # the analytic standard error of a correlation, roughly
            r = per_set[t]["plcc"]
            assert per_set[t]["plcc_se"] == pytest.approx((1 - r * r) / math.sqrt(n // 2), rel=0.35)
        assert per_set["average"]["plcc_se"] < max(per_set[t]["plcc_se"] for t in cfg.test_sets)
    entry = comparisons(metrics, [("rapo", "sft"), ("rapo", "missing")])["rapo"]["sft"]
    diff = metrics["rapo"]["readouts"]["sampled"]["average"]["plcc"] - \
        metrics["sft"]["readouts"]["sampled"]["average"]["plcc"]
    assert entry["sampled_plcc_diff"] == pytest.approx(diff) and entry["sampled_plcc_diff_over_2se"]
    unpaired = math.hypot(metrics["rapo"]["readouts"]["sampled"]["average"]["plcc_se"],
                          metrics["sft"]["readouts"]["sampled"]["average"]["plcc_se"])
    assert entry["sampled_plcc_diff_se"] < unpaired  # pairing removes the images' shared difficulty


def test_the_gallery_shows_each_models_score_and_critique_worst_first(tmp_path):
    images = [write_jpeg(tmp_path / f"{i}.jpg", value=40 * i, size=32) for i in range(5)]
    truth = [0.1, 0.3, 0.5, 0.7, 0.9]
    frames = []
    for model, predicted in (("sft", [0.5, 0.5, 0.5, 0.5, 0.5]), ("rapo", [0.15, np.nan, 0.5, 0.2, 0.85])):
        frames.append(pd.DataFrame({
            "image_id": [f"ava/{i}" for i in range(5)], "dataset": ["ava", "ava", "para", "para", "para"],
            "image_path": [str(p) for p in images], "score": truth, "model": model, "predicted": predicted,
            "completion": [make_trajectory(f"{model} <critique> {i}", 0.5) for i in range(5)]}))
    page = write_gallery(pd.concat(frames), tmp_path / "gallery.html", sort_model="rapo", size=4).read_text()
    rows = page.split("<tr>")[2:]
    assert len(rows) == 4  # at most size, drawn from both test sets
    assert sum("para" in row for row in rows) == 2
    order = [next(i for i in range(5) if f">ava/{i}<" in row) for row in rows]
    assert order[0] == 1 and "unparseable" in rows[0]  # unparseable first, then by rapo's absolute error
    errors = [float(row.split("</td><td>")[2]) for row in rows[1:]]
    assert errors == sorted(errors, reverse=True)
    assert all(row.count("data:image/jpeg;base64,") == 1 for row in rows)  # the page is one self-contained file
    assert "sft &lt;critique&gt;" in page and "<critique>" not in page  # critiques are escaped text


def test_a_model_entry_reads_its_answers_on_its_own_scale_and_is_checked_when_loaded(tmp_path):
    from aesr1.config import ParamsError, load_section
    from aesr1.evaluation.evaluate import EvaluateConfig, ModelEntry, model_entry
    from aesr1.trajectory import parse_score

    own = model_entry("data/models/rapo")
    texts = [make_trajectory("soft light", 0.7), "<think>x</think><answer>1.5</answer>", "no format 0.4",
             "<think>x</think><answer>0.4 or so</answer>", " <think>a</think>\n<answer> .25 </answer> "]
    assert [own.read_score(t) for t in texts] == pytest.approx([parse_score(t) for t in texts], nan_ok=True)
    reference = ModelEntry("authors/aes-r1", prompt="Rate it from 1 to 5.", scale=(1, 5))
    assert reference.read_score("<think>fine</think><answer>4</answer>") == pytest.approx(0.75)
    assert math.isnan(reference.read_score("<think>fine</think><answer>7</answer>"))  # off its scale: not a guess
    assert not reference.own_format and own.own_format
    insight = ModelEntry("q-insight", scale=(1, 5), parse=r'"score":\s*([0-9.]+)')
    assert insight.read_score('<answer>{"score": 2.0}</answer>') == pytest.approx(0.25)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Score this photo's aesthetics from 1 to 5.\n")
    assert ModelEntry("m", prompt=str(prompt)).prompt_text() == "Score this photo's aesthetics from 1 to 5."

    (tmp_path / "params.yaml").write_text(
        "evaluate:\n  models:\n    rapo: data/models/rapo\n"
        "    reference: {path: authors/aes-r1, prompt: prompt.txt, scale: [1, 5]}\n")
    models = load_section(tmp_path / "params.yaml", "evaluate", EvaluateConfig).models
    assert models["rapo"] == "data/models/rapo" and models["reference"].scale == (1, 5)
    for bad, message in (("{path: m, scale: [5, 1]}", "from low to high"), ("{path: m, parse: '[0-9'}", "regular"),
                         ("{path: m, parse: 'score'}", "group around the score"), ("{path: m, scales: [1, 5]}", "")):
        (tmp_path / "params.yaml").write_text(f"evaluate:\n  models:\n    m: {bad}\n")
        with pytest.raises(ParamsError, match=message):
            load_section(tmp_path / "params.yaml", "evaluate", EvaluateConfig)


def test_a_plain_path_and_a_mapping_with_the_policy_prompt_give_identical_figures(tmp_path, monkeypatch):
    """The same model as a plain path and as a mapping with this project's prompt and a [0, 1] scale: identical
    completions and figures under greedy decoding; an external entry is asked with its own prompt, and the report
    and the stage's run name each model's prompt and scale."""
    import yaml
    from mlflow import MlflowClient
    from test_score import SMALL

    from aesr1.backbone.backbone import BackboneConfig, with_pixel_budget
    from aesr1.backbone.tiny import build_tiny
    from aesr1.evaluation.evaluate import EvaluateConfig, evaluate
    from aesr1.policy.data import policy_prompt
    from aesr1.stage import run_stage

    monkeypatch.chdir(tmp_path)
    model, processor = build_tiny(SMALL)
    with_pixel_budget(processor, BackboneConfig(tiny=SMALL))
    model.save_pretrained("policy")
    processor.save_pretrained("policy")
    paths = [write_jpeg(tmp_path / "images" / f"{i}.jpg", 30 * i, size=24 + 8 * i) for i in range(6)]
    pd.DataFrame({"image_id": [f"ava/{i}" for i in range(6)], "dataset": "ava", "image_path": list(map(str, paths)),
                  "score": np.linspace(0.1, 0.9, 6)}).to_parquet("test.parquet")
    (tmp_path / "reference_prompt.txt").write_text("Rate this image's aesthetics from 1 to 5.\n")
    evaluate_params = {
        "models": {"plain": "policy", "mapped": {"path": "policy", "prompt": policy_prompt(), "scale": [0, 1]},
                   "reference": {"path": "policy", "prompt": "reference_prompt.txt", "scale": [1, 5]}},
        "test_manifest": "test.parquet", "latent_scores": None, "rl_history": None, "out_dir": "evaluation",
        "test_sets": ["ava"], "in_domain": ["ava"], "bootstrap": 20, "gallery_size": 0, "compare": [],
        "register": {"model": None},
        "decoding": {"greedy": True, "max_new_tokens": 12, "batch_size": 6}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"launcher": "python", "recipe": "custom",
                                                          "evaluate": evaluate_params}))
    metrics = run_stage("evaluate", "params.yaml", EvaluateConfig, evaluate, metrics_dir=tmp_path / "metrics")
    predictions = pd.read_parquet("evaluation/predictions.parquet").set_index(["model", "image_id"])
    plain, mapped = predictions.loc["plain"], predictions.loc["mapped"]
    assert plain.completion.tolist() == mapped.completion.tolist()
    assert plain.predicted.equals(mapped.predicted)
    assert json.dumps(metrics["plain"], sort_keys=True) == json.dumps(metrics["mapped"], sort_keys=True)
    # asked with its own prompt: the untrained model's token distributions differ from the policy prompt's
    assert metrics["reference"]["entropy"] != metrics["plain"]["entropy"]
    assert "expected" not in metrics["reference"]["readouts"]  # the digit readout is this project's format's

    report = (tmp_path / "evaluation/report.md").read_text()
    assert "| reference | `policy` | Rate this image's aesthetics from 1 to 5. (sha256 " in report
    assert "| 1 to 5 |" in report and "| plain | `policy` | the policy prompt | 0 to 1 |" in report
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("aesr1").experiment_id],
                                "attributes.run_name = 'evaluate'")
    assert run.data.params["scale.reference"] == "[1.0, 5.0]" and run.data.params["prompt.plain"] == \
        "the policy prompt"
    assert run.data.params["prompt.reference"].startswith("Rate this image's aesthetics")
