"""The `openai` teacher against a loopback server with 100 ms latency: concurrency 1 vs 16.

    python benchmarks/distill.py [--samples 400] [--latency 0.1]

Same 400 samples for both runs, fresh caches; prints both throughputs and the ratio (target >= 8x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from chat_server import ChatServer  # noqa: E402

from aesr1.aescot.teacher_openai import OpenAITeacher, OpenAITeacherConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    os.environ["AESR1_BENCH_KEY"] = "bench-key"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, ChatServer(latency_s=args.latency) as server:
        items = []
        for i in range(args.samples):
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
            items.append((f"img/{i}", str(path), "fair"))
        rates = {}
        for concurrency in (1, 16):
            cfg = OpenAITeacherConfig(base_url=server.url, model="bench", api_key_env="AESR1_BENCH_KEY",
                                concurrency=concurrency, cache_dir=str(Path(tmp) / f"cache{concurrency}"))
            start = time.perf_counter()
            results = OpenAITeacher(cfg).critique_many(items)
            elapsed = time.perf_counter() - start
            assert all(r.text for r in results), "a request failed"
            rates[concurrency] = args.samples / elapsed
            print(f"concurrency {concurrency:2d}: {elapsed:6.2f} s  {rates[concurrency]:7.1f} samples/s")
    ratio = rates[16] / rates[1]
    print(f"ratio 16/1: {ratio:.1f}x (target >= 8x: {'met' if ratio >= 8 else 'MISSED'})")


if __name__ == "__main__":
    main()
