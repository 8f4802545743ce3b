"""Peak memory of one evaluation batch with Qwen2.5-VL's vocabulary: stacked logits vs. per-step reduction.

    python benchmarks/generation_memory.py [--vocab 151936] [--batch 16] [--tokens 256]

A random-weight model (the tiny model's shape, but the real 151,936-token vocabulary) samples
one batch on the CPU for exactly ``--tokens`` steps, once per way of reading the logits, each
in a fresh process (peak resident memory is per process):

- ``stacked``: ``generate(output_logits=True)`` keeps every step's full-vocabulary logits
  (batch x steps x vocabulary floats), then reduces them: how evaluation sampled before.
- ``per-step``: :func:`aesr1.policy.generation.sample`, whose hook on the LM head keeps
  11 numbers per row and step (entropy, ten digit logits): how it samples now.

Printed: the peak resident memory above the loaded model's, and the wall time, per mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(mode: str, vocab: int, batch: int, tokens: int) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from aesr1.policy.backbone import TinyModelConfig, build_tiny
    from aesr1.policy.generation import DIGITS, entropies, sample

    model, processor = build_tiny(TinyModelConfig())
    model.resize_token_embeddings(vocab)  # the real vocabulary; the tokenizer decodes the ids it knows
    model.generation_config.eos_token_id = None  # random weights: every row runs all the steps
    model.eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(batch)]
    torch.manual_seed(0)

    class NoEnd(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = -float("inf")
            return scores

    baseline = rss_peak_mb()
    start = time.perf_counter()
    if mode == "stacked":
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "score"}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt] * batch, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                                 temperature=0.6, top_p=0.7, top_k=50, output_logits=True,
                                 return_dict_in_generate=True, logits_processor=LogitsProcessorList([NoEnd()]))
            digit_ids = processor.tokenizer.convert_tokens_to_ids(DIGITS)
            entropy = torch.stack([entropies(step, 0.6) for step in out.logits], 1)
            digits = torch.stack([step[:, digit_ids] for step in out.logits], 1)
        steps = len(out.logits)
        del entropy, digits
    else:
        original = model.generate

        def generate_all_steps(**kwargs):
            return original(**kwargs, min_new_tokens=tokens, logits_processor=LogitsProcessorList([NoEnd()]))

        model.generate = generate_all_steps
        sampled = sample(model, processor, images, temperature=0.6, top_p=0.7, top_k=50, max_new_tokens=tokens,
                         batch_size=batch)
        steps = sampled.tokens // batch
    return {"mode": mode, "steps": steps, "peak_above_model_mb": rss_peak_mb() - baseline,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--child", choices=["stacked", "per-step"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.vocab, args.batch, args.tokens)))
        return
    stacked_bytes = args.batch * args.tokens * args.vocab * 4
    print(f"vocabulary {args.vocab}, batch {args.batch}, {args.tokens} steps; the stacked logits alone: "
          f"{stacked_bytes / 2**20:.0f} MiB")
    results = {}
    for mode in ("stacked", "per-step"):
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--vocab", str(args.vocab), "--batch",
                               str(args.batch), "--tokens", str(args.tokens)],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:9s}: peak {r['peak_above_model_mb']:8.0f} MiB above the loaded model, {r['steps']} steps, "
              f"{r['seconds']:.1f} s")
    ratio = results["per-step"]["peak_above_model_mb"] / results["stacked"]["peak_above_model_mb"]
    print(f"per-step / stacked peak: {ratio:.3f}")


if __name__ == "__main__":
    main()
