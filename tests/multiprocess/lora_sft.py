"""Run by tests/test_policy.py under ``torchrun --nproc_per_node 2`` (gloo): LoRA SFT, then one merged save."""

import json
import sys
from pathlib import Path

import pandas as pd

from aesr1 import distributed
from aesr1.policy.data import sft_dataset
from aesr1.policy.generation import load_processor
from aesr1.policy.train import TrainConfig, fit
from aesr1.policy.trainer import save_trained


def main(backbone: str, trajectories: str, out: str) -> None:
    processor = load_processor(backbone)
    cfg = TrainConfig(mode="lora", epochs=2, learning_rate=5e-3, batch_size=2, freeze_vision=True, lora_r=8,
                      logging_steps=1, save_steps=1000)
    trainer = fit(backbone, processor, sft_dataset(pd.read_parquet(trajectories), "trajectory"), cfg,
                  Path(out) / "ck")
    save_trained(trainer, processor, Path(out) / "sft", base=backbone)
    rank = distributed.rank()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"world": distributed.world_size(), "steps": trainer.state.global_step,
         "saved": (Path(out) / "sft" / "config.json").is_file()}))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
