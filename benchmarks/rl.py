"""RAPO step time on this machine: seconds per optimizer step and the share spent generating.

    dvc repro sft                   # the SFT model and the manifests
    python benchmarks/rl.py [--steps 6] [--model PATH] [--mode full|lora] [--use-vllm] ...

Builds the trainer exactly as ``aesr1 rl`` does (params.yaml's rl section, the flags
override it), without MLflow and without saving checkpoints. trl generates once every
``num_iterations`` optimizer steps, so the script times whole cycles; the first is warm-up.
On a GPU it trains as the stage does (fp32 weights, bf16 compute). Run it twice, with and without
--use-vllm, to compare generation back ends on the same machine, once trl passes vLLM correct image
prompts: on trl 1.16 the stage refuses use_vllm, and so does this script (docs/stages/rapo.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch
from transformers import TrainerCallback

from aesr1.config import load_section
from aesr1.rl.rl import RLStageConfig, build_trainer


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and of the generation calls inside it."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.generation: list[float] = []
        self.completion_tokens: list[int] = []
        self._started = 0.0
        self._generating = 0.0
        self._tokens = 0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._started, self._generating, self._tokens = time.perf_counter(), 0.0, 0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.steps.append(time.perf_counter() - self._started)
        self.generation.append(self._generating)
        self.completion_tokens.append(self._tokens)
        return control

    def wrap(self, trainer) -> None:
        """Time trl's one generation entry point (transformers or vLLM alike)."""
        generate = trainer._generate

        def timed(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            out = generate(*args, **kwargs)
            synchronize()
            self._generating += time.perf_counter() - start
            self._tokens += sum(len(ids) for ids in out[1])  # trl 1.16: (prompt_ids, completion_ids, ...)
            return out

        trainer._generate = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps, the first cycle not counted")
    parser.add_argument("--model", help="policy folder or hub id (default: the rl section's)")
    parser.add_argument("--mode", choices=["full", "lora"])
    parser.add_argument("--images-per-device", type=int)
    parser.add_argument("--max-completion-length", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--use-vllm", action="store_true", help="vLLM colocated with training (needs vllm)")
    args = parser.parse_args()

    cfg = load_section(args.params, "rl", RLStageConfig)
    grpo = dataclasses.replace(cfg.grpo, max_steps=args.steps, save_steps=10**9, use_vllm=args.use_vllm,
                               gradient_checkpointing=args.gradient_checkpointing or cfg.grpo.gradient_checkpointing,
                               **{k: v for k, v in {"mode": args.mode, "images_per_device": args.images_per_device,
                                                    "max_completion_length": args.max_completion_length}.items()
                                  if v is not None})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, grpo=grpo, model=args.model or cfg.model, checkpoint_root=tmp)
        trainer, *_ = build_trainer(cfg, report_to=[], callbacks=[timer])
        timer.wrap(trainer)
        trainer.train()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in trainer.model.parameters())
    sequences = grpo.images_per_device * grpo.num_generations
    print(f"{device}; model {cfg.model} ({params / 1e6:.1f}M parameters, {grpo.mode}); "
          f"{grpo.images_per_device} images x {grpo.num_generations} generations = {sequences} sequences per step, "
          f"up to {grpo.max_completion_length} tokens, num_iterations {grpo.num_iterations}, "
          f"generation: {'vLLM' if grpo.use_vllm else 'transformers'}")
    # trl generates once per num_iterations optimizer steps: time whole cycles, the first one is warm-up.
    cycle = grpo.num_iterations
    cycles = len(timer.steps) // cycle - 1
    if cycles < 1:
        raise SystemExit(f"--steps must be at least {2 * cycle} (two cycles of num_iterations steps)")
    counted = slice(cycle, cycle * (cycles + 1))
    steps, generation = timer.steps[counted], timer.generation[counted]
    tokens = sum(timer.completion_tokens[counted])
    cycle_s, generation_s = sum(steps) / cycles, sum(generation) / cycles
    print(f"per cycle (one generation, {cycle} optimizer steps): {cycle_s:.3f} s, of which generation "
          f"{generation_s:.3f} s = {generation_s / cycle_s:.0%}; {cycles} cycles after warm-up; "
          f"step times {', '.join(f'{t:.2f}' for t in steps)} s")
    print(f"{tokens / sum(generation):.0f} completion tokens/s while generating "
          f"({tokens / cycles / sequences:.0f} tokens per completion)")
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
