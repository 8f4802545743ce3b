"""The vectorised RAPO reward core vs straightforward per-pair loops.

    python benchmarks/rewards.py

Two loops, both written by us: ``torch pairs`` is the reference's way (its rewards live in
a torch training loop: for each image pair, torch ops over the K samples of one image);
``python scalars`` goes one image, sample and partner at a time with ``math``, the fastest a
plain loop gets. Same inputs (10% unparseable), all checked equal; prints times and ratios.
Target: at least 50x over the loop, and under 5 ms at N = 64, K = 8.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from aesr1.rl.rewards import rapo_rewards


def loop_rewards(pred, gt, sigma=0.1, eps=1e-5, gamma=1e-6, sqrt_eps=1e-6):
    """One image, one sample, one partner at a time: the reference's arithmetic written plainly."""
    n, k = len(pred), len(pred[0])
    means, variances = [], []
    for i in range(n):
        parsed = [v for v in pred[i] if not math.isnan(v)]
        means.append(sum(parsed) / len(parsed) if parsed else None)
        variances.append(sum((v - means[i]) ** 2 for v in parsed) / (len(parsed) - 1) if len(parsed) > 1 else 0.0)
    rank = [[0.0] * k for _ in range(n)]
    absolute = [[0.0] * k for _ in range(n)]
    for i in range(n):
        for s in range(k):
            o = pred[i][s]
            if math.isnan(o):
                continue
            absolute[i][s] = math.exp(-0.5 * (abs(o - gt[i]) / sigma) ** 2) + eps
            total, partners = 0.0, 0
            for j in range(n):
                if j == i or means[j] is None:
                    continue
                p = 0.5 * (1 + math.erf((o - means[j]) / math.sqrt(variances[i] + variances[j] + gamma) / math.sqrt(2)))
                pc = 1.0 if gt[i] >= gt[j] else 0.0
                total += math.sqrt(pc * p + sqrt_eps) + math.sqrt((1 - pc) * (1 - p) + sqrt_eps)
                partners += 1
            rank[i][s] = total / partners if partners else 0.0
    return np.array(rank), np.array(absolute)


def torch_pair_loop(pred, gt, sigma=0.1, eps=1e-5, gamma=1e-6, sqrt_eps=1e-6):
    """For each image pair (i, j), torch ops over image i's K samples, as a torch codebase writes it."""
    pred = torch.as_tensor(pred, dtype=torch.float64)
    gt = torch.as_tensor(gt, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    valid = ~torch.isnan(pred)
    n, k = pred.shape
    means, variances = [], []
    for i in range(n):
        parsed = pred[i][valid[i]]
        means.append(parsed.mean() if len(parsed) else None)
        variances.append(parsed.var(unbiased=True) if len(parsed) > 1 else torch.tensor(0.0, dtype=torch.float64))
    rank = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        partners = 0
        for j in range(n):
            if j == i or means[j] is None:
                continue
            p = normal.cdf((torch.nan_to_num(pred[i]) - means[j]) / torch.sqrt(variances[i] + variances[j] + gamma))
            pc = 1.0 if gt[i] >= gt[j] else 0.0
            rank[i] += torch.sqrt(pc * p + sqrt_eps) + torch.sqrt((1 - pc) * (1 - p) + sqrt_eps)
            partners += 1
        rank[i] = torch.where(valid[i], rank[i] / max(partners, 1), 0.0) if partners else 0.0
    absolute = torch.where(valid, torch.exp(-0.5 * ((pred - gt[:, None]).abs() / sigma) ** 2) + eps, 0.0)
    return rank.numpy(), absolute.numpy()


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"{'N':>4} {'K':>2} {'torch pairs ms':>15} {'python scalars ms':>18} {'vector ms':>10} "
          f"{'ratio (torch pairs)':>20} {'ratio (scalars)':>16}")
    for n in (8, 64, 256):
        for k in (4, 8):
            pred = rng.random((n, k))
            pred[rng.random((n, k)) < 0.1] = np.nan
            gt = rng.random(n)
            fast = rapo_rewards(pred, gt)
            for slow in (loop_rewards(pred.tolist(), gt.tolist()), torch_pair_loop(pred, gt)):
                for a, b in zip(fast, slow):
                    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
            repeats = 1 if n == 256 else 3
            t_torch = best_time(lambda: torch_pair_loop(pred, gt), repeats)
            t_scalar = best_time(lambda: loop_rewards(pred.tolist(), gt.tolist()), repeats)
            t_vec = best_time(lambda: rapo_rewards(pred, gt), 20)
            flag = "  <- target: < 5 ms, >= 50x" if (n, k) == (64, 8) else ""
            print(f"{n:>4} {k:>2} {t_torch * 1e3:>15.2f} {t_scalar * 1e3:>18.2f} {t_vec * 1e3:>10.3f} "
                  f"{t_torch / t_vec:>19.0f}x {t_scalar / t_vec:>15.0f}x{flag}")


if __name__ == "__main__":
    main()
