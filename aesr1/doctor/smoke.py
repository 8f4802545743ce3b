"""The doctor's smoke test: the sft and rl stages themselves, a few steps each, on the recipe's model shape.

A GPU run's first failures are in the stages' own code under the recipe's settings, so that is what runs.
``--smoke`` reads the params (``--params``, recipe applied as the stages apply it) and saves a random-weight model
of the recipe's backbone: a hub model's or folder's own config (``AutoConfig``; widths, vocabulary, the tied or
untied head as they are; no weights needed) at ``--layers`` text layers and vision blocks (default 2), with its
own processor (``AutoProcessor``) at the recipe's pixel budget (:func:`aesr1.backbone.backbone.policy_processor`);
for the ``tiny`` recipe the backbone stage's model (:func:`aesr1.backbone.tiny.build_tiny`) at the recipe's size,
unpretrained. It writes synthetic photos of six aspect ratios at twice the pixel budget (the processor resizes
them), an SFT corpus with trajectories of about the RL completion length, an RL and a test manifest, and a params
file: the recipe's values (batch, grad_accum, K, completion length, checkpointing, modes, frozen vision, its
DeepSpeed config, copied beside it) with only the data paths, the step counts (2), the logging interval (1), the
held-out sample counts and ``keep_checkpoints`` changed.

In that folder, through :func:`aesr1.stage.run_stage` (MLflow, in a SQLite store there unless ``--smoke-mlflow``;
the metrics files; the barrier after each save) it runs: the sft stage in the recipe's mode; the sft stage again,
which must resume from the checkpoint the first kept; the rl stage on that model, twice likewise; the sft stage in
the other mode (LoRA merged, or full where the recipe trains LoRA). Each stage ends with its own held-out probe on
the trainer's (under ZeRO-3 partitioned) model; the saved folders must then load with
``AutoModelForImageTextToText``. Per phase it reports the step times (SFT: differences of the ``train_runtime``
the Trainer logs at each step with ``include_num_input_tokens_seen``; RL: trl's ``step_time``; both read from the
MLflow run), each process's peak memory (``torch.cuda.max_memory_allocated``; on the CPU its peak resident set),
the planner's peak for the same reduced shape and settings (:func:`aesr1.doctor.memory.estimate` without the CUDA
context, which the allocator does not count) and whether its checkpoint is a ZeRO-3 one. ``ok`` needs every phase
finished, every SFT loss and RL reward finite, both reruns resumed, ZeRO-3 checkpoints where the config is ZeRO-3,
and the saved folders loading. A watchdog (``--smoke-timeout``) stops a hung run: exit status 124, the report so far.

Launch it with ``torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor --smoke``: every process runs the
phases (the stages do their own rank logic), rank 0 prints the JSON. Without CUDA it exits 2, unless ``--cpu``
(DeepSpeed there on one process only, on its CPU accelerator; ``--zero3 on`` adds the project's ZeRO-3 config where
the recipe has none, ``off`` drops it). **The GPU path has not yet been run on a GPU**: it was written on a machine
without one. What has run is ``--cpu``: the tiny recipe plain (on one and on two gloo processes) and under ZeRO-3
on one process, and a Qwen2.5-VL config folder (untied, reduced in depth) plain.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

from aesr1.doctor.memory import GiB
from aesr1.errors import AesError

log = logging.getLogger(__name__)

NOTE_UNRUN = ("the GPU path of --smoke was written without a GPU and has not yet been run on one; what the tests run "
              "is its --cpu path: the tiny recipe plain and under ZeRO-3 on one process, and a Qwen2.5-VL config "
              "folder reduced in depth")
SMOKE_TIMEOUT_S = 1800.0
STEPS = 2  # optimizer steps of each stage's first run: the first carries the warm-up, the second is a steady one
LAYERS = 2  # a real backbone's text layers and vision blocks, unless --layers
ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1), (2, 3), (21, 9))  # the photos' width:height
OVER_BUDGET = 2  # the photos have this many times the pixel budget: the processor really resizes them
HELDOUT_PER_PROCESS = 2  # held-out images each process samples in a stage's probe (a batch of mixed sizes)
ZERO3_FILE = "configs/deepspeed/zero3.json"  # what --zero3 on adds: the reference recipe's
EXPERIMENT = "aesr1-doctor-smoke"  # the MLflow experiment of the smoke's runs, apart from the pipeline's
CHECKOUT = Path(__file__).resolve().parents[2]


class SmokeError(AesError):
    """The smoke test cannot start: its model's files are not to be had, or the options do not fit the machine."""


@dataclass(frozen=True)
class Phase:
    name: str
    stage: str  # "sft" | "rl"
    params: str  # the smoke's params file it runs with
    mode: str
    resumes: bool  # the same params as the phase before: it must resume from the checkpoint that one kept


# ---------------------------------------------------------------------------------------------- the model

def vision_depth(vision_config) -> str:
    """The name of a vision config's block count: Qwen's ``depth``, most others' ``num_hidden_layers``."""
    return "depth" if hasattr(vision_config, "depth") else "num_hidden_layers"


def reduced_config(config, layers: int):
    """``config`` with ``layers`` text layers and vision blocks; every other value (widths, vocabulary, the tied
    or untied head) as it is. Per-layer lists are cut to the new depth, and the vision blocks' index lists
    (Qwen2.5-VL's full-attention blocks) keep the indexes below it, or the last block, so both attention kinds
    still run; so do both kinds of text layer (Qwen3.5's linear and full attention, Gemma 3's sliding and full):
    a kind the cut leaves out takes the last layers' places."""
    text = config.get_text_config()
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        kinds, kept = list(dict.fromkeys(text.layer_types)), text.layer_types[:layers]
        missing = [kind for kind in kinds if kind not in kept][:max(layers - 1, 0)]
        text.layer_types = kept[:layers - len(missing)] + missing
    vision = config.vision_config
    blocks = min(layers, getattr(vision, vision_depth(vision)))
    setattr(vision, vision_depth(vision), blocks)
    for key, value in vision.to_dict().items():
        if key.endswith("_indexes") and isinstance(value, list):
            setattr(vision, key, [i for i in value if i < blocks] or [blocks - 1])
    return config


def build_model(backbone, layers: int | None, out: Path, on_gpu: bool) -> tuple[dict, object]:
    """Save a random-weight model of ``backbone``'s shape (a real one reduced to ``layers``) with its processor at
    the backbone's pixel budget in ``out``; (what was built, the processor)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from aesr1.backbone.backbone import policy_processor, with_pixel_budget
    from aesr1.backbone.tiny import build_tiny
    from aesr1.policy.families import check_model, image_pixels

    if backbone.name_or_path == "tiny":
        model, processor = build_tiny(backbone.tiny, seed=0)  # the backbone stage's model, before its pretraining
        with_pixel_budget(processor, backbone)
    else:
        name = backbone.name_or_path
        try:
            config = AutoConfig.from_pretrained(name)
            processor = AutoProcessor.from_pretrained(name)
        except OSError as err:
            raise SmokeError(
                f"backbone {name}: its config and processor are not in a local folder or the local hub cache, and the "
                f"hub cannot be reached ({type(err).__name__}: {str(err).splitlines()[0][:160]}): where there is "
                f"network, `hf download {name} --exclude '*.safetensors'` (the smoke test needs no weights), or set "
                f"backbone.name_or_path to a local folder") from None
        check_model(config)  # an unsupported family stops here, as it stops the backbone stage
        policy_processor(processor, backbone, config.model_type)
        config = reduced_config(config, layers or LAYERS)
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.bfloat16  # as the hub saves it
        with torch.random.fork_rng(devices=[]), torch.device("cuda" if on_gpu else "cpu"):
            torch.manual_seed(0)
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    text, vision, size = model.config.get_text_config(), model.config.vision_config, processor.image_processor.size
    built = {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
             "layers": text.num_hidden_layers, "vision_blocks": getattr(vision, vision_depth(vision)),
             "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
             "tied_head": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
             "model_type": model.config.model_type, "processor": type(processor).__name__, "image_size": dict(size),
             "max_pixels": image_pixels(processor, model.config.model_type)}
    del model
    return built, processor


# ---------------------------------------------------------------------------------------------- the data

def trajectory_text(tokenizer, tokens: int) -> str:
    """A critique (the analytic teacher's wording) whose trajectory is about ``tokens`` tokens long."""
    from aesr1.aescot.teacher_analytic import phrase_bank
    from aesr1.trajectory import make_trajectory

    phrases, critique = phrase_bank(), ""
    while len(tokenizer(make_trajectory(critique, 0.5))["input_ids"]) < tokens:
        critique += f"{phrases[len(critique) % len(phrases)].capitalize()}. "
    return critique.strip()


def write_data(folder: Path, processor, model_type: str, sft, rl, world: int) -> dict:
    """Photos above the pixel budget; the SFT corpus (one optimizer step's trajectories, of about the RL completion
    length), the RL manifest (one generation batch's images, as many per score band) and the test manifest
    (``HELDOUT_PER_PROCESS`` per process of every held-out dataset), over those photos."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from aesr1.policy.families import image_pixels
    from aesr1.trajectory import make_trajectory

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    budget = image_pixels(processor, model_type)
    photos, sizes = [], []
    for i, (wide, high) in enumerate(ASPECTS):
        width = round(math.sqrt(OVER_BUDGET * budget * wide / high))
        height = round(OVER_BUDGET * budget / width)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        photos.append(f"{folder.name}/{i}.jpg")  # relative: the stages run in the smoke's folder
        sizes.append([width, height])

    def rows(count: int, datasets: list[str], prefix: str) -> pd.DataFrame:
        scores = [(0.1, 0.5, 0.8)[i % 3] + 0.01 * (i // 3 % 10) for i in range(count)]  # bad, fair, good in turn
        return pd.DataFrame({"image_id": [f"{prefix}/{i}" for i in range(count)],
                             "image_path": [photos[i % len(photos)] for i in range(count)],
                             "score": scores, "dataset": [datasets[i % len(datasets)] for i in range(count)]})

    critique = trajectory_text(processor.tokenizer, rl.grpo.max_completion_length)
    corpus = rows(sft.train.batch_size * sft.train.grad_accum * world, ["ava"], "sft")
    corpus["trajectory"] = [make_trajectory(critique, score) for score in corpus.score]
    corpus.to_parquet(folder / "corpus.parquet")
    prompts = 3 * math.ceil(rl.grpo.images_per_device * rl.grpo.grad_accum * world / 3)
    rows(prompts, ["ava"], "rl").to_parquet(folder / "train.parquet")
    held = sorted(set(sft.heldout.datasets) | set(rl.heldout.datasets))
    rows(HELDOUT_PER_PROCESS * world * len(held), held, "test").to_parquet(folder / "test.parquet")
    return {"photos": sizes, "sft_trajectories": len(corpus),
            "trajectory_tokens": len(processor.tokenizer(corpus.trajectory[0])["input_ids"]), "rl_images": prompts,
            "heldout_images": HELDOUT_PER_PROCESS * world}


# ---------------------------------------------------------------------------------------------- the params

def source_file(value: str, params_path: Path) -> Path:
    """A params path as the stages see it (relative to the project root: the params file's folder), else the
    working directory's, else this checkout's."""
    for root in (params_path.parent, Path.cwd(), CHECKOUT):
        if (root / value).is_file():
            return root / value
    raise SmokeError(f"{value} (named in {params_path}, or by --zero3 on) not found")


def smoke_params(params_path: Path, zero3: str, layers: int | None, folder: Path) -> tuple[dict, object]:
    """(the user's params over their recipe with the backbone and DeepSpeed choices made, the backbone config).
    The recipe file and the DeepSpeed configs are copied into ``folder`` at the paths the params name."""
    import dataclasses

    from aesr1.backbone.backbone import BackboneConfig
    from aesr1.config import load_section, read_params, recipe_file, with_recipe

    backbone = load_section(params_path, "backbone", BackboneConfig)
    params = copy.deepcopy(with_recipe(params_path, read_params(params_path)))
    recipe = recipe_file(params_path, params)
    if recipe is not None:
        (folder / "configs" / "recipes").mkdir(parents=True, exist_ok=True)
        shutil.copy(recipe, folder / "configs" / "recipes" / recipe.name)
    section = params.setdefault("backbone", {})
    if backbone.name_or_path == "tiny" and layers:
        depth = {"layers": layers, "vision_depth": min(layers, backbone.tiny.vision_depth)}
        section.setdefault("tiny", {}).update(depth)
        backbone = dataclasses.replace(backbone, tiny=dataclasses.replace(backbone.tiny, **depth))
    elif backbone.name_or_path != "tiny":
        section["name_or_path"] = "backbone"  # the reduced model's folder (the planner reads its shape there)
    for options in (params.setdefault("sft", {}).setdefault("train", {}).setdefault("trl", {}),
                    params.setdefault("rl", {}).setdefault("grpo", {}).setdefault("trl", {})):
        if zero3 == "off":
            options.pop("deepspeed", None)
        elif zero3 == "on" and not options.get("deepspeed"):
            options["deepspeed"] = ZERO3_FILE
        value = options.get("deepspeed")
        if isinstance(value, str) and not Path(value).is_absolute():
            (folder / value).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source_file(value, params_path), folder / value)
    return params, backbone


def phase_params(params: dict, world: int) -> dict:
    """The smoke's params: data paths, step counts, the logging interval, held-out samples and kept checkpoints
    changed, every training value left as it is."""
    params = copy.deepcopy(params)
    params["launcher"] = "python" if world == 1 else f"torchrun --standalone --nproc_per_node {world}"  # this run's
    sft, rl = params["sft"], params["rl"]
    sft.update(model="backbone", corpus="data/corpus.parquet", test_manifest="data/test.parquet",
               out_dir="models/sft", checkpoint_root="checkpoints", keep_checkpoints=True)
    sft["train"]["logging_steps"] = 1
    sft["train"]["trl"].update(max_steps=STEPS, include_num_input_tokens_seen=True)  # train_runtime at every step
    rl.update(model="models/sft", train_manifest="data/train.parquet", test_manifest="data/test.parquet",
              out_dir="models/rl", checkpoint_root="checkpoints", keep_checkpoints=True)
    rl["grpo"].update(max_steps=STEPS, logging_steps=1)
    for section in (sft, rl):
        section.setdefault("heldout", {})["samples"] = HELDOUT_PER_PROCESS * world
    return params


def in_mode(params: dict, mode: str) -> dict:
    """``params`` with SFT in ``mode`` (a LoRA adapter merged into its base) into a folder of its own."""
    params = copy.deepcopy(params)
    params["sft"]["train"].update(mode=mode, merge_lora=True)
    params["sft"]["out_dir"] = f"models/sft-{mode}"
    return params


def stage_configs(folder: Path) -> tuple:
    """The sft and rl configs of the smoke's params, as the stages read them."""
    from aesr1.config import load_section
    from aesr1.policy.sft import SFTStageConfig
    from aesr1.rl.rl import RLStageConfig

    return load_section(folder / "params.yaml", "sft", SFTStageConfig), \
        load_section(folder / "params.yaml", "rl", RLStageConfig)


# ---------------------------------------------------------------------------------------------- measuring

def reset_peak() -> None:
    """Start a phase's peak memory: the allocator's on a GPU, the resident set's on Linux (``clear_refs`` 5)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_gib() -> float | None:
    """This process's peak since :func:`reset_peak`: ``torch.cuda.max_memory_allocated``, else its peak resident
    set (VmHWM; None where there is no /proc)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / GiB, 3)
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return round(int(line.split()[1]) * 1024 / GiB, 3)
    return None


def step_seconds(run_id: str, stage: str, after_step: int) -> list[float]:
    """The seconds of each optimizer step a run trained, from its MLflow metrics: SFT logs the time since training
    began at each step (at the last step the summary's larger figure follows: the smaller is the step's), RL
    trl's own ``step_time``."""
    import mlflow

    key = "train_runtime" if stage == "sft" else "step_time"
    per_step: dict[int, float] = {}
    for metric in mlflow.MlflowClient().get_metric_history(run_id, key):
        if metric.step > after_step:
            per_step[metric.step] = min(per_step.get(metric.step, math.inf), metric.value)
    values = [per_step[step] for step in sorted(per_step)]
    if stage == "sft":
        values = [later - earlier for earlier, later in zip([0.0, *values], values)]
    return [round(v, 3) for v in values]


def checkpoint_zero3(root: Path, stage: str) -> bool | None:
    """Whether the checkpoint a stage kept is a ZeRO-3 one: DeepSpeed writes the model states once per process
    under ZeRO-3 (``zero_pp_rank_*``), once in all under stages 0-2; None: not a DeepSpeed checkpoint."""
    states = list(root.glob(f"{stage}-*/checkpoint-*/global_step*/*model_states.pt"))
    return any(p.name.startswith("zero_pp_rank_") for p in states) if states else None


def planned_peaks(params: Path, world: int, phases: list[Phase]) -> tuple[dict[str, float], str | None]:
    """The planner's peak per GPU (GiB) of each phase's stage and mode, for the reduced shape and the smoke's
    params, without the CUDA context (``max_memory_allocated`` does not count it); ({}, why) when it has none."""
    import dataclasses

    from aesr1.doctor import memory, plan
    from aesr1.doctor.checks import Context

    try:
        shape, recipe, _, _ = plan.recipe(Context(params), world)
    except AesError as err:
        return {}, str(err)
    peaks = {}
    for phase in phases:
        setting = dataclasses.replace(memory.stage_setting(recipe, phase.stage, phase.mode), cuda_context_gib=0.0)
        peaks[phase.name] = round(memory.estimate(shape, setting).peak / GiB, 3)
    return peaks, None


# ---------------------------------------------------------------------------------------------- the phases

def run_phase(phase: Phase, planned: float | None) -> dict:
    """One stage run through :func:`aesr1.stage.run_stage`, measured; every process runs it."""
    import mlflow

    from aesr1 import distributed
    from aesr1.policy.sft import SFTStageConfig, sft
    from aesr1.rl.rl import RLStageConfig, rl
    from aesr1.stage import run_stage

    cls, fn = {"sft": (SFTStageConfig, sft), "rl": (RLStageConfig, rl)}[phase.stage]
    reset_peak()
    started = time.perf_counter()
    metrics = run_stage(phase.stage, phase.params, cls, fn, metrics_dir=f"metrics/{phase.name}")
    out = {"name": phase.name, "stage": phase.stage, "mode": phase.mode,
           "seconds": round(time.perf_counter() - started, 2), "steps": metrics["steps"],
           "resumed_from_step": metrics["resumed_from_step"], "peak_memory_gib": distributed.gather([peak_gib()]),
           "planned_peak_gib": planned}
    if distributed.is_main():  # what only the main process has: the MLflow run, and the checkpoint until it goes
        run_id = mlflow.last_active_run().info.run_id
        out.update(mlflow_run=run_id, step_seconds=step_seconds(run_id, phase.stage, metrics["resumed_from_step"]),
                   checkpoint_zero3=checkpoint_zero3(Path("checkpoints"), phase.stage))
    if phase.stage == "sft":
        out.update({k: metrics[k] for k in ("loss_first", "loss_last", "train_runtime_s", "starting_entropy",
                                            "format_valid_rate", "heldout_images")})
    else:
        out.update(reward=metrics["reward"], kl=metrics["kl"], entropy=metrics["entropy"],
                   heldout={k: metrics["heldout"][k] for k in ("entropy", "format_valid_rate", "heldout_images")})
    return out


def problems(phase: Phase, out: dict, zero3_expected: bool) -> list[str]:
    """What makes a finished phase fail the smoke test."""
    figures = [out["loss_first"], out["loss_last"]] if phase.stage == "sft" else list(out["reward"].values())
    found = []
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in figures):
        found.append(f"{phase.name}: a {'loss' if phase.stage == 'sft' else 'reward'} is not finite: {figures}")
    if phase.resumes and not out["resumed_from_step"] > 0:
        found.append(f"{phase.name}: did not resume from the checkpoint the run before kept")
    if not phase.resumes and out["resumed_from_step"]:
        found.append(f"{phase.name}: resumed from step {out['resumed_from_step']} instead of starting afresh")
    if zero3_expected and out["checkpoint_zero3"] is not True:
        found.append(f"{phase.name}: its DeepSpeed config is ZeRO-3, but its checkpoint is "
                     f"{'not a DeepSpeed one' if out['checkpoint_zero3'] is None else 'not ZeRO-3'}")
    return found


def saved_models(folders: list[str]) -> dict:
    """Each saved model folder loaded whole with ``AutoModelForImageTextToText`` (outside any ZeRO-3 config)."""
    from transformers import AutoModelForImageTextToText

    from aesr1.policy.trainer import outside_zero3

    loaded = {}
    for folder in folders:
        with outside_zero3():
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
        loaded[folder] = {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}
        del model
    return loaded


def run_all(report: dict, params_path: Path, here: Path, layers: int | None, zero3: str, world: int, on_gpu: bool,
            mlflow_uri: str | None) -> int:
    """Build, write, run the phases and load the saved models (see the module docstring); the exit status."""
    from aesr1 import distributed, environment
    from aesr1.doctor.checks import Context, deepspeed_stage

    if distributed.is_main():
        params, backbone = smoke_params(params_path, zero3, layers, here)
        report.update(recipe=params.get("recipe") or "tiny", backbone=backbone.name_or_path)
        (here / "params.yaml").write_text(yaml.safe_dump(phase_params(params, world), sort_keys=False))
    distributed.barrier()
    sft, rl = stage_configs(here)
    deepspeed = {"sft": sft.train.trl.get("deepspeed"), "rl": rl.grpo.trl.get("deepspeed")}
    report["deepspeed"] = deepspeed
    if any(deepspeed.values()) and not on_gpu:
        if world > 1:
            raise SmokeError("--cpu with a DeepSpeed config runs on one process only: on several CPU processes the "
                             "Trainer's CPU path does not route DeepSpeed (tests/test_zero3.py); use --zero3 off, or "
                             "one process")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo), before it is imported
    other = "full" if sft.train.mode == "lora" else "lora"
    phases = [Phase("sft", "sft", "params.yaml", sft.train.mode, False),
              Phase("sft-resume", "sft", "params.yaml", sft.train.mode, True),
              Phase("rl", "rl", "params.yaml", rl.grpo.mode, False),
              Phase("rl-resume", "rl", "params.yaml", rl.grpo.mode, True),
              Phase(f"sft-{other}", "sft", f"params-{other}.yaml", other, False)]
    zero3_expected = {stage: value is not None and deepspeed_stage(Context(here / "params.yaml"), value) == 3
                      for stage, value in deepspeed.items()}
    planned: dict[str, float] = {}
    if distributed.is_main():
        report["phase"] = "build"
        (here / f"params-{other}.yaml").write_text(yaml.safe_dump(
            in_mode(yaml.safe_load((here / "params.yaml").read_text()), other), sort_keys=False))
        report["model"], processor = build_model(backbone, layers, here / "backbone", on_gpu)
        report["data"] = write_data(here / "data", processor, report["model"]["model_type"], sft, rl, world)
        planned, why = planned_peaks(here / "params.yaml", world, phases)
        if why:
            report["planned_note"] = f"no planned peak: {why}"
    distributed.barrier()
    tracking = {"MLFLOW_TRACKING_URI": mlflow_uri or f"sqlite:///{here / 'mlflow.db'}",
                environment.EXPERIMENT: EXPERIMENT,
                environment.PIPELINE_ID: f"doctor-smoke-{uuid.uuid4().hex[:12]}"}  # the phases: one pipeline run
    report.update(mlflow={"tracking_uri": tracking["MLFLOW_TRACKING_URI"], "experiment": EXPERIMENT},
                  memory_measure="torch.cuda.max_memory_allocated per process" if on_gpu else
                  "the peak resident set (VmHWM) of each whole process",
                  planned_measure="the planner's peak per GPU (bf16, one process per GPU), CUDA context left out",
                  phases=[])
    failed: list[str] = []
    with contextlib.chdir(here), mock.patch.dict(os.environ, tracking):
        for phase in phases:
            report["phase"] = phase.name
            out = run_phase(phase, planned.get(phase.name))
            report["phases"].append(out)
            if distributed.is_main():
                failed += problems(phase, out, zero3_expected[phase.stage])
                if phase.resumes or phase is phases[-1]:  # their checkpoints have served (a 7B's: ~20 GB each)
                    for kept in Path("checkpoints").glob(f"{phase.stage}-*"):
                        shutil.rmtree(kept)
        report["phase"] = "load saved models"
        if distributed.is_main():
            report["saved_models"] = saved_models(["models/sft", "models/rl", f"models/sft-{other}"])
        distributed.barrier()
    del report["phase"]
    failed = distributed.gather([failed])[0]  # the main process's verdict: every process exits with its status
    if failed:
        report["error"] = "; ".join(failed)
    report["ok"] = not failed
    return 0 if report["ok"] else 1


# ---------------------------------------------------------------------------------------------- the command

def _expire(report: dict, seconds: float, rank: int, own_folder: bool) -> None:
    """The watchdog: past its time limit the smoke test stops with what it has (a hung collective included)."""
    from aesr1.stage import strict_json

    if rank == 0:
        if own_folder and report.get("folder"):
            shutil.rmtree(report["folder"], ignore_errors=True)
        late = {**report, "ok": False, "error": f"timed out after {seconds:g} s in phase {report.get('phase')}"}
        print(json.dumps(strict_json(late), indent=1, default=str), file=sys.__stdout__, flush=True)
        print(f"aesr1 doctor --smoke: {late['error']}", file=sys.__stderr__, flush=True)
    os._exit(124)


def smoke(params: str | Path = "params.yaml", layers: int | None = None, cpu: bool = False, zero3: str = "auto",
          folder: str | None = None, timeout: float = SMOKE_TIMEOUT_S,
          mlflow_uri: str | None = None) -> tuple[int, dict]:
    """Run the smoke test; (exit status, report): 0 ok, 1 a phase failed or a check of it did, 2 it could not
    start. Every launched process runs it; rank 0's report is complete. Past ``timeout`` seconds every process
    exits with status 124 after rank 0 prints the report so far.

    The GPU path has not yet been run on a GPU (see the module docstring)."""
    import torch

    from aesr1 import distributed
    from aesr1.stage import ddp_timeout, strict_json

    on_gpu = torch.cuda.is_available()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    report: dict = {"ok": False, "note": NOTE_UNRUN, "device": "cuda" if on_gpu else "cpu", "world_size": world,
                    "params": str(params)}
    if not on_gpu and not cpu:
        return 2, {**report, "error": "--smoke needs a CUDA GPU (torch.cuda.is_available() is False); --smoke --cpu "
                                      "runs the same phases on the CPU"}
    report["phase"] = "setup"  # where it is, for the watchdog and the error
    if on_gpu and world == 1 and torch.cuda.device_count() > 1:
        report["warning"] = (f"one process on {torch.cuda.device_count()} visible GPUs: only one is used; launch "
                             f"with torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor --smoke")
    own_folder = folder is None
    started = time.perf_counter()
    watchdog = threading.Timer(timeout, _expire, args=(report, timeout, rank, own_folder))
    watchdog.daemon = True
    watchdog.start()
    try:
        params_path = Path(params).resolve()
        distributed.set_timeout(ddp_timeout(params_path))  # before the first collective creates the group
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if folder and Path(folder).is_dir() and any(Path(folder).iterdir()):
            raise SmokeError(f"--smoke-dir {folder} is not empty: the smoke test starts from nothing (a checkpoint "
                             f"there would be resumed)")
        here = Path(folder or tempfile.mkdtemp(prefix="aesr1-smoke-")).resolve() if rank == 0 else None
        if distributed.launched():
            here = Path(distributed.gather([str(here) if here else ""])[0])  # rank 0's folder, for every process
        here.mkdir(parents=True, exist_ok=True)
        report["folder"] = str(here)
        status = run_all(report, params_path, here, layers, zero3, world, on_gpu, mlflow_uri)
    except Exception as err:  # noqa: BLE001  (the report says where it broke; an unexpected one's traceback is logged)
        phase = report.pop("phase", None)
        if not isinstance(err, AesError):
            log.exception("smoke test failed in phase %s", phase)
        why = str(err) if isinstance(err, AesError) else f"{type(err).__name__}: {str(err)[:500]}"
        started_phases = phase != "setup" and not isinstance(err, SmokeError)
        report["error"] = f"phase {phase}: {why}" if started_phases else why
        status = 1 if started_phases else 2
    report["total_s"] = round(time.perf_counter() - started, 1)
    with contextlib.suppress(Exception):  # a process group broken by the failure above
        distributed.close()
    watchdog.cancel()
    if own_folder and rank == 0 and report.get("folder"):
        shutil.rmtree(report["folder"], ignore_errors=True)
    return status, strict_json(report)  # a NaN (RL's KL without a reference model) as null: strict JSON
