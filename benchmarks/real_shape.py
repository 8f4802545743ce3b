"""Qwen2.5-VL-7B's real widths at reduced depth on this CPU: SFT, RL and sampling at the real token counts.

    python benchmarks/real_shape.py [--layers 1] [--vision-depth 1] [--dtype bf16|fp32] [--steps 2]
                                    [--rl-steps 1] [--rl-images 1] [--json]

A random-weight Qwen2.5-VL with the 7B's widths (text: hidden 3584, MLP 18944, 28 heads, 4 KV
heads, 152,064-token vocabulary, untied LM head, mrope [16, 24, 24], rope_theta 1e6; vision:
hidden 1280, MLP 3420, 16 heads, patch 14, merge 2, window 112, out 3584) but ``--layers`` text
layers and ``--vision-depth`` vision blocks (the last one full attention, as in the real tower).
Its tokenizer is a small byte-level BPE with Qwen's special tokens, trained like the tiny
model's (``aesr1.backbone.tiny.build_tokenizer``) with the vocabulary size that makes the
project's prompt about as long as Qwen's tokenizer makes it; the model's vocabulary is the
real 152,064 (ids the tokenizer does not have decode to nothing). Sampling suppresses the
special tokens (``suppress_tokens``), end-of-turn included, so every completion runs its full
512 tokens and no sampled ``<|image_pad|>`` confuses the next forward.

Each image is a 640 x 480 photo: under the recipe's max_pixels 262,144 the processor makes it
420 x 588 pixels, a 30 x 42 patch grid, 315 visual tokens. Phases, in one process, each timed
with its peak resident memory (sampled every 5 ms) above the memory with the model loaded:

0. probe: one plain forward + backward (LoRA, no checkpointing) of one SFT sequence, with
   autograd's saved tensors counted per decoder layer and the LM head's logits measured;
1. sft: ``aesr1.policy.train.fit`` (trl's SFTTrainer), LoRA r 16 on the language model's LORA_PROJECTIONS,
   gradient checkpointing as in the recipe, ``--sft-batch`` trajectories of ~512 tokens per step;
2. rl: ``aesr1.rl.rl.build_trainer`` (trl's GRPOTrainer with the project's rewards), LoRA,
   ``--rl-images`` images x K = 4 completions of 512 tokens per step, beta 0.01 (the reference
   is the adapter-disabled model); only ``load_policy`` is replaced, to hand it this model;
3. sample: ``aesr1.policy.generation.sample``, one completion of 512 tokens with the recipe's
   evaluation decoding (temperature 0.6, top-p 0.7, top-k 50).

Then the same figures from the memory model (``aesr1/doctor/memory.py``) for this reduced
model on this CPU, beside the measurements, and the memory model of the full 7B recipe per GPU.

``--dtype`` defaults to bf16: this CPU has AVX512-BF16, where a bf16 forward runs ~2.4x faster
than fp32 and decoding reads half the bytes; fp32 would take the benchmark past 8 minutes on 2
cores. bf16 is also what the recipe trains on (LoRA: frozen bf16 base, fp32 adapters, as
``load_policy`` loads it on a GPU). The process re-executes itself with ``MALLOC_MMAP_THRESHOLD_``
at 1 MiB so freed tensors return to the system and each phase's peak is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from aesr1.doctor import memory as mm
from aesr1.doctor.plan import REFERENCE, TIERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_memory import PeakMemory  # noqa: E402  (one peak-RSS sampler for the benchmarks)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "recipes" / "qwen2.5-vl-7b.yaml"
PHOTO = (640, 480)  # width x height: 315 visual tokens under max_pixels 262,144
MIN_PIXELS, MAX_PIXELS = 3136, 262_144  # the recipe's backbone budget
PROMPT_TOKENS = 90  # what Qwen's own tokenizer makes of the policy prompt's text (besides the visual tokens)
MiB = 2**20


@contextlib.contextmanager
def machine(into: dict, name: str):
    """Record a phase's wall time, this process's CPU seconds over it and the load average at its end: a quiet
    machine gives compute-bound phases close to 2 CPU-seconds per second on 2 cores (load ~2, all ours)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    yield
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    into[name] = {"wall_s": wall, "cpu_per_wall": (usage.ru_utime + usage.ru_stime - cpu) / wall,
                  "load_end": os.getloadavg()[0]}
    print(f"  [{name}: {wall:.0f} s wall, {into[name]['cpu_per_wall']:.2f} CPU-s/s ours, load "
          f"{into[name]['load_end']:.2f} at its end]", flush=True)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def recipe_values() -> mm.Recipe:
    """The memory model's recipe from configs/recipes/qwen2.5-vl-7b.yaml on the reference's GPUs (the planner's
    first tier: 8)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    sft, grpo = recipe["sft"]["train"], recipe["rl"]["grpo"]
    gpus = next(count for name, count, _ in TIERS if name == REFERENCE)
    return mm.Recipe(gpus=gpus, sft_batch=sft["batch_size"], sft_checkpointing=sft["gradient_checkpointing"],
                     images_per_device=grpo["images_per_device"], generations=grpo["num_generations"],
                     grad_accum=grpo["grad_accum"], rl_checkpointing=grpo["gradient_checkpointing"],
                     beta=grpo["beta"], completion_tokens=grpo["max_completion_length"],
                     eval_batch=recipe["evaluate"]["decoding"]["batch_size"])


# ---------------------------------------------------------------------------------------------------- the model


def processor_for(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from aesr1.images import set_pixel_budget

    chat_template = resources.files("trl").joinpath("chat_templates", "qwen2_5_vl.jinja").read_text()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=chat_template)
    processor.tokenizer.padding_side = "left"  # as load_processor sets it
    return set_pixel_budget(processor, MIN_PIXELS, MAX_PIXELS)


def prompt_token_counts(processor, image) -> tuple[int, int, list]:
    """(visual tokens, other prompt tokens, image_grid_thw) of the policy prompt with ``image``."""
    from aesr1.policy.data import prompt_messages

    prompt = processor.apply_chat_template(prompt_messages(), add_generation_prompt=True, tokenize=False)
    out = processor(text=[prompt], images=[image], return_tensors="pt")
    ids = out["input_ids"][0]
    visual = int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    return visual, len(ids) - visual, out["image_grid_thw"].tolist()


def tokenizer_and_processor(image):
    """The BPE vocabulary whose prompt length is nearest Qwen's ~90 tokens (few merges: a longer prompt)."""
    from aesr1.backbone.tiny import build_tokenizer

    best = None
    for vocab in range(600, 1041, 20):
        processor = processor_for(build_tokenizer(vocab))
        visual, text, grid = prompt_token_counts(processor, image)
        if best is None or abs(text - PROMPT_TOKENS) < abs(best[2] - PROMPT_TOKENS):
            best = (processor, visual, text, grid, vocab)
    return best


def qwen_config(tokenizer, layers: int, vision_depth: int):
    """Qwen2.5-VL-7B's config with ``layers`` text layers and ``vision_depth`` vision blocks, this tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig

    s = mm.QWEN25_VL_7B
    ids = tokenizer.convert_tokens_to_ids
    # the real tower: full attention in blocks 7, 15, 23, 31 of 32; reduced: every 8th, and always the last
    full_attention = sorted({*range(7, vision_depth, 8), vision_depth - 1})
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=layers,
            num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=128_000,
            rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(
            depth=vision_depth, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
            num_heads=s.vision_heads, patch_size=s.patch, spatial_merge_size=s.merge, temporal_patch_size=s.temporal,
            window_size=112, out_hidden_size=s.hidden, hidden_act="silu", fullatt_block_indexes=full_attention),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)


def full_7b_parameters(tokenizer) -> int:
    """Parameters of the whole 28-layer, 32-block model, built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen_config(tokenizer, mm.QWEN25_VL_7B.layers,
                                                               mm.QWEN25_VL_7B.vision_depth))
    return sum(p.numel() for p in model.parameters())


def preload() -> None:
    """Import what the phases import (trl's trainers pull in accelerate, deepspeed, datasets)."""
    import peft  # noqa: F401
    import trl  # noqa: F401
    from trl import GRPOTrainer, SFTTrainer  # noqa: F401

    import aesr1.rl.rl  # noqa: F401


def build_model(processor, layers: int, vision_depth: int, dtype):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(tokenizer, layers, vision_depth),
                                                                dtype=dtype)
    special = sorted(tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = special  # every completion runs its full length
    return model, special


def reset(model) -> None:
    """Undo what a trainer left on the base model: trl's fused-head forward, input grads, checkpointing."""
    model.__dict__.pop("forward", None)
    with contextlib.suppress(Exception):
        model.disable_input_require_grads()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    for p in model.parameters():
        p.requires_grad_(True)
    gc.collect()


# ---------------------------------------------------------------------------------------------------- the data


def write_photos(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):  # a smooth gradient plus noise: photo-like enough for a JPEG of realistic size
        y, x = np.mgrid[0:PHOTO[1], 0:PHOTO[0]]
        base = np.stack([x * 255 / PHOTO[0], y * 255 / PHOTO[1], np.full_like(x, 40 * i % 255)], -1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def trajectory_of(tokenizer, tokens: int, score: float = 0.62) -> tuple[str, int]:
    """A ``<think>...</think><answer>...</answer>`` trajectory of about ``tokens`` tokens (with its end-of-turn),
    its critique made of the analytic teacher's phrases; and its exact token count."""
    from itertools import cycle

    from aesr1.aescot.teacher_analytic import phrase_bank
    from aesr1.trajectory import make_trajectory

    phrases = phrase_bank()
    words: list[str] = []

    def count() -> tuple[str, int]:
        text = make_trajectory(" ".join(words) or "fine", score)
        return text, len(tokenizer(text + "<|im_end|>")["input_ids"])

    for phrase in cycle(phrases):  # whole phrases while far from the length, then word by word
        if count()[1] >= tokens - 40:
            break
        words.append(phrase)
    for word in cycle(" ".join(phrases).split()):
        text, n = count()
        if n >= tokens:
            return text, n
        words.append(word)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------- measuring


class SavedTensors:
    """Bytes autograd saves for backward during a forward, by where they were saved (unique storages, no weights)."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.where = "embedding"
        self.by_where: dict[str, dict[int, int]] = {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.handles = []
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        core = inner.model
        self._mark(core.visual, "vision", "embedding")
        for layer in core.language_model.layers:
            self._mark(layer, "text layers", "between layers")
        self._mark(core.language_model.norm, "head + loss", None)

    def _mark(self, module, inside: str, after: str | None):
        def pre(*_):
            self.where = inside

        def post(*_):
            if after is not None:
                self.where = after

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr:
            bucket = self.by_where.setdefault(self.where, {})
            bucket[ptr] = max(bucket.get(ptr, 0), storage.nbytes())
        return tensor

    def hooks(self):
        return self.torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def bytes(self) -> dict[str, int]:
        seen: set[int] = set()
        out = {}
        for where, storages in self.by_where.items():
            fresh = {p: n for p, n in storages.items() if p not in seen}
            seen.update(fresh)
            out[where] = sum(fresh.values())
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


class LogitsProbe:
    """A forward hook on the LM head: the largest logits tensor it produced, its shape and dtype."""

    def __init__(self):
        self.nbytes, self.shape, self.dtype, self.calls = 0, None, None, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if output.nbytes > self.nbytes:
            self.nbytes, self.shape, self.dtype = output.nbytes, tuple(output.shape), str(output.dtype)


def step_clock(name: str, log: list):
    """A TrainerCallback printing one line per optimizer step: its seconds and the resident memory."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            log.append(seconds)
            print(f"  {name} step {state.global_step}/{state.max_steps}: {seconds:.1f} s, RSS {rss() / 2**30:.2f} GiB",
                  flush=True)
            return control

    return StepClock()


# ---------------------------------------------------------------------------------------------------- the phases


def probe(model, processor, photo: str, trajectory: str, mode: str) -> dict:
    """A plain forward of one SFT sequence with the saved tensors counted where they were saved; with LoRA
    (``mode`` "lora") the backward too, under the peak-memory sampler. Input grads on, as gradient
    checkpointing turns them on (for LoRA the Trainer does too): every layer's input carries a grad."""
    from peft import get_peft_model

    from aesr1.images import load_image
    from aesr1.policy.data import prompt_messages
    from aesr1.policy.train import TrainConfig
    from aesr1.policy.trainer import freeze_vision, lora_config

    prompt = processor.apply_chat_template(prompt_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt + trajectory + "<|im_end|>"], images=[load_image(photo)], return_tensors="pt")
    prompt_length = len(processor(text=[prompt], images=[load_image(photo)])["input_ids"][0])
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    freeze_vision(model)
    net = get_peft_model(model, lora_config(TrainConfig(mode="lora"), model)) if mode == "lora" else model
    net.enable_input_require_grads()
    net.train()
    saved = SavedTensors(net)
    logits = LogitsProbe()
    hook = model.get_output_embeddings().register_forward_hook(logits)
    start = time.perf_counter()
    with PeakMemory() as memory:
        with saved.hooks():
            loss = net(**inputs, labels=labels).loss
        forward_s = time.perf_counter() - start
        if mode == "lora":
            loss.backward()
    seconds = time.perf_counter() - start
    hook.remove()
    saved.remove()
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    del loss
    if mode == "lora":
        net.unload()
    reset(model)
    tokens = int(inputs["input_ids"].shape[1])
    return {"mode": mode, "tokens": tokens, "completion_tokens": tokens - prompt_length,
            "patches": int(inputs["image_grid_thw"].prod()), "saved_bytes": saved.bytes(),
            "logits_bytes": logits.nbytes, "logits_shape": logits.shape, "logits_dtype": logits.dtype,
            "seconds": seconds, "forward_s": forward_s, "peak_above_start": memory.peak - memory.start,
            "trainable_parameters": trainable}


def sft(model, processor, photos: list[str], trajectory: str, steps: int, batch: int, checkpointing: bool) -> dict:
    from aesr1.policy.data import sft_dataset
    from aesr1.policy.train import TrainConfig, fit

    rows = steps * batch
    frame = pd.DataFrame({"image_path": [photos[i % len(photos)] for i in range(rows)],
                          "trajectory": [trajectory] * rows})
    cfg = TrainConfig(mode="lora", epochs=1, batch_size=batch, grad_accum=1, logging_steps=1, save_steps=10**9,
                      gradient_checkpointing=checkpointing, freeze_vision=True)
    times: list[float] = []
    logits = LogitsProbe()  # trl's fused LM head never calls the module: no full logits
    hook = model.get_output_embeddings().register_forward_hook(logits)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as memory:
        start = time.perf_counter()
        trainer = fit(model, processor, sft_dataset(frame, "trajectory"), cfg, Path(tmp) / "checkpoints",
                      callbacks=[step_clock("sft", times)])
        seconds = time.perf_counter() - start
    hook.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.model.unload()
    del trainer
    reset(model)
    return {"steps": len(times), "batch": batch, "step_s": times, "seconds": seconds, "losses": losses,
            "lm_head_calls": logits.calls, "logits_bytes_max": logits.nbytes, "logits_shape_max": logits.shape,
            "peak_above_start": memory.peak - memory.start, "peak": memory.peak}


def rl(model, processor, photos: list[str], steps: int, images: int, k: int, completion: int, beta: float,
       checkpointing: bool, special: list[int]) -> dict:
    from aesr1.policy.trainer import quiet
    from aesr1.rl.rl import GRPOParams, RLStageConfig, build_trainer

    times: list[float] = []
    generation = {"seconds": 0.0, "tokens": 0, "calls": 0}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "train.parquet"
        pd.DataFrame({"image_id": [f"photo{i}" for i in range(images * steps)],
                      "image_path": [photos[i % len(photos)] for i in range(images * steps)],
                      "score": [0.3 + 0.4 * (i % 2) for i in range(images * steps)]}).to_parquet(manifest)
        grpo = GRPOParams(mode="lora", num_generations=k, images_per_device=images, grad_accum=1, max_steps=steps,
                          max_completion_length=completion, beta=beta, gradient_checkpointing=checkpointing,
                          logging_steps=1, save_steps=10**9,
                          trl={"generation_kwargs": {"suppress_tokens": special}})  # also <|image_pad|>, as trl does
        cfg = RLStageConfig(model="(this process's model)", train_manifest=str(manifest), test_manifest=str(manifest),
                            checkpoint_root=str(Path(tmp) / "checkpoints"), log_model=False, grpo=grpo)
        with mock.patch("aesr1.rl.rl.load_policy", return_value=(model, processor)):
            trainer, *_ = build_trainer(cfg, report_to=[], callbacks=[step_clock("rl", times)])
        quiet(trainer)  # as the rl stage does
        logits = LogitsProbe()  # called while generating only: the loss goes through trl's fused head
        hook = model.get_output_embeddings().register_forward_hook(logits)
        original = trainer._generate

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            generation["seconds"] += time.perf_counter() - start
            generation["tokens"] += sum(len(ids) for ids in out[1])  # (prompt_ids, completion_ids, ...)
            generation["calls"] += 1
            return out

        trainer._generate = timed
        with PeakMemory() as memory, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        hook.remove()
        history = [h for h in trainer.state.log_history if "loss" in h]
        trainer.model.unload()
        del trainer
    reset(model)
    return {"steps": len(times), "images": images, "k": k, "step_s": times, "seconds": seconds,
            "generation_s": generation["seconds"], "completion_tokens": generation["tokens"],
            "generation_calls": generation["calls"], "loss": [h["loss"] for h in history],
            "lm_head_calls": logits.calls, "logits_bytes_max": logits.nbytes, "logits_shape_max": logits.shape,
            "peak_above_start": memory.peak - memory.start, "peak": memory.peak}


def sample_phase(model, processor, photo: str, tokens: int) -> dict:
    from aesr1.policy.generation import sample

    logits = LogitsProbe()
    hook = model.get_output_embeddings().register_forward_hook(logits)
    with PeakMemory() as memory:
        start = time.perf_counter()
        sampled = sample(model, processor, [photo], n=1, temperature=0.6, top_p=0.7, top_k=50, max_new_tokens=tokens,
                         batch_size=16)
        seconds = time.perf_counter() - start
    hook.remove()
    return {"tokens": sampled.tokens, "seconds": seconds, "per_token_s": seconds / max(sampled.tokens, 1),
            "entropy": sampled.entropy, "text_chars": len(sampled.texts[0]), "logits_bytes_max": logits.nbytes,
            "logits_shape_max": logits.shape, "lm_head_calls": logits.calls,
            "peak_above_start": memory.peak - memory.start, "peak": memory.peak}


# ---------------------------------------------------------------------------------------------------- the report


def reduced_estimates(shape: mm.Shape, args, tokens: dict, compute_bytes: int) -> dict[str, mm.Estimate]:
    """The memory model for this reduced model on this CPU: one process, no ZeRO, no CUDA context."""
    cpu = dict(gpus=1, zero3=False, compute_bytes=compute_bytes, lora_copy_bytes=mm.LORA_COPY_BYTES_CPU,
               lora_mask_bytes=mm.LORA_MASK_BYTES_CPU, expanded_kv=False, cuda_context_gib=0.0, lora_r=16,
               head_triton=False)
    return {
        "probe": mm.estimate(shape, mm.Setting("sft", "lora", mm.Batch(1, **tokens), gradient_checkpointing=False,
                                               fused_head=False, **cpu)),
        "probe_full": mm.estimate(shape, mm.Setting("sft", "full", mm.Batch(1, **tokens),
                                                    gradient_checkpointing=False, fused_head=False, **cpu)),
        "sft": mm.estimate(shape, mm.Setting("sft", "lora", mm.Batch(args.sft_batch, **tokens),
                                             gradient_checkpointing=True, **cpu)),
        "rl": mm.estimate(shape, mm.Setting("rl", "lora", mm.Batch(args.rl_images * args.k, **tokens),
                                            gradient_checkpointing=True, generations=args.k, steps_per_generation=1,
                                            beta=0.01, **cpu)),
        "sample": mm.estimate(shape, mm.Setting("eval", "lora", mm.Batch(1, **tokens), **cpu)),
    }


def above_weights(e: mm.Estimate) -> float:
    """What a phase adds to a process that already holds the model: its peak less the base weights."""
    weights = e.persistent.get("weights (bf16)", 0.0)
    return e.peak - weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="text decoder layers (the 7B has 28)")
    parser.add_argument("--vision-depth", type=int, default=1, help="vision blocks (the 7B has 32)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights and compute")
    parser.add_argument("--steps", type=int, default=2, help="SFT steps (the first one includes warm-up)")
    parser.add_argument("--sft-batch", type=int, default=1, help="trajectories per SFT step (the recipe: 8 per GPU)")
    parser.add_argument("--rl-steps", type=int, default=1, help="RL steps (one generation each)")
    parser.add_argument("--rl-images", type=int, default=1, help="images per RL step (the recipe: 8 per GPU)")
    parser.add_argument("--k", type=int, default=4, help="completions per image")
    parser.add_argument("--completion-tokens", type=int, default=512)
    parser.add_argument("--phases", default="probe,sft,rl,sample", help="comma-separated subset to run")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON at the end")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed tensors back to the system: per-phase peaks
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)})

    wall = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
    logging.getLogger("aesr1").setLevel(logging.INFO)  # StepProgress's lines
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    compute_bytes = 2 if args.dtype == "bf16" else 4
    phases = set(args.phases.split(","))
    recipe = recipe_values()
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}", flush=True)

    results: dict = {"args": vars(args), "load_before": load}
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp), max(2, args.rl_images * args.rl_steps))
        processor, visual, text_tokens, grid, vocab = tokenizer_and_processor(Image.open(photos[0]))
        trajectory, completion = trajectory_of(processor.tokenizer, args.completion_tokens)
        print(f"tokenizer: byte-level BPE, {len(processor.tokenizer)} tokens (merges for {vocab}); policy prompt: "
              f"{visual} visual tokens (image_grid_thw {grid[0]}) + {text_tokens} other; SFT completion "
              f"{completion} tokens", flush=True)
        start = time.perf_counter()
        model, special = build_model(processor, args.layers, args.vision_depth, dtype)
        build_s = time.perf_counter() - start
        shape = dataclasses.replace(mm.QWEN25_VL_7B, layers=args.layers, vision_depth=args.vision_depth)
        counts = mm.param_counts(shape)
        measured_params = sum(p.numel() for p in model.parameters())
        full_params = full_7b_parameters(processor.tokenizer)
        preload()  # the trainers' libraries, so that no phase's memory counts their import
        baseline = rss()
        print(f"model: {measured_params / 1e6:.1f}M parameters ({args.layers} text layer(s), {args.vision_depth} "
              f"vision block(s), {args.dtype}), built in {build_s:.1f} s; RSS with the model {baseline / 2**30:.2f} "
              "GiB;"
              f" memory model's count {counts['total'] / 1e6:.1f}M; the full 7B on the meta device "
              f"{full_params / 1e9:.4f}B (memory model {mm.param_counts(mm.QWEN25_VL_7B)['total'] / 1e9:.4f}B)",
              flush=True)
        results.update(parameters=measured_params, parameters_model=counts, full_7b_parameters=full_params,
                       build_s=build_s, rss_with_model=baseline, visual_tokens=visual, prompt_other_tokens=text_tokens,
                       image_grid_thw=grid, completion_tokens=completion, tokenizer_size=len(processor.tokenizer))

        if "probe" in phases:
            for mode, key, what in (("lora", "probe", "forward + backward"), ("full", "probe_full", "forward")):
                print(f"probe: plain {what}, {mode}, saved tensors counted ...", flush=True)
                with machine(results.setdefault("machine", {}), key):
                    results[key] = probe(model, processor, photos[0], trajectory, mode)
                print(f"  {results[key]['seconds']:.1f} s; saved: " + ", ".join(
                    f"{k} {v / MiB:.0f} MiB" for k, v in results[key]["saved_bytes"].items()), flush=True)
        if "sft" in phases:
            print(f"sft: aesr1.policy.train.fit, LoRA, {args.steps} steps x {args.sft_batch} ...", flush=True)
            with machine(results.setdefault("machine", {}), "sft"):
                results["sft"] = sft(model, processor, photos, trajectory, args.steps, args.sft_batch,
                                     recipe.sft_checkpointing)
        if "rl" in phases:
            print(f"rl: aesr1.rl.rl.build_trainer (GRPO), LoRA, {args.rl_steps} step(s) x {args.rl_images} image(s) x "
                  f"K={args.k} x {args.completion_tokens} tokens ...", flush=True)
            with machine(results.setdefault("machine", {}), "rl"):
                results["rl"] = rl(model, processor, photos, args.rl_steps, args.rl_images, args.k,
                                   args.completion_tokens, recipe.beta, recipe.rl_checkpointing, special)
        if "sample" in phases:
            print(f"sample: aesr1.policy.generation.sample, 1 x {args.completion_tokens} tokens ...", flush=True)
            with machine(results.setdefault("machine", {}), "sample"):
                results["sample"] = sample_phase(model, processor, photos[0], args.completion_tokens)
    results["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["wall_s"] = time.perf_counter() - wall
    results["load_after"] = os.getloadavg()

    tokens = dict(visual_tokens=visual, prompt_text_tokens=text_tokens, completion_tokens=args.completion_tokens)
    estimates = reduced_estimates(shape, args, tokens, compute_bytes)
    print()
    print(measured_table(results, estimates, shape, compute_bytes, args))
    text, data = mm.report(recipe=dataclasses.replace(recipe, visual_tokens=visual, prompt_text_tokens=PROMPT_TOKENS))
    print()
    print("Memory model of the full 7B recipe per GPU (aesr1/doctor/memory.py):")
    print(text)
    results["memory_model_7b"] = data
    results["memory_model_reduced"] = {k: {"peak_above_weights": above_weights(e), "training_held": e.held,
                                           "training_transient": e.transient, "generation": e.generation,
                                           "info": e.info} for k, e in estimates.items()}
    print(f"\nwall time {results['wall_s']:.0f} s; load average after {results['load_after'][0]:.2f}")
    if args.json:
        print(json.dumps(results, indent=1, default=float))


def measured_table(r: dict, est: dict[str, mm.Estimate], shape: mm.Shape, c: int, args) -> str:
    """The measurements, each beside what the memory model says for this reduced model on this CPU."""
    gib = 2**30
    counts = r["parameters_model"]
    rows = [("parameters (reduced model)", f"{r['parameters'] / 1e6:.1f}M", f"{counts['total'] / 1e6:.1f}M"),
            ("  of which embed + lm_head", "", f"{(counts['embed'] + counts['lm_head']) / 1e6:.1f}M"),
            ("parameters (full 7B, meta device)", f"{r['full_7b_parameters'] / 1e9:.4f}B",
             f"{mm.param_counts(mm.QWEN25_VL_7B)['total'] / 1e9:.4f}B"),
            ("RSS with the model loaded", f"{r['rss_with_model'] / gib:.2f} GiB",
             f"{r['parameters'] * c / gib:.2f} GiB weights")]
    if "probe" in r:
        p = r["probe"]
        for key, label in (("probe", "LoRA"), ("probe_full", "full")):
            q = r[key]
            per_layer = q["saved_bytes"].get("text layers", 0) / args.layers / q["tokens"]
            rows.append((f"probe: saved per token per layer, {label}", f"{per_layer / 1024:.1f} KiB",
                         f"{est[key].info['activation bytes per token per layer'] / 1024:.1f} KiB"))
        vision_model = sum(v for k, v in est["probe"].held.items() if k.startswith("vision:"))  # none: frozen
        rows += [
            ("probe: ... x 28 layers x 917 tok x 32 seq (LoRA)",
             f"{p['saved_bytes'].get('text layers', 0) / args.layers / p['tokens'] * 28 * 917 * 32 / gib:.0f} GiB",
             "what RL's batch would keep without checkpointing"),
            (f"probe: vision saved ({p['patches']} patches)", f"{p['saved_bytes'].get('vision', 0) / MiB:.1f} MiB",
             f"{vision_model / MiB:.1f} MiB (a frozen tower runs without autograd)"),
            ("probe: LM head output (forward hook)", f"{p['logits_bytes'] / MiB:.0f} MiB {p['logits_dtype']}",
             f"{p['tokens'] * shape.vocab * c / MiB:.0f} MiB = 1 x {p['tokens']} x {shape.vocab} x {c}"),
            ("probe: fp32 logits saved by the loss", f"{p['saved_bytes'].get('head + loss', 0) / MiB:.0f} MiB",
             f"{est['probe'].info['naive logits B x S x V x 4'] / MiB:.0f} MiB = B x S x V x 4"),
            ("probe: peak RSS above start (LoRA fwd+bwd)", f"{p['peak_above_start'] / gib:.2f} GiB",
             f"{above_weights(est['probe']) / gib:.2f} GiB"),
            ("probe: seconds, LoRA fwd+bwd (forward)", f"{p['seconds']:.1f} ({p['forward_s']:.1f})", "")]
    if "sft" in r:
        s = r["sft"]
        steady = s["step_s"][1:] or s["step_s"]
        rows += [("sft: s per step (batch %d; after the first)" % s["batch"],
                  f"{np.mean(steady):.1f}", "steps " + ", ".join(f"{t:.1f}" for t in s["step_s"])),
                 ("sft: peak RSS above start", f"{s['peak_above_start'] / gib:.2f} GiB",
                  f"{above_weights(est['sft']) / gib:.2f} GiB"),
                 ("sft: LM head module calls (trl's fused head)", f"{s['lm_head_calls']}",
                  f"plain logits would be {est['sft'].info['naive logits B x S x V x 4'] / MiB:.0f} MiB B x S x V x 4")]
    if "rl" in r:
        q = r["rl"]
        tokens = max(q["completion_tokens"], 1)
        rows += [(f"rl: s per step ({q['images']} image x K={q['k']})", f"{np.mean(q['step_s']):.1f}",
                  f"generation {q['generation_s']:.1f} s = {q['generation_s'] / max(sum(q['step_s']), 1e-9):.0%}"),
                 ("rl: s per generated token (batch K)", f"{q['generation_s'] / tokens:.4f}",
                  f"{tokens} tokens, {q['generation_s'] / (tokens / q['k']):.3f} s per decoding step"),
                 ("rl: peak RSS above start", f"{q['peak_above_start'] / gib:.2f} GiB",
                  f"{above_weights(est['rl']) / gib:.2f} GiB"),
                 ("rl: largest LM head output (generation)", f"{q['logits_bytes_max'] / MiB:.1f} MiB",
                  f"{q['logits_shape_max']}, {q['lm_head_calls']} calls; plain loss logits would be "
                  f"{est['rl'].info['naive logits, completion only'] / MiB:.0f} MiB")]
    if "sample" in r:
        m = r["sample"]
        rows += [("sample: s per generated token (batch 1)", f"{m['per_token_s']:.4f}",
                  f"{m['tokens']} tokens in {m['seconds']:.1f} s"),
                 ("sample: largest logits (forward hook)", f"{m['logits_bytes_max'] / MiB:.1f} MiB",
                  f"{m['logits_shape_max']}, {m['lm_head_calls']} LM head calls"),
                 ("sample: peak RSS above start", f"{m['peak_above_start'] / gib:.2f} GiB",
                  f"{above_weights(est['sample']) / gib:.2f} GiB")]
    rows += [("peak RSS of the process (ru_maxrss)", f"{r['ru_maxrss'] / gib:.2f} GiB", "")]
    for name, m in r.get("machine", {}).items():
        rows.append((f"machine during {name}", f"{m['cpu_per_wall']:.2f} CPU-s/s",
                     f"ours of 2 cores; load {m['load_end']:.2f} at its end; {m['wall_s']:.0f} s"))
    width = max(len(a) for a, _, _ in rows) + 2
    lines = [f"{'measured on this CPU':<{width}}{'measured':>22}   memory model (this reduced model, CPU)"]
    lines += [f"{a:<{width}}{b:>22}   {m}" for a, b, m in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
