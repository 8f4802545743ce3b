"""``aesr1 doctor --plan``: whether a recipe's run fits the GPUs, phase by phase, and what makes it fit.

The params are read as the stages read them (recipe applied: :func:`aesr1.config.load_section`) and turned
into the memory model's :class:`~aesr1.doctor.memory.Recipe` (:func:`recipe`); each phase's peak per GPU is
:func:`aesr1.doctor.memory.estimate`'s:

- SFT: ``sft.train`` (mode, batch, gradient checkpointing, its DeepSpeed config);
- RL training and RL generation: ``rl.grpo`` (images per device x K sequences per micro-batch; trl
  generates ``steps_per_generation`` micro-batches at once: grad_accum unless ``rl.grpo.trl`` sets it or
  ``generation_batch_size``; the gathered model unless ``ds3_gather_for_generation: false``);
- evaluation: the whole bf16 model sampling ``evaluate.decoding``'s batch.

The model's shape is the backbone's: the tiny model's config, a local folder's config.json (Qwen2.5-VL
only), the known config of Qwen/Qwen2.5-VL-3B- or 7B-Instruct, or a hub id's config.json in the local hub
cache. A sequence is at most ``pixel budget / (patch x merge)^2`` visual tokens (262,144 pixels: 334), 90
prompt tokens and the completion length (SFT's trajectories counted at the RL completion length). A trl
``deepspeed`` option (else a DeepSpeed launcher) at ZeRO-3 partitions over every GPU, and its
``offload_optimizer`` moves the optimizer to host memory; without DeepSpeed each GPU holds everything. A
phase fits when its peak leaves 10% of the GPU free (host memory: 10% of the machine's, where known).
When one does not, :func:`changes` tries the departures that keep most of the recipe (fewer images per
device with more grad_accum, ZeRO-3, generation without the gathered model, optimizer offload, LoRA, more
GPUs, a smaller RL batch) and names those with which everything fits.

``python -m aesr1.doctor.plan --markdown [--write docs/real-scale.md]`` prints the tiers' table (or writes
it into the docs between the plan markers, where a test holds it to what this module prints).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aesr1.doctor import memory
from aesr1.doctor.checks import Context, count, deepspeed_config, looks_like_path, parse_launcher
from aesr1.doctor.memory import HEADROOM, GiB, Recipe, Shape
from aesr1.errors import AesError

REPO = Path(__file__).resolve().parents[2]
PHASES = {"sft": "SFT", "rl_training": "RL training", "rl_generation": "RL generation", "evaluate": "evaluation"}
KNOWN_SHAPES = {"qwen/qwen2.5-vl-7b-instruct": memory.QWEN25_VL_7B, "qwen/qwen2.5-vl-3b-instruct": memory.QWEN25_VL_3B,
                "qwen/qwen3-vl-8b-instruct": memory.QWEN3_VL_8B, "qwen/qwen3-vl-2b-instruct": memory.QWEN3_VL_2B}
PLANNED_FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # the layouts the memory model derives
ZERO3_FILE = "configs/deepspeed/zero3.json"
OFFLOAD_FILE = "configs/deepspeed/zero3_offload.json"
REFERENCE = "qwen2.5-vl-7b"
CARD_24GB_GIB = 23.99  # nvidia-smi's total of a 24 GB card (RTX 4090, RTX A5000: 24,564 MiB)
# the docs' tiers: (recipe, GPUs, GiB per GPU); the reference also on one GPU, to show what the planner proposes
TIERS = ((REFERENCE, 8, memory.GPU_GIB["80GB"]), (REFERENCE, 1, memory.GPU_GIB["80GB"]),
         ("qwen2.5-vl-7b-1gpu", 1, memory.GPU_GIB["80GB"]), ("qwen2.5-vl-3b-24gb", 1, CARD_24GB_GIB),
         ("qwen3-vl-8b", 8, memory.GPU_GIB["80GB"]), ("qwen3-vl-2b-24gb", 1, CARD_24GB_GIB))
BEGIN, END = "<!-- plan:begin -->", "<!-- plan:end -->"


class PlanError(AesError):
    """No plan: the model's shape is unknown, or there are no GPUs to plan for."""


# ---------------------------------------------------------------------------------------------- the model's shape

def tiny_shape(values: dict) -> Shape:
    """The tiny model's shape, as :func:`aesr1.backbone.tiny.build_tiny` builds it (tied head, vision MLP twice
    its width)."""
    from aesr1.backbone.tiny import TinyModelConfig

    t = TinyModelConfig(**values)
    if t.family != "qwen2_5_vl":
        raise PlanError(f"backbone.tiny.family {t.family}: the memory model plans the tiny Qwen2.5-VL only")
    return Shape(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.layers, heads=t.heads,
                 kv_heads=t.kv_heads, vocab=t.vocab_size, tied=True, vision_depth=t.vision_depth,
                 vision_hidden=t.vision_hidden_size, vision_intermediate=2 * t.vision_hidden_size,
                 vision_heads=t.vision_heads, patch=t.patch_size)


def config_shape(config: dict, where: str) -> Shape:
    """A Qwen2.5-VL's or Qwen3-VL's shape from its config.json (the text keys under ``text_config``, or at the top
    level as older files have them)."""
    model_type = config.get("model_type")
    if model_type not in PLANNED_FAMILIES:
        raise PlanError(f"{where}: model_type {model_type!r}: the memory model knows the layouts of "
                        f"{', '.join(PLANNED_FAMILIES)} only")
    text = {**config, **(config.get("text_config") or {})}
    vision = config.get("vision_config") or {}
    if text.get("head_dim", text.get("hidden_size", 0) // max(text.get("num_attention_heads", 1), 1)) \
            * text.get("num_attention_heads", 0) != text.get("hidden_size"):
        raise PlanError(f"{where}: heads x head_dim is not the hidden size: the memory model's attention widths "
                        f"assume it is")
    qwen3 = {} if model_type == "qwen2_5_vl" else dict(  # Qwen3-VL's layout (memory.Shape)
        qkv_bias=False, qk_norm=True, vision_gated=False, vision_positions=vision.get("num_position_embeddings", 0),
        deepstack=len(vision.get("deepstack_visual_indexes", [])))
    try:
        return Shape(hidden=text["hidden_size"], intermediate=text["intermediate_size"],
                     layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                     kv_heads=text["num_key_value_heads"], vocab=text["vocab_size"],
                     tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                     vision_depth=vision["depth"], vision_hidden=vision["hidden_size"],
                     vision_intermediate=vision["intermediate_size"], vision_heads=vision["num_heads"],
                     patch=vision.get("patch_size", 14 if model_type == "qwen2_5_vl" else 16),
                     merge=vision.get("spatial_merge_size", 2), temporal=vision.get("temporal_patch_size", 2),
                     **qwen3)
    except KeyError as err:
        raise PlanError(f"{where}: no {err.args[0]}") from None


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise PlanError(f"no {path}") from None
    except ValueError as err:
        raise PlanError(f"{path} is not JSON: {err}") from None


def backbone_shape(ctx: Context) -> tuple[Shape, str]:
    """``backbone.name_or_path``'s shape and where it came from, without the network; PlanError if unknown."""
    name = str(ctx.value("backbone.name_or_path", "tiny"))
    if name == "tiny":
        return tiny_shape(ctx.value("backbone.tiny", {}) or {}), "backbone.tiny"
    folder = ctx.path(name)
    if folder.is_dir():
        return config_shape(read_config(folder / "config.json"), str(folder)), f"{folder / 'config.json'}"
    if name.lower() in KNOWN_SHAPES:
        return KNOWN_SHAPES[name.lower()], "its config.json, known"
    if not looks_like_path(name):
        from huggingface_hub import try_to_load_from_cache

        with contextlib.suppress(Exception):  # not a valid repo id: unknown, as below
            cached = try_to_load_from_cache(name, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
            if isinstance(cached, str):
                return config_shape(read_config(Path(cached)), name), "its config.json in the local hub cache"
    raise PlanError(f"backbone {name}: its shape is unknown here (not a local folder, not one of "
                    f"{', '.join(KNOWN_SHAPES)}, no config.json in the local hub cache: `hf download {name} "
                    f"config.json`)")


# ---------------------------------------------------------------------------------------------- the recipe

def deepspeed_choice(ctx: Context, key: str, trl: dict, launch) -> tuple[bool, bool, list[str]]:
    """(ZeRO-3, optimizer offloaded, notes) of one stage: its trl ``deepspeed`` option, else the launcher's."""
    notes = []
    if trl.get("deepspeed"):
        zero = deepspeed_config(ctx, trl["deepspeed"]).get("zero_optimization") or {}
        stage = int(zero.get("stage") or 0)
        offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
        if (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"):
            notes.append(f"{key}: offload_param is not modelled: the parameters count on the GPU (an upper bound)")
    elif launch.deepspeed:
        stage, offload = launch.zero_stage or 0, launch.offload
    else:
        stage, offload = 0, False
    if stage in (1, 2):
        notes.append(f"{key}: ZeRO-{stage} is counted unpartitioned (the model knows ZeRO-3 and none): an upper bound")
    return stage == 3, offload, notes


def recipe(ctx: Context, gpus: int) -> tuple[Shape, Recipe, str, list[str]]:
    """The params' run as the memory model sees it on ``gpus`` GPUs: (shape, recipe, where the shape came from,
    notes on what is not modelled)."""
    from aesr1.backbone.backbone import BackboneConfig, pixel_budget
    from aesr1.config import load_section
    from aesr1.evaluation.evaluate import EvaluateConfig
    from aesr1.policy.sft import SFTStageConfig
    from aesr1.rl.rl import RLStageConfig

    path = ctx.params_path
    backbone = load_section(path, "backbone", BackboneConfig)
    sft = load_section(path, "sft", SFTStageConfig).train
    grpo = load_section(path, "rl", RLStageConfig).grpo
    decoding = load_section(path, "evaluate", EvaluateConfig).decoding
    shape, source = backbone_shape(ctx)
    launch = parse_launcher(str(ctx.value("launcher", "python")), ctx.root)
    sft_zero3, sft_offload, notes = deepspeed_choice(ctx, "sft.train", sft.trl, launch)
    rl_zero3, rl_offload, rl_notes = deepspeed_choice(ctx, "rl.grpo", grpo.trl, launch)
    notes += rl_notes
    steps = grpo.trl.get("steps_per_generation")
    if grpo.trl.get("generation_batch_size"):  # global: every process's share of it
        steps = max(1, grpo.trl["generation_batch_size"] // (grpo.images_per_device * grpo.num_generations * gpus))
    if grpo.use_vllm:
        notes.append("rl.grpo.use_vllm: vLLM's own memory is not modelled; RL generation is counted as trl's "
                     "generation with transformers")
    r = Recipe(gpus=gpus, sft_batch=sft.batch_size, sft_grad_accum=sft.grad_accum,
               sft_checkpointing=sft.gradient_checkpointing, sft_mode=sft.mode, sft_zero3=sft_zero3,
               sft_offload=sft_offload, images_per_device=grpo.images_per_device, generations=grpo.num_generations,
               grad_accum=grpo.grad_accum, steps_per_generation=steps,
               rl_checkpointing=grpo.gradient_checkpointing, rl_mode=grpo.mode, rl_zero3=rl_zero3,
               rl_offload=rl_offload, gather_for_generation=bool(grpo.trl.get("ds3_gather_for_generation", True)),
               beta=grpo.beta, completion_tokens=grpo.max_completion_length,
               visual_tokens=pixel_budget(backbone) // (shape.patch * shape.merge) ** 2,
               eval_batch=decoding.batch_size, eval_completion_tokens=decoding.max_new_tokens,
               lora_r=max(sft.lora_r, grpo.lora_r), freeze_vision=sft.freeze_vision and grpo.freeze_vision)
    return shape, r, source, notes


# ---------------------------------------------------------------------------------------------- the verdict

@dataclass(frozen=True)
class Hardware:
    """The GPUs to plan for (ZeRO-3 partitions over all of them) and, where known, the host memory of the
    machine that holds them."""

    gpus: int
    gpu_gib: float
    source: str = "given"
    host_gib: float | None = None

    @property
    def label(self) -> str:
        return f"{self.gpus} x {self.gpu_gib:g} GiB"


def machine_memory_gib() -> float | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return None


def found_hardware(ctx: Context, host_gib: float | None = None) -> Hardware:
    """The GPUs torch sees here (times the launcher's nodes) and this machine's memory."""
    info = ctx.cuda
    if info.error or not info.available:
        raise PlanError(f"no GPU here ({info.error or 'torch.cuda.is_available() is False'}): give the GPUs to plan "
                        f"for, --gpus N --gpu-memory GIB")
    nodes = parse_launcher(str(ctx.value("launcher", "python")), ctx.root).nodes
    where = f"torch.cuda: {info.count} x {info.gpus[0]['name']}" + (f", x {nodes} nodes" if nodes > 1 else "")
    return Hardware(info.count * nodes, min(g["memory_gib"] for g in info.gpus), where,
                    host_gib if host_gib is not None else machine_memory_gib())


@dataclass
class Verdict:
    """Peak bytes per GPU of each phase (persistent + the phase's own), and the host memory a machine needs."""

    persistent: dict[str, float]
    phase: dict[str, float]
    components: dict[str, dict[str, float]]
    host: float
    hardware: Hardware

    @property
    def peaks(self) -> dict[str, float]:
        return {k: self.persistent[k] + self.phase[k] for k in PHASES}

    @property
    def gpu_fits(self) -> dict[str, bool]:
        return {k: memory.fits(v, self.hardware.gpu_gib) for k, v in self.peaks.items()}

    @property
    def host_fits(self) -> bool | None:
        if self.hardware.host_gib is None:
            return None
        return self.host <= self.hardware.host_gib * GiB * (1 - HEADROOM)

    @property
    def fits(self) -> bool:
        return all(self.gpu_fits.values()) and self.host_fits is not False

    @property
    def peak_phase(self) -> str:
        return max(self.peaks, key=self.peaks.get)

    @property
    def peak(self) -> float:
        return self.peaks[self.peak_phase]


def verdict(shape: Shape, r: Recipe, hardware: Hardware) -> Verdict:
    """Each phase of ``r`` on ``hardware``. Host memory: the offloaded optimizer of every GPU's process, all on one
    machine."""
    est = {stage: memory.estimate(shape, memory.stage_setting(r, stage)) for stage in ("sft", "rl", "eval")}
    of = {"sft": est["sft"], "rl_training": est["rl"], "rl_generation": est["rl"], "evaluate": est["eval"]}
    phase = {"sft": est["sft"].training, "rl_training": est["rl"].training,
             "rl_generation": sum(est["rl"].generation.values()), "evaluate": sum(est["eval"].generation.values())}
    parts = {"sft": est["sft"].held | est["sft"].transient, "rl_training": est["rl"].held | est["rl"].transient,
             "rl_generation": est["rl"].generation, "evaluate": est["eval"].generation}
    return Verdict(persistent={k: sum(e.persistent.values()) for k, e in of.items()}, phase=phase,
                   components={k: {**of[k].persistent, **parts[k]} for k in PHASES},
                   host=max(sum(est[s].host.values()) for s in ("sft", "rl")) * r.gpus, hardware=hardware)


# ---------------------------------------------------------------------------------------------- what makes it fit

def split_batches(shape: Shape, r: Recipe, hardware: Hardware) -> Recipe | None:
    """``r`` with fewer SFT sequences / RL images per device and more grad_accum (the same batch per step and the
    same generation batch) where its training phase does not fit; None if no split makes it fit."""
    def fitting(current: Recipe, phase: str, per_device: str, accum: str) -> Recipe | None:
        if verdict(shape, current, hardware).gpu_fits[phase]:
            return current
        total = getattr(current, per_device) * getattr(current, accum)
        for smaller in range(getattr(current, per_device) - 1, 0, -1):
            if total % smaller:
                continue
            changes = {per_device: smaller, accum: total // smaller}
            if phase == "rl_training" and current.steps_per_generation:  # keep the sequences generated at once
                changes["steps_per_generation"] = current.steps_per_generation * current.images_per_device // smaller
            candidate = dataclasses.replace(current, **changes)
            if verdict(shape, candidate, hardware).gpu_fits[phase]:
                return candidate
        return None

    sft = fitting(r, "sft", "sft_batch", "sft_grad_accum")
    return fitting(sft, "rl_training", "images_per_device", "grad_accum") if sft else None


def depart(r: Recipe, departure: str) -> Recipe | None:
    """``r`` with one departure from the recipe, or None where it changes nothing."""
    if departure == "zero3" and not (r.sft_zero3 and r.rl_zero3) and r.gpus > 1:
        return dataclasses.replace(r, sft_zero3=True, rl_zero3=True)
    if departure == "no_gather" and r.rl_zero3 and r.gather_for_generation:
        return dataclasses.replace(r, gather_for_generation=False)
    if departure == "offload" and not (r.sft_offload and r.rl_offload):
        return dataclasses.replace(r, sft_zero3=True, rl_zero3=True, sft_offload=True, rl_offload=True)
    if departure == "lora" and (r.sft_mode, r.rl_mode) != ("lora", "lora"):
        return dataclasses.replace(r, sft_mode="lora", rl_mode="lora")
    return None


def smaller_rl_batch(shape: Shape, r: Recipe, hardware: Hardware) -> Recipe | None:
    """``r`` with the largest grad_accum below its own that fits: fewer sequences generated at once, and a smaller
    RL batch per optimizer step."""
    for accum in range(r.grad_accum - 1, 0, -1):
        candidate = dataclasses.replace(r, grad_accum=accum, steps_per_generation=None)
        if verdict(shape, candidate, hardware).fits:
            return candidate
    return None


PARAMS_KEYS = (("sft_batch", "sft.train.batch_size"), ("sft_grad_accum", "sft.train.grad_accum"),
               ("sft_mode", "sft.train.mode"), ("images_per_device", "rl.grpo.images_per_device"),
               ("grad_accum", "rl.grpo.grad_accum"), ("steps_per_generation", "rl.grpo.trl.steps_per_generation"),
               ("rl_mode", "rl.grpo.mode"), ("gather_for_generation", "rl.grpo.trl.ds3_gather_for_generation"))


def params_changes(r: Recipe, changed: Recipe) -> dict[str, object]:
    """What to set (params keys; ``GPUs``: the hardware) to run ``changed`` in place of ``r``."""
    out: dict[str, object] = {"GPUs": changed.gpus} if changed.gpus != r.gpus else {}
    for name, key in PARAMS_KEYS:
        if getattr(changed, name) != getattr(r, name):
            out[key] = getattr(changed, name)
    for stage, key in (("sft", "sft.train.trl.deepspeed"), ("rl", "rl.grpo.trl.deepspeed")):
        choice = (getattr(changed, f"{stage}_zero3"), getattr(changed, f"{stage}_offload"))
        if choice != (getattr(r, f"{stage}_zero3"), getattr(r, f"{stage}_offload")):
            out[key] = OFFLOAD_FILE if choice[1] else ZERO3_FILE if choice[0] else None
    return out


def changes(shape: Shape, r: Recipe, hardware: Hardware, most: int = 3) -> list[dict]:
    """Up to ``most`` sets of changes with which every phase fits, the fewest departures first: each departure
    alone, then two and three together (each with the batch split where training still does not fit), then more
    GPUs under ZeRO-3, then a smaller RL batch."""
    order = ("zero3", "no_gather", "offload", "lora")
    tried: list[tuple[set[str], Recipe]] = []
    for size in (0, 1, 2, 3):
        for combination in itertools.combinations(order, size):
            candidate: Recipe | None = r
            for departure in combination:
                candidate = depart(candidate, departure) if candidate else None
            if candidate is not None:
                tried.append((set(combination), candidate))
    tried += [({"gpus"}, dataclasses.replace(r, gpus=n, sft_zero3=True, rl_zero3=True))
              for n in (2, 4, 8, 16, 32, 64) if n > r.gpus]
    found: list[Recipe] = []
    fitting: list[set[str]] = []  # the departures of what fits: more of them on top is no news
    for departures, candidate in tried:
        if any(earlier <= departures for earlier in fitting):
            continue
        hw = dataclasses.replace(hardware, gpus=candidate.gpus)
        split = split_batches(shape, candidate, hw)
        if split is None or split in found or not verdict(shape, split, hw).fits:
            continue
        fitting.append(departures)
        found.append(split)
        if len(found) == most:
            break
    if len(found) < most:
        smaller = smaller_rl_batch(shape, r, hardware)
        if smaller is not None and smaller not in found:
            found.append(smaller)
    out = []
    for candidate in found[:most]:
        v = verdict(shape, candidate, dataclasses.replace(hardware, gpus=candidate.gpus))
        change = {"params": params_changes(r, candidate), "peak_gib": round(v.peak / GiB, 1),
                  "host_gib": round(v.host / GiB, 1)}
        batches = [f"{what} {now} per step, not {was}" for what, now, was in (
            ("RL images", *(x.images_per_device * x.grad_accum * x.gpus for x in (candidate, r))),
            ("SFT sequences", *(x.sft_batch * x.sft_grad_accum * x.gpus for x in (candidate, r)))) if now != was]
        if batches:
            change["note"] = "; ".join(batches)
        out.append(change)
    return out


# ---------------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """A recipe's plan on some GPUs: what it reads, each phase's verdict, and what would make it fit."""

    params: str
    recipe_name: str
    backbone: str
    shape_source: str
    shape: Shape
    recipe: Recipe
    verdict: Verdict
    notes: list[str] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.verdict.fits

    def as_dict(self) -> dict:
        v, hw = self.verdict, self.verdict.hardware
        return {
            "params": self.params, "recipe": self.recipe_name, "backbone": self.backbone,
            "parameters": memory.param_counts(self.shape)["total"], "shape": dataclasses.asdict(self.shape),
            "shape_source": self.shape_source, "gpus": hw.gpus, "gpu_memory_gib": hw.gpu_gib,
            "usable_gib": round(hw.gpu_gib * (1 - HEADROOM), 2), "hardware_source": hw.source,
            "fits": self.fits, "peak_gib": round(v.peak / GiB, 2), "peak_phase": v.peak_phase,
            "phases": {k: {"peak_gib": round(v.peaks[k] / GiB, 2), "persistent_gib": round(v.persistent[k] / GiB, 2),
                           "phase_gib": round(v.phase[k] / GiB, 2), "fits": v.gpu_fits[k],
                           "components_gib": {n: round(b / GiB, 3) for n, b in v.components[k].items()}}
                       for k in PHASES},
            "host_gib": round(v.host / GiB, 1), "host_memory_gib": hw.host_gib, "host_fits": v.host_fits,
            "settings": dataclasses.asdict(self.recipe), "changes": self.changes, "notes": self.notes,
        }

    def rows(self) -> list[tuple[str, str]]:
        """(phase, what it runs per GPU) for the table."""
        r = self.recipe

        def how(mode: str, zero3: bool, offload: bool) -> str:
            where = f"ZeRO-3 over {r.gpus} GPU{'s' if r.gpus > 1 else ''}" if zero3 else \
                "replicated" if r.gpus > 1 else "one GPU"
            return f"{mode}, {where}{', optimizer offloaded' if offload else ''}"

        tokens = r.visual_tokens + r.prompt_text_tokens
        gathered = "whole model gathered" if r.rl_zero3 and r.gather_for_generation else \
            "layer by layer (ZeRO-3)" if r.rl_zero3 else "plain"
        return [
            ("sft", f"{how(r.sft_mode, r.sft_zero3, r.sft_offload)}; {r.sft_batch} x {tokens + r.completion_tokens} "
                    f"tokens, grad_accum {r.sft_grad_accum}"),
            ("rl_training", f"{how(r.rl_mode, r.rl_zero3, r.rl_offload)}; {r.images_per_device} images x K "
                            f"{r.generations} x {tokens + r.completion_tokens} tokens, grad_accum {r.grad_accum}"),
            ("rl_generation", f"{r.generated_at_once} sequences at once, {gathered}"),
            ("evaluate", f"whole bf16 model; {r.eval_batch} x {tokens + r.eval_completion_tokens} tokens"),
        ]

    def text(self) -> str:
        v, hw = self.verdict, self.verdict.hardware
        usable = hw.gpu_gib * (1 - HEADROOM)
        lines = [f"aesr1 doctor --plan: {self.params}, recipe {self.recipe_name}: {self.backbone}, "
                 f"{count(memory.param_counts(self.shape)['total'])} parameters (shape: {self.shape_source})",
                 f"on {hw.label} ({hw.source}): {usable:.1f} GiB usable per GPU (10% headroom)", ""]
        width = max(len(how) for _, how in self.rows())
        lines.append(f"{'phase':<14} {'per GPU':<{width}} {'persistent':>10} {'phase':>7} {'peak GiB':>9}  fits")
        for key, how in self.rows():
            lines.append(f"{PHASES[key]:<14} {how:<{width}} {v.persistent[key] / GiB:>10.1f} "
                         f"{v.phase[key] / GiB:>7.1f} {v.peaks[key] / GiB:>9.1f}  {'yes' if v.gpu_fits[key] else 'NO'}")
        if v.host:
            have = f" of {hw.host_gib:.0f} GiB here" if hw.host_gib is not None else " (not checked: --host-memory)"
            lines.append(f"host memory for the offloaded optimizer: {v.host / GiB:.1f} GiB{have}"
                         + (": NOT ENOUGH" if v.host_fits is False else ""))
        lines += [f"note: {note}" for note in self.notes]
        verdict_line = (f"fits: peak {v.peak / GiB:.1f} GiB per GPU ({PHASES[v.peak_phase]}) of {usable:.1f} usable"
                        if self.fits else f"does NOT fit: peak {v.peak / GiB:.1f} GiB per GPU "
                                          f"({PHASES[v.peak_phase]}) of {usable:.1f} usable")
        lines += ["", verdict_line]
        if not self.fits:
            lines.append("what makes it fit (each line alone):" if self.changes else
                         "no change the planner tries makes it fit: a larger GPU, or a smaller model")
            lines += [f"  - {describe(c)}" for c in self.changes]
        return "\n".join(lines)


def describe(change: dict) -> str:
    keys = ", ".join(f"{k}: {json.dumps(v)}" for k, v in change["params"].items())
    host = f", {change['host_gib']:.1f} GiB of host memory" if change["host_gib"] else ""
    note = f"; {change['note']}" if "note" in change else ""
    return f"{keys} (peak {change['peak_gib']:.1f} GiB{host}{note})"


def plan(ctx: Context, hardware: Hardware | None = None) -> Plan:
    """The plan of ``ctx``'s params on ``hardware`` (None: the GPUs found here)."""
    if ctx.params is None:
        raise PlanError(f"params unreadable: {ctx.params_error}")
    hardware = hardware or found_hardware(ctx)
    shape, r, source, notes = recipe(ctx, hardware.gpus)
    result = Plan(str(ctx.params_path), str(ctx.value("recipe", "tiny")), str(ctx.value("backbone.name_or_path",
                  "tiny")), source, shape, r, verdict(shape, r, hardware), notes)
    if not result.fits:
        result.changes = changes(shape, r, hardware)
    return result


@contextlib.contextmanager
def params_for(path: str | Path, recipe_name: str | None):
    """``path``, or where ``recipe_name`` is given a copy of it selecting that recipe (in a temporary folder that
    sees the project's configs/); the stages' root stays the original's."""
    path = Path(path)
    if recipe_name is None:
        yield path
        return
    from aesr1.config import read_params

    data = read_params(path)
    data["recipe"] = recipe_name
    with tempfile.TemporaryDirectory(prefix="aesr1-plan-") as tmp:
        (Path(tmp) / "configs").symlink_to(path.resolve().parent / "configs", target_is_directory=True)
        copy = Path(tmp) / path.name
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        yield copy


def plan_recipe(path: str | Path, recipe_name: str | None, hardware: Hardware | None) -> Plan:
    """The plan of the params file ``path``, with ``recipe_name`` in place of its recipe where given."""
    root = Path(path).resolve().parent
    with params_for(path, recipe_name) as params:
        result = plan(Context(params, root=root), hardware)
    result.params = str(path)
    return result


def command(args) -> int:
    """``aesr1 doctor --plan``: 0 it fits, 1 it does not, 2 no plan (unknown shape, no GPUs, bad options)."""
    if (args.gpus is None) != (args.gpu_memory is None):
        print("aesr1 doctor --plan: --gpus and --gpu-memory go together", file=sys.stderr)
        return 2
    hardware = Hardware(args.gpus, args.gpu_memory, "given", args.host_memory) if args.gpus else None
    try:
        if hardware is None:
            hardware = found_hardware(Context(args.params), args.host_memory)
        result = plan_recipe(args.params, args.recipe, hardware)
    except AesError as err:
        print(f"aesr1 doctor --plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.text())
    return 0 if result.fits else 1


# ---------------------------------------------------------------------------------------------- the docs' table

def departures(name: str, root: Path = REPO) -> list[str]:
    """What recipe ``name`` sets otherwise than the reference's, key by key."""
    from aesr1.config import flatten

    def read(recipe_name: str) -> dict:
        return flatten(yaml.safe_load((root / "configs" / "recipes" / f"{recipe_name}.yaml").read_text()) or {})

    def shown(values: dict, key: str) -> str:
        return json.dumps(values[key]) if key in values else "unset"

    ours, reference = read(name), read(REFERENCE)
    return [f"`{key}` {shown(ours, key)} (reference {shown(reference, key)})"
            for key in sorted(set(ours) | set(reference)) if ours.get(key) != reference.get(key)]


def markdown(params: Path = REPO / "params.yaml") -> str:
    """The tiers' table (peak GiB per GPU per phase), what each tier departs from the reference in, and the
    changes the planner proposes where a tier does not fit."""
    lines = ["| recipe | GPUs | SFT | RL training | RL generation | evaluation | fits | host memory |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, gpus, gib in TIERS:
        p = plan_recipe(params, name, Hardware(gpus, gib))
        v = p.verdict
        cells = [f"{v.peaks[k] / GiB:.1f}" + ("" if v.gpu_fits[k] else " (NO)") for k in PHASES]
        host = f"{v.host / GiB:.1f} GiB" if v.host else "-"
        lines.append(f"| `{name}` | {gpus} x {gib:g} GiB | " + " | ".join(cells)
                     + f" | {'yes' if p.fits else '**no**'} | {host} |")
        if not p.fits:
            notes.append(f"- `{name}` on {gpus} x {gib:g} GiB does not fit; the planner's changes, each alone: "
                         + "; ".join(describe(c) for c in p.changes) + ".")
    lines += ["", *notes, ""]
    for name in dict.fromkeys(n for n, _, _ in TIERS if n != REFERENCE):
        lines.append(f"- `{name}` departs from `{REFERENCE}` in: " + "; ".join(departures(name)) + ".")
    return "\n".join(lines)


def docs_block(text: str) -> str:
    """The part of ``text`` between the plan markers."""
    if BEGIN not in text or END not in text:
        raise PlanError(f"no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The planner's table of the recipes' tiers, for the docs.")
    parser.add_argument("--markdown", action="store_true", required=True, help="print the tiers' table as markdown")
    parser.add_argument("--write", type=Path, help="write it into this file between the plan markers")
    args = parser.parse_args(argv)
    block = markdown()
    if args.write is None:
        print(block)
        return 0
    text = args.write.read_text()
    docs_block(text)  # the markers are there
    before, rest = text.split(BEGIN, 1)
    args.write.write_text(f"{before}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
