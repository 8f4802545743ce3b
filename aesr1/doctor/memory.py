"""The memory model: bytes per GPU of a Qwen2.5-VL run (SFT, RAPO, evaluation sampling; full or LoRA; ZeRO-3 or not).

Pure arithmetic, no torch: every assumption is a named constant below with a one-line reason.
``aesr1 doctor --plan`` (:mod:`aesr1.doctor.plan`) applies it to a recipe's values on given GPUs;
``benchmarks/real_shape.py`` measures the same terms on a reduced-depth model at the 7B's widths
and prints them beside this model's figures for that reduced model, then :func:`report`.

How a peak is assembled (all in bytes per GPU):

- persistent: the weights, gradients, fp32 master, Adam moments and the reference model, each
  divided over the GPUs under ZeRO-3 (whole on every GPU without it), plus the CUDA context;
  under ZeRO-Offload (``offload_optimizer``) the gradients, master and moments are in host
  memory instead (:attr:`Estimate.host`), and the GPU keeps the bf16 weights;
- training phase: what the backward holds throughout (ZeRO-3's gathered working set and reduce
  buckets, the checkpointed layer inputs: one hidden vector per token per layer, the vision
  tower's, the merger's and the LM head's saved tensors, the batch's inputs), plus the largest
  of the transients that come one after another (the LM head's backward: trl's chunked log-prob
  kernel, no full logits; one layer recomputed with its gradient buffers; one vision block
  likewise; the frozen vision tower's forward);
- generation phase (RL only): under ZeRO-3 trl gathers the whole bf16 model on every GPU for
  ``generate`` (``ds3_gather_for_generation``; off: one layer at a time, as in training), plus
  the KV cache of the generation batch and the prefill's transient;
- peak = persistent + max(training phase, generation phase).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GiB = 2**30

# ---------------------------------------------------------------- bytes per parameter (ZeRO-3, bf16 mixed precision)
TRAIN_WEIGHT_BYTES = 2  # the bf16 copy of a trainable parameter that forward and backward run on (partitioned)
TRAIN_GRAD_BYTES = 4  # its gradient partition, counted in fp32 (DeepSpeed reduces bf16, casts to fp32 for the step)
MASTER_BYTES = 4  # the fp32 master copy the optimizer updates
ADAM_BYTES = 8  # AdamW's two fp32 moments
FROZEN_WEIGHT_BYTES = 2  # a frozen parameter (the vision tower; LoRA's whole base): its bf16 copy only
REF_WEIGHT_BYTES = 2  # trl's reference model (full mode, beta > 0): a second bf16 model, partitioned by ZeRO-3
TRAINABLE_BYTES = TRAIN_WEIGHT_BYTES + TRAIN_GRAD_BYTES + MASTER_BYTES + ADAM_BYTES  # 18 per trainable parameter

# ---------------------------------------------------------------- ZeRO-3 working set (accelerate's "auto" buckets)
PREFETCH_BUCKET = 0.9  # stage3_prefetch_bucket_size = 0.9 * hidden^2 parameters gathered ahead of use
REDUCE_BUCKET = 1.0  # reduce_bucket_size = hidden^2 gradient elements per reduce-scatter bucket
REDUCE_BUCKET_COPIES = 2  # the bucket being reduced and the one filling (bf16 each)
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers: outside PyTorch's allocator

# ---------------------------------------------------------------- activations (bytes per element of what is saved)
NORM_INPUT_BYTES = 4  # Qwen2RMSNorm upcasts its input to fp32 and saves that copy (pow and mul backward)
NORM_STAT_BYTES = 4  # ... and its fp32 rsqrt, one per token
LSE_BYTES = 4  # SDPA's fp32 logsumexp, one per token and head
LORA_COPY_BYTES_GPU = 2  # peft's lora_dropout output saved by lora_A: bf16 under DeepSpeed bf16 (adapters cast to bf16)
LORA_MASK_BYTES_GPU = 1  # CUDA's fused dropout saves a bool mask
LORA_COPY_BYTES_CPU = 4  # on this CPU: fp32 adapters on a bf16 base, no autocast: peft casts the input to fp32
LORA_MASK_BYTES_CPU = 4  # the CPU dropout multiplies by a saved fp32 noise tensor instead of a bool mask
EXPANDED_KV_7B = True  # padded batches pass a mask, so transformers' sdpa repeat_kv's K and V to all heads first
CHECKPOINT_INPUT_COPIES = 1  # gradient checkpointing keeps each layer's input (one hidden vector per token) only
BACKWARD_INTERMEDIATE_TENSORS = 3  # MLP backward: grads of the down_proj input, SiLU output and up output at once
BACKWARD_HIDDEN_TENSORS = 4  # hidden-width grads at once: residual stream, layer output, the norm's fp32 pair

# ---------------------------------------------------------------- the LM head (trl's fused chunked log-prob kernel)
TRL_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE: tokens per projection tile
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns per tile
HEAD_SAVED_PER_TOKEN = 16  # fp32 log_z and entropy, int64 target, per scored token
HEAD_GRAD_HIDDEN_BYTES = 4  # the backward accumulates the hidden states' gradient in fp32
HEAD_WEIGHT_GRAD_BYTES = 4 + 2  # full mode: the lm_head gradient in fp32, then its bf16 cast (gathered, whole)
# trl's torch fallback where Triton is missing (this CPU): every position is scored, not only the completion's, and
# the backward holds fp32 tile-sized temporaries (y, z, log_p, p, grad, the target mask as float, a product):
# measured 7-9 (with the entropy's gradient) by projecting 3664 x 3584 hidden states on 152,064 rows
TRL_TORCH_TILE_FP32_COPIES = 7
NAIVE_LOGIT_BYTES = 4  # a plain forward's fp32 logits for the loss: batch x sequence x vocabulary x 4
NAIVE_LOGIT_COPIES = 3  # fp32 logit-sized tensors alive in a plain loss's backward: log-softmax out, its grad, logits'

# ---------------------------------------------------------------- generation (trl with transformers' generate)
KV_BYTES = 2  # bf16 keys and values
SAMPLING_BYTES_PER_LOGIT = 4 + 4 + 8 + 4  # per row and step: fp32 logits, softmax, int64 sort indices, sorted values

# ---------------------------------------------------------------- GPUs and disk
GPU_GIB = {"80GB": 79.6, "141GB": 140.4}  # nvidia-smi's totals: H100 80 GB (81,559 MiB), H200 141 GB (143,771 MiB)
HEADROOM = 0.10  # keep 10% free for the allocator's fragmentation and spikes not modelled
CHECKPOINTS_AT_ONCE = 2  # the Trainer writes the next checkpoint before it deletes the last (save_total_limit 1)
SAVED_POLICY_BYTES = FROZEN_WEIGHT_BYTES  # a saved policy (sft, rl): bf16 safetensors


@dataclass(frozen=True)
class Shape:
    """A Qwen VLM's widths and depths: Qwen2.5-VL's by default; Qwen3-VL's text layers have no q/k/v bias but
    q and k RMSNorms, its tower LayerNorms, a GELU MLP (not gated), learned position embeddings and ``deepstack``
    extra mergers (:data:`QWEN3_VL_8B`)."""

    hidden: int = 3584
    intermediate: int = 18944
    layers: int = 28
    heads: int = 28
    kv_heads: int = 4
    vocab: int = 152_064
    tied: bool = False
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    vision_heads: int = 16
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    qkv_bias: bool = True
    qk_norm: bool = False
    vision_gated: bool = True  # Qwen2.5-VL's SwiGLU vision MLP with RMSNorms; False: Qwen3-VL's GELU with LayerNorms
    vision_positions: int = 0  # learned position embeddings of the tower (Qwen3-VL: 2304)
    deepstack: int = 0  # mergers of intermediate vision blocks' features (Qwen3-VL: 3)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


QWEN25_VL_7B = Shape()  # Qwen/Qwen2.5-VL-7B-Instruct's config.json (8,292,166,656 parameters on the meta device)
QWEN25_VL_3B = Shape(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151_936,
                     tied=True)  # Qwen/Qwen2.5-VL-3B-Instruct's config.json: the same vision tower, a tied head
QWEN3_VL = dict(qkv_bias=False, qk_norm=True, vision_gated=False, vision_positions=2304, deepstack=3, patch=16,
                vision_heads=16)
# Qwen/Qwen3-VL-8B-Instruct's published config (text: Qwen3-8B's; vision: 27 blocks of 1152, deepstack 8/16/24)
QWEN3_VL_8B = Shape(hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, vocab=151_936, tied=False,
                    vision_depth=27, vision_hidden=1152, vision_intermediate=4304, **QWEN3_VL)
# Qwen/Qwen3-VL-2B-Instruct's (text: Qwen3-1.7B's, tied; vision: 24 blocks of 1024, deepstack 5/11/17)
QWEN3_VL_2B = Shape(hidden=2048, intermediate=6144, layers=28, heads=16, kv_heads=8, vocab=151_936, tied=True,
                    vision_depth=24, vision_hidden=1024, vision_intermediate=4096, **QWEN3_VL)


def text_layer_params(s: Shape) -> int:
    """One decoder layer: q/k/v (with bias: Qwen2.5), o without, q/k RMSNorms (Qwen3), the SwiGLU MLP, two
    RMSNorms."""
    attention = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_dim
    attention += (s.hidden + 2 * s.kv_dim if s.qkv_bias else 0) + (2 * s.head_dim if s.qk_norm else 0)
    return attention + 3 * s.hidden * s.intermediate + 2 * s.hidden


def vision_block_params(s: Shape) -> int:
    """Two norms (RMS, or Layer with bias), qkv and proj with bias, the MLP (gated: gate and up, then down)."""
    h, i = s.vision_hidden, s.vision_intermediate
    if s.vision_gated:
        return 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
    return 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)


def param_counts(s: Shape) -> dict[str, int]:
    """Parameters by part; ``vision`` includes the patch embedding and the merger(s) (the projector)."""
    merged = s.vision_hidden * s.merge**2
    mlp = merged * merged + merged + merged * s.hidden + s.hidden  # a merger's two layers
    if s.vision_gated:  # Qwen2.5-VL: no patch bias, the merger's RMSNorm
        embedding, merger = 3 * s.temporal * s.patch**2 * s.vision_hidden, s.vision_hidden + mlp
    else:  # Qwen3-VL: a patch bias, position embeddings, LayerNorms; deepstack mergers normalise after merging
        embedding = (3 * s.temporal * s.patch**2 + 1 + s.vision_positions) * s.vision_hidden
        merger = 2 * s.vision_hidden + mlp + s.deepstack * (2 * merged + mlp)
    vision = embedding + s.vision_depth * vision_block_params(s) + merger
    counts = {"embed": s.vocab * s.hidden, "lm_head": 0 if s.tied else s.vocab * s.hidden,
              "text_layers": s.layers * text_layer_params(s), "final_norm": s.hidden, "vision": vision}
    counts["text"] = counts["embed"] + counts["lm_head"] + counts["text_layers"] + counts["final_norm"]
    counts["total"] = counts["text"] + vision
    return counts


def vision_block_activation_bytes(s: Shape, compute_bytes: int) -> float:
    """Bytes saved per patch in one frozen vision block whose input carries a grad: 2 RMSNorms' fp32 inputs and
    rsqrt, q and k after the rotary (own tensors), the packed qkv output (kept by v, a view of it), the
    attention output and logsumexp, the MLP's gate, SiLU and up outputs."""
    h, c = s.vision_hidden, compute_bytes
    return 2 * (NORM_INPUT_BYTES * h + NORM_STAT_BYTES) + 2 * c * h + 3 * c * h + c * h + LSE_BYTES * s.vision_heads \
        + 3 * c * s.vision_intermediate


def merger_activation_bytes(s: Shape, compute_bytes: int) -> float:
    """Per patch, once per tower: the merger's RMSNorm fp32 input and rsqrt, its GELU's input (merged width, a
    quarter per patch), and the rotary cos and sin (fp32, one head's width each) every block shares."""
    rotary = 2 * (s.vision_hidden // s.vision_heads) * 4
    return NORM_INPUT_BYTES * s.vision_hidden + NORM_STAT_BYTES + compute_bytes * s.vision_hidden + rotary


def lora_params(s: Shape, r: int) -> int:
    """LoRA A and B on q, k, v, o, gate, up, down of every decoder layer (aesr1.policy.families.LORA_PROJECTIONS)."""
    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return s.layers * per_layer


def layer_activation_bytes(s: Shape, compute_bytes: int, lora: bool, lora_copy_bytes: int, lora_mask_bytes: int,
                           expanded_kv: bool) -> float:
    """Bytes autograd saves per token in one decoder layer's forward, without checkpointing.

    Derived op by op (what each op's backward needs; a frozen weight's input is not saved):
    2 RMSNorms: fp32 input + rsqrt, and the normalised input if the norm weight trains;
    q/k/v: their input if they train; SDPA: q, k, v (expanded to all heads when a mask is passed),
    output, logsumexp; o_proj's input is SDPA's output itself (the fused kernels write it token-major,
    so the transpose's ``contiguous`` copies nothing: measured); MLP: its input if it trains,
    gate output (SiLU), SiLU and up outputs (their product), down_proj's input if it trains;
    LoRA: per adapted module, its dropout's output (saved by lora_A) and the dropout's mask.
    """
    h, kv, i, c = s.hidden, s.kv_dim, s.intermediate, compute_bytes
    full = not lora
    norms = 2 * (NORM_INPUT_BYTES * h + NORM_STAT_BYTES + (c * h if full else 0))
    kv_width = h if expanded_kv else kv
    attention = c * h + 2 * c * kv_width + c * h + LSE_BYTES * s.heads  # q, k, v, the output, its logsumexp
    projection_inputs = c * h if full else 0  # the first norm's output, saved by q/k/v (one tensor)
    mlp = (c * h if full else 0) + 3 * c * i + (c * i if full else 0)
    adapters = (6 * h + i) * (lora_copy_bytes + lora_mask_bytes) if lora else 0  # q, k, v, o, gate, up: h wide; down: i
    return norms + attention + projection_inputs + mlp + adapters


def backward_transient_bytes(s: Shape, compute_bytes: int) -> float:
    """Per token: the gradient buffers alive while one layer back-propagates."""
    return compute_bytes * (BACKWARD_INTERMEDIATE_TENSORS * s.intermediate + BACKWARD_HIDDEN_TENSORS * s.hidden)


def vision_transient_bytes(s: Shape, compute_bytes: int) -> float:
    """Per patch: one vision block's live tensors in the frozen tower's no-grad forward (qkv, attention output,
    residual, gate/up/act)."""
    return compute_bytes * (3 * s.vision_hidden + 2 * s.vision_hidden + 3 * s.vision_intermediate)


@dataclass(frozen=True)
class Batch:
    """One micro-batch per GPU: sequences of prompt (visual + text) and completion tokens."""

    sequences: int
    visual_tokens: int = 315
    prompt_text_tokens: int = 90
    completion_tokens: int = 512
    images: int | None = None  # images through the vision tower (None: one per sequence)

    @property
    def tokens_per_sequence(self) -> int:
        return self.visual_tokens + self.prompt_text_tokens + self.completion_tokens

    @property
    def tokens(self) -> int:
        return self.sequences * self.tokens_per_sequence

    @property
    def scored_tokens(self) -> int:  # the loss falls on the completion only; trl's fused head scores those
        return self.sequences * self.completion_tokens


@dataclass(frozen=True)
class Setting:
    """Everything a per-GPU estimate depends on besides the shape."""

    stage: str  # "sft" | "rl" | "eval"
    mode: str  # "full" | "lora"
    batch: Batch
    gpus: int = 8
    zero3: bool = True
    gradient_checkpointing: bool = True
    lora_r: int = 16
    freeze_vision: bool = True
    beta: float = 0.01  # RL's KL weight: a reference model in full mode when > 0
    generations: int = 1  # sequences per image in a batch (RL: K)
    steps_per_generation: int = 1  # RL: trl generates this many micro-batches at once (= grad_accum)
    compute_bytes: int = 2  # bf16
    lora_copy_bytes: int = LORA_COPY_BYTES_GPU
    lora_mask_bytes: int = LORA_MASK_BYTES_GPU
    expanded_kv: bool = EXPANDED_KV_7B
    fused_head: bool = True  # trl's fused LM head (this environment's trl): log-probs in tiles, no full logits
    head_triton: bool = True  # a GPU: trl's Triton kernel scores the completion only, no fp32 tile temporaries
    gather_for_generation: bool = True  # trl's ds3_gather_for_generation
    offload: bool = False  # DeepSpeed's offload_optimizer to the CPU: gradients, master and moments in host memory
    cuda_context_gib: float = CUDA_CONTEXT_GIB


@dataclass
class Estimate:
    persistent: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # per process, in host memory (ZeRO-Offload): not on the GPU
    held: dict[str, float] = field(default_factory=dict)  # training: alive through the whole backward
    transient: dict[str, float] = field(default_factory=dict)  # training: one after another, the largest counts
    generation: dict[str, float] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)  # not added to the peak: references and per-unit figures

    @property
    def training(self) -> float:
        return sum(self.held.values()) + max(self.transient.values(), default=0.0) if self.held else 0.0

    @property
    def peak(self) -> float:
        return sum(self.persistent.values()) + max(self.training, sum(self.generation.values()))


def estimate(s: Shape, st: Setting) -> Estimate:
    """Bytes per GPU of ``st`` on a model of shape ``s`` (see the module docstring for how they combine)."""
    counts = param_counts(s)
    shards = st.gpus if st.zero3 else 1
    c = st.compute_bytes
    trainable_base = 0 if st.mode == "lora" else counts["text"] + (0 if st.freeze_vision else counts["vision"])
    adapters = lora_params(s, st.lora_r) if st.mode == "lora" else 0
    frozen = counts["total"] - trainable_base
    trainable = trainable_base + adapters
    e = Estimate()
    if st.stage == "eval":  # evaluation sampling loads the whole bf16 model on each GPU (load_policy)
        e.persistent["weights (bf16)"] = counts["total"] * FROZEN_WEIGHT_BYTES
    else:
        e.persistent["weights (bf16)"] = (trainable * TRAIN_WEIGHT_BYTES + frozen * FROZEN_WEIGHT_BYTES) / shards
        optimizer = e.host if st.offload else e.persistent
        optimizer["gradients (fp32)"] = trainable * TRAIN_GRAD_BYTES / shards
        optimizer["master + Adam (fp32)"] = trainable * (MASTER_BYTES + ADAM_BYTES) / shards
        if st.stage == "rl" and st.beta > 0 and st.mode == "full":
            e.persistent["reference model (bf16)"] = counts["total"] * REF_WEIGHT_BYTES / shards
    e.persistent["CUDA context"] = st.cuda_context_gib * GiB

    b = st.batch
    images = b.images if b.images is not None else b.sequences  # trl repeats each image's pixels per completion
    patches = b.visual_tokens * s.merge**2  # 2 x 2 patches merge into one visual token
    if st.stage != "eval":
        h, x = e.held, e.transient
        if st.zero3:
            h["ZeRO-3 gathered params"] = zero3_working_set(s)
            h["ZeRO-3 reduce buckets"] = REDUCE_BUCKET * s.hidden**2 * 2 * REDUCE_BUCKET_COPIES
        per_layer = layer_activation_bytes(s, c, st.mode == "lora", st.lora_copy_bytes, st.lora_mask_bytes,
                                           st.expanded_kv)
        layer_grads = text_layer_params(s) * TRAIN_WEIGHT_BYTES if st.mode == "full" and st.zero3 else 0
        if st.gradient_checkpointing:
            h["checkpointed layer inputs"] = s.layers * b.tokens * s.hidden * c * CHECKPOINT_INPUT_COPIES
            x["one layer: recomputed + grads"] = b.tokens * (per_layer + backward_transient_bytes(s, c)) + layer_grads
        else:
            h["all layers' activations"] = s.layers * b.tokens * per_layer
            x["one layer: grads"] = b.tokens * backward_transient_bytes(s, c) + layer_grads
        scored = b.scored_tokens
        final_norm = b.tokens * (NORM_INPUT_BYTES * s.hidden + (c * s.hidden if st.mode == "full" else 0))
        head_weight_grad = counts["lm_head"] * HEAD_WEIGHT_GRAD_BYTES if st.mode == "full" else 0
        if st.fused_head:
            rows = scored if st.head_triton else b.sequences * (b.tokens_per_sequence - 1)
            tile = min(rows, TRL_TOKEN_TILE) * min(s.vocab, TRL_VOCAB_TILE)
            h["LM head: saved (trl fused)"] = final_norm + rows * (c * s.hidden + HEAD_SAVED_PER_TOKEN)
            x["LM head: backward tiles"] = (tile * (c + (0 if st.head_triton else 4 * TRL_TORCH_TILE_FP32_COPIES))
                                            + rows * HEAD_GRAD_HIDDEN_BYTES * s.hidden + head_weight_grad)
        else:  # transformers' loss: every position's logits (SFT); trl's logits_to_keep: the completion's (RL)
            positions = b.tokens if st.stage == "sft" else scored
            logits = positions * s.vocab
            h["LM head: full logits (bf16 + fp32 log-softmax)"] = logits * (c + NAIVE_LOGIT_BYTES) + final_norm
            x["LM head: logits' gradients (fp32)"] = (logits * NAIVE_LOGIT_BYTES * (NAIVE_LOGIT_COPIES - 1)
                                                      + head_weight_grad)
        if not st.freeze_vision:  # a frozen tower runs without autograd (aesr1.policy.trainer.freeze_vision)
            block = vision_block_activation_bytes(s, c)
            grads = images * patches * c * (BACKWARD_INTERMEDIATE_TENSORS * s.vision_intermediate
                                             + BACKWARD_HIDDEN_TENSORS * s.vision_hidden)
            if st.gradient_checkpointing:
                h["vision: checkpointed block inputs"] = s.vision_depth * images * patches * s.vision_hidden * c
                x["vision: one block recomputed + grads"] = images * patches * block + grads
            else:
                h["vision: all blocks' activations"] = s.vision_depth * images * patches * block
            h["vision: merger + rotary"] = images * patches * merger_activation_bytes(s, c)
        x["vision: forward transient"] = images * patches * vision_transient_bytes(s, c)
        h["inputs (pixel_values fp32, ids)"] = images * patches * 3 * s.temporal * s.patch**2 * 4 + b.tokens * 8 * 3
        e.info["naive logits B x S x V x 4"] = b.sequences * b.tokens_per_sequence * s.vocab * NAIVE_LOGIT_BYTES
        e.info["naive logits, completion only"] = scored * s.vocab * NAIVE_LOGIT_BYTES
        e.info["activation bytes per token per layer"] = per_layer
        e.info["vision bytes per patch per block"] = vision_block_activation_bytes(s, c)

    seqs = {"rl": b.sequences * st.steps_per_generation, "eval": b.sequences}.get(st.stage, 0)
    if seqs:
        g = e.generation
        if st.stage == "rl" and st.zero3:
            if st.gather_for_generation:
                g["whole bf16 model gathered"] = counts["total"] * FROZEN_WEIGHT_BYTES
            else:
                g["ZeRO-3 gathered params"] = zero3_working_set(s)
        prompt = b.visual_tokens + b.prompt_text_tokens
        g["KV cache"] = seqs * (prompt + b.completion_tokens) * kv_bytes_per_token(s)
        prefill = seqs * prompt * c * (2 * s.intermediate + 4 * s.hidden)  # gate, up; q, attention out, residual x 2
        vision = seqs * patches * vision_transient_bytes(s, c)
        g["prefill transient"] = max(prefill, vision)
        g["sampling buffers"] = seqs * s.vocab * SAMPLING_BYTES_PER_LOGIT
    return e


def zero3_working_set(s: Shape) -> float:
    """What ZeRO-3 holds gathered while it runs a partitioned model: the larger of the embedding and the head, one
    decoder layer and the prefetch bucket (bf16)."""
    counts = param_counts(s)
    return (max(counts["embed"], counts["lm_head"]) + text_layer_params(s) + PREFETCH_BUCKET * s.hidden**2) \
        * TRAIN_WEIGHT_BYTES


def kv_bytes_per_token(s: Shape) -> int:
    """The KV cache of one token: keys and values of every layer's KV heads."""
    return s.layers * 2 * s.kv_dim * KV_BYTES


@dataclass(frozen=True)
class Recipe:
    """A run's batch shapes and memory choices, stage by stage. The defaults are configs/recipes/qwen2.5-vl-7b.yaml
    on 8 GPUs; :func:`aesr1.doctor.plan.recipe` reads them from any params file."""

    gpus: int = 8  # ZeRO-3 partitions over them
    sft_batch: int = 8
    sft_grad_accum: int = 1
    sft_checkpointing: bool = True
    sft_mode: str = "full"
    sft_zero3: bool = True
    sft_offload: bool = False
    images_per_device: int = 8
    generations: int = 4
    grad_accum: int = 2
    steps_per_generation: int | None = None  # trl's: micro-batches generated at once (None: grad_accum)
    rl_checkpointing: bool = True
    rl_mode: str = "full"
    rl_zero3: bool = True
    rl_offload: bool = False
    gather_for_generation: bool = True
    beta: float = 0.01
    completion_tokens: int = 512
    visual_tokens: int = 315
    prompt_text_tokens: int = 90
    eval_batch: int = 16
    eval_completion_tokens: int = 512
    lora_r: int = 16
    freeze_vision: bool = True

    @property
    def generated_at_once(self) -> int:
        """Sequences one GPU generates in one ``generate`` call (trl: one micro-batch per step of a generation)."""
        return self.images_per_device * self.generations * (self.steps_per_generation or self.grad_accum)


def stage_setting(r: Recipe, stage: str, mode: str | None = None) -> Setting:
    """Stage ``stage`` ("sft", "rl" or "eval") of ``r`` as a setting; ``mode`` in place of the recipe's."""
    tokens = dict(visual_tokens=r.visual_tokens, prompt_text_tokens=r.prompt_text_tokens)
    common = dict(gpus=r.gpus, lora_r=r.lora_r, freeze_vision=r.freeze_vision)
    if stage == "sft":
        return Setting("sft", mode or r.sft_mode, Batch(r.sft_batch, completion_tokens=r.completion_tokens, **tokens),
                       zero3=r.sft_zero3, offload=r.sft_offload, gradient_checkpointing=r.sft_checkpointing, **common)
    if stage == "rl":
        return Setting("rl", mode or r.rl_mode,
                       Batch(r.images_per_device * r.generations, completion_tokens=r.completion_tokens, **tokens),
                       zero3=r.rl_zero3, offload=r.rl_offload, gradient_checkpointing=r.rl_checkpointing,
                       beta=r.beta, generations=r.generations,
                       steps_per_generation=r.steps_per_generation or r.grad_accum,
                       gather_for_generation=r.gather_for_generation, **common)
    return Setting("eval", "full", Batch(r.eval_batch, completion_tokens=r.eval_completion_tokens, **tokens),
                   zero3=False, **common)


def settings(r: Recipe) -> dict[str, Setting]:
    """The recipe's SFT and RL in both modes and its evaluation sampling, keyed "stage/mode" (and "eval")."""
    out = {f"{stage}/{mode}": stage_setting(r, stage, mode) for stage in ("sft", "rl") for mode in ("full", "lora")}
    out["eval"] = stage_setting(r, "eval")
    return out


def fits(peak: float, gpu_gib: float) -> bool:
    """Whether ``peak`` bytes leave the headroom free on a GPU of ``gpu_gib``."""
    return peak <= gpu_gib * GiB * (1 - HEADROOM)


def images_that_fit(shape: Shape, st: Setting, gpu_gib: float, most: int = 64) -> int:
    """The most images per device (``st.generations`` sequences each) with which ``st`` fits; 0 if none."""
    best = 0
    for images in range(1, most + 1):
        batch = dataclasses.replace(st.batch, sequences=images * st.generations)
        if not fits(estimate(shape, dataclasses.replace(st, batch=batch)).peak, gpu_gib):
            break
        best = images
    return best


def checkpoint_bytes(s: Shape, mode: str, lora_r: int = 16, freeze_vision: bool = True) -> float:
    """One resumable checkpoint: the bf16 weights (gathered whole on save) and the fp32 master weights and AdamW
    moments of what trains (ZeRO-3's optimizer states); a LoRA one: the adapters with theirs."""
    counts = param_counts(s)
    states = MASTER_BYTES + ADAM_BYTES
    if mode == "lora":
        return lora_params(s, lora_r) * (TRAIN_WEIGHT_BYTES + states)
    trainable = counts["text"] + (0 if freeze_vision else counts["vision"])
    return counts["total"] * FROZEN_WEIGHT_BYTES + trainable * states


REMEDIES = (
    "gradient checkpointing on (gradient_checkpointing: true): one layer's activations instead of 28",
    "fewer images per device (rl.grpo.images_per_device, sft.train.batch_size) with more grad_accum",
    "keep trl's fused LM head (no compute_loss_func / label smoothing): full logits are B x S x 152K x 4 bytes",
    "ZeRO-3 optimizer offload (configs/deepspeed/zero3_offload.json): the 16 bytes/param of gradients, master and "
    "Adam leave the GPU",
    "LoRA (mode: lora): no gradients, master weights or reference model for the 8.3B base",
    "ds3_gather_for_generation: false: generation without the whole model gathered on every GPU",
)


def table(shape: Shape, chosen: dict[str, Setting]) -> tuple[str, dict]:
    """The component x setting table in GiB, the peaks and the verdicts, and the same as a dict."""
    estimates = {k: estimate(shape, v) for k, v in chosen.items()}
    gpus = next(iter(chosen.values())).gpus
    rows: list[tuple[str, str]] = []  # (section, component)
    for section in ("persistent", "held", "transient", "generation"):
        for e in estimates.values():
            for name in getattr(e, section):
                if (section, name) not in rows:
                    rows.append((section, name))
    width = max(len(n) for _, n in rows) + 4
    keys = list(estimates)
    lines = [f"{'GiB per GPU':<{width}}" + "".join(f"{k:>11}" for k in keys)]
    current = None
    titles = {"persistent": "[persistent: ZeRO-3 partitions]", "held": "[training: held through the backward]",
              "transient": "[training: transients, one at a time: the largest counts]",
              "generation": "[generation (RL: trl + transformers' generate; eval: sample)]"}
    for section, name in rows:
        if section != current:
            lines.append(titles[section])
            current = section
        cells = []
        for k in keys:
            value = getattr(estimates[k], section).get(name)
            cells.append(f"{value / GiB:>11.2f}" if value is not None else f"{'-':>11}")
        lines.append(f"  {name:<{width - 2}}" + "".join(cells))
    for label, fn in (("persistent total", lambda e: sum(e.persistent.values())),
                      ("training phase = held + max(transients)", lambda e: e.training),
                      ("generation phase", lambda e: sum(e.generation.values())),
                      ("PEAK = persistent + max(phases)", lambda e: e.peak)):
        lines.append(f"{label:<{width}}" + "".join(f"{fn(estimates[k]) / GiB:>11.2f}" for k in keys))
    verdicts: dict[str, dict[str, bool]] = {}
    for gpu, gib in GPU_GIB.items():
        cells = []
        for k in keys:
            ok = fits(estimates[k].peak, gib)
            verdicts.setdefault(k, {})[gpu] = ok
            cells.append(f"{'fits' if ok else 'NO':>11}")
        lines.append(f"{f'fits {gpus} x {gpu} ({gib * (1 - HEADROOM):.0f} GiB usable)':<{width}}" + "".join(cells))
    lines.append("[not added: a plain forward's fp32 logits, for comparison]")
    for name in ("naive logits B x S x V x 4", "naive logits, completion only"):
        cells = [f"{estimates[k].info[name] / GiB:>11.2f}" if name in estimates[k].info else f"{'-':>11}"
                 for k in keys]
        lines.append(f"  {name:<{width - 2}}" + "".join(cells))
    data = {k: {"persistent": e.persistent, "training_held": e.held, "training_transient": e.transient,
                "generation": e.generation, "info": e.info, "peak_gib": e.peak / GiB, "fits": verdicts[k]}
            for k, e in estimates.items()}
    return "\n".join(lines), data


def variants(shape: Shape, r: Recipe) -> tuple[str, dict]:
    """What breaks the fit: one recipe setting with one choice changed at a time."""
    chosen = settings(r)
    base = chosen["rl/full"]
    doubled = dataclasses.replace(base.batch, sequences=2 * base.batch.sequences)
    cases = {
        "recipe (rl/full)": base,
        "rl/full, no checkpointing": dataclasses.replace(base, gradient_checkpointing=False),
        "rl/full, full logits": dataclasses.replace(base, fused_head=False),
        f"rl/full, {2 * r.images_per_device} images/device": dataclasses.replace(base, batch=doubled),
        "rl/lora, no checkpointing": dataclasses.replace(chosen["rl/lora"], gradient_checkpointing=False),
        "sft/full, no checkpointing": dataclasses.replace(chosen["sft/full"], gradient_checkpointing=False),
        "sft/full, full logits": dataclasses.replace(chosen["sft/full"], fused_head=False),
    }
    lines = [f"{'variant':<30}{'peak GiB':>10}" + "".join(f"{gpu:>8}" for gpu in GPU_GIB)
             + "   if not: the most images/device that fit (80GB, 141GB)"]
    data = {}
    for name, st in cases.items():
        peak = estimate(shape, st).peak
        data[name] = {"peak_gib": peak / GiB, "fits": {gpu: fits(peak, gib) for gpu, gib in GPU_GIB.items()}}
        line = f"{name:<30}{peak / GiB:>10.1f}" + "".join(f"{'fits' if ok else 'NO':>8}"
                                                          for ok in data[name]["fits"].values())
        if not all(data[name]["fits"].values()):
            data[name]["images_that_fit"] = {gpu: images_that_fit(shape, st, gib) for gpu, gib in GPU_GIB.items()}
            line += "   " + ", ".join(str(n) for n in data[name]["images_that_fit"].values())
        lines.append(line)
    return "\n".join(lines), data


def report(shape: Shape = QWEN25_VL_7B, recipe: Recipe = Recipe()) -> tuple[str, dict]:
    """The 7B recipe's components in both modes (the table), the variants, and the remedies when something does
    not fit; text and data. ``aesr1 doctor --plan`` gives a recipe's own verdict per phase."""
    counts = param_counts(shape)
    per_micro = recipe.images_per_device * recipe.generations
    head = (f"Qwen2.5-VL-7B: {counts['total'] / 1e9:.3f}B parameters (text {counts['text'] / 1e9:.3f}B, vision "
            f"{counts['vision'] / 1e9:.3f}B); LoRA r={recipe.lora_r}: {lora_params(shape, recipe.lora_r) / 1e6:.1f}M; "
            f"ZeRO-3 over {recipe.gpus} GPUs.\nPer sequence {recipe.visual_tokens} visual + "
            f"{recipe.prompt_text_tokens} prompt + {recipe.completion_tokens} completion tokens; SFT batch "
            f"{recipe.sft_batch}/GPU; RL {recipe.images_per_device} images x K={recipe.generations} = {per_micro} "
            f"sequences/GPU per micro-batch, {recipe.generated_at_once} generated at once (trl's "
            f"steps_per_generation = grad_accum {recipe.grad_accum}); evaluation sampling batch {recipe.eval_batch}.")
    text, data = table(shape, settings(recipe))
    vtext, vdata = variants(shape, recipe)
    failing = [k for k, v in data.items() if not all(v["fits"].values())]
    failing += [k for k, v in vdata.items() if not all(v["fits"].values())]
    lines = [head, "", text, "", "One change at a time:", vtext]
    if failing:
        lines += ["", "Does not fit everywhere: " + "; ".join(failing) + ". What to change:",
                  *[f"  - {remedy}" for remedy in REMEDIES]]
    return "\n".join(lines), {"parameters": counts, "lora_parameters": lora_params(shape, recipe.lora_r),
                              "recipe": dataclasses.asdict(recipe), "settings": data, "variants": vdata}
