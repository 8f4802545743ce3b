"""The tiny Qwen2.5-VL: the paper's model class from a small config, with its tokenizer and processor.

The tokenizer is a byte-level BPE trained offline on the project's own wording (Qwen's
pre-tokenizer, special tokens and chat template); the processor is Qwen2-VL's image and
video processors at the model's patch size.
"""

from __future__ import annotations

import json
from importlib import resources

from aesr1.aescot import teacher_analytic
from aesr1.aescot.claims import CLAIMS
from aesr1.backbone.pretrain import DESCRIBE_PROMPT, description_phrases
from aesr1.config import config
from aesr1.policy.data import policy_prompt
from aesr1.trajectory import make_trajectory

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


@config
class TinyModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    vision_depth: int = 2
    vision_hidden_size: int = 96
    vision_heads: int = 4
    patch_size: int = 8
    image_size: int = 64  # the descriptive pretraining renders its images at image_size x image_size


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: prompts, descriptions' and critiques' wording, scores."""
    texts = [policy_prompt(), DESCRIBE_PROMPT, "system\nYou are a helpful assistant.\nuser\nassistant\n"]
    for claim in CLAIMS:
        texts += [p.format(light_from=d) for p in claim.phrases for d in ("left", "right", "top", "bottom")]
    texts += teacher_analytic.phrase_bank()
    texts += [make_trajectory("x", s / 100) for s in range(101)]
    texts += description_phrases()
    return texts * 3


def build_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def build_tiny(cfg: TinyModelConfig, seed: int = 0):
    """A randomly initialised Qwen2.5-VL and its processor, from config; the processor reads every image
    within the ``image_size`` x ``image_size`` pixels the model is trained on.

    The initialisation is seeded (torch's default generator starts from a different seed in
    every process, and an unseeded build made each pipeline run train a different model), on a
    forked generator so the caller's random state is left as it was.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(cfg.vocab_size)
    chat_template = resources.files("trl").joinpath("chat_templates", "qwen2_5_vl.jinja").read_text()
    token = (2 * cfg.patch_size) ** 2  # the pixels of one visual token (2 x 2 patches merged)
    # at most the pixels of its training images (the backbone stage saves it with pixel_budget's)
    image_processor = Qwen2VLImageProcessor(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2,
                                            min_pixels=token, max_pixels=cfg.image_size ** 2)
    video_processor = Qwen2VLVideoProcessor(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=chat_template)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = cfg.hidden_size // cfg.heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    model_config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
            num_heads=cfg.vision_heads, patch_size=cfg.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=cfg.hidden_size, window_size=cfg.patch_size * 4,
            fullatt_block_indexes=list(range(1, cfg.vision_depth, 2))),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(model_config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor
