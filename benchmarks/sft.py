"""SFT throughput on the embedded default: samples/s and tokens/s, full fine-tuning vs LoRA.

    dvc repro filter backbone      # the corpus and the tiny backbone
    python benchmarks/sft.py [--samples 256]

Uses the sft section of params.yaml (batch size, learning rate); one epoch over the first
--samples trajectories per mode, timed in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import pandas as pd

from aesr1.config import load_section
from aesr1.images import load_image
from aesr1.policy.data import prompt_messages, sft_dataset
from aesr1.policy.generation import load_processor
from aesr1.policy.sft import SFTStageConfig
from aesr1.policy.train import fit


def count_tokens(processor, frame: pd.DataFrame) -> int:
    prompt = processor.apply_chat_template(prompt_messages(), add_generation_prompt=True, tokenize=False)
    total = 0
    for path, target in zip(frame.image_path, frame.trajectory):
        inputs = processor(text=[prompt + target + "<|im_end|>"], images=[load_image(path)])
        total += len(inputs["input_ids"][0])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cfg = load_section(args.params, "sft", SFTStageConfig)
    corpus = pd.read_parquet(cfg.corpus).head(args.samples)
    processor = load_processor(cfg.model)
    tokens = count_tokens(processor, corpus)
    print(f"{len(corpus)} samples, {tokens} tokens ({tokens / len(corpus):.0f} per sample incl. image tokens), "
          f"batch {cfg.train.batch_size}")
    rates = {}
    for mode in ("full", "lora"):
        train = dataclasses.replace(cfg.train, mode=mode, epochs=1, save_steps=10**9)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            fit(cfg.model, processor, sft_dataset(corpus, "trajectory"), train, Path(tmp))
            elapsed = time.perf_counter() - start
        rates[mode] = len(corpus) / elapsed
        print(f"{mode:4s}: {elapsed:6.1f} s  {rates[mode]:6.1f} samples/s  {tokens / elapsed:8.0f} tokens/s")
    print(f"lora/full throughput: {rates['lora'] / rates['full']:.2f}x")


if __name__ == "__main__":
    main()
