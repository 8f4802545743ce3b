"""``aesr1 doctor``: what a GPU user runs first. Checks this machine and the params, or runs a smoke test.

Without ``--smoke`` it runs a list of checks. Each one returns a record ``{name, ok, detail}``, where ok is
true (passed), false (failed) or null (skipped, does not apply, or an optional part that is absent). They
print as a table, or as JSON with ``--json``. The exit status is 1 if any check failed, else 0. An expected
failure is a failed record, never a traceback. The params are read as the stages read them, recipe
applied (:func:`aesr1.config.with_recipe`):

- ``params``: the params file reads, and the backbone, sft and rl sections and the teacher validate.
- ``torch``: the version and the CUDA version it was built for.
- ``cuda``: ``torch.cuda.is_available()`` and the GPUs: name, memory and bf16 support. bf16 is required
  because the training stages use it on a GPU. No CUDA is a failure only where the params need a GPU (a
  real backbone, a non-tiny recipe, a GPU launcher); for the embedded tiny default it is a null note.
- ``gpu_memory``: with CUDA, whether the weights and optimizer states fit on each GPU. Full fine-tuning
  takes 16 B/param (bf16 weights and gradients, fp32 master weights, two fp32 Adam moments), divided by
  the GPU count under ZeRO-3. LoRA takes 2 B/param for the bf16 base. With ``rl.grpo.beta`` > 0 the bf16
  reference model adds 2 B/param. Activations come on top, so the check fails above 90% of the smallest
  GPU.
- ``deepspeed``: importable, and its version, when the launcher (or its accelerate config) or a ``trl``
  option uses DeepSpeed. Otherwise skipped.
- ``flash_attn``: optional. Absent is a null note: the project loads models with transformers' default
  attention. Installed but not importable is a failure.
- ``vllm``: importable only when ``rl.grpo.use_vllm`` is true.
- ``launcher``: params' top-level ``launcher``. With CUDA it must start one process per visible GPU
  (``--nproc_per_node gpu``, or a count or an accelerate ``num_processes`` equal to
  ``torch.cuda.device_count()``). Without CUDA it must not ask for GPUs.
- ``backbone``: ``backbone.name_or_path``. ``tiny`` is ok. A local folder needs ``config.json`` (its
  model_type is reported), weights and a processor. A hub id needs one ``model_info`` request to
  ``HF_ENDPOINT`` (``--timeout``), or the model in the local cache. Offline it fails at once with what to
  do.
- ``disk``: free space for the checkpoint and model folders, or their nearest existing parent, on each
  filesystem. Rule: parameters x (16 B for the one resumable full fine-tuning checkpoint the Trainer
  keeps, 1 B for a LoRA one, + 4 B for each saved policy, sft and rl) + 1 GiB. Below that it fails;
  below 1.5x that it is ok but tight. A 7B full fine-tune needs about 7.6e9 x 24 B = 183 GB; the tiny
  model about 1 GiB.
- ``teacher``: for ``distill.teacher.kind: openai``, the API key's variable (``api_key_env``) is set (the
  key is never printed), and one ``GET {base_url}/models`` with the key (``--timeout``) answers 200 and
  lists the model. The analytic teacher is offline: skipped.
- ``dvc_remote``: ``dvc remote list``. No remote is a null note: fine on a single machine.
- ``mlflow``: :func:`aesr1.tracking.tracking_uri`. For SQLite or file stores the folder must be
  writable. For http(s), ``GET /health`` (``--timeout``).

``--smoke`` is the GPU smoke test: a random-weight Qwen2.5-VL-3B-shaped model (text: hidden 2048,
intermediate 11008, 16 heads, 2 KV heads, vocabulary 151,936, 36 layers or ``--layers``; vision: hidden
1280, depth 32, out_hidden 2048), saved with a processor. Then one SFT step
(:func:`aesr1.policy.train.fit`) and one RL step (:func:`aesr1.rl.rl.build_trainer`), both under ZeRO-3
on every visible GPU: the Trainer's ``deepspeed`` argument gets ``configs/deepspeed/zero3.json``, as the
qwen2.5-vl-7b recipe passes it, unless ``accelerate launch`` already brings a DeepSpeed plugin. Both
trainers must really run at ZeRO stage 3, or the test fails. It saves after each step
(:func:`aesr1.policy.trainer.save_trained`), reloads the result with ``AutoModelForImageTextToText``
(:func:`aesr1.policy.generation.load_policy`) and generates (:func:`aesr1.policy.generation.sample`).
It prints step times and the peak memory per GPU (``torch.cuda.max_memory_allocated`` per phase) as
JSON on stdout. Launch it with ``torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor --smoke``
(or ``accelerate launch``; the world size comes from the environment), on one machine. On one GPU it
should take a few minutes. A watchdog (``--smoke-timeout``, default 600 s) stops a hung run with exit
status 124 and the report so far.

Without CUDA, ``--smoke`` says it needs a GPU and exits 2, unless ``--cpu`` is given: that runs the same
code on a tiny shape on the CPU, plain, or with ``--zero3 on`` under ZeRO-3 on DeepSpeed's CPU
accelerator, one process only. **The GPU path has not yet been run on a GPU**: it was written on a
machine without one. What has been run is the ``--cpu`` path: plain, on 1 and 2 gloo processes, and
under ZeRO-3 on one process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aesr1.errors import AesError

log = logging.getLogger(__name__)

HELP = ("Check this machine and params.yaml before a GPU run (torch, CUDA and GPUs, DeepSpeed, flash-attn, vLLM, "
        "launcher, backbone, disk, teacher, DVC remote, MLflow); --smoke: one ZeRO-3 SFT and RL step on a "
        "random-weight 3B-shaped Qwen2.5-VL.")
DESCRIPTION = (
    "Check this machine and the params (recipe applied) before a run: exit status 1 if a check failed, else 0. "
    "--smoke runs a GPU smoke test instead: a random-weight Qwen2.5-VL-3B-shaped model, one SFT step and one RL "
    "step under DeepSpeed ZeRO-3 on every visible GPU, save, reload and generate; it prints step times and peak "
    "memory per GPU as JSON. Launch it with `torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor --smoke`. "
    "Without a GPU it exits 2, unless --cpu runs the same steps on a tiny shape on the CPU. The GPU path has not "
    "yet been run on a GPU.")

GiB = 2 ** 30
NOTE_UNRUN = ("the GPU path of --smoke was written without a GPU and has not yet been run on one; "
              "its --cpu path (tiny shape; plain, and under ZeRO-3 on one process) is what the tests run")


# ---------------------------------------------------------------------------------------------- checks

@dataclass
class Check:
    """One check's result: ok True (passed), False (failed) or None (skipped / not applicable / optional)."""

    name: str
    ok: bool | None
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class Skip(Exception):
    """A check that does not apply here: its record is ok None with this message."""


@dataclass
class CudaInfo:
    available: bool
    count: int = 0
    gpus: list[dict] = field(default_factory=list)  # index, name, memory_gib, capability
    bf16: bool | None = None
    cuda_version: str | None = None
    error: str | None = None  # torch missing or broken


def cuda_info() -> CudaInfo:
    try:
        import torch
    except Exception as err:  # noqa: BLE001  (a broken torch install is what the doctor reports)
        return CudaInfo(False, error=f"torch does not import: {type(err).__name__}: {err}")
    if not torch.cuda.is_available():
        return CudaInfo(False, cuda_version=torch.version.cuda)
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / GiB, 1),
                     "capability": f"sm_{props.major}{props.minor}"})
    return CudaInfo(True, len(gpus), gpus, bool(torch.cuda.is_bf16_supported()), torch.version.cuda)


class Context:
    """What the checks share: the params (recipe applied), the project root, the timeout and cached facts."""

    def __init__(self, params_path: str | Path = "params.yaml", timeout: float = 10.0):
        from aesr1.config import read_params, with_recipe

        self.params_path = Path(params_path)
        self.root = self.params_path.resolve().parent  # the stages run here (dvc.yaml's wdir)
        self.timeout = timeout
        self.params: dict | None = None
        self.params_error: str | None = None
        try:
            self.params = with_recipe(self.params_path, read_params(self.params_path))
        except Exception as err:  # noqa: BLE001  (ParamsError, or YAML that does not parse: the params check says)
            self.params_error = str(err) if isinstance(err, AesError) else f"{params_path}: {type(err).__name__}: {err}"
        self._cuda: CudaInfo | None = None
        self.cache: dict = {}

    @property
    def cuda(self) -> CudaInfo:
        if self._cuda is None:
            self._cuda = cuda_info()
        return self._cuda

    @cuda.setter
    def cuda(self, info: CudaInfo) -> None:  # tests set a machine's GPUs
        self._cuda = info

    def value(self, key: str, default=None):
        """A dotted params key (recipe applied), or ``default`` where it is unset or the params are unreadable."""
        from aesr1.config import lookup

        if self.params is None:
            return default
        try:
            found = lookup(self.params, key)
        except KeyError:
            return default
        return default if found is None and default is not None else found

    def need_params(self) -> dict:
        if self.params is None:
            raise Skip(f"params unreadable (see the params check): {self.params_error}")
        return self.params

    def path(self, value: str) -> Path:
        """A params path as the stages see it: relative to the project root."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path


def check_params(ctx: Context) -> tuple[bool, str]:
    if ctx.params is None:
        return False, ctx.params_error or "unreadable"
    from aesr1.config import load_section

    recipe = ctx.params.get("recipe") or "tiny"
    sections = {"backbone": ("aesr1.backbone.backbone", "BackboneConfig"),
                "sft": ("aesr1.policy.sft", "SFTStageConfig"), "rl": ("aesr1.rl.rl", "RLStageConfig")}
    problems = []
    for section, (module, name) in sections.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            problems.append(f"{section}: cannot import {module}.{name} to validate it ({err})")
            continue
        try:
            load_section(ctx.params_path, section, cls)
        except AesError as err:
            problems.append(str(err))
    try:
        teacher_config(ctx)
    except AesError as err:
        problems.append(str(err))
    if problems:
        return False, "; ".join(problems)
    return True, f"{ctx.params_path} reads, recipe {recipe}; backbone, sft, rl and distill.teacher validate"


def check_torch(ctx: Context) -> tuple[bool, str]:
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        return False, f"torch does not import ({type(err).__name__}: {err}): pip install -e . (torch 2.6-2.14)"
    build = torch.version.cuda
    return True, f"torch {torch.__version__} (built for CUDA {build})" if build else \
        f"torch {torch.__version__} (a CPU-only build: no CUDA)"


def gpu_reasons(ctx: Context) -> list[str]:
    """Why the params need a GPU (empty: the embedded tiny default, which runs on CPUs)."""
    reasons = []
    backbone = ctx.value("backbone.name_or_path", "tiny")
    if backbone != "tiny":
        reasons.append(f"backbone.name_or_path is {backbone}")
    recipe = ctx.value("recipe", "tiny")
    if recipe not in ("tiny", "custom"):
        reasons.append(f"recipe {recipe}")
    launch = parse_launcher(str(ctx.value("launcher", "python")), ctx.root)
    if launch.gpu:
        reasons.append(f"the launcher ({ctx.value('launcher')}) asks for GPUs")
    return reasons


def nvidia_smi() -> str | None:
    """What nvidia-smi sees (a driver without a CUDA-capable torch, say), or None where there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    return (done.stdout.strip() or done.stderr.strip()).replace("\n", "; ")


def check_cuda(ctx: Context) -> tuple[bool | None, str]:
    info = ctx.cuda
    if info.error:
        return False, info.error
    if not info.available:
        smi = nvidia_smi()
        seen = (f"; nvidia-smi sees: {smi} (torch built for CUDA {info.cuda_version}: a driver/build mismatch?)"
                if smi else "")
        reasons = gpu_reasons(ctx)
        if reasons:
            return False, f"CUDA not available{seen}; the params need a GPU: {'; '.join(reasons)}"
        return None, (f"CUDA not available: CPU only{seen}; fine for the embedded tiny default "
                      f"(backbone tiny, CPU launcher)")
    kinds: dict[str, int] = {}  # 8 alike GPUs are one entry
    for g in info.gpus:
        kind = f"{g['name']} ({g['memory_gib']} GiB, {g['capability']})"
        kinds[kind] = kinds.get(kind, 0) + 1
    gpus = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    detail = f"CUDA {info.cuda_version}, {info.count} GPU(s): {gpus}; bf16 {'yes' if info.bf16 else 'NO'}"
    if not info.bf16:
        return False, detail + " (sft and rl train in bf16 on a GPU: this GPU cannot)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return True, detail + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")


def modes(ctx: Context) -> dict[str, str]:
    return {"sft": ctx.value("sft.train.mode", "full"), "rl": ctx.value("rl.grpo.mode", "full")}


def check_gpu_memory(ctx: Context) -> tuple[bool | None, str]:
    info = ctx.cuda
    if not info.available:
        raise Skip("no GPU")
    params, source = parameter_estimate(ctx)
    if params is None:
        raise Skip(f"backbone size unknown ({source})")
    launch = parse_launcher(str(ctx.value("launcher", "python")), ctx.root)
    stage = (launch.zero_stage or 3) if launch.deepspeed else 0
    for value in trl_deepspeed(ctx).values():  # the recipe's way: the Trainer's deepspeed argument
        with contextlib.suppress(AesError):
            stage = deepspeed_stage(ctx, value) or stage
    processes = launch.processes if isinstance(launch.processes, int) else info.count
    world = max(1, processes * launch.nodes)
    full = "full" in modes(ctx).values()
    reference = 2 if float(ctx.value("rl.grpo.beta", 0.01) or 0) > 0 else 0
    if not full:  # the bf16 base (adapters and their states are small); ZeRO-3 shards it
        per_gpu = (2 + reference) / (world if stage == 3 else 1)
        what = f"2 B LoRA base{f' + {reference} B reference' if reference else ''}"
    else:  # bf16 weights 2 + bf16 gradients 2 + fp32 master weights and two Adam moments 12, sharded by stage
        per_gpu = {3: (16 + reference) / world, 2: 2 + reference + 14 / world, 1: 4 + reference + 12 / world}.get(
            stage, 16 + reference)
        what = f"16 B full fine-tuning{f' + {reference} B reference' if reference else ''}"
    need = params * per_gpu
    smallest = min(g["memory_gib"] for g in info.gpus)
    sharding = f"ZeRO-{stage} over {world} processes" if stage else "not sharded (every GPU holds all)"
    rule = f"{params / 1e9:.2f}B params ({source}) x {what}, {sharding}"
    if need / GiB > 0.9 * smallest:
        return False, (f"~{need / GiB:.1f} GiB per GPU for weights and optimizer states alone ({rule}) > 90% of "
                       f"{smallest} GiB: use ZeRO-3 (configs/accelerate/zero3.yaml), more GPUs or mode: lora")
    return True, f"~{need / GiB:.1f} GiB per GPU of {smallest} GiB for weights and optimizer states ({rule}); " \
                 f"activations come on top"


def trl_deepspeed(ctx: Context) -> dict[str, object]:
    """``sft.train.trl.deepspeed`` / ``rl.grpo.trl.deepspeed`` where set: key -> a config file or mapping."""
    found = {}
    for key in ("sft.train.trl", "rl.grpo.trl"):
        value = (ctx.value(key, {}) or {}).get("deepspeed")
        if value:
            found[f"{key}.deepspeed"] = value
    return found


def deepspeed_stage(ctx: Context, value) -> int | None:
    """The ZeRO stage of a trl ``deepspeed`` option (a JSON file relative to the root, or a mapping); AesError
    when the file is missing or unreadable."""
    if isinstance(value, (str, Path)):
        path = ctx.path(str(value))
        try:
            value = json.loads(path.read_text())
        except OSError:
            raise AesError(f"DeepSpeed config {value} not found ({path})") from None
        except ValueError as err:
            raise AesError(f"DeepSpeed config {value} is not JSON: {err}") from None
    stage = ((value or {}).get("zero_optimization") or {}).get("stage") if isinstance(value, dict) else None
    return int(stage) if stage is not None else None


def deepspeed_reasons(ctx: Context) -> list[str]:
    """What uses DeepSpeed: the launcher (or its accelerate config), a trl ``deepspeed`` option (with its stage)."""
    launcher = str(ctx.value("launcher", "python"))
    launch = parse_launcher(launcher, ctx.root)
    reasons = []
    if launch.deepspeed or re.search(r"zero3|deepspeed", launcher, re.I):
        reasons.append(f"the launcher {launcher}")
    for key, value in trl_deepspeed(ctx).items():
        stage = deepspeed_stage(ctx, value)  # AesError: a missing or broken file
        what = value if isinstance(value, str) else "a mapping"
        reasons.append(f"{key} ({what}{f', ZeRO-{stage}' if stage is not None else ''})")
    return reasons


def import_probe(module: str, timeout: float = 180.0) -> tuple[bool | None, str]:
    """(True, version) if ``module`` imports in a fresh interpreter, (None, ...) if not installed, (False, why)."""
    if importlib.util.find_spec(module) is None:
        return None, "not installed"
    code = f"import {module}; print(getattr({module}, '__version__', '?'))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"import {module} did not finish within {timeout:.0f} s"
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
        return False, f"installed but does not import: {last[0]}"
    return True, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"


def check_deepspeed(ctx: Context) -> tuple[bool | None, str]:
    reasons = deepspeed_reasons(ctx)
    if not reasons:
        raise Skip("not used (neither the launcher nor a trl option names DeepSpeed)")
    ok, what = import_probe("deepspeed")
    if not ok:
        return False, f"deepspeed {what}; needed by {'; '.join(reasons)}: pip install deepspeed (for this torch build)"
    refused = deepspeed_refusals(ctx)
    if refused:
        return False, f"deepspeed {what}, used by {'; '.join(reasons)}, but " + "; ".join(refused)
    return True, f"deepspeed {what}, used by {'; '.join(reasons)}; the stages' trl configs pass DeepSpeed's checks"


def deepspeed_refusals(ctx: Context) -> list[str]:
    """What the sft and rl stages would refuse in their trl configs (DeepSpeed options, batch mismatches),
    found by the stages' own builders before any model loads."""
    from aesr1.config import load_section
    from aesr1.policy.sft import SFTStageConfig
    from aesr1.policy.train import sft_config
    from aesr1.rl.rl import RLStageConfig, grpo_config

    refused = []
    with tempfile.TemporaryDirectory(prefix="aesr1-doctor-") as scratch:
        for section, cls, build in (("sft", SFTStageConfig, lambda c: sft_config(c.train, Path(scratch))),
                                    ("rl", RLStageConfig, lambda c: grpo_config(c, Path(scratch), [], []))):
            try:
                cfg = load_section(ctx.params_path, section, cls)
                with contextlib.chdir(ctx.root):  # the stages' paths are relative to the project root
                    build(cfg)
            except AesError as err:
                refused.append(str(err))
    return refused


def check_flash_attn(ctx: Context) -> tuple[bool | None, str]:
    ok, what = import_probe("flash_attn")
    if ok is None:
        return None, "not installed: optional (the project loads models with transformers' default attention, SDPA)"
    if ok:
        return True, f"flash_attn {what} (optional: the project's models use transformers' default attention)"
    return False, f"flash_attn {what}: reinstall it for this torch build, or uninstall it"


def check_vllm(ctx: Context) -> tuple[bool | None, str]:
    if not ctx.value("rl.grpo.use_vllm", False):
        raise Skip("rl.grpo.use_vllm is false")
    ok, what = import_probe("vllm")
    mode = ctx.value("rl.grpo.vllm_mode", "colocate")
    if ok:
        extra = "; mode server: start `trl vllm-serve` first" if mode == "server" else ""
        return True, f"vllm {what} (rl.grpo.use_vllm, mode {mode}){extra}"
    return False, f"vllm {what}; rl.grpo.use_vllm is true: install vLLM matching this torch build"


# --- launcher

@dataclass
class Launch:
    tool: str  # python | torchrun | accelerate | deepspeed | unknown
    processes: int | str | None  # a count, "gpu" (one per visible GPU), "auto", or None (unknown)
    nodes: int = 1
    deepspeed: bool = False
    zero_stage: int | None = None
    gpu: bool = False  # it asks for GPUs
    source: str = ""  # where the process count came from
    errors: list[str] = field(default_factory=list)


def _flag(tokens: list[str], *names: str) -> str | None:
    for i, token in enumerate(tokens):
        for name in names:
            if token == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def _count(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def parse_launcher(launcher: str, root: Path) -> Launch:
    """What a params ``launcher`` starts: the tool, its process count, DeepSpeed, whether it wants GPUs."""
    try:
        tokens = shlex.split(launcher)
    except ValueError as err:
        return Launch("unknown", None, errors=[f"cannot parse the launcher: {err}"])
    names = [Path(t).name for t in tokens]
    if "torchrun" in names or any(t in ("torch.distributed.run", "torch.distributed.launch") for t in tokens):
        nproc = _flag(tokens, "--nproc_per_node", "--nproc-per-node") or "1"
        nodes = _flag(tokens, "--nnodes") or "1"
        processes = os.cpu_count() if nproc == "cpu" else _count(nproc)
        return Launch("torchrun", processes, nodes=int(nodes) if nodes.isdigit() else 1, gpu=nproc == "gpu",
                      source="--nproc_per_node")
    if "accelerate" in names and "launch" in tokens:
        launch = Launch("accelerate", None)
        config_file = _flag(tokens, "--config_file", "--config-file")
        conf: dict = {}
        if config_file is not None:
            path = Path(config_file) if Path(config_file).is_absolute() else root / config_file
            if not path.is_file():
                launch.errors.append(f"accelerate config {config_file} not found (relative to {root})")
            else:
                import yaml

                conf = yaml.safe_load(path.read_text()) or {}
                launch.source = f"{config_file} num_processes"
        else:
            default = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "accelerate" / \
                "default_config.yaml"
            if default.is_file():
                import yaml

                conf = yaml.safe_load(default.read_text()) or {}
                launch.source = f"accelerate's default config {default}"
        flag = _flag(tokens, "--num_processes", "--num-processes")
        if flag is not None:
            launch.source = "--num_processes"
        launch.processes = _count(flag) if flag is not None else conf.get("num_processes")
        launch.nodes = int(_flag(tokens, "--num_machines", "--num-machines") or conf.get("num_machines") or 1)
        distributed_type = str(conf.get("distributed_type", "")).upper()
        launch.deepspeed = "--use_deepspeed" in tokens or distributed_type == "DEEPSPEED"
        stage = _flag(tokens, "--zero_stage", "--zero-stage") or (conf.get("deepspeed_config") or {}).get("zero_stage")
        launch.zero_stage = int(stage) if stage is not None else None
        cpu = "--cpu" in tokens or bool(conf.get("use_cpu"))
        launch.gpu = not cpu and ("--multi_gpu" in tokens or launch.deepspeed
                                  or distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP"))
        return launch
    if "deepspeed" in names:
        gpus = _flag(tokens, "--num_gpus", "--num-gpus")
        return Launch("deepspeed", _count(gpus) if gpus else "gpu", deepspeed=True, gpu=True,
                      source="--num_gpus" if gpus else "deepspeed's default: every GPU")
    if names and names[0].startswith("python"):
        return Launch("python", 1, source="one process")
    return Launch("unknown", None, errors=[] if tokens else ["the launcher is empty"])


def check_launcher(ctx: Context) -> tuple[bool | None, str]:
    params = ctx.need_params()
    launcher = params.get("launcher")
    if not launcher:
        raise Skip("no launcher in params (dvc.yaml's stages then start however they say)")
    launch = parse_launcher(str(launcher), ctx.root)
    if launch.errors:
        return False, f"{launcher}: {'; '.join(launch.errors)}"
    info = ctx.cuda
    nodes = f" per node ({launch.nodes} nodes)" if launch.nodes > 1 else ""
    if info.available:
        n = info.count
        processes = n if launch.processes in ("gpu", "auto") else launch.processes
        if processes is None:
            return None, f"{launcher}: cannot tell how many processes it starts ({launch.tool}); {n} GPUs visible"
        if not isinstance(processes, int):
            return False, f"{launcher}: process count {processes!r} not understood"
        if processes == n:
            return True, f"{launcher}: {processes} processes{nodes}, one per visible GPU ({n}; from {launch.source})"
        fix = ("--nproc_per_node gpu" if launch.tool == "torchrun" else f"num_processes: {n}" if
               launch.tool == "accelerate" else f"--num_gpus {n}")
        return False, (f"{launcher}: starts {processes} process(es){nodes} (from {launch.source}) but {n} GPU(s) are "
                       f"visible: one process per GPU, e.g. {fix}")
    if launch.gpu:
        return False, f"{launcher}: asks for GPUs ({launch.tool}), but CUDA is not available"
    processes = os.cpu_count() if launch.processes == "auto" else launch.processes
    if processes is None:
        return None, f"{launcher}: cannot tell how many processes it starts ({launch.tool})"
    cores = os.cpu_count() or 1
    more = f"; more processes than the {cores} cores" if isinstance(processes, int) and processes > cores else ""
    return True, f"{launcher}: {processes} CPU process(es) (gloo, no CUDA){more}"


# --- backbone and its size

def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``, ``~``) is a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def qwen25vl_parameters(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                        vision_hidden: int, vision_depth: int, vision_intermediate: int, patch: int,
                        tied: bool = True) -> int:
    """A Qwen2.5-VL's parameter count from its shape (transformers' layout: biases on q/k/v and the vision
    tower's linears, RMS norms, a 2 x 2 patch merger)."""
    kv = kv_heads * (hidden // heads)
    attention = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden
    text = vocab * hidden * (1 if tied else 2) + layers * (attention + 3 * hidden * intermediate + 2 * hidden) + hidden
    block = (2 * vision_hidden + vision_hidden * 3 * vision_hidden + 3 * vision_hidden + vision_hidden ** 2
             + vision_hidden + 3 * vision_hidden * vision_intermediate + 2 * vision_intermediate + vision_hidden)
    merged = 4 * vision_hidden
    merger = vision_hidden + merged * merged + merged + merged * hidden + hidden
    return text + 3 * 2 * patch * patch * vision_hidden + vision_depth * block + merger


def tiny_parameters(ctx: Context) -> int:
    try:
        from aesr1.backbone.tiny import TinyModelConfig

        defaults = {f.name: f.default for f in dataclasses.fields(TinyModelConfig)}
    except ImportError:
        defaults = dict(vocab_size=1024, hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384,
                        vision_depth=2, vision_hidden_size=96, patch_size=8)
    t = {**defaults, **(ctx.value("backbone.tiny", {}) or {})}
    return qwen25vl_parameters(t["vocab_size"], t["hidden_size"], t["intermediate_size"], t["layers"], t["heads"],
                               t["kv_heads"], t["vision_hidden_size"], t["vision_depth"], 2 * t["vision_hidden_size"],
                               t["patch_size"])


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def folder_parameters(folder: Path) -> int | None:
    """Parameters of a local model folder from its weight files' size and dtype."""
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    if not weights:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or
                (config.get("text_config") or {}).get("dtype") or "bfloat16")
    return sum(p.stat().st_size for p in weights) // DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)


# parameter counts with the vision tower (a name's "7B" undercounts the VLM): qwen25vl_parameters of their
# config.json shapes (7B: vocabulary 152,064, hidden 3584, intermediate 18944, 28 layers, 28/4 heads, untied)
KNOWN_SIZES = {"qwen2.5-vl-3b": 3_754_622_976, "qwen2.5-vl-7b": 8_292_166_656}


def parameter_estimate(ctx: Context) -> tuple[int | None, str]:
    """(parameter count or None, where it came from) of ``backbone.name_or_path``; no network."""
    name = str(ctx.value("backbone.name_or_path", "tiny"))
    if name == "tiny":
        return tiny_parameters(ctx), "backbone.tiny"
    folder = ctx.path(name)
    if folder.is_dir():
        found = folder_parameters(folder)
        return (found, "its weight files") if found else (None, f"no weight files in {folder}")
    if "hub_parameters" in ctx.cache:
        return ctx.cache["hub_parameters"], "the hub's safetensors metadata"
    known = next((n for family, n in KNOWN_SIZES.items() if family in name.lower()), None)
    if known:
        return known, "the known size of its family"
    match = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", name.split("/")[-1])
    if match:
        return int(float(match.group(1)) * 1e9), f"its name ({match.group(0)})"
    return None, f"not in its name, {name}"


def check_backbone(ctx: Context) -> tuple[bool | None, str]:
    name = str(ctx.value("backbone.name_or_path", "tiny"))
    if name == "tiny":
        return True, f"tiny: the embedded Qwen2.5-VL (~{tiny_parameters(ctx) / 1e6:.1f}M parameters), built by the " \
                     f"backbone stage"
    folder = ctx.path(name)
    if folder.is_dir():
        return check_model_folder(folder, name)
    if folder.exists():
        return False, f"backbone.name_or_path {name}: {folder} is a file, not a model folder"
    if looks_like_path(name):
        return False, f"backbone.name_or_path {name}: no such folder ({folder})"
    return check_hub_model(ctx, name)


def check_model_folder(folder: Path, name: str) -> tuple[bool, str]:
    config = folder / "config.json"
    if not config.is_file():
        return False, f"backbone folder {name}: no config.json in {folder} (a model saved with save_pretrained?)"
    try:
        model_type = json.loads(config.read_text()).get("model_type", "?")
    except ValueError as err:
        return False, f"backbone folder {name}: config.json is not JSON ({err})"
    params = folder_parameters(folder)
    if params is None:
        return False, f"backbone folder {name}: config.json (model_type {model_type}) but no weight files " \
                      f"(*.safetensors, *.bin)"
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        return False, f"backbone folder {name}: model_type {model_type}, but no processor " \
                      f"(preprocessor_config.json): the backbone stage loads AutoProcessor from it"
    return True, f"local folder {folder}: model_type {model_type}, ~{params / 1e9:.2f}B parameters"


def check_hub_model(ctx: Context, name: str) -> tuple[bool, str]:
    from huggingface_hub import HfApi, try_to_load_from_cache

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        cached = try_to_load_from_cache(name, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception:  # noqa: BLE001  (not a valid repo id: the request below says so)
        cached = None
    in_cache = isinstance(cached, str)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        if in_cache:
            return True, f"{name}: HF_HUB_OFFLINE is set and its config is in the local cache ({Path(cached).parent})"
        return False, f"{name}: HF_HUB_OFFLINE is set and it is not in the local cache: download it where there " \
                      f"is network (`hf download {name}`) or set backbone.name_or_path to a local folder"
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    started = time.monotonic()
    try:
        info = HfApi(endpoint=endpoint).model_info(name, timeout=ctx.timeout)
    except GatedRepoError:
        return False, f"{name} is gated on {endpoint}: accept its licence there and set HF_TOKEN"
    except RepositoryNotFoundError:
        return False, f"{name}: no such model on {endpoint} (or a private one without HF_TOKEN)"
    except Exception as err:  # noqa: BLE001  (offline, DNS, refused, timeout: all say the same to the user)
        took = time.monotonic() - started
        why = f"{type(err).__name__}: {str(err)[:160]}"
        if in_cache:
            return True, (f"{name}: the hub ({endpoint}) did not answer ({why}), but its config is in the local "
                          f"cache: set HF_HUB_OFFLINE=1 to load it without the network")
        return False, (f"{name}: cannot reach the hub at {endpoint} ({why}, after {took:.1f} s; timeout "
                       f"{ctx.timeout:g} s) and it is not in the local cache: offline? download it where there is "
                       f"network (`hf download {name}`) and set backbone.name_or_path to its folder, or set "
                       f"HF_ENDPOINT to a reachable mirror")
    total = getattr(getattr(info, "safetensors", None), "total", None)
    if total:
        ctx.cache["hub_parameters"] = int(total)
    model_type = (getattr(info, "config", None) or {}).get("model_type", "?")
    size = f", {total / 1e9:.2f}B parameters" if total else ""
    return True, f"{name} on {endpoint}: model_type {model_type}{size}" + (" (also in the local cache)" if in_cache
                                                                           else "")


# --- disk

def nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_disk(ctx: Context) -> tuple[bool | None, str]:
    ctx.need_params()
    params, source = parameter_estimate(ctx)
    mode = modes(ctx)
    folders: dict[Path, float] = {}  # folder -> bytes it needs
    if params is not None:
        for stage, key in (("sft", "sft.checkpoint_root"), ("rl", "rl.checkpoint_root")):
            folder = ctx.path(ctx.value(key, "data/checkpoints"))
            # sft's and rl's checkpoints never coexist (a finished stage removes its own): the larger counts
            folders[folder] = max(folders.get(folder, 0), params * (16 if mode[stage] == "full" else 1))
        for key, default in (("sft.out_dir", "data/models/sft"), ("rl.out_dir", "data/models/rapo")):
            folder = ctx.path(ctx.value(key, default))
            folders[folder] = folders.get(folder, 0) + params * 4
    else:
        folders = {ctx.path(ctx.value(k, "data/checkpoints")): 0 for k in ("sft.checkpoint_root", "rl.checkpoint_root")}
    devices: dict[int, dict] = {}
    for folder, need in folders.items():
        existing = nearest_existing(folder)
        device = devices.setdefault(existing.stat().st_dev, {"at": existing, "need": GiB, "folders": []})
        device["need"] += need
        device["folders"].append(str(folder.relative_to(ctx.root)) if folder.is_relative_to(ctx.root) else str(folder))
    rule = ("rule: parameters x (16 B per full fine-tuning checkpoint, 1 B LoRA, + 4 B per saved sft/rl policy) "
            "+ 1 GiB")
    parts, ok = [], True
    for device in devices.values():
        free = shutil.disk_usage(device["at"]).free
        need = device["need"]
        where = f"{', '.join(device['folders'])} (at {device['at']}): {free / GiB:.1f} GiB free"
        if params is None:
            parts.append(where)
            continue
        verdict = "" if free >= 1.5 * need else " (tight)" if free >= need else " (NOT ENOUGH)"
        ok = ok and free >= need
        parts.append(f"{where}, need ~{need / GiB:.1f} GiB{verdict}")
    size = f"{params / 1e9:.3g}B" if params is not None and params >= 1e8 else \
        f"{params / 1e6:.3g}M" if params is not None else "?"
    if params is None:
        return None, f"{'; '.join(parts)}; backbone size unknown ({source}): no threshold"
    return ok, f"{'; '.join(parts)}; {size} params ({source}), modes sft {mode['sft']} rl {mode['rl']}; {rule}"


# --- teacher

def teacher_config(ctx: Context):
    """The openai teacher's config (validated), the analytic one's raw mapping, or AesError."""
    raw = dict(ctx.value("distill.teacher", {}) or {})
    kind = raw.get("kind", "analytic")
    if kind != "openai":
        if kind != "analytic":
            raise AesError(f"distill.teacher.kind {kind!r}: expected analytic or openai")
        return raw
    from pydantic import TypeAdapter, ValidationError

    try:
        from aesr1.aescot.teacher_openai import OpenAITeacherConfig
    except ImportError:  # mid-move: it was split out of aesr1.aescot.teachers
        from aesr1.aescot.teachers import OpenAITeacherConfig
    try:
        return TypeAdapter(OpenAITeacherConfig).validate_python(raw)
    except ValidationError as err:
        problems = "; ".join(f"distill.teacher.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise AesError(problems) from None


def check_teacher(ctx: Context) -> tuple[bool | None, str]:
    ctx.need_params()
    cfg = teacher_config(ctx)
    if isinstance(cfg, dict):
        raise Skip("analytic teacher: offline, nothing to reach")
    key = os.environ.get(cfg.api_key_env)
    if not key:
        return False, (f"{cfg.api_key_env} is not set (distill.teacher.api_key_env): export it before the distill "
                       f"stage (the key never goes in a file)")
    import httpx

    url = cfg.base_url.rstrip("/") + "/models"

    def scrub(text: str) -> str:
        return text.replace(key, "***")

    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=ctx.timeout)
    except httpx.TimeoutException:
        return False, f"GET {url}: no answer within {ctx.timeout:g} s"
    except httpx.HTTPError as err:
        return False, f"GET {url}: cannot connect ({type(err).__name__}: {scrub(str(err))[:160]})"
    status = response.status_code
    if status in (401, 403):
        return False, f"GET {url}: HTTP {status}: the endpoint rejects the key in {cfg.api_key_env}"
    if status == 404:
        return False, f"GET {url}: HTTP 404: no /models there: is base_url right (OpenAI-compatible servers " \
                      f"answer under /v1)?"
    if status >= 400:
        return False, f"GET {url}: HTTP {status}: {scrub(response.text)[:200]}"
    try:
        served = [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return True, f"GET {url}: HTTP {status} with the key in {cfg.api_key_env} (the model list is unreadable: " \
                     f"'{cfg.model}' not confirmed)"
    if cfg.model not in served:
        shown = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
        return False, f"GET {url}: HTTP {status}, but it does not serve '{cfg.model}' (distill.teacher.model); " \
                      f"it serves: {shown or 'nothing'}"
    return True, f"GET {url}: HTTP {status} with the key in {cfg.api_key_env}; serves '{cfg.model}'"


# --- DVC and MLflow

def redact(text: str) -> str:
    """URLs less their credentials (``scheme://user:password@host``)."""
    return re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", text)


def check_dvc_remote(ctx: Context) -> tuple[bool | None, str]:
    exe = shutil.which("dvc") or (Path(sys.executable).parent / "dvc")
    command = [str(exe)] if Path(exe).is_file() else [sys.executable, "-m", "dvc"]
    if command[0] == sys.executable and importlib.util.find_spec("dvc") is None:
        return False, "dvc is not installed (pip install -e . installs it)"
    try:
        done = subprocess.run([*command, "remote", "list"], cwd=ctx.root, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "`dvc remote list` did not finish within 60 s"
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
        return False, f"`dvc remote list` in {ctx.root} failed: {redact(message[0])}"
    remotes = [redact(line.strip()) for line in done.stdout.splitlines() if line.strip()]
    if not remotes:
        return None, "no DVC remote: fine on a single machine (several machines share outputs through one: " \
                     "docs/orchestration.md)"
    return True, f"{len(remotes)} remote(s): {'; '.join(remotes)}"


def check_mlflow(ctx: Context) -> tuple[bool | None, str]:
    from aesr1.tracking import tracking_uri

    uri = tracking_uri(ctx.root)
    if uri.startswith(("http://", "https://")):
        import httpx

        url = uri.rstrip("/") + "/health"
        try:
            response = httpx.get(url, timeout=ctx.timeout)
        except httpx.TimeoutException:
            return False, f"MLflow server {redact(uri)}: GET /health no answer within {ctx.timeout:g} s"
        except httpx.HTTPError as err:
            return False, f"MLflow server {redact(uri)}: GET /health cannot connect ({type(err).__name__}: " \
                          f"{redact(str(err))[:160]})"
        if response.status_code != 200:
            return False, f"MLflow server {redact(uri)}: GET /health answered HTTP {response.status_code}"
        return True, f"MLflow server {redact(uri)}: /health OK"
    if uri.startswith("sqlite:"):
        if ":///" not in uri or not uri.split(":///", 1)[1]:
            return None, f"{uri}: an in-memory or unusual SQLite URI, not checked"
        store = Path(uri.split(":///", 1)[1])  # sqlite:////abs/mlflow.db or sqlite:///relative.db
        folder = (store if store.is_absolute() else ctx.root / store).parent
    elif uri.startswith("file:") or "://" not in uri:
        store = Path(re.sub(r"^file:(//)?", "", uri))
        folder = store if store.is_absolute() else ctx.root / store
        store = folder
    else:
        return None, f"{redact(uri)}: not checked (only sqlite, file and http(s) stores are)"
    existing = nearest_existing(folder)
    if not os.access(existing, os.W_OK):
        return False, f"{uri}: {existing} is not writable"
    target = store if store.is_absolute() else ctx.root / store
    if target.is_file() and not os.access(target, os.W_OK):
        return False, f"{uri}: {target} is not writable"
    made = "" if folder.exists() else f" ({folder} will be created under {existing})"
    return True, f"{uri}: writable{made}"


CHECKS: dict[str, Callable[[Context], tuple[bool | None, str]]] = {
    "params": check_params,
    "torch": check_torch,
    "cuda": check_cuda,
    "gpu_memory": check_gpu_memory,
    "deepspeed": check_deepspeed,
    "flash_attn": check_flash_attn,
    "vllm": check_vllm,
    "launcher": check_launcher,
    "backbone": check_backbone,
    "disk": check_disk,
    "teacher": check_teacher,
    "dvc_remote": check_dvc_remote,
    "mlflow": check_mlflow,
}


def run_check(name: str, ctx: Context) -> Check:
    """One check as a record: what it found, or why it failed, never a traceback."""
    try:
        ok, detail = CHECKS[name](ctx)
    except Skip as skip:
        return Check(name, None, str(skip))
    except AesError as err:
        return Check(name, False, str(err))
    except Exception as err:  # noqa: BLE001  (the check itself could not run: say so, on its line)
        log.debug("check %s", name, exc_info=True)
        return Check(name, False, f"the check could not run: {type(err).__name__}: {err}")
    return Check(name, ok, detail)


def run_checks(ctx: Context, skip: set[str] | frozenset = frozenset()) -> list[Check]:
    return [Check(name, None, "skipped (--skip)") if name in skip else run_check(name, ctx) for name in CHECKS]


def table(checks: list[Check], title: str) -> str:
    label = {True: "ok", False: "FAIL", None: "--"}
    width = max(len(c.name) for c in checks)
    lines = [title]
    for check in checks:
        head = f"  {label[check.ok]:<4}  {check.name:<{width}}  "
        wrapped = textwrap.wrap(check.detail, width=max(40, 118 - len(head)), break_on_hyphens=False) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * len(head) + rest for rest in wrapped[1:]]
    failed = [c.name for c in checks if c.ok is False]
    lines.append(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "no check failed")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- smoke test

@dataclass(frozen=True)
class SmokeShape:
    """A random-weight Qwen2.5-VL's shape for the smoke test."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden_size: int
    vision_depth: int
    vision_heads: int
    vision_intermediate_size: int
    patch_size: int
    window_size: int  # pixels (Qwen2.5-VL: 112)
    image_size: int  # the smoke images are image_size x image_size, the processor's max_pixels image_size ** 2
    rope_theta: float = 1e6


# Qwen2.5-VL-3B-Instruct's shape (its config.json)
QWEN25_VL_3B = SmokeShape(vocab_size=151_936, hidden_size=2048, intermediate_size=11008, layers=36, heads=16,
                          kv_heads=2, vision_hidden_size=1280, vision_depth=32, vision_heads=16,
                          vision_intermediate_size=3420, patch_size=14, window_size=112, image_size=224)
# the --cpu shape: the same code in seconds; its vocabulary is larger than the tokenizer's, as the 3B shape's is
TINY_SHAPE = SmokeShape(vocab_size=2048, hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2,
                        vision_hidden_size=32, vision_depth=2, vision_heads=2, vision_intermediate_size=64,
                        patch_size=8, window_size=32, image_size=32, rope_theta=1e4)
TOKENIZER_VOCAB = 1024  # the project's own byte-level BPE (aesr1.backbone.tiny.build_tokenizer)


@dataclass(frozen=True)
class SmokeSteps:
    sft_batch: int  # per process
    rl_images: int  # per process
    generations: int  # K
    completion_tokens: int
    generate_tokens: int


GPU_STEPS = SmokeSteps(sft_batch=2, rl_images=2, generations=4, completion_tokens=64, generate_tokens=32)
CPU_STEPS = SmokeSteps(sft_batch=2, rl_images=2, generations=2, completion_tokens=8, generate_tokens=8)

# ZeRO-3 through the Trainer's `deepspeed` argument, as the qwen2.5-vl-7b recipe sets it (its file when this is a
# checkout, else this copy); an `accelerate launch --config_file configs/accelerate/zero3.yaml` brings its own
ZERO3_FILE = "configs/deepspeed/zero3.json"
ZERO3 = {
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,  # save_model gathers the partitions into one model
        "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def smoke_model(shape: SmokeShape, seed: int = 0, device: str = "cpu", dtype=None):
    """A random-weight Qwen2.5-VL of ``shape`` and its processor, wired as :func:`aesr1.backbone.tiny.build_tiny`
    wires the tiny model (the project's tokenizer, trl's Qwen2.5-VL chat template). The embedding has
    ``shape.vocab_size`` rows, more than the tokenizer's ids: sampled ids beyond them decode to nothing."""
    from importlib import resources

    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from aesr1.backbone.tiny import build_tokenizer

    tokenizer = build_tokenizer(TOKENIZER_VOCAB)
    chat_template = resources.files("trl").joinpath("chat_templates", "qwen2_5_vl.jinja").read_text()
    image_processor = Qwen2VLImageProcessor(patch_size=shape.patch_size, merge_size=2, temporal_patch_size=2,
                                            min_pixels=(2 * shape.patch_size) ** 2, max_pixels=shape.image_size ** 2)
    video_processor = Qwen2VLVideoProcessor(patch_size=shape.patch_size, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=chat_template)
    ids = tokenizer.convert_tokens_to_ids
    half = shape.hidden_size // shape.heads // 2  # mrope_section sums to head_dim / 2 (3B: [16, 24, 24])
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    full_attention = [i for i in range(shape.vision_depth) if i % 8 == 7] or [shape.vision_depth - 1]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(shape.vocab_size, len(tokenizer)), hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=32768,
            tie_word_embeddings=True, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta, "mrope_section": section},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(
            depth=shape.vision_depth, hidden_size=shape.vision_hidden_size,
            intermediate_size=shape.vision_intermediate_size, num_heads=shape.vision_heads,
            patch_size=shape.patch_size, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=shape.hidden_size,
            window_size=shape.window_size, fullatt_block_indexes=full_attention),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def smoke_images(folder: Path, count: int, size: int, seed: int = 0):
    """``count`` random JPEGs with scores and short trajectories: image_id, image_path, score, trajectory."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from aesr1.trajectory import make_trajectory

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        score = round(float(rng.random()), 2)
        rows.append({"image_id": f"smoke{i}", "image_path": str(path), "score": score,
                     "trajectory": make_trajectory("Lighting: the light is even. Composition: the frame is busy.",
                                                   score)})
    return pd.DataFrame(rows)


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported late) timing each optimizer step."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.steps: list[float] = []
                self._started = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._started = time.perf_counter()
                return control

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.steps.append(round(time.perf_counter() - self._started, 3))
                return control

        return _Timer()


class Phases:
    """Wall time and peak memory (per GPU: torch.cuda.max_memory_allocated) of each phase of the smoke test."""

    def __init__(self, report: dict):
        import torch

        self.torch = torch
        self.report = report
        self.peaks: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, into: dict, key: str):
        torch = self.torch
        self.report["phase"] = name
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peaks[name] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        into[key] = round(time.perf_counter() - started, 2)


def _zero_stage(trainer) -> int | None:
    """The ZeRO stage the trainer really runs under (None: no DeepSpeed)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


def _require_zero3(trainer, zero3: bool, phase: str) -> None:
    if zero3 and _zero_stage(trainer) != 3:
        raise RuntimeError(f"{phase}: ZeRO-3 was asked for, but the trainer runs under "
                           f"{'no DeepSpeed' if _zero_stage(trainer) is None else f'ZeRO-{_zero_stage(trainer)}'}")


def _free(trainer) -> None:
    import gc

    import torch

    with contextlib.suppress(Exception):
        trainer.accelerator.free_memory()  # drops the DeepSpeed engine, optimizer and scheduler
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _deepspeed_options(zero3: bool) -> dict:
    """The trl option that selects ZeRO-3, unless accelerate's launcher already did (its config's plugin).

    Asked once, before any trainer: a trainer under DeepSpeed leaves ACCELERATE_USE_DEEPSPEED=true in the
    environment, and a later one without this option would get accelerate's default plugin (ZeRO-2)."""
    if not zero3 or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {}
    project_file = Path(__file__).resolve().parents[1] / ZERO3_FILE  # the recipe's, in a checkout
    return {"deepspeed": str(project_file) if project_file.is_file() else ZERO3}


def _single_process_environment() -> None:
    """DeepSpeed wants a process group even for one process: give it a loopback one when nothing launched us."""
    if "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _sft_phase(model_dir: Path, folder: Path, frame, steps: SmokeSteps, zero3: bool, ds: dict,
               phases: Phases) -> dict:
    from aesr1.policy.data import sft_dataset
    from aesr1.policy.generation import load_processor
    from aesr1.policy.train import TrainConfig, fit
    from aesr1.policy.trainer import save_trained

    out: dict = {}
    cfg = TrainConfig(mode="full", epochs=1, learning_rate=1e-5, lr_scheduler="cosine", warmup=0,
                      batch_size=steps.sft_batch, grad_accum=1, freeze_vision=True, gradient_checkpointing=True,
                      save_steps=10 ** 9, logging_steps=1, seed=0, trl={"max_steps": 1, **ds})
    processor = load_processor(model_dir)
    timer = StepTimer()
    with phases("sft", out, "fit_s"):  # the model is loaded inside fit, after the Trainer's arguments (ZeRO-3)
        trainer = fit(str(model_dir), processor, sft_dataset(frame, "trajectory"), cfg, folder / "checkpoints-sft",
                      report_to=[], callbacks=[timer], progress_name="doctor-sft")
    out["zero_stage"] = _zero_stage(trainer)
    _require_zero3(trainer, zero3, "sft")
    out["step_s"] = timer.steps
    out["loss"] = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    with phases("sft_save", out, "save_s"):
        save_trained(trainer, processor, folder / "sft")
    _free(trainer)
    return out


def _rl_phase(folder: Path, frame, steps: SmokeSteps, zero3: bool, ds: dict, phases: Phases) -> dict:
    from aesr1.policy.trainer import quiet, save_trained
    from aesr1.rl.rl import GRPOParams, RLStageConfig, build_trainer

    out: dict = {}
    frame.to_parquet(folder / "train.parquet")
    grpo = GRPOParams(num_generations=steps.generations, images_per_device=steps.rl_images, grad_accum=1, epochs=1,
                      max_steps=1, learning_rate=1e-6, beta=0.01, temperature=1.0,
                      max_completion_length=steps.completion_tokens, mode="full", freeze_vision=True,
                      gradient_checkpointing=True, logging_steps=1, save_steps=10 ** 9,
                      completions_table_every=10 ** 9, seed=0, trl=ds)
    cfg = RLStageConfig(model=str(folder / "sft"), train_manifest=str(folder / "train.parquet"),
                        test_manifest=str(folder / "train.parquet"), out_dir=str(folder / "rl"),
                        checkpoint_root=str(folder / "checkpoints-rl"), balance_bands=False, log_model=False, grpo=grpo)
    timer = StepTimer()
    with phases("rl_build", out, "build_s"):  # the policy and the reference model load here
        trainer, processor, *_ = build_trainer(cfg, report_to=[], callbacks=[timer])
    quiet(trainer)
    out["zero_stage"] = _zero_stage(trainer)
    _require_zero3(trainer, zero3, "rl")
    with phases("rl", out, "train_s"):
        trainer.train()
    out["step_s"] = timer.steps
    logged = next((h for h in trainer.state.log_history if "reward" in h), {})
    out["reward"] = logged.get("reward")
    out["completion_mean_length"] = logged.get("completions/mean_length")
    with phases("rl_save", out, "save_s"):
        save_trained(trainer, processor, cfg.out_dir)
    _free(trainer)
    return out


def _generate_phase(folder: Path, frame, steps: SmokeSteps, world: int, phases: Phases) -> dict:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from aesr1.policy.generation import load_policy, sample

    unset_hf_deepspeed_config()  # a plain load now, not a ZeRO-3 partitioned one
    out: dict = {}
    with phases("reload", out, "load_s"):
        model, processor = load_policy(folder / "rl")  # AutoModelForImageTextToText, bf16 on this process's GPU
    out["model_class"] = type(model).__name__
    images = list(frame.image_path[: 2 * world])
    with phases("generate", out, "generate_s"):
        sampled = sample(model, processor, images, n=1, do_sample=False, max_new_tokens=steps.generate_tokens,
                         batch_size=4)
    out.update(completions=len(sampled.texts), tokens=sampled.tokens, first=sampled.texts[0][:80])
    return out


def _memory_record(phases: Phases, rank: int) -> dict:
    import resource

    import torch

    record = {"rank": rank, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        record.update(device=props.name, cuda_index=index, total_gib=round(props.total_memory / GiB, 1),
                      peak_gib=phases.peaks, peak_gib_max=max(phases.peaks.values(), default=None))
    else:
        record["device"] = "cpu"
    return record


def _expire(report: dict, seconds: float, rank: int, own_folder: bool) -> None:
    """The watchdog: past its time limit the smoke test stops with what it has (a hung collective included)."""
    if rank == 0:
        if own_folder and report.get("folder"):
            shutil.rmtree(report["folder"], ignore_errors=True)
        late = {**report, "ok": False, "error": f"timed out after {seconds:g} s in phase {report.get('phase')}"}
        print(json.dumps(late, indent=1, default=str), file=sys.__stdout__, flush=True)
        print(f"aesr1 doctor --smoke: {late['error']}", file=sys.__stderr__, flush=True)
    os._exit(124)


def smoke(layers: int | None = None, cpu: bool = False, zero3: str = "auto", folder: str | None = None,
          timeout: float = 600.0) -> tuple[int, dict]:
    """Run the smoke test; (exit status, report). Every launched process runs it; rank 0's report is complete.
    Past ``timeout`` seconds every process exits with status 124 after rank 0 prints the report so far.

    The GPU path has not yet been run on a GPU (see the module docstring)."""
    import torch

    from aesr1 import distributed

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not cpu:
        return 2, {"ok": False, "error": "--smoke needs a CUDA GPU (torch.cuda.is_available() is False); "
                                         "--smoke --cpu runs the same steps on a tiny shape on the CPU"}
    shape = TINY_SHAPE if cpu else QWEN25_VL_3B
    if layers:
        shape = dataclasses.replace(shape, layers=layers)
    steps = CPU_STEPS if cpu else GPU_STEPS
    zero3 = zero3 == "on" or (zero3 == "auto" and on_gpu)  # auto: on GPUs, not on the CPU
    if zero3 and importlib.util.find_spec("deepspeed") is None:
        return 1, {"ok": False, "error": "the smoke test runs under ZeRO-3 and deepspeed is not installed: "
                                         "pip install -e '.[gpu]' (or --zero3 off for plain data parallel)"}
    if zero3 and not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 2, {"ok": False, "error": "--cpu --zero3 on runs on one process only: on several CPU processes the "
                                         "Trainer's CPU path does not route DeepSpeed (accelerate sees one process "
                                         "where DeepSpeed sees them all; tests/test_zero3.py)"}
    if zero3:
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo)
        _single_process_environment()
    ds = _deepspeed_options(zero3)  # now, before any trainer sets ACCELERATE_USE_DEEPSPEED
    given = ds.get("deepspeed")
    source = given if isinstance(given, str) else "aesr1.doctor.ZERO3" if given else "accelerate's launcher config"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    report: dict = {"ok": False, "note": NOTE_UNRUN, "device": "cuda" if on_gpu else "cpu", "world_size": world,
                    "zero3": zero3, "deepspeed_config": source if zero3 else None, "shape": dataclasses.asdict(shape),
                    "tokenizer_vocab": TOKENIZER_VOCAB, "steps": dataclasses.asdict(steps)}
    if on_gpu and world == 1 and torch.cuda.device_count() > 1:
        report["warning"] = (f"one process on {torch.cuda.device_count()} visible GPUs: only one is used; launch "
                             f"with torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor --smoke")
    started = time.perf_counter()
    phases = Phases(report)
    rank = int(os.environ.get("RANK", "0"))
    own_folder = folder is None
    watchdog = threading.Timer(timeout, _expire, args=(report, timeout, rank, own_folder))
    watchdog.daemon = True
    watchdog.start()
    try:
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        here = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="aesr1-doctor-")) if rank == 0 else None
        if distributed.launched():
            here = Path(distributed.gather([str(here) if here else ""])[0])  # rank 0's folder, for every process
        here.mkdir(parents=True, exist_ok=True)
        report["folder"] = str(here)
        frame = None
        if distributed.is_main():
            with phases("build", report, "build_s"):
                model, processor = smoke_model(shape, device="cuda" if on_gpu else "cpu",
                                               dtype=torch.bfloat16 if on_gpu else torch.float32)
            report["parameters"] = sum(p.numel() for p in model.parameters())
            with phases("save", report, "save_s"):
                model.save_pretrained(here / "random")
                processor.save_pretrained(here / "random")
            del model
            world_images = max(8, 2 * world * max(steps.sft_batch, steps.rl_images))
            smoke_images(here / "images", world_images, shape.image_size).to_parquet(here / "images.parquet")
        distributed.barrier()
        import pandas as pd

        frame = pd.read_parquet(here / "images.parquet")
        if on_gpu:
            torch.cuda.empty_cache()
        report["sft"] = _sft_phase(here / "random", here, frame, steps, zero3, json.loads(json.dumps(ds)), phases)
        if own_folder and distributed.is_main():  # RL starts from the SFT model: disk for the 3B's next copies
            shutil.rmtree(here / "random", ignore_errors=True)
        report["rl"] = _rl_phase(here, frame, steps, zero3, json.loads(json.dumps(ds)), phases)
        report["generate"] = _generate_phase(here, frame, steps, world, phases)
        report["ok"] = True
        report.pop("phase", None)
    except Exception as err:  # noqa: BLE001  (the report says where it broke; the traceback goes to the log)
        log.exception("smoke test failed in phase %s", report.get("phase"))
        report["error"] = f"{type(err).__name__}: {str(err)[:500]}"
    report["total_s"] = round(time.perf_counter() - started, 1)
    record = _memory_record(phases, rank)
    try:
        report["memory"] = distributed.gather([record]) if distributed.launched() else [record]
        distributed.barrier()
    except Exception as err:  # noqa: BLE001  (a process group broken by the failure above)
        report["memory"] = [record]
        report.setdefault("error", f"gathering the processes' memory: {err}")
    watchdog.cancel()
    if own_folder and rank == 0 and report.get("folder"):
        shutil.rmtree(report["folder"], ignore_errors=True)
    return (0 if report["ok"] else 1), report


# ---------------------------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``doctor`` subcommand's options (``--params`` included)."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds for each network check: hub, teacher, MLflow server (default: 10)")
    parser.add_argument("--skip", action="append", default=[], metavar="CHECK",
                        help=f"skip these checks (repeat or comma-separate): {', '.join(CHECKS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="GPU smoke test instead of the checks: a random-weight Qwen2.5-VL-3B shape, one SFT and "
                             "one RL step under ZeRO-3 on every visible GPU, save, reload, generate; JSON out. "
                             "Launch: torchrun --standalone --nproc_per_node gpu -m aesr1.cli doctor --smoke. "
                             "Not yet run on a GPU")
    parser.add_argument("--cpu", action="store_true",
                        help="with --smoke: a tiny shape on the CPU (hides any GPU), without ZeRO-3 unless --zero3 on")
    parser.add_argument("--layers", type=int, help="with --smoke: text layers (default: 36, the 3B shape's)")
    parser.add_argument("--zero3", choices=["auto", "on", "off"], default="auto",
                        help="with --smoke: DeepSpeed ZeRO-3 (auto: on GPUs yes, with --cpu no; on with --cpu: "
                             "DeepSpeed's CPU accelerator, one process); off: plain data parallel")
    parser.add_argument("--smoke-dir", help="with --smoke: keep the models here (default: a temporary folder, removed; "
                                            "one machine: every process must see it)")
    parser.add_argument("--smoke-timeout", type=float, default=600.0,
                        help="with --smoke: stop after this many seconds, exit status 124 (default: 600)")
    return parser


def run(args: argparse.Namespace) -> int:
    """The ``doctor`` subcommand: 0 all checks passed (or were skipped), 1 one failed, 2 a usage error
    (or --smoke without a GPU)."""
    if not args.smoke and (args.cpu or args.layers or args.zero3 != "auto" or args.smoke_dir
                           or args.smoke_timeout != 600.0):
        print("aesr1 doctor: --cpu, --layers, --zero3, --smoke-dir and --smoke-timeout go with --smoke",
              file=sys.stderr)
        return 2
    if args.smoke:
        if args.cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch for a GPU
        with contextlib.redirect_stdout(sys.stderr):  # trainer chatter off stdout: it carries the JSON alone
            status, report = smoke(args.layers, args.cpu, args.zero3, args.smoke_dir, args.smoke_timeout)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(report, indent=1))
            if "error" in report:
                print(f"aesr1 doctor --smoke: {report['error']}", file=sys.stderr)
        return status
    skip = {name.strip() for item in args.skip for name in item.split(",") if name.strip()}
    unknown = sorted(skip - set(CHECKS))
    if unknown:
        print(f"aesr1 doctor: no check(s) {unknown}; the checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    ctx = Context(args.params, args.timeout)
    checks = run_checks(ctx, skip)
    failed = any(c.ok is False for c in checks)
    if args.json:
        print(json.dumps({"params": str(ctx.params_path), "recipe": (ctx.params or {}).get("recipe") or "tiny",
                          "ok": not failed, "checks": [c.as_dict() for c in checks]}, indent=1))
    else:
        recipe = (ctx.params or {}).get("recipe") or "tiny"
        print(table(checks, f"aesr1 doctor: {ctx.params_path} (recipe {recipe})"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aesr1.doctor``: the same as ``aesr1 doctor`` (for a launcher, or before cli.py wires it)."""
    parser = add_arguments(argparse.ArgumentParser(prog="aesr1 doctor", description=DESCRIPTION))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aesr1").setLevel(logging.INFO)
    from aesr1.distributed import quiet_other_processes

    quiet_other_processes()
    try:
        return run(args)
    except AesError as err:
        print(f"aesr1 doctor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
