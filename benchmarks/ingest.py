"""Generate and ingest AesSynth at the paper's scale (15K train + test sets); print throughput.

    python benchmarks/ingest.py [--train-size 15000] [--test-per-dataset 1000] [--workers 2]

Target: generate + ingest in under 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from aesr1.data.ingest import IngestConfig, ingest
from aesr1.data.synth import SplitSize, SynthConfig, generate
from aesr1.stage import Recorder

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=15000)
    parser.add_argument("--test-per-dataset", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    # pools 2% above the quotas, as the planted faults take a few rows
    mix = (("ava", 2), ("tad66k", 2), ("flickr_aes", 1))
    pool = {name: int(args.train_size * w / 5 * 1.02) + 10 for name, w in mix}
    sizes = {name: SplitSize(pool.get(name, 0), args.test_per_dataset)
             for name in ("ava", "tad66k", "flickr_aes", "para", "aadb")}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        start = time.perf_counter()
        counts = generate(SynthConfig(out_dir=str(raw), sizes=sizes, workers=args.workers))
        generated = time.perf_counter() - start

        section = yaml.safe_load((REPO / "params.yaml").read_text())["ingest"]
        section.update(raw_root=str(raw), out_dir=str(Path(tmp) / "ingest"), train_size=args.train_size)
        start = time.perf_counter()
        metrics = ingest(IngestConfig(**section), Recorder())
        ingested = time.perf_counter() - start

    images = counts["images"]
    print(f"images generated: {images} ({sizes['ava'].train + sizes['tad66k'].train + sizes['flickr_aes'].train} "
          f"train pool, {5 * args.test_per_dataset} test)")
    print(f"generate: {generated:7.1f} s  {images / generated:8.1f} images/s")
    print(f"ingest:   {ingested:7.1f} s  {images / ingested:8.1f} images/s "
          f"(train {metrics['train_size']}, test {metrics['test_size']}, rejected {metrics['rejected']})")
    total = generated + ingested
    verdict = "met" if total < 180 else "MISSED"
    print(f"total:    {total:7.1f} s  {images / total:8.1f} images/s  (target < 180 s: {verdict})")


if __name__ == "__main__":
    main()
