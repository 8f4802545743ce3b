"""Run by tests/test_mixed_sizes.py under ``torchrun --nproc_per_node 2`` (gloo): one phase over a batch of
images of mixed sizes and aspect ratios, each process writing ``<phase>_rank<r>.json`` into ``out``.

    mixed_sizes.py sft    BACKBONE TRAJECTORIES OUT   one SFTTrainer step (aesr1.policy.train.fit)
    mixed_sizes.py rl     BACKBONE MANIFEST OUT       two GRPO steps (aesr1.rl.rl.build_trainer, trainer.train)
    mixed_sizes.py sample POLICY MANIFEST OUT         greedy sampling, batched and one image at a time
"""

import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch

from aesr1 import distributed


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def sft(backbone: str, trajectories: str, out: Path) -> dict:
    from aesr1.policy.data import sft_dataset
    from aesr1.policy.generation import load_processor
    from aesr1.policy.train import TrainConfig, fit

    frame = pd.read_parquet(trajectories)
    images = frame.image_path.nunique()
    # each process takes `images` rows a step: the 2 x 6 rows are one step, every batch mixing all six sizes
    cfg = TrainConfig(epochs=1, learning_rate=1e-3, batch_size=images, freeze_vision=True, logging_steps=1,
                      save_steps=1000)
    trainer = fit(backbone, load_processor(backbone), sft_dataset(frame, "trajectory"), cfg, out / "sft_ck")
    return {"steps": trainer.state.global_step, "losses": losses(trainer)}


class VisualTokens:
    """Records the visual-token count of every prompt this process trains on (the image_pad tokens of trl's
    padded batches), wrapping the trainer's generation."""

    def __init__(self, trainer, image_pad: int):
        self.counts: list[int] = []
        original = trainer._generate_and_score_completions

        def recording(inputs):
            output = original(inputs)
            self.counts += [int(n) for n in ((output["prompt_ids"] == image_pad) & (output["prompt_mask"] == 1))
                            .sum(1).tolist()]
            return output

        trainer._generate_and_score_completions = recording


def rl(backbone: str, manifest: str, out: Path) -> dict:
    from aesr1.rl.rl import GRPOParams, RLStageConfig, build_trainer

    images = len(pd.read_parquet(manifest))
    world = distributed.world_size()
    # the global batch of a step is the manifest's images, each with K = 2 completions, shared over the processes
    cfg = RLStageConfig(model=backbone, train_manifest=manifest, checkpoint_root=str(out / "rl_ck"),
                        out_dir=str(out / "rapo"), log_model=False,
                        grpo=GRPOParams(num_generations=2, images_per_device=images // world, grad_accum=1,
                                        max_steps=2, learning_rate=1e-4, max_completion_length=12,
                                        save_steps=1000, logging_steps=1, seed=0))
    trainer, processor, *_ = build_trainer(cfg, [], [])
    prompts = VisualTokens(trainer, processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "losses": [h["loss"] for h in history],
            "rewards": [h.get("reward") for h in history], "visual_tokens": prompts.counts,
            "grad_norms": [h.get("grad_norm") for h in history]}


def greedy(model, processor, images: list, batch_size: int, max_new_tokens: int = 24):
    """Greedy ``sample`` of ``images``, and the LM head's logits at each decoding step of each row this process
    sampled: a list, per row in order, of (steps of its batch, vocabulary) tensors."""
    from aesr1.policy.generation import sample

    batches: list[list[torch.Tensor]] = []
    generate = model.generate

    def generating(*args, **kwargs):  # one generate call per batch
        batches.append([])
        return generate(*args, **kwargs)

    def record(module, inputs, output):
        batches[-1].append(output[:, -1].detach().float().cpu())

    model.generate = generating
    hook = model.get_output_embeddings().register_forward_hook(record)
    try:
        sampled = sample(model, processor, images, do_sample=False, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    finally:
        hook.remove()
        del model.generate
    rows = [row for steps in batches for row in torch.stack(steps, 1)]
    return sampled, rows


def sample_phase(policy: str, manifest: str, out: Path) -> dict:
    from aesr1.policy.generation import load_policy

    paths = list(pd.read_parquet(manifest).image_path)
    model, processor = load_policy(policy)
    result, logits = {}, {}
    for name, batch_size in (("batched", len(paths)), ("single", 1)):
        sampled, logits[name] = greedy(model, processor, paths, batch_size)
        result[name] = {"texts": sampled.texts, "tokens": sampled.tokens, "entropy": sampled.entropy,
                        "expected": [None if math.isnan(e) else e for e in sampled.expected.tolist()]}
    torch.save(logits, out / f"logits_rank{distributed.rank()}.pt")
    return result


def main(phase: str, backbone: str, data: str, out: str) -> None:
    out = Path(out)
    result = {"sft": sft, "rl": rl, "sample": sample_phase}[phase](backbone, data, out)
    result.update(world=distributed.world_size(), rank=distributed.rank())
    (out / f"{phase}_rank{distributed.rank()}.json").write_text(json.dumps(result))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
