"""Plain regressors on the pipeline's own training images: the bar the policy must clear, and why it does not.

A regressor learns the score from ``data/ingest/train.parquet`` (the images the SFT and RL
stages train on; a tenth held out to pick the epoch), then scores every test set of
``data/ingest/test.parquet``. It prints PLCC / SRCC per test set and the in-domain and
out-of-domain averages, to set beside ``metrics/evaluate.json``. ``--inputs`` says what it reads:

- ``pixels`` (default): a small CNN on the pixels: the bar a critique-then-score policy should clear;
- ``tower``: the policy's own frozen vision tower (``--model``, the backbone the SFT and RL stages
  start from and keep frozen): its merged visual tokens, as the language model receives them;
- ``stats``: the image statistics the analytic teacher measures (``aesr1/aescot/measure.py``).

``--head`` reads the tower's tokens or the statistics linearly (``linear``) or through the CNN's
own head (``mlp``: one hidden layer of 64), so the tower's figure bounds what any policy with that
frozen tower can read from the image, by the same training as the CNN.

    python benchmarks/pixel_regressor.py [--inputs pixels|tower|stats] [--head mlp|linear] [--epochs 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from aesr1.aescot.measure import measure_files
from aesr1.config import load_section
from aesr1.evaluation.evaluate import EvaluateConfig
from aesr1.images import load_image
from aesr1.metrics import correlations


def pixels(paths, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [0, 1]: the images as the policy's processor would see them, resized."""
    arrays = [np.asarray(load_image(p).resize((size, size)), np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def tower_tokens(model_dir: str, paths, batch: int = 256) -> torch.Tensor:
    """(N, tokens x width): each image's merged visual tokens from the model's vision tower, flattened."""
    from aesr1.policy.generation import load_policy

    model, processor = load_policy(model_dir)
    model.eval()
    features = []
    for start in range(0, len(paths), batch):
        images = [load_image(p) for p in paths[start:start + batch]]
        inputs = processor.image_processor(images=images, return_tensors="pt")
        tokens = model.get_image_features(inputs["pixel_values"].to(model.device),
                                          inputs["image_grid_thw"].to(model.device)).pooler_output
        if len({t.shape for t in tokens}) > 1:
            raise ValueError("the images give different numbers of visual tokens; the tower probe needs one size")
        features.append(torch.stack(tokens).flatten(1).float().cpu())
    return torch.cat(features)


def image_stats(paths) -> torch.Tensor:
    """(N, statistics): the teacher's measured statistics, the light's direction one-hot."""
    rows = []
    for stats in measure_files(list(paths), workers=2):
        values = dataclasses.asdict(stats)
        side = values.pop("light_from")
        rows.append([float(v) for v in values.values()] + [side == s for s in ("left", "right", "top", "bottom")])
    return torch.tensor(rows, dtype=torch.float32)


def head(width: int, mean_score: float, kind: str) -> nn.Module:
    """The output starts at the mean score (from 0, the first steps' large errors drove every unit of the
    CNN head's ReLU dead and the prediction went constant)."""
    out = nn.Linear(width if kind == "linear" else 64, 1)
    nn.init.zeros_(out.weight)
    nn.init.constant_(out.bias, mean_score)
    return out if kind == "linear" else nn.Sequential(nn.Dropout(0.3), nn.Linear(width, 64), nn.GELU(), out)


def cnn(mean_score: float) -> nn.Module:
    """Three conv blocks and the MLP head."""
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         head(64 * 16, mean_score, "mlp"))


class Standardize(nn.Module):
    """Features to zero mean and unit variance over the training images (the tower's and statistics' scales
    differ by orders of magnitude)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp_min(1e-6))

    def forward(self, x):
        return (x - self.mean) / self.std


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + 256]).squeeze(1) for i in range(0, len(x), 256)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="data/ingest/train.parquet")
    parser.add_argument("--test", default="data/ingest/test.parquet")
    parser.add_argument("--inputs", choices=("pixels", "tower", "stats"), default="pixels")
    parser.add_argument("--head", choices=("mlp", "linear"), default="mlp", help="for tower and stats")
    parser.add_argument("--model", default="data/models/backbone", help="whose vision tower (--inputs tower)")
    parser.add_argument("--size", type=int, default=64, help="the CNN's input side (--inputs pixels)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml", help="its evaluate.in_domain splits the averages")
    args = parser.parse_args()
    in_domain = load_section(args.params, "evaluate", EvaluateConfig).in_domain
    torch.manual_seed(args.seed)
    train, test = pd.read_parquet(args.train), pd.read_parquet(args.test)
    start = time.perf_counter()
    read = {"pixels": lambda paths: pixels(paths, args.size), "tower": lambda paths: tower_tokens(args.model, paths),
            "stats": image_stats}[args.inputs]
    # one read of every image (the tower is loaded once): training rows first, then the test rows
    features = read(list(train.image_path) + list(test.image_path))
    x, test_x = features[: len(train)], features[len(train):]
    y = torch.tensor(train.score.to_numpy(), dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    held, fit = order[: len(x) // 10], order[len(x) // 10:]
    if args.inputs == "pixels":
        model, what = cnn(float(y[fit].mean())), "small CNN on the pixels"
    else:
        model = nn.Sequential(Standardize(x[fit]), head(x.shape[1], float(y[fit].mean()), args.head))
        source = f"the frozen tower of {args.model}" if args.inputs == "tower" else "the teacher's statistics"
        what = f"{args.head} head on {source} ({x.shape[1]} features)"
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    best, best_state = -np.inf, None
    for epoch in range(args.epochs):
        model.train()
        for batch in fit[torch.randperm(len(fit))].split(64):
            loss = nn.functional.mse_loss(model(x[batch]).squeeze(1), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        val = correlations(predict(model, x[held]), y[held].numpy())["plcc"]
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, held-out PLCC {val:.3f}", flush=True)
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    rows = []
    predicted = predict(model, test_x)
    for dataset, rows_of_set in test.groupby("dataset").indices.items():
        c = correlations(predicted[rows_of_set], test.score.to_numpy()[rows_of_set])
        rows.append({"test_set": dataset, "n": c["n"], "plcc": c["plcc"], "srcc": c["srcc"]})
    table = pd.DataFrame(rows).set_index("test_set")
    print(f"\nregressor ({what}, {len(fit)} training images, {args.epochs} epochs, best held-out PLCC "
          f"{best:.3f}, {time.perf_counter() - start:.0f} s)")
    print(table.round(3).to_string())
    inside = table.index.isin(in_domain)
    for name, mask in (("in-domain", inside), ("out-of-domain", ~inside), ("all five", inside | ~inside)):
        if mask.any():
            print(f"{name} average: PLCC {table.plcc[mask].mean():.3f}, SRCC {table.srcc[mask].mean():.3f}")


if __name__ == "__main__":
    main()
