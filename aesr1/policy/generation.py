"""Loading a policy, sampling its completions, and the mean token entropy of what it samples.

One loading path for every model: a tiny backbone saved by ``aesr1 backbone`` and
Qwen2.5-VL-7B from the hub load through the same ``Auto*`` classes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from aesr1.images import load_image
from aesr1.policy.data import prompt_messages

log = logging.getLogger(__name__)

POINTER = "backbone.json"  # a backbone folder that names a hub model or a folder instead of holding one


def resolve_model(path: str | Path) -> str:
    """What to load for a model folder: itself, or the model its ``backbone.json`` points at."""
    pointer = Path(path) / POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())["name_or_path"]
    return str(path)


def processor_source(path: str | Path) -> str:
    """A model folder's own processor (it carries the pixel budget) if it has one, else its model's."""
    folder = Path(path)
    if any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        return str(folder)
    return resolve_model(path)


def load_policy(path: str | Path, training: str | None = None):
    """(model, processor) of a model folder (or a hub id).

    For inference (``training`` None) the model goes to this process's device, in bf16 on
    a GPU. For training (``training`` "full" or "lora") it stays on the CPU for the Trainer
    (or DeepSpeed) to place: full fine-tuning keeps fp32 master weights (the Trainer's bf16
    autocast computes in bf16; AdamW updating bf16 weights in place loses small steps), LoRA
    keeps the frozen base in bf16 on a GPU and peft makes the adapters fp32.
    """
    from aesr1.distributed import device as process_device

    on_gpu = torch.cuda.is_available()
    if training == "full" or not on_gpu:
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(resolve_model(path), dtype=dtype)
    model.generation_config = token_ids_only(model.generation_config)
    if training is None:
        model = model.to(process_device())
    return model, load_processor(path)


def token_ids_only(generation_config):
    """The model folder's generation config less its sampling fields, which come from params alone.

    transformers fills every field a caller leaves unset from the model's generation_config.json:
    a hub model's (Qwen2.5-VL-7B-Instruct: repetition_penalty 1.05, top_k 1, temperature 0.1) would
    then apply to some sampling paths and not others. Only the special token ids are kept.
    """
    from transformers import GenerationConfig

    dropped = {k: v for k, v in generation_config.to_diff_dict().items()
               if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")}
    if dropped:
        log.info("sampling fields of the model's generation_config.json left out (params set them): %s", dropped)
    return GenerationConfig(bos_token_id=generation_config.bos_token_id, eos_token_id=generation_config.eos_token_id,
                            pad_token_id=generation_config.pad_token_id)


def load_processor(path: str | Path):
    processor = AutoProcessor.from_pretrained(processor_source(path))
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    return processor


def entropies(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / T) along the last axis."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class Sampled:
    texts: list[str]  # len(images) * n, each image's n samples consecutive
    entropy: float  # mean token entropy over all sampled tokens
    tokens: int
    expected: np.ndarray  # per text, its expected score (:func:`expected_answer`); NaN where it has none


DIGITS = [str(d) for d in range(10)]
_ANSWER_START = re.compile(r"<answer>\s*")


def expected_answer(pieces: list[str], digit_logits: torch.Tensor) -> float:
    """The expected score under the policy's own distribution over the answer's digits.

    ``pieces`` are the decoded tokens of one completion and ``digit_logits`` (steps, 10) the
    logits of the ten digit tokens at each of its steps, so this costs no extra forward pass.
    The leading digit's 0-vs-1 odds give the weight of a score of 1; each decimal after "0."
    contributes its expected digit, read on the sampled path (a sampled first decimal
    conditions the second). The answer sampling's noise is gone; the critique's is not.
    NaN unless the answer is written as "0." followed by single-token digits (a sampled
    "1..." answer says nothing of the "0." branch): the caller then keeps the parsed score.
    """
    text = "".join(pieces)
    match = _ANSWER_START.search(text)
    if match is None:
        return math.nan
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    lead = int(np.searchsorted(starts, match.end()))
    if lead + 2 >= len(pieces) or starts[lead] != match.end() or pieces[lead] != "0" or pieces[lead + 1] != ".":
        return math.nan
    p_one = float(torch.softmax(digit_logits[lead, :2].float(), dim=-1)[1])
    decimals, place, position = 0.0, 0.1, lead + 2
    while position < len(pieces) and pieces[position] in DIGITS and place > 0.001:
        probs = torch.softmax(digit_logits[position].float(), dim=-1)
        decimals += place * float(probs @ torch.arange(10, dtype=probs.dtype))
        place /= 10
        position += 1
    if place > 0.05:  # no decimal digit at all
        return math.nan
    return p_one + (1.0 - p_one) * decimals


class StepLogits:
    """A forward hook on the LM head: per decoding step, the sampling entropy and the ten digit logits.

    It reads the raw logits of the new position as the model computes them and keeps
    (batch, 11) numbers per step, so memory does not grow with the vocabulary (stacking
    every step's logits would: 50 x 512 steps x 152K vocabulary is 15 GB in fp32).
    """

    def __init__(self, temperature: float, digit_ids: list[int]):
        self.temperature = temperature
        self.digit_ids = digit_ids
        self.entropy: list[torch.Tensor] = []
        self.digits: list[torch.Tensor] = []

    def __call__(self, module, inputs, output):
        last = output[:, -1, :]
        self.entropy.append(entropies(last, self.temperature).cpu())
        self.digits.append(last[:, self.digit_ids].float().cpu())


@torch.no_grad()
def sample(model, processor, images: list, n: int = 1, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
           do_sample: bool = True, prompt_text: str | None = None) -> Sampled:
    """Generate ``n`` completions per image (a path or a PIL image) with the policy prompt.

    Besides the texts: the mean token entropy of what was sampled (at the sampling
    temperature) and each completion's expected score. Launched on several processes, each
    samples its share of the images and every process gets all results, in input order.
    """
    from aesr1 import distributed

    jobs = [image for image in images for _ in range(n)]
    mine = distributed.shard(jobs)
    batches = None
    if distributed.launched():  # as many batches everywhere: ZeRO-3 gathers the weights in each forward, together
        batches = math.ceil(math.ceil(len(jobs) / distributed.world_size()) / batch_size)
    texts, expected, entropy_sum, token_count = _sample_here(
        model, processor, mine, jobs[:1], temperature, top_p, top_k, max_new_tokens, batch_size, do_sample,
        prompt_text, batches)
    if distributed.launched():
        parts = distributed.gather([(texts, expected, entropy_sum, token_count)])
        texts = [t for part in parts for t in part[0]]
        expected = [e for part in parts for e in part[1]]
        entropy_sum, token_count = sum(p[2] for p in parts), sum(p[3] for p in parts)
    return Sampled(texts, entropy_sum / token_count if token_count else math.nan, token_count, np.array(expected))


def end_of_turn_ids(model) -> list[int]:
    """The token ids that end the policy's turn: the model's generation config's ``eos_token_id`` (Qwen's
    ``<|im_end|>``, Gemma 3's ``<end_of_turn>``, SmolVLM's ``<end_of_utterance>``; a hub model may list several)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError("the model's generation_config has no eos_token_id: the end of its turn is unknown")
    return [eos] if isinstance(eos, int) else list(eos)


def _sample_here(model, processor, jobs, filler, temperature, top_p, top_k, max_new_tokens, batch_size, do_sample,
                 prompt_text, batches):
    prompt = processor.apply_chat_template(prompt_messages(prompt_text), add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    eos = end_of_turn_ids(model)
    pad = tokenizer.pad_token_id
    digit_ids = tokenizer.convert_tokens_to_ids(DIGITS)
    texts: list[str] = []
    expected: list[float] = []
    entropy_sum, token_count = 0.0, 0
    model.eval()
    starts = list(range(0, len(jobs), batch_size))
    if batches is not None:  # keep pace with the other processes: batches whose results are dropped
        starts += [None] * (batches - len(starts))
    for start in starts:
        chunk = jobs[start:start + batch_size] if start is not None else filler
        pixels = [load_image(image) for image in chunk]
        # one list of images per prompt: Gemma 3's and SmolVLM's processors pair them so (Qwen's flattens them)
        inputs = processor(text=[prompt] * len(chunk), images=[[image] for image in pixels], return_tensors="pt",
                           padding=True)
        inputs = inputs.to(model.device)
        steps = StepLogits(temperature if do_sample else 1.0, digit_ids)
        hook = model.get_output_embeddings().register_forward_hook(steps)
        try:  # every sampling field set here (neutral when greedy), none left to the model folder's defaults
            sequences = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature if do_sample else 1.0, top_p=top_p if do_sample else 1.0,
                top_k=top_k if do_sample else 0, min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                eos_token_id=eos, pad_token_id=pad)
        finally:
            hook.remove()
        if start is None:
            continue
        new = sequences[:, inputs["input_ids"].shape[1]:].cpu()
        # tokens up to and including the first end-of-turn count; padding after it does not
        ended = torch.isin(new, torch.tensor(eos)).int()
        finished_before = torch.cumsum(ended, dim=1) - ended
        mask = finished_before == 0
        step_entropy = torch.stack(steps.entropy, 1)[:, :new.shape[1]]
        digit_logits = torch.stack(steps.digits, 1)[:, :new.shape[1]]
        count = int(mask.sum())
        entropy_sum += float((step_entropy * mask).sum())
        token_count += count
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, ids in enumerate(new.tolist()):
            length = int(mask[row].sum())
            pieces = tokenizer.batch_decode([[t] for t in ids[:length]], skip_special_tokens=True)
            expected.append(expected_answer(pieces, digit_logits[row, :length]))
    return texts, expected, entropy_sum, token_count
