"""Peak memory of one evaluation batch with Qwen2.5-VL's vocabulary: stacked logits vs. per-step reduction.

    python benchmarks/generation_memory.py [--vocab 151936] [--batch 16] [--tokens 256]

A random-weight model (the tiny model's shape, but the real 151,936-token vocabulary) samples
one batch on the CPU for exactly ``--tokens`` steps, once per way of reading the logits, each
in a fresh process (peak resident memory is per process):

- ``stacked``: ``generate(output_logits=True)`` keeps every step's full-vocabulary logits
  (batch x steps x vocabulary floats), then reduces them: how evaluation sampled before.
- ``per-step``: :func:`aesr1.policy.generation.sample`, whose hook on the LM head keeps
  11 numbers per row and step (entropy, ten digit logits): how it samples now.

Printed per mode: the peak resident memory during generation above the memory before it (sampled
every 5 ms), and the wall time. The children run with ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB so that
glibc returns freed tensors to the system: otherwise its heap keeps freed per-step buffers and the
resident size grows with the steps even when nothing is held (seen here: +2.2 GB for 256 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image


class PeakMemory:
    """The highest resident size of this process while the ``with`` block runs, above its size at the start."""

    def __enter__(self):
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.above_mb = (self.peak - self.start) / 2**20


def child(mode: str, vocab: int, batch: int, tokens: int) -> dict:
    import torch
    from transformers import LogitsProcessor

    from aesr1.backbone.tiny import TinyModelConfig, build_tiny

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

    start = time.perf_counter()
    with PeakMemory() as memory:
        steps = run(mode, model, processor, images, tokens, NoEnd)
    return {"mode": mode, "steps": steps, "peak_above_model_mb": memory.above_mb,
            "seconds": time.perf_counter() - start}


def run(mode, model, processor, images, tokens, no_end) -> int:
    """Sample one batch for ``tokens`` steps; the number of steps taken."""
    import torch
    from transformers import LogitsProcessorList

    from aesr1.policy.generation import DIGITS, entropies, sample

    batch = len(images)
    if mode == "stacked":
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "score"}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt] * batch, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                                 temperature=0.6, top_p=0.7, top_k=50, output_logits=True,
                                 return_dict_in_generate=True, logits_processor=LogitsProcessorList([no_end()]))
            digit_ids = processor.tokenizer.convert_tokens_to_ids(DIGITS)
            entropy = torch.stack([entropies(step, 0.6) for step in out.logits], 1)
            digits = torch.stack([step[:, digit_ids] for step in out.logits], 1)
        del entropy, digits
        return len(out.logits)
    original = model.generate

    def generate_all_steps(**kwargs):
        return original(**kwargs, min_new_tokens=tokens, logits_processor=LogitsProcessorList([no_end()]))

    model.generate = generate_all_steps
    sampled = sample(model, processor, images, temperature=0.6, top_p=0.7, top_k=50, max_new_tokens=tokens,
                     batch_size=batch)
    return sampled.tokens // batch


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
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:9s}: peak {r['peak_above_model_mb']:8.0f} MiB above the memory before sampling, "
              f"{r['steps']} steps, {r['seconds']:.1f} s")
    ratio = results["per-step"]["peak_above_model_mb"] / results["stacked"]["peak_above_model_mb"]
    print(f"per-step / stacked peak: {ratio:.3f}")


if __name__ == "__main__":
    main()
