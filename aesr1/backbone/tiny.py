"""The tiny testbed: a VLM family's model class from a small config, with its tokenizer and processor.

``family`` is a transformers ``model_type`` (:data:`BUILDERS`); the default, ``qwen2_5_vl``, is the paper's
model class. The tokenizer is a byte-level BPE trained offline on the project's own wording (Qwen's
pre-tokenizer), carrying the family's special tokens; the processor is the family's own, built offline at the
model's patch size, with trl's chat template for the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aesr1.aescot import teacher_analytic
from aesr1.aescot.claims import CLAIMS
from aesr1.backbone.pretrain import DESCRIBE_PROMPT, description_phrases
from aesr1.config import config
from aesr1.policy.data import policy_prompt
from aesr1.policy.families import family, trl_chat_template
from aesr1.trajectory import make_trajectory


@dataclass(frozen=True)
class FamilyTokens:
    """A family's special tokens, as its chat template and processor use them: ``special`` in vocabulary order
    (the first is the padding token), the roles of some, and ``named`` ones its processor reads off the
    tokenizer as attributes (Gemma 3's ``boi_token``)."""

    special: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    named: dict = field(default_factory=dict)


QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>")
FAMILY_TOKENS = {
    "qwen2_5_vl": FamilyTokens(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>"),
    "qwen3_vl": FamilyTokens(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>"),
    "qwen3_5": FamilyTokens(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>"),
    "gemma3": FamilyTokens(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                            "<end_of_image>", "<image_soft_token>"), eos="<end_of_turn>", pad="<pad>", bos="<bos>",
                           named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"}),
    "smolvlm": FamilyTokens(("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                             "<image>", "<global-img>",
                             *(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5))),
                            eos="<end_of_utterance>", pad="<|endoftext|>", bos="<|im_start|>"),
}


@config
class TinyModelConfig:
    family: str = "qwen2_5_vl"  # a transformers model_type: qwen2_5_vl, qwen3_vl, qwen3_5, gemma3, smolvlm
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

    def __post_init__(self):
        if self.family not in BUILDERS:
            raise ValueError(f"VLM family {self.family!r} has no tiny testbed (one of: {', '.join(BUILDERS)})")


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: prompts, descriptions' and critiques' wording, scores."""
    texts = [policy_prompt(), DESCRIBE_PROMPT, "system\nYou are a helpful assistant.\nuser\nassistant\n"]
    for claim in CLAIMS:
        texts += [p.format(light_from=d) for p in claim.phrases for d in ("left", "right", "top", "bottom")]
    texts += teacher_analytic.phrase_bank()
    texts += [make_trajectory("x", s / 100) for s in range(101)]
    texts += description_phrases()
    return texts * 3


def build_tokenizer(vocab_size: int, tokens: FamilyTokens = FAMILY_TOKENS["qwen2_5_vl"]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(tokens.special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token=tokens.eos, pad_token=tokens.pad,
                               bos_token=tokens.bos, unk_token=None, extra_special_tokens=tokens.named or None)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in tokens.special if t != tokens.pad]})
    return tokenizer


def build_tiny(cfg: TinyModelConfig, seed: int = 0):
    """A randomly initialised model of ``cfg.family`` and its processor, from config; the processor reads every
    image within the ``image_size`` x ``image_size`` pixels the model is trained on.

    The initialisation is seeded (torch's default generator starts from a different seed in
    every process, and an unseeded build made each pipeline run train a different model), on a
    forked generator so the caller's random state is left as it was.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    build = BUILDERS[cfg.family]
    tokens = FAMILY_TOKENS[cfg.family]
    tokenizer = build_tokenizer(cfg.vocab_size, tokens)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                max_position_embeddings=4096, tie_word_embeddings=True,
                bos_token_id=ids(tokens.bos) if tokens.bos else None,
                eos_token_id=ids(tokens.eos), pad_token_id=ids(tokens.pad))
    chat_template = trl_chat_template(family(cfg.family).chat_template)
    model_config, processor = build(cfg, tokenizer, text, chat_template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(model_config)
    model.generation_config.eos_token_id = ids(tokens.eos)
    model.generation_config.pad_token_id = ids(tokens.pad)
    return model, processor


def mrope_section(rotary_dim: int) -> list[int]:
    """Qwen's multimodal rope split of ``rotary_dim`` / 2 frequencies over time, height and width."""
    half = rotary_dim // 2
    return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def qwen_vision(cfg: TinyModelConfig) -> dict:
    return dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size,
                intermediate_size=2 * cfg.vision_hidden_size,
                num_heads=cfg.vision_heads, patch_size=cfg.patch_size, spatial_merge_size=2, temporal_patch_size=2,
                out_hidden_size=cfg.hidden_size)


def qwen_processor(cfg: TinyModelConfig, tokenizer, chat_template: str, processor_class, video_class):
    from transformers import Qwen2VLImageProcessor

    token = (2 * cfg.patch_size) ** 2  # the pixels of one visual token (2 x 2 patches merged)
    # at most the pixels of its training images (the backbone stage saves it with pixel_budget's)
    image_processor = Qwen2VLImageProcessor(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2,
                                            min_pixels=token, max_pixels=cfg.image_size ** 2)
    video_processor = video_class(patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                           chat_template=chat_template)


def qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_qwen2_5_vl(cfg, tokenizer, text, chat_template):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(cfg.hidden_size // cfg.heads)}
    config = Qwen2_5_VLConfig(
        text_config={**text, "bos_token_id": None, "rope_parameters": rope},
        vision_config={**qwen_vision(cfg), "window_size": cfg.patch_size * 4,
                       "fullatt_block_indexes": list(range(1, cfg.vision_depth, 2))},
        tie_word_embeddings=True, **qwen_token_ids(tokenizer))
    return config, qwen_processor(cfg, tokenizer, chat_template, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor)


def build_qwen3_vl(cfg, tokenizer, text, chat_template):
    from transformers import Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(cfg.hidden_size // cfg.heads),
            "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config={**text, "bos_token_id": None, "head_dim": cfg.hidden_size // cfg.heads, "rope_parameters": rope},
        vision_config={**qwen_vision(cfg), "num_position_embeddings": (cfg.image_size // cfg.patch_size) ** 2,
                       "deepstack_visual_indexes": [0]},
        tie_word_embeddings=True, **qwen_token_ids(tokenizer))
    return config, qwen_processor(cfg, tokenizer, chat_template, Qwen3VLProcessor, Qwen3VLVideoProcessor)


def build_qwen3_5(cfg, tokenizer, text, chat_template):
    """Qwen3.5: Qwen3-VL's tower before a hybrid decoder (three linear-attention layers to one full, the last
    layer full at any depth: a cache of linear-attention layers alone has no sequence length to generate with)."""
    from transformers import Qwen3_5Config, Qwen3VLProcessor, Qwen3VLVideoProcessor

    head_dim = cfg.hidden_size // cfg.heads
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
            "mrope_section": mrope_section(head_dim // 4), "mrope_interleaved": True}
    config = Qwen3_5Config(
        text_config={**text, "bos_token_id": None, "head_dim": head_dim, "rope_parameters": rope,
                     "layer_types": ["full_attention" if (i + 1) % 4 == 0 or i == cfg.layers - 1 else "linear_attention"
                                     for i in range(cfg.layers)],
                     "linear_num_key_heads": cfg.kv_heads, "linear_num_value_heads": cfg.heads,
                     "linear_key_head_dim": head_dim, "linear_value_head_dim": head_dim},
        vision_config={**qwen_vision(cfg), "num_position_embeddings": (cfg.image_size // cfg.patch_size) ** 2},
        tie_word_embeddings=True, **qwen_token_ids(tokenizer))
    return config, qwen_processor(cfg, tokenizer, chat_template, Qwen3VLProcessor, Qwen3VLVideoProcessor)


def siglip_vision(cfg: TinyModelConfig) -> dict:
    return dict(hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
                num_hidden_layers=cfg.vision_depth, num_attention_heads=cfg.vision_heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size)


def build_gemma3(cfg, tokenizer, text, chat_template):
    """Gemma 3: a SigLIP tower read at ``image_size`` square, pooled to one token per 2 x 2 patches."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    ids = tokenizer.convert_tokens_to_ids
    tokens = (cfg.image_size // cfg.patch_size // 2) ** 2
    config = Gemma3Config(
        text_config={**text, "head_dim": cfg.hidden_size // cfg.heads,
                     "query_pre_attn_scalar": cfg.hidden_size // cfg.heads, "sliding_window": 512},
        vision_config={**siglip_vision(cfg), "model_type": "siglip_vision_model"}, mm_tokens_per_image=tokens,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True)
    image_processor = Gemma3ImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                           do_pan_and_scan=False)
    return config, Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                                   image_seq_length=tokens)


def build_smolvlm(cfg, tokenizer, text, chat_template):
    """SmolVLM: a SigLIP tower on ``image_size`` tiles, pixel-shuffled 2 x 2 into the connector."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    scale = 2
    config = SmolVLMConfig(text_config={**text, "model_type": "llama"},
                           vision_config={**siglip_vision(cfg)}, scale_factor=scale,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    tile = {"longest_edge": cfg.image_size}
    image_processor = SmolVLMImageProcessor(size=dict(tile), max_image_size=dict(tile),
                                            do_image_splitting=True)
    video_processor = SmolVLMVideoProcessor(size=dict(tile), max_image_size=dict(tile))
    return config, SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=chat_template,
                                    image_seq_len=(cfg.image_size // cfg.patch_size // scale) ** 2)


BUILDERS = {"qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl, "qwen3_5": build_qwen3_5,
            "gemma3": build_gemma3, "smolvlm": build_smolvlm}
