"""The evaluate stage: every model on every test set, the paper's main table and more.

For each model (backbone, SFT, RAPO by default) the policy critiques and scores every
test image with the shared prompt. Per test set: PLCC/SRCC on all images, where an
unparseable output gets the fixed ``unparseable_score`` (the middle of the scale: the
model abstains; never a random score), and on the parsed images alone; the unparseable
rate; the noise ceiling where the data carries a latent score (AesSynth). Per model:
the critique quality the paper leaves unmeasured (the AesCoT filters run on the model's
own critiques) and the mean token entropy of what it sampled.

Each model is read out three ways: ``sampled``, the first sample's written score (the
reference's readout, the paper-comparable row); ``expected``, the expected score under
the policy's own digit distribution after its critiques (no answer-sampling noise, no
extra cost); and ``mean``, the mean of the ``samples_per_image`` written scores. Every
PLCC/SRCC carries a bootstrap standard error over the test images, and ``compare`` pairs
of models get the difference of their average with its paired standard error.

The RAPO model is then registered in the MLflow model registry as a pyfunc model
(:class:`aesr1.inference.PolicyScorer`) that ``mlflow models serve`` can serve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import math
import re
from dataclasses import field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import aesr1
from aesr1 import distributed
from aesr1.aescot.claims import DIMENSION_WORDS, dimensions_addressed
from aesr1.aescot.critique_filters import FilterConfig, align_errors, fact_errors, leak_errors, polarity
from aesr1.aescot.measure import measure_file
from aesr1.config import config, shared
from aesr1.errors import AesError
from aesr1.evaluation.gallery import write_gallery
from aesr1.evaluation.plots import histogram_plot, history_curves, scatter_plot
from aesr1.evaluation.report import write_report
from aesr1.inference import DecodingConfig, PolicyScorer, critique_of, generate, image_scores, signature
from aesr1.metrics import bootstrap_correlations, correlations, resample_indices
from aesr1.policy.generation import load_policy
from aesr1.stage import Recorder
from aesr1.summary import model_metrics
from aesr1.tracking import check_can_register, refusals_explained
from aesr1.trajectory import band_of, parse_score, split_trajectory

log = logging.getLogger(__name__)

# The paper's average PLCC / SRCC over its five test sets (docs/method.md), for the report.
PAPER = {"backbone": ("Qwen2.5-VL-7B backbone", 0.4285, 0.4589), "sft": ("Q-Align (SFT)", 0.5120, 0.5255),
         "rapo": ("Aes-R1", 0.6337, 0.6186)}


@config
class RegisterConfig:
    """Which evaluated model goes to the MLflow registry, and under what name (model null: none)."""

    model: str | None = "rapo"
    name: str = "aesr1-policy"


@config
class ModelEntry:
    """An evaluated model given as a mapping: any checkpoint (the authors' weights, another method's, a zero-shot
    backbone) through this same harness. A plain path in ``evaluate.models`` is this project's own model:
    ``ModelEntry(path)``, the policy prompt, scores on [0, 1] in its ``<think>/<answer>`` format."""

    path: str  # a model folder or a hub id
    prompt: str | None = None  # the text it was trained with, or a file holding it; null: the policy prompt
    scale: tuple[float, float] = (0.0, 1.0)  # the range its answers' scores are on (the reference's prompt: 1 to 5)
    # a regular expression whose first group is the score, searched in the whole answer; null: the number inside
    # this project's <think>...</think><answer>...</answer> format
    parse: str | None = None

    def __post_init__(self):
        low, high = self.scale
        if not high > low:
            raise ValueError(f"scale {list(self.scale)} must run from low to high")
        if self.parse is not None:
            try:
                groups = re.compile(self.parse).groups
            except re.error as error:
                raise ValueError(f"parse {self.parse!r} is not a regular expression: {error}") from None
            if groups < 1:
                raise ValueError(f"parse {self.parse!r} needs a group around the score, e.g. <answer>([0-9.]+)")

    @property
    def own_format(self) -> bool:
        """Whether answers are read as this project's policy writes them (the expected-score readout applies)."""
        return self.parse is None and tuple(self.scale) == (0.0, 1.0)

    def prompt_text(self) -> str | None:
        """The prompt: the file's text where ``prompt`` names a file, else ``prompt`` itself (None: the policy's)."""
        if self.prompt is not None and len(self.prompt) < 4096 and Path(self.prompt).is_file():
            return Path(self.prompt).read_text().strip()
        return self.prompt

    def read_score(self, text: str) -> float:
        """The answer's score mapped from ``scale`` to [0, 1]; NaN when it cannot be read or lies outside ``scale``
        (never a guess)."""
        if self.own_format:
            return parse_score(text)
        if self.parse is None:
            parts = split_trajectory(text)
            found = parts[1] if parts else None
        else:
            match = re.search(self.parse, text, re.DOTALL)
            found = match.group(1) if match else None
        try:
            value = float(found.strip()) if found is not None else math.nan
        except ValueError:
            return math.nan
        low, high = self.scale
        return (value - low) / (high - low) if low <= value <= high else math.nan


def model_entry(value: str | ModelEntry) -> ModelEntry:
    return value if isinstance(value, ModelEntry) else ModelEntry(path=value)


def prompt_label(entry: ModelEntry) -> str:
    """How the report and the MLflow run name a model's prompt: the policy prompt, or its first words and hash."""
    text = entry.prompt_text()
    if text is None:
        return "the policy prompt"
    words = " ".join(text.split())
    short = words if len(words) <= 60 else words[:57] + "..."
    return f"{short} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


@config
class EvaluateConfig:
    """Params section ``evaluate``."""

    # name -> a model folder or hub id (this project's format), or a ModelEntry mapping (any checkpoint)
    models: dict[str, str | ModelEntry] = field(default_factory=lambda: {
        "backbone": "data/models/backbone", "sft": "data/models/sft", "rapo": "data/models/rapo"})
    only: list[str] | None = None  # evaluate just these of ``models`` (ablations: [rapo]); null: all
    test_manifest: str = "data/ingest/test.parquet"
    latent_scores: str | None = "data/aessynth/aessynth_latent.csv"  # AesSynth's sidecar; null for real data
    rl_history: str | None = "data/models/rapo/training_history.csv"
    out_dir: str = "data/evaluate"
    test_sets: list[str] | None = None  # null: every dataset of the test manifest, in its order
    in_domain: list[str] = field(default_factory=list)  # the test sets whose dataset is also trained on
    max_per_test_set: int | None = None
    unparseable_score: float = 0.5
    bootstrap: int = 1000  # resamples of the test images for each standard error
    align: FilterConfig = shared("filter.align", default_factory=FilterConfig)  # the critique check's thresholds
    gallery_size: int = 200  # test images in gallery.html (thumbnail, true score, each model's critique); 0: none
    # (model, baseline) pairs whose average PLCC/SRCC difference is reported with its paired standard error
    compare: list[tuple[str, str]] = field(default_factory=lambda: [("sft", "backbone"), ("rapo", "sft")])
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)


# ---------------------------------------------------------------- metrics

def score_metrics(truth: np.ndarray, predicted: np.ndarray, unparseable_score: float,
                  resamples: np.ndarray | None = None) -> dict:
    """PLCC/SRCC with the unparseable rule, and on the parsed outputs alone.

    Under the rule a model whose every output is the same number (e.g. a backbone that
    never writes a parseable score, so all get ``unparseable_score``) carries no ranking
    information: its correlations count as 0, not undefined, so models stay comparable.
    With ``resamples`` (bootstrap indices over the images) the result also holds each
    correlation's standard error and, under ``replicates``, the per-resample values.
    """
    parsed = np.isfinite(predicted)
    ruled = np.where(parsed, predicted, unparseable_score)
    overall = correlations(ruled, truth)
    if len(truth) >= 3 and np.ptp(ruled) == 0:
        overall = {"plcc": 0.0, "srcc": 0.0}
    on_parsed = correlations(predicted, truth)  # correlations() keeps the finite pairs
    result = {"n": len(truth), "plcc": overall["plcc"], "srcc": overall["srcc"],
              "unparseable_rate": float(1 - parsed.mean()) if len(truth) else math.nan,
              "n_parsed": int(parsed.sum()), "plcc_parsed": on_parsed["plcc"], "srcc_parsed": on_parsed["srcc"],
              "mean_predicted": float(np.nanmean(predicted)) if parsed.any() else math.nan,
              "std_predicted": float(np.nanstd(predicted)) if parsed.any() else math.nan,
              "mean_true": float(np.mean(truth)), "std_true": float(np.std(truth))}
    if resamples is not None and len(truth) >= 3:
        plcc, srcc = bootstrap_correlations(ruled, truth, resamples)
        result.update(plcc_se=float(plcc.std()), srcc_se=float(srcc.std()), replicates={"plcc": plcc, "srcc": srcc})
    return result


def noise_ceilings(test: pd.DataFrame, latent_path: str | None) -> dict[str, dict]:
    """Per test set, how well the raters' MOS itself tracks the noiseless latent score."""
    if not latent_path or not Path(latent_path).is_file():
        return {}
    latent = pd.read_csv(latent_path, dtype={"name": str})
    merged = test.merge(latent, left_on=["dataset", "native_id"], right_on=["dataset", "name"])
    ceilings = {}
    for dataset, rows in merged.groupby("dataset"):
        c = correlations(rows.score.to_numpy(), rows.latent_score.to_numpy())
        ceilings[dataset] = {"plcc": c["plcc"], "srcc": c["srcc"], "n": c["n"]}
    return ceilings


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_fingerprint(test: pd.DataFrame, digests: dict[str, str]) -> str:
    """The test split as evaluated, in 16 hex digits: a hash of each row's image id, its file's content hash
    and its score, in image-id order. Two runs' figures compare only when theirs match: the same ids with
    re-encoded files, or rescored ones, give another fingerprint."""
    digest = hashlib.sha256()
    for row in test.sort_values("image_id").itertuples():
        digest.update(f"{row.image_id}\0{digests[row.image_path]}\0{row.score!r}\n".encode())
    return digest.hexdigest()[:16]


def critique_quality(completions: pd.DataFrame, measures: dict[str, object], align: FilterConfig) -> dict:
    """The AesCoT filters and more, applied to a model's own critiques.

    ``completions`` has image_path, completion, predicted (that sample's own score); ``align`` the align
    filter's thresholds (the filter stage's own).
    """
    rows = []
    for path, text, score in completions[["image_path", "completion", "predicted"]].itertuples(index=False):
        critique = critique_of(text)
        if critique is None:
            continue
        row = {"words": len(critique.split()), "dimensions": len(dimensions_addressed(critique)),
               "leak": bool(leak_errors(critique)), "fact": bool(fact_errors(critique, measures[path])),
               "polarity": polarity(critique).score, "score": score}
        row["align_error"] = (bool(align_errors(critique, band_of(score), align))
                              if math.isfinite(score) else None)
        rows.append(row)
    if not rows:
        return {"critiques": 0}
    frame = pd.DataFrame(rows)
    scored = frame[frame.score.notna()]
    tone = stats.spearmanr(scored.polarity, scored.score).statistic if len(scored) > 2 else math.nan
    return {"critiques": len(frame), "mean_words": float(frame.words.mean()),
            "dimension_coverage": float(frame.dimensions.mean() / len(DIMENSION_WORDS)),
            "all_dimensions_rate": float((frame.dimensions == len(DIMENSION_WORDS)).mean()),
            "leak_rate": float(frame.leak.mean()), "fact_error_rate": float(frame.fact.mean()),
            "align_error_rate": float(scored["align_error"].astype(bool).mean()) if len(scored) else math.nan,
            "tone_score_srcc": float(tone) if np.isfinite(tone) else math.nan}


def summarise(metrics: dict, test_sets: list[str], in_domain: list[str], ceilings: dict,
              replicates: dict | None = None) -> dict:
    """Averages over the five test sets (the paper's figure), in and out of domain, and vs the ceiling.

    ``replicates`` (test set -> {"plcc": (B,), "srcc": (B,)}) adds the standard error of the
    five-set average and keeps its per-resample values under ``replicates``.
    """
    present = [t for t in test_sets if t in metrics and metrics[t]["n"] > 1]
    out_domain = [t for t in present if t not in in_domain]
    inside = [t for t in present if t in in_domain]

    def mean(key, sets):
        values = [metrics[t][key] for t in sets if np.isfinite(metrics[t][key])]
        return float(np.mean(values)) if values else math.nan

    average = {"plcc": mean("plcc", present), "srcc": mean("srcc", present),
               "in_domain_plcc": mean("plcc", inside), "in_domain_srcc": mean("srcc", inside),
               "out_of_domain_plcc": mean("plcc", out_domain), "out_of_domain_srcc": mean("srcc", out_domain),
               "unparseable_rate": mean("unparseable_rate", present)}
    for name, sets in (("in_domain", inside), ("out_of_domain", out_domain)):
        ratios = [metrics[t]["plcc"] / ceilings[t]["plcc"] for t in sets if t in ceilings]
        if ratios:
            average[f"{name}_ceiling_ratio"] = float(np.mean(ratios))
    if replicates and all(t in replicates for t in present):
        reps = {key: np.mean([replicates[t][key] for t in present], axis=0) for key in ("plcc", "srcc")}
        average.update(plcc_se=float(reps["plcc"].std()), srcc_se=float(reps["srcc"].std()), replicates=reps)
    return average


def readout_scores(texts: list[str], expected: np.ndarray, samples_per_image: int,
                   entry: ModelEntry | None = None) -> dict[str, np.ndarray]:
    """Per image: the first sample's written score (the reference's readout), the expected score
    over its samples (this project's format only: it reads the policy's digits after ``<answer>``), and
    (with several samples) the mean of their written scores; each read by ``entry`` (None: this project's)."""
    k = samples_per_image
    read = entry.read_score if entry else parse_score
    scores = {"sampled": image_scores(texts[::k], 1, reader=read)}
    if entry is None or entry.own_format:
        scores["expected"] = image_scores(texts, k, expected)
    if k > 1:
        scores["mean"] = image_scores(texts, k, reader=read)
    return scores


def readout_metrics(test: pd.DataFrame, scores: dict[str, np.ndarray], cfg: EvaluateConfig) -> dict:
    """Per readout: per test set metrics (with standard errors) and their average.

    The sampled readout's figures sit at the top level (``plcc``, ``srcc``, ...), the
    others under their readout's name; ``replicates`` keep the bootstrap values.
    """
    results = {}
    for readout, predicted in scores.items():
        per_set = {}
        for t in cfg.test_sets:
            rows = np.flatnonzero(test.dataset.to_numpy() == t)
            if len(rows):
                resamples = resample_indices(len(rows), cfg.bootstrap, t) if cfg.bootstrap else None
                per_set[t] = score_metrics(test.score.to_numpy()[rows], predicted[rows], cfg.unparseable_score,
                                           resamples)
        results[readout] = per_set
    return results


def strip_replicates(tree):
    """The metrics without their bootstrap values (they stay in memory for the comparisons)."""
    if isinstance(tree, dict):
        return {k: strip_replicates(v) for k, v in tree.items() if k != "replicates"}
    return tree


def comparisons(metrics: dict, pairs: list[tuple[str, str]]) -> dict:
    """model -> baseline -> the difference of their average PLCC/SRCC per readout, with its paired
    bootstrap standard error (both models resampled on the same images)."""
    result = {}
    for model, baseline in pairs:
        if model not in metrics or baseline not in metrics:
            continue
        entry = {}
        for readout in metrics[model]["readouts"]:
            a = metrics[model]["readouts"][readout]["average"]
            b = metrics[baseline]["readouts"].get(readout, metrics[baseline]["readouts"]["sampled"])["average"]
            for key in ("plcc", "srcc"):
                diff = a[key] - b[key]
                entry[f"{readout}_{key}_diff"] = diff
                if "replicates" in a and "replicates" in b:
                    se = float((a["replicates"][key] - b["replicates"][key]).std())
                    entry[f"{readout}_{key}_diff_se"] = se
                    entry[f"{readout}_{key}_diff_over_2se"] = bool(diff > 2 * se)
        result.setdefault(model, {})[baseline] = entry
    return result


# ---------------------------------------------------------------- the stage

def evaluate_model(name: str, entry: ModelEntry, test: pd.DataFrame, cfg: EvaluateConfig,
                   measures: dict[str, object], ceilings: dict) -> tuple[dict, pd.DataFrame] | None:
    """One model's figures and predictions; on several processes each samples its share of the
    images, and the main process (the only one that gets a result) reads them all out."""
    log.info("evaluating %s (%s; prompt: %s; scale %s) on %d images x %d samples", name, entry.path,
             prompt_label(entry), list(entry.scale), len(test), cfg.decoding.samples_per_image)
    model, processor = load_policy(entry.path)
    sampled = generate(model, processor, list(test.image_path), cfg.decoding, prompt_text=entry.prompt_text())
    if not distributed.is_main():
        return None
    k = cfg.decoding.samples_per_image
    scores = readout_scores(sampled.texts, sampled.expected, k, entry)
    predictions = test[["image_id", "dataset", "image_path", "score"]].assign(
        model=name, predicted=scores["sampled"], completion=sampled.texts[::k],
        **{f"predicted_{readout}": values for readout, values in scores.items() if readout != "sampled"})
    completions = pd.DataFrame({"image_path": np.repeat(test.image_path.to_numpy(), k),
                                "completion": sampled.texts,
                                "predicted": image_scores(sampled.texts, 1, reader=entry.read_score)})
    readouts = readout_metrics(test, scores, cfg)
    for per_set in readouts.values():
        for t, ceiling in ceilings.items():
            if t in per_set:
                per_set[t]["noise_ceiling_plcc"] = ceiling["plcc"]
                per_set[t]["noise_ceiling_srcc"] = ceiling["srcc"]
        per_set["average"] = summarise(per_set, cfg.test_sets, cfg.in_domain, ceilings,
                                       {t: m["replicates"] for t, m in per_set.items() if "replicates" in m})
    result = dict(readouts["sampled"])  # the reference's readout: the paper-comparable figures
    result["readouts"] = {readout: {"average": per_set["average"]} | {t: {key: per_set[t][key] for key in
                                    ("plcc", "srcc", "plcc_se", "srcc_se") if key in per_set[t]}
                                    for t in cfg.test_sets if t in per_set}
                          for readout, per_set in readouts.items()}
    result["critique"] = critique_quality(completions, measures, cfg.align)
    result["entropy"] = sampled.entropy
    return result, predictions


def evaluate(cfg: EvaluateConfig, recorder: Recorder) -> dict:
    out = Path(cfg.out_dir)
    test = pd.read_parquet(cfg.test_manifest)
    cfg = dataclasses.replace(cfg, test_sets=cfg.test_sets or list(dict.fromkeys(test.dataset)))
    missing = sorted(set(cfg.test_sets) - set(test.dataset))
    if missing:
        raise AesError(f"test sets {missing} are not in {cfg.test_manifest} (it has {sorted(set(test.dataset))})")
    test = test[test.dataset.isin(cfg.test_sets)].sort_values("image_id")
    if cfg.max_per_test_set:
        shuffled = test.sample(frac=1.0, random_state=cfg.decoding.seed)
        test = shuffled[shuffled.groupby("dataset").cumcount() < cfg.max_per_test_set].sort_values("image_id")
    recorder.dataset(cfg.test_manifest, test, "evaluation")
    main = distributed.is_main()
    if main and cfg.register.model:
        check_can_register(cfg.register.name)  # a refusal now, not after the evaluation
    # every process measures its share of the images (the fact check's statistics): on the main process alone,
    # tens of thousands of real images would keep the others waiting inside a collective past its timeout
    mine = distributed.shard(list(test.image_path.unique()))
    read = distributed.gather([(path, measure_file(path), file_digest(path)) for path in mine])
    measures = {path: measure for path, measure, _ in read}
    test_split = split_fingerprint(test, {path: digest for path, _, digest in read})
    recorder.pipeline_param("test_split", test_split)
    ceilings = noise_ceilings(test, cfg.latent_scores)

    unknown = sorted(set(cfg.only or []) - set(cfg.models))
    if unknown:
        raise AesError(f"evaluate.only names {unknown}, which evaluate.models does not define")
    chosen = {name: model_entry(value) for name, value in cfg.models.items() if cfg.only is None or name in cfg.only}
    if cfg.register.model and cfg.register.model not in chosen:
        raise AesError(f"evaluate.register.model '{cfg.register.model}' is not among the evaluated models")
    if cfg.register.model and not chosen[cfg.register.model].own_format:
        raise AesError(f"evaluate.register.model '{cfg.register.model}' has its own prompt, scale or parse: the "
                       f"registered model scores with this project's prompt and format")
    for name, entry in chosen.items():  # what each model was asked, and on what scale: in the stage's run
        recorder.param(f"prompt.{name}", prompt_label(entry))
        recorder.param(f"scale.{name}", list(entry.scale))
    metrics: dict = {}
    frames = []
    for name, entry in chosen.items():
        evaluated = evaluate_model(name, entry, test, cfg, measures, ceilings)
        if not main:
            continue
        result, predictions = evaluated
        metrics[name] = result
        frames.append(predictions)
        log.info("%s: average PLCC %.3f SRCC %.3f", name, result["average"]["plcc"], result["average"]["srcc"])
    if not main:
        return {}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    predictions = pd.concat(frames, ignore_index=True)
    predictions.to_parquet(out / "predictions.parquet", index=False)
    compared = comparisons(metrics, cfg.compare)
    metrics = strip_replicates(metrics)
    for name, against in compared.items():
        metrics[name]["compared_to"] = against

    for name in chosen:
        rows = predictions[predictions.model == name]
        scatter_plot(rows, metrics[name], cfg.test_sets, out / "plots" / f"scatter_{name}.png", name)
        histogram_plot(rows, cfg.test_sets, out / "plots" / f"histogram_{name}.png", name)
    if cfg.rl_history and Path(cfg.rl_history).is_file():
        history_curves(pd.read_csv(cfg.rl_history)).to_csv(out / "rl_curves.csv", index=False)
        recorder.artifact(out / "rl_curves.csv", "plots")
    write_report(out / "report.md", metrics, ceilings, cfg.test_sets, PAPER, test_split,
                 {name: (entry.path, prompt_label(entry), list(entry.scale), entry.parse or "this project's format")
                  for name, entry in chosen.items()})
    recorder.artifact(out / "plots", "plots")
    recorder.artifact(out / "report.md")
    recorder.artifact(out / "predictions.parquet")
    recorder.table("predictions_sample.json", predictions.groupby("model").head(30).drop(columns=["image_path"]))
    if cfg.gallery_size:
        sort_model = cfg.register.model or list(chosen)[-1]
        recorder.artifact(write_gallery(predictions, out / "gallery.html", sort_model, cfg.gallery_size,
                                        cfg.decoding.seed))
    recorder.pipeline_metrics(model_metrics(metrics))
    recorder.pipeline_metrics({"test_split": test_split})

    if cfg.register.model:
        version = register(cfg, metrics[cfg.register.model]["average"])
        recorder.param("registered_model", f"models:/{cfg.register.name}/{version}")
    return metrics


def register(cfg: EvaluateConfig, average: dict) -> str:
    """Log the chosen model as a pyfunc into the stage's run and register it; returns the version."""
    import mlflow

    source = Path(model_entry(cfg.models[cfg.register.model]).path)
    if not (source / "config.json").is_file():
        raise AesError(f"only a saved model folder can be registered; {source} has no config.json")
    requirements = [f"{dist}=={importlib.metadata.version(dist)}" for dist in
                    ("torch", "transformers", "mlflow", "pandas", "numpy", "pillow", "scipy", "datasets",
                     "pydantic", "httpx", "pyyaml")]
    decoding = dataclasses.asdict(cfg.decoding)
    with refusals_explained(mlflow.get_tracking_uri(), f"registered model '{cfg.register.name}'", "EDIT"):
        info = mlflow.pyfunc.log_model(
            name="policy", python_model=PolicyScorer(decoding), artifacts={"policy": str(source)},
            code_paths=[str(Path(aesr1.__file__).parent)], pip_requirements=requirements,
            signature=signature(cfg.decoding), registered_model_name=cfg.register.name)
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for key in ("plcc", "srcc", "in_domain_plcc", "out_of_domain_plcc"):
            if np.isfinite(average.get(key, math.nan)):
                client.set_model_version_tag(cfg.register.name, version, f"average_{key}", f"{average[key]:.4f}")
        client.set_model_version_tag(cfg.register.name, version, "policy", cfg.register.model)
    log.info("registered %s as models:/%s/%s", source, cfg.register.name, version)
    return version
