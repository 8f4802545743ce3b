"""Scoring images with a trained policy: the ``aesr1 score`` command and the MLflow model.

One function, :func:`score_images`, turns images into critiques and scores; the
``aesr1 score`` command and :class:`PolicyScorer` (the pyfunc model that the evaluate
stage registers and ``mlflow models serve`` serves) both call it, with the decoding
the evaluation used.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from PIL import Image

from aesr1.config import config
from aesr1.errors import AesError
from aesr1.images import load_image
from aesr1.trajectory import parse_score, split_trajectory

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@config
class DecodingConfig:
    """How completions are drawn (the reference's inference sampling by default, or greedy) and read."""

    greedy: bool = False
    temperature: float = 0.6
    top_p: float = 0.7
    top_k: int = 50
    samples_per_image: int = 1  # > 1: the image's score is the mean over its samples
    # how `aesr1 score` and the registered model read an image's score. mean: of the samples' written scores
    # (one sample: the reference's readout); expected: of each sample's expected score under the policy's digit
    # distribution after its critique (lower noise, same cost). The evaluate stage reports every readout.
    readout: Literal["mean", "expected"] = "mean"
    max_new_tokens: int = 512
    batch_size: int = 32
    seed: int = 0


def generate(model, processor, images: list, decoding: DecodingConfig, prompt_text: str | None = None):
    """Sampled completions (``samples_per_image`` per image, consecutive) and their token entropy; ``prompt_text``
    in place of the policy prompt (another checkpoint's own)."""
    import torch

    from aesr1.policy.generation import sample

    torch.manual_seed(decoding.seed)
    return sample(model, processor, images, n=decoding.samples_per_image, temperature=decoding.temperature,
                  top_p=decoding.top_p, top_k=decoding.top_k, max_new_tokens=decoding.max_new_tokens,
                  batch_size=decoding.batch_size, do_sample=not decoding.greedy, prompt_text=prompt_text)


def image_scores(texts: list[str], samples_per_image: int, expected: np.ndarray | None = None,
                 reader: Callable[[str], float] = parse_score) -> np.ndarray:
    """Per image, the mean of its parseable samples' scores (``reader``: text -> score on [0, 1] or NaN); NaN when
    none parses.

    With ``expected`` (one per text, :func:`aesr1.policy.generation.expected_answer`), each
    parseable sample counts with its expected score where it has one, else its written score.
    """
    parsed = np.array([reader(t) for t in texts], dtype=float)
    if expected is not None:
        parsed = np.where(np.isfinite(parsed) & np.isfinite(expected), expected, parsed)
    parsed = parsed.reshape(-1, samples_per_image)
    finite = np.isfinite(parsed)
    sums = np.where(finite, parsed, 0.0).sum(axis=1)
    counts = finite.sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(parsed), math.nan), where=counts > 0)


def critique_of(text: str) -> str | None:
    parts = split_trajectory(text)
    return parts[0] if parts else None


def score_images(model, processor, images: list, decoding: DecodingConfig) -> list[dict]:
    """Critique and score per image (score None when no sample parsed); the first sample's text."""
    sampled = generate(model, processor, images, decoding)
    texts = sampled.texts
    scores = image_scores(texts, decoding.samples_per_image,
                          sampled.expected if decoding.readout == "expected" else None)
    results = []
    for i, score in enumerate(scores):
        first = texts[i * decoding.samples_per_image]
        results.append({"critique": critique_of(first), "score": float(score) if math.isfinite(score) else None,
                        "completion": first})
    return results


def image_files(inputs: list[str]) -> list[Path]:
    """The image files named, with folders expanded (sorted); a missing path is an error."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise AesError(f"no such image or folder: {item}")
    return files


def read_image_file(path: str | Path) -> Image.Image:
    """The image in a file (:func:`aesr1.images.load_image`); any decoding failure is an :class:`AesError`
    naming the file (PIL raises OSError for a truncated or unknown file, but SyntaxError, EOFError,
    ValueError or DecompressionBombError for some broken ones, depending on the format)."""
    try:
        return load_image(path)
    except Exception as error:
        raise AesError(f"cannot read image {path}: {error}") from error


def check_image(image: Image.Image, processor, name: str | Path) -> None:
    """An :class:`AesError` naming ``name`` unless the policy's image processor reads ``image`` on its own.

    Qwen's processor refuses an image whose aspect ratio is over 200; in a batch, that would stop every
    other image's scoring too, so each image is checked alone first. Qwen's token count also grows past the
    budget for a very long image, which is logged; a fixed-size or tiled family's (Gemma 3, SmolVLM) does not.
    """
    if processor is None:
        return
    images = processor.image_processor
    try:
        grid = images(images=[image], return_tensors="pt").get("image_grid_thw")
    except Exception as error:
        raise AesError(f"cannot process image {name} ({image.width} x {image.height}): {error}") from error
    if grid is None:
        return
    tokens = int(grid.prod()) // images.merge_size ** 2
    budget = images.size["longest_edge"] // (images.patch_size * images.merge_size) ** 2
    if tokens > budget:  # Qwen's resize keeps each side at least one token wide: an aspect ratio over the budget
        log.warning("image %s (%d x %d, aspect %.0f:1) is read with %d visual tokens, over the %d of the pixel "
                    "budget (each side is at least one token wide)", name, image.width, image.height,
                    max(image.size) / min(image.size), tokens, budget)


def decode_image(value: str) -> Image.Image:
    """An image from a request field: a file path, or base64-encoded image bytes."""
    if Path(value).suffix.lower() in IMAGE_SUFFIXES and Path(value).is_file():
        return read_image_file(value)
    try:
        return load_image(io.BytesIO(base64.b64decode(value, validate=True)))
    except Exception as error:
        raise AesError("each 'image' must be an existing image file path or base64-encoded image bytes") from error


REQUEST_PARAMS = ("greedy", "temperature", "top_p", "top_k", "samples_per_image", "readout", "max_new_tokens")


def request_params(decoding: DecodingConfig) -> dict:
    """The decoding fields a request may set (the served model's signature declares them)."""
    return {name: getattr(decoding, name) for name in REQUEST_PARAMS}


def signature(decoding: DecodingConfig):
    """Input ``image`` (path or base64), output critique/score/completion, decoding as request params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {bool: "boolean", int: "long", float: "double", str: "string"}
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "critique", required=False), ColSpec("double", "score", required=False),
                        ColSpec("string", "completion")]),
        params=ParamSchema([ParamSpec(name, kinds[type(value)], value)
                            for name, value in request_params(decoding).items()]))


def _mlflow_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class PolicyScorer(_mlflow_base()):
    """An MLflow pyfunc model: a DataFrame with an ``image`` column in, critique and score out."""

    def __init__(self, decoding: dict):
        self.decoding = decoding

    def load_context(self, context):
        from aesr1.policy.generation import load_policy

        self.model, self.processor = load_policy(context.artifacts["policy"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise AesError("the input needs an 'image' column (file paths or base64-encoded images)")
        images = [decode_image(str(v)) for v in model_input["image"]]
        for i, image in enumerate(images):
            check_image(image, self.processor, f"#{i}")
        decoding = DecodingConfig(**{**self.decoding, **(params or {})})
        results = score_images(self.model, self.processor, images, decoding)
        return pd.DataFrame(results, columns=["critique", "score", "completion"])


class Scorer:
    """Scores image files with a policy (a callable ``paths, decoding -> results``); :meth:`check` says
    up front whether one file can be scored, so one bad file does not stop the others."""

    def __init__(self, score, processor=None):
        self.score = score
        self.processor = processor  # the policy's, to check each image with (None: reading it is the check)

    def check(self, path: str | Path) -> None:
        """An :class:`AesError` naming ``path`` unless it decodes and the policy's processor reads it."""
        check_image(read_image_file(path), self.processor, path)

    def __call__(self, paths: list[Path], decoding: DecodingConfig) -> list[dict]:
        return self.score(paths, decoding)


def load_scorer(model: str) -> Scorer:
    """A :class:`Scorer` for a model folder or an MLflow model URI (models:/, runs:/)."""
    if "://" in model or model.startswith(("models:/", "runs:/")):
        import mlflow.pyfunc

        from aesr1.tracking import project_root, refusals_explained, tracking_uri

        uri = tracking_uri(project_root())
        mlflow.set_tracking_uri(uri)
        with refusals_explained(uri, f"model {model}", "READ"):
            pyfunc = mlflow.pyfunc.load_model(model)

        def by_uri(paths: list[Path], decoding: DecodingConfig) -> list[dict]:
            frame = pyfunc.predict(pd.DataFrame({"image": [str(p.resolve()) for p in paths]}),
                                   params=request_params(decoding))
            return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                    for row in frame.to_dict("records")]
        try:  # a PolicyScorer loaded here has the policy's processor
            processor = getattr(pyfunc.unwrap_python_model(), "processor", None)
        except Exception:
            processor = None
        return Scorer(by_uri, processor)

    from aesr1.policy.generation import load_policy

    policy, processor = load_policy(model)

    def by_folder(paths: list[Path], decoding: DecodingConfig) -> list[dict]:
        return score_images(policy, processor, [str(p) for p in paths], decoding)
    return Scorer(by_folder, processor)
