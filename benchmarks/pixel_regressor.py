"""A plain pixel regressor on the pipeline's own training images: the bar the policy must clear.

A small CNN learns the score straight from the pixels of ``data/ingest/train.parquet``
(the images the SFT and RL stages train on; a tenth held out to pick the epoch), then
scores every test set of ``data/ingest/test.parquet``. It prints PLCC / SRCC per test set
and the in-domain and out-of-domain averages, to set beside ``metrics/evaluate.json``: a
critique-then-score policy should lose nothing against it.

    python benchmarks/pixel_regressor.py [--epochs 30] [--seed 0]   # after dvc repro ingest
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from aesr1.config import load_section
from aesr1.evaluation.evaluate import EvaluateConfig
from aesr1.images import load_image
from aesr1.metrics import correlations


def pixels(paths, size: int) -> torch.Tensor:
    """(N, 3, size, size) in [0, 1]: the images as the policy's processor would see them, resized."""
    arrays = [np.asarray(load_image(p).resize((size, size)), np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def cnn(mean_score: float) -> nn.Module:
    """Three conv blocks and a small head; the output starts at the mean score (from 0, the first steps'
    large errors drove every unit of the head's ReLU dead and the prediction went constant)."""
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Linear(64, 1)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, mean_score)
    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(64 * 16, 64), nn.GELU(), head)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + 256]).squeeze(1) for i in range(0, len(x), 256)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="data/ingest/train.parquet")
    parser.add_argument("--test", default="data/ingest/test.parquet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml", help="its evaluate.in_domain splits the averages")
    args = parser.parse_args()
    in_domain = load_section(args.params, "evaluate", EvaluateConfig).in_domain
    torch.manual_seed(args.seed)
    train, test = pd.read_parquet(args.train), pd.read_parquet(args.test)
    start = time.perf_counter()
    x, y = pixels(train.image_path, args.size), torch.tensor(train.score.to_numpy(), dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    held, fit = order[: len(x) // 10], order[len(x) // 10:]
    model = cnn(float(y[fit].mean()))
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
    for dataset, frame in test.groupby("dataset"):
        c = correlations(predict(model, pixels(frame.image_path, args.size)), frame.score)
        rows.append({"test_set": dataset, "n": c["n"], "plcc": c["plcc"], "srcc": c["srcc"]})
    table = pd.DataFrame(rows).set_index("test_set")
    print(f"\npixel regressor (small CNN, {len(fit)} training images, {args.epochs} epochs, best held-out PLCC "
          f"{best:.3f}, {time.perf_counter() - start:.0f} s)")
    print(table.round(3).to_string())
    inside = table.index.isin(in_domain)
    for name, mask in (("in-domain", inside), ("out-of-domain", ~inside), ("all five", inside | ~inside)):
        if mask.any():
            print(f"{name} average: PLCC {table.plcc[mask].mean():.3f}, SRCC {table.srcc[mask].mean():.3f}")


if __name__ == "__main__":
    main()
