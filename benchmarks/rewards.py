"""The vectorised RAPO reward core vs a straightforward per-pair loop (as the reference computes it).

    python benchmarks/rewards.py

Same inputs for both (10% unparseable), checked equal; prints times and ratios.
Target: at least 50x, and under 5 ms at N = 64, K = 8.
"""

from __future__ import annotations

import math
import time

import numpy as np

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


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'N':>4} {'K':>2} {'loop ms':>10} {'vector ms':>10} {'ratio':>8}")
    for n in (8, 64, 256):
        for k in (4, 8):
            pred = rng.random((n, k))
            pred[rng.random((n, k)) < 0.1] = np.nan
            gt = rng.random(n)
            fast = rapo_rewards(pred, gt)
            slow = loop_rewards(pred.tolist(), gt.tolist())
            for a, b in zip(fast, slow):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
            t_loop = best_time(lambda: loop_rewards(pred.tolist(), gt.tolist()), 1 if n == 256 else 3)
            t_vec = best_time(lambda: rapo_rewards(pred, gt), 20)
            flag = "  (target: < 5 ms, >= 50x)" if (n, k) == (64, 8) else ""
            print(f"{n:>4} {k:>2} {t_loop * 1e3:>10.2f} {t_vec * 1e3:>10.3f} {t_loop / t_vec:>7.0f}x{flag}")


if __name__ == "__main__":
    main()
