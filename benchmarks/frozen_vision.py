"""What back-propagating the frozen vision tower costs: one LoRA step with gradient checkpointing, side by side.

    python benchmarks/frozen_vision.py [--vision-depth 4] [--images 2] [--rounds 2] [--json]

transformers (5.x), under gradient checkpointing or adapters, hooks every sub-model's input
embeddings so that their output requires grad, and Qwen2.5-VL's vision tower is such a
sub-model (its patch embedding). With the tower's weights frozen, backward still runs
through every vision block and keeps their checkpointed inputs. The project's
``freeze_vision`` runs the tower without autograd. This benchmark measures one SFT-shaped
step (the 7B's widths, one text layer, ``--vision-depth`` vision blocks, one 640 x 480 photo
per sequence, ~512 completion tokens, LoRA r 16, non-reentrant checkpointing as trl sets it)
both ways in one process, alternating, and prints seconds, peak RSS above the loaded model
and autograd's saved bytes inside the tower. The 7B tower has 32 blocks: its cost scales
with depth and with the images per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_shape as rs  # noqa: E402  (the 7B-shaped model, its tokenizer and photos)
from generation_memory import PeakMemory  # noqa: E402

MiB = 2**20


def step(net, inputs, labels) -> dict:
    """One forward + backward, timed, with its peak memory and the bytes autograd saved inside the tower."""
    saved = rs.SavedTensors(net)
    start = time.perf_counter()
    with PeakMemory() as memory:
        with saved.hooks():
            loss = net(**inputs, labels=labels).loss
        loss.backward()
    seconds = time.perf_counter() - start
    saved.remove()
    net.zero_grad(set_to_none=True)
    return {"seconds": seconds, "peak_above_start_mib": (memory.peak - memory.start) / MiB,
            "vision_saved_mib": saved.bytes().get("vision", 0) / MiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-depth", type=int, default=4, help="vision blocks (the 7B has 32)")
    parser.add_argument("--images", type=int, default=2, help="sequences (one photo each) per step")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both variants")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from peft import get_peft_model

    from aesr1.images import load_image
    from aesr1.policy.data import prompt_messages
    from aesr1.policy.train import TrainConfig
    from aesr1.policy.trainer import freeze_vision, lora_config

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        photos = rs.write_photos(Path(scratch), args.images)
        images = [load_image(p) for p in photos]
    processor, visual_tokens, _, _, _ = rs.tokenizer_and_processor(images[0])
    model, _ = rs.build_model(processor, layers=1, vision_depth=args.vision_depth, dtype=torch.bfloat16)
    trajectory, _ = rs.trajectory_of(processor.tokenizer, 512)
    prompt = processor.apply_chat_template(prompt_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt + trajectory + "<|im_end|>"] * args.images, images=images, return_tensors="pt")
    prompt_length = len(processor(text=[prompt], images=images[:1])["input_ids"][0])
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100

    for name, param in model.named_parameters():  # frozen weights only: what freeze_vision did before
        if ".visual." in f".{name}":
            param.requires_grad_(False)
    net = get_peft_model(model, lora_config(TrainConfig(mode="lora"), model))
    net.train()
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.enable_input_require_grads()  # what trl's trainers call for LoRA with checkpointing
    step(net, inputs, labels)  # warm-up

    results: dict[str, list[dict]] = {"tower back-propagated": [], "freeze_vision (no autograd)": []}
    for _ in range(args.rounds):
        for variant in results:
            tower = model.model.visual
            if variant.startswith("freeze_vision"):
                freeze_vision(model)
            else:  # take freeze_vision's hooks off again
                tower._forward_pre_hooks.clear()
                tower._forward_hooks.clear()
                tower.__dict__.pop("_grad_enabled_outside", None)
            results[variant].append(step(net, inputs, labels))

    summary = {variant: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for variant, runs in results.items()}
    setup = {"vision_depth": args.vision_depth, "images": args.images, "visual_tokens_per_image": visual_tokens,
             "sequence_tokens": int(inputs["input_ids"].shape[1]), "rounds": args.rounds,
             "torch_threads": torch.get_num_threads()}
    print(f"frozen vision tower, LoRA + gradient checkpointing, 7B widths, 1 text layer, "
          f"{args.vision_depth} vision blocks, {args.images} x {setup['sequence_tokens']} tokens "
          f"({visual_tokens} visual per image); median of {args.rounds} alternating rounds")
    print(f"{'':30s} {'s/step':>8s} {'peak MiB':>9s} {'vision saved MiB':>17s}")
    for variant, s in summary.items():
        print(f"{variant:30s} {s['seconds']:8.2f} {s['peak_above_start_mib']:9.0f} {s['vision_saved_mib']:17.1f}")
    back, fixed = summary.values()
    print(f"step time ratio {back['seconds'] / fixed['seconds']:.2f}x; saved inside the tower per block per image "
          f"{back['vision_saved_mib'] / args.vision_depth / args.images:.1f} MiB "
          f"(x 32 blocks x the recipe's 32 completions per GPU in RL: "
          f"{back['vision_saved_mib'] / args.vision_depth / args.images * 32 * 32 / 1024:.1f} GiB)")
    if args.json:
        print(json.dumps({"setup": setup, "median": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
