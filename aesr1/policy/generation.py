"""Loading a policy, sampling its completions, and the mean token entropy of what it samples.

One loading path for every model: a tiny backbone saved by ``aesr1 backbone`` and
Qwen2.5-VL-7B from the hub load through the same ``Auto*`` classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from aesr1.policy.data import prompt_messages


def load_policy(name_or_path: str, dtype: str = "auto", device: str | None = None):
    """(model, processor) from a local folder or a hub id; CPU float32 unless a GPU is present."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch.float32 if device == "cpu" and dtype == "auto" else dtype
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype).to(device)
    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    return model, processor


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits / T) over the positions where ``mask`` is 1.

    ``logits`` (batch, steps, vocab), ``mask`` (batch, steps). This is the paper's Tab. 3
    measure when the logits are those of the policy's own sampled tokens.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class Sampled:
    texts: list[str]  # len(images) * n, each image's n samples consecutive
    entropy: float  # mean token entropy over all sampled tokens
    tokens: int


@torch.no_grad()
def sample(model, processor, images: list, n: int = 1, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
           do_sample: bool = True, prompt_text: str | None = None) -> Sampled:
    """Generate ``n`` completions per image (a path or a PIL image) with the policy prompt; measure their entropy."""
    prompt = processor.apply_chat_template(prompt_messages(prompt_text), add_generation_prompt=True, tokenize=False)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    texts: list[str] = []
    entropy_sum, token_count = 0.0, 0
    model.eval()
    jobs = [image for image in images for _ in range(n)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        pixels = [(image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB") for image in chunk]
        inputs = processor(text=[prompt] * len(chunk), images=pixels, return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None, top_k=top_k if do_sample else None, eos_token_id=eos,
            pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        # tokens up to and including the first end-of-turn count; padding after it does not
        finished_before = torch.cumsum((new == eos).int(), dim=1) - (new == eos).int()
        mask = finished_before == 0
        logits = torch.stack(out.logits, dim=1)
        entropy = token_entropy(logits, mask, temperature if do_sample else 1.0)
        count = int(mask.sum())
        entropy_sum += float(entropy) * count
        token_count += count
        texts += processor.batch_decode(new, skip_special_tokens=True)
    return Sampled(texts, entropy_sum / token_count if token_count else math.nan, token_count)

