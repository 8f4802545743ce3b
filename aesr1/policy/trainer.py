"""The trainer plumbing that SFT (:mod:`aesr1.policy.train`) and RL (:mod:`aesr1.rl.rl`) share.

trl's arguments from the project's params, the frozen vision tower, LoRA, resuming a killed
run from its last checkpoint, one progress line per logging step, saving the trained policy
once, and freeing the optimizer before the trained model samples.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from aesr1 import distributed
from aesr1.config import ParamsError
from aesr1.policy.families import lora_targets, vision_modules

log = logging.getLogger(__name__)


def freeze_vision(model) -> int:
    """Freeze the vision tower and its projector (:func:`aesr1.policy.families.parts`); return the frozen
    parameter count.

    The tower also runs without autograd. Frozen weights alone do not stop backward from
    running through it: with gradient checkpointing or adapters, transformers makes the
    output of every sub-model's input embeddings require grad, the tower's patch embedding
    included, and then every sequence back-propagates through all 32 vision blocks of its
    image and keeps their checkpointed inputs (benchmarks/frozen_vision.py).
    """
    frozen = 0
    for module in vision_modules(model):
        for param in module.parameters():
            param.requires_grad_(False)
            frozen += numel(param)
        if not hasattr(module, "_grad_enabled_outside"):
            module._grad_enabled_outside = []
            module.register_forward_pre_hook(_autograd_off)
            module.register_forward_hook(_autograd_back, always_call=True)
    return frozen


def numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partition holds none locally


def parameter_counts(model) -> dict[str, int]:
    """``trainable_parameters`` and ``frozen_parameters`` of a model as it trains (adapters included): a vision
    tower left unfrozen shows in them."""
    counts = {"trainable_parameters": 0, "frozen_parameters": 0}
    for param in model.parameters():
        counts["trainable_parameters" if param.requires_grad else "frozen_parameters"] += numel(param)
    return counts


def _autograd_off(module, args) -> None:
    module._grad_enabled_outside.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _autograd_back(module, args, output) -> None:
    torch.set_grad_enabled(module._grad_enabled_outside.pop())


def restore_weights(model, checkpoint: str) -> None:
    """Load a full-model checkpoint's weights into ``model``.

    The Trainer's own resume loads the raw state dict without the key renaming that
    ``from_pretrained`` applies (Qwen2.5-VL saves ``visual.*``, the module is
    ``model.visual.*``), so it silently restores nothing; this loads it properly first.
    """
    from transformers import AutoModelForImageTextToText

    saved = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict(), strict=True)


def lora_config(cfg, model):
    """peft's LoRA config from ``cfg``'s ``lora_r``, ``lora_alpha``, ``lora_dropout`` on ``model``'s language model
    (:func:`aesr1.policy.families.lora_targets`); None in full ``mode``."""
    if cfg.mode != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(model), task_type="CAUSAL_LM")


def resume(trainer, checkpoint_dir: Path, mode: str) -> str | None:
    """The last checkpoint of a killed run in ``checkpoint_dir`` (None: start afresh), its weights restored
    into ``trainer.model`` in full mode; pass it to ``trainer.train(resume_from_checkpoint=...)``."""
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    trainer.resumed_from_step = int(Path(last).name.rsplit("-", 1)[-1]) if last else 0  # the stage's metrics say it
    if last:
        log.info("resuming from %s", last)
        # under DeepSpeed the Trainer's resume loads the engine's own checkpoint, weights included; a second,
        # partitioned load here would copy empty shards
        if mode == "full" and not getattr(trainer, "is_deepspeed_enabled", False):
            restore_weights(trainer.model, last)
    return last


def run_fingerprint(cfg: object, data: pd.DataFrame | None = None) -> str:
    """A short hash of a run's config, training data (every row's content) and process count: a checkpoint is
    resumed only by a run with the same config on the same data and as many processes (a ZeRO-3 checkpoint holds
    one optimizer shard per process, and the batch per step is per process)."""
    digest = hashlib.sha256(json.dumps([str(cfg), distributed.world_size()]).encode())
    if data is not None:
        digest.update(pd.util.hash_pandas_object(data.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()[:12]


class StepProgress(TrainerCallback):
    """One log line per logging step on the main process: step/total, loss or reward, time left.

    It replaces the Trainer's tqdm bar, which garbles the captured logs of `dvc repro` and Prefect.
    """

    def __init__(self, name: str):
        self.name = name
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.first_step = state.global_step  # a resumed run counts its speed from here
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        done = state.global_step - self.first_step
        elapsed = time.monotonic() - self.started
        left = elapsed / done * (state.max_steps - state.global_step) if done else math.nan
        figures = " ".join(f"{k} {logs[k]:.4g}" for k in ("loss", "reward", "kl") if k in logs)
        log.info("%s step %d/%d (%.0f%%) %s | %s elapsed, ~%s left", self.name, state.global_step, state.max_steps,
                 100 * state.global_step / max(state.max_steps, 1), figures, clock(elapsed), clock(left))
        return control


def quiet(trainer) -> None:
    """Drop the Trainer's raw dict printing: StepProgress says the same in one readable line."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def trl_arguments(config_class, owned: dict, options: dict, key: str) -> dict:
    """The keyword arguments of a trl config: the project's own, plus ``options`` (``<key>.trl``) by trl's names.

    A name trl does not have is an error (a typo must not be ignored), and so is one the
    project sets from its own params field (two places for one value).
    """
    import dataclasses
    import difflib

    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        hints = {name: difflib.get_close_matches(name, fields, n=1) for name in unknown}
        raise ParamsError(f"{key}.trl: {config_class.__name__} has no field(s) {unknown}"
                          + "".join(f"; did you mean '{h[0]}' for '{n}'?" for n, h in hints.items() if h))
    taken = sorted(set(options) & set(owned))
    if taken:
        raise ParamsError(f"{key}.trl: {taken} are set by this project from {key}'s own fields, not under 'trl'")
    return {**owned, **options}


def trl_config(config_class, owned: dict, options: dict, key: str, batch: str):
    """trl's ``config_class`` from ``owned`` and ``<key>.trl``'s ``options``. Settings that trl, transformers or
    DeepSpeed refuse stop here, before any model loads, naming the params key; ``batch`` names the params
    that make the per-device batch."""
    owned = {**owned, "ddp_timeout": distributed.timeout_s()}  # the process group's (params: ddp_timeout)
    try:
        args = config_class(**trl_arguments(config_class, owned, options, key))
    except ParamsError:
        raise
    except ValueError as error:  # trl's own checks (batch divisibility, ...), a missing DeepSpeed file
        raise ParamsError(
            f"{key}: trl refuses these settings: {error} (the per-device batch is {batch} = "
            f"{owned['per_device_train_batch_size']}, on {distributed.world_size()} process(es); trl's own fields "
            f"go under {key}.trl)") from None
    check_deepspeed(args, f"{key}.trl.deepspeed", batch)
    if args.deepspeed:
        distributed.single_process_group()  # DeepSpeed needs a group even for one process (launcher: python)
    return args


# What transformers fills once the model has loaded (from its hidden size) or training starts (the step count):
# any number stands in for an "auto" there while the rest of the config is checked
FILLED_LATER = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.stage3_param_persistence_threshold", "scheduler.params.total_num_steps",
                "scheduler.params.warmup_num_steps")


def check_deepspeed(args, key: str, batch: str) -> None:
    """A DeepSpeed config that cannot work stops the stage before the model loads (a 7B load takes minutes).

    Two checks that otherwise fire only once the model is loaded, by the libraries' own code:
    transformers' comparison of the JSON's values with trl's (the batch, accumulation, clipping,
    precision), and DeepSpeed's own parser (an unknown or invalid ZeRO option, fp16 with bf16).
    """
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is None:
        return
    try:
        from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    except ImportError as error:
        raise ParamsError(f"{key} is set but deepspeed does not import ({error}): pip install -e '.[gpu]'") from None
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from pydantic import ValidationError

    problems = [line.removeprefix("- ds ") for line in ds.mismatches]
    filled = HfDeepSpeedConfig(ds.config)  # a copy
    for setting in FILLED_LATER:
        if filled.get_value(setting) == "auto":
            node, name = filled.find_config_node(setting)
            node[name] = 1
    filled.config.pop("train_batch_size", None)  # its product with the process count is in transformers' comparison
    try:
        DeepSpeedConfig(filled.config)
    except ValidationError as error:
        problems += [f"{error.title}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    except (AssertionError, ValueError, DeepSpeedConfigError) as error:
        problems.append(str(error))
    if problems:
        source = args.deepspeed if isinstance(args.deepspeed, str) else "the mapping given"
        raise ParamsError(
            f"{key} ({source}): DeepSpeed refuses this config:\n  " + "\n  ".join(problems)
            + f"\n(a value that mismatches takes params' value when the JSON says \"auto\"; the per-device batch "
              f"is {batch})")


def save_trained(trainer, processor, out_dir: str | Path, base: str | Path | None = None,
                 log_model: bool = False) -> Path:
    """Save a trained policy once, as an ordinary model folder that ``from_pretrained`` loads.

    The Trainer's ``save_model`` gathers the weights (under ZeRO-3 each process holds a
    part) and writes on the main process only. A LoRA run with ``base`` is merged from
    the saved adapter into a fresh load of ``base`` on the main process, so the merge
    never sees partitioned weights. Every process returns once the folder is complete.
    """
    out = Path(out_dir)
    from peft import PeftModel

    if base is not None and isinstance(trainer.model, PeftModel):
        adapter = out / "adapter"
        trainer.save_model(str(adapter))
        if distributed.is_main():
            merge_adapter(base, adapter, out)
            shutil.rmtree(adapter)
    else:
        trainer.save_model(str(out))
    if distributed.is_main():
        processor.save_pretrained(out)
        if log_model:
            import mlflow

            mlflow.log_artifacts(str(out), artifact_path="model")
    distributed.barrier()
    return out


@contextmanager
def outside_zero3():
    """Load models whole, as if no ZeRO-3 config were alive.

    While the Trainer's DeepSpeed config lives, transformers loads every model inside
    ``deepspeed.zero.Init`` (partitioned, a collective): on one process alone, while the
    others wait at a barrier, that never returns.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    alive = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public way to set it aside
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = alive


def merge_adapter(base: str | Path, adapter: Path, out: Path) -> Path:
    """A saved LoRA adapter merged into a fresh, whole load of ``base``, saved to ``out`` (one process).

    The base loads in the dtype it was saved in (a hub VLM's bf16: a 7B merged folder of 16.6 GB, not 33 GB
    in fp32, and as many bytes to log to MLflow and push through DVC).
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from aesr1.policy.generation import resolve_model

    with outside_zero3():
        merged = AutoModelForImageTextToText.from_pretrained(resolve_model(base), dtype="auto")
        merged = PeftModel.from_pretrained(merged, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return out


def free_optimizer(trainer) -> None:
    """Drop the optimizer's state before sampling with the trained model (a 7B model's Adam moments alone
    are 56 GB). Under DeepSpeed the engine owns it and is left as it is."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish(checkpoint_dir: Path, keep: bool = False) -> None:
    """Remove a finished run's checkpoints (they only serve to resume a killed run) unless ``keep``; main process
    only."""
    if distributed.is_main() and not keep:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
