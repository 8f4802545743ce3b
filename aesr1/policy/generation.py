"""Loading a policy, sampling its completions, and the mean token entropy of what it samples.

One loading path for every model: a tiny backbone saved by ``aesr1 backbone`` and
Qwen2.5-VL-7B from the hub load through the same ``Auto*`` classes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from aesr1.policy.data import prompt_messages

POINTER = "backbone.json"  # a backbone folder that names a hub model or a folder instead of holding one


def resolve_model(path: str | Path) -> str:
    """What to load for a model folder: itself, or the model its ``backbone.json`` points at."""
    pointer = Path(path) / POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())["name_or_path"]
    return str(path)


def load_policy(name_or_path: str, dtype: str = "auto", device: str | None = None):
    """(model, processor) from a local folder or a hub id; CPU float32 unless a GPU is present."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch.float32 if device == "cpu" and dtype == "auto" else dtype
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype).to(device)
    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    return model, processor


def entropies(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / T) along the last axis."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits / T) over the positions where ``mask`` is 1.

    ``logits`` (batch, steps, vocab), ``mask`` (batch, steps). This is the paper's Tab. 3
    measure when the logits are those of the policy's own sampled tokens.
    """
    entropy = entropies(logits, temperature)
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp(min=1)


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


@torch.no_grad()
def sample(model, processor, images: list, n: int = 1, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
           do_sample: bool = True, prompt_text: str | None = None) -> Sampled:
    """Generate ``n`` completions per image (a path or a PIL image) with the policy prompt.

    Besides the texts: the mean token entropy of what was sampled (at the sampling
    temperature) and each completion's expected score. Each step's logits are reduced
    (entropy, the ten digit logits) one step at a time, never stacked over the vocabulary.
    """
    prompt = processor.apply_chat_template(prompt_messages(prompt_text), add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id
    digit_ids = tokenizer.convert_tokens_to_ids(DIGITS)
    texts: list[str] = []
    expected: list[float] = []
    entropy_sum, token_count = 0.0, 0
    model.eval()
    jobs = [image for image in images for _ in range(n)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        pixels = [(image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB") for image in chunk]
        inputs = processor(text=[prompt] * len(chunk), images=pixels, return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None, top_k=top_k if do_sample else None, eos_token_id=eos,
            pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        # tokens up to and including the first end-of-turn count; padding after it does not
        finished_before = torch.cumsum((new == eos).int(), dim=1) - (new == eos).int()
        mask = finished_before == 0
        step_entropy = torch.stack([entropies(step, temperature if do_sample else 1.0) for step in out.logits], 1)
        digit_logits = torch.stack([step[:, digit_ids] for step in out.logits], dim=1).cpu()
        count = int(mask.sum())
        entropy_sum += float((step_entropy * mask).sum())
        token_count += count
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, ids in enumerate(new.tolist()):
            length = int(mask[row].sum())
            pieces = tokenizer.batch_decode([[t] for t in ids[:length]], skip_special_tokens=True)
            expected.append(expected_answer(pieces, digit_logits[row, :length]))
        del out
    return Sampled(texts, entropy_sum / token_count if token_count else math.nan, token_count, np.array(expected))
