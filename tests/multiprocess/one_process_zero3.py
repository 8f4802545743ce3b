"""Run by tests/test_zero3.py as a plain ``python`` process (params' ``launcher: python``: no launcher environment):
SFT under the recipes' ZeRO-3 config, then the trained model saved."""

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
    cfg = TrainConfig(epochs=1, learning_rate=1e-3, batch_size=4, logging_steps=1, save_steps=1000,
                      trl={"deepspeed": "configs/deepspeed/zero3.json"})
    trainer = fit(backbone, processor, sft_dataset(pd.read_parquet(trajectories), "trajectory"), cfg,
                  Path(out) / "ck")
    save_trained(trainer, processor, Path(out) / "sft")
    (Path(out) / "seen.json").write_text(json.dumps(
        {"world": distributed.world_size(), "steps": trainer.state.global_step,
         "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
         "loss": trainer.state.log_history[-1].get("train_loss")}))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
