"""The doctor's checks of this machine and the params.

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
- ``gpu_memory``: with CUDA, the planner's verdict (:mod:`aesr1.doctor.plan`, ``aesr1 doctor --plan``):
  each phase's peak per GPU (SFT, RL training, RL generation, evaluation) from the memory model
  (:mod:`aesr1.doctor.memory`) for the params on the GPUs found here. It fails where a phase leaves less
  than 10% of the smallest GPU free, and names the first change that makes it fit.
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
  filesystem. Rule: two resumable checkpoints, since the Trainer writes the next before it deletes the
  last (save_total_limit 1), of the larger of sft's and rl's (a finished stage removes its own); each
  holds the bf16 weights (2 B/param) and the fp32 master weights and AdamW moments of what trains (12 B
  per trained parameter; LoRA: 14 B per adapter parameter), the memory model's constants; + 2 B/param
  for each saved bf16 policy, sft and rl, + 1 GiB. Below that it fails; below 1.5x that it is ok but
  tight. A 7B full fine-tune (vision frozen) needs about 2 x 108 GB + 2 x 16.6 GB = 249 GB; the tiny
  model about 1 GiB.
- ``teacher``: for ``distill.teacher.kind: openai``, the API key's variable (``api_key_env``) is set (the
  key is never printed), and one ``GET {base_url}/models`` with the key (``--timeout``) answers 200 and
  lists the model. The analytic teacher is offline: skipped.
- ``dvc_remote``: ``dvc remote list``. No remote is a null note: fine on a single machine.
- ``mlflow``: :func:`aesr1.tracking.tracking_uri`. For SQLite or file stores the folder must be
  writable. For http(s), ``GET /health`` (``--timeout``), then, with the credentials MLflow's client
  reads from the environment, what a stage asks first (:func:`aesr1.tracking.check_access`): the
  experiment read and written (its kind tag, set to the value it holds). A refusal names the server,
  the HTTP status and the variable to set (401) or the user and experiment (403).
- ``prefect``: with ``PREFECT_API_URL`` set, ``GET {PREFECT_API_URL}/admin/version`` with
  ``PREFECT_API_AUTH_STRING`` as Prefect's client sends it (basic auth). HTTP 401 names the variable.
  Unset: skipped (a flow run starts a temporary local server).
"""

from __future__ import annotations

import contextlib
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aesr1.doctor.memory import HEADROOM, GiB
from aesr1.errors import AesError, redact
from aesr1.policy.families import FAMILIES

log = logging.getLogger(__name__)


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

    def __init__(self, params_path: str | Path = "params.yaml", timeout: float = 10.0, root: Path | None = None):
        from aesr1.config import read_params, with_recipe

        self.params_path = Path(params_path)
        self.root = root or self.params_path.resolve().parent  # the stages run here (dvc.yaml's wdir)
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


def check_gpu_memory(ctx: Context) -> tuple[bool | None, str]:
    """The planner's verdict (:mod:`aesr1.doctor.plan`) for the params on the GPUs found here."""
    from aesr1.doctor import plan

    if not ctx.cuda.available:
        raise Skip("no GPU")
    try:
        found = plan.plan(ctx)
    except plan.PlanError as err:
        raise Skip(str(err)) from None
    v = found.verdict
    peaks = ", ".join(f"{title} {v.peaks[key] / GiB:.1f}" for key, title in plan.PHASES.items())
    where = (f"peak GiB per GPU on {v.hardware.label}, {v.hardware.gpu_gib * (1 - HEADROOM):.1f} usable: {peaks} "
             f"(aesr1 doctor --plan: the table)")
    if v.host:
        where += f"; host memory for the offloaded optimizer {v.host / GiB:.1f} GiB" + (
            f" of this machine's {v.hardware.host_gib:.0f} GiB" if v.hardware.host_gib is not None else "")
    if found.fits:
        return True, where
    fix = f"; what makes it fit: {plan.describe(found.changes[0])}" if found.changes else ""
    return False, f"does not fit: {where}{fix}"


def trl_deepspeed(ctx: Context) -> dict[str, object]:
    """``sft.train.trl.deepspeed`` / ``rl.grpo.trl.deepspeed`` where set: key -> a config file or mapping."""
    found = {}
    for key in ("sft.train.trl", "rl.grpo.trl"):
        value = (ctx.value(key, {}) or {}).get("deepspeed")
        if value:
            found[f"{key}.deepspeed"] = value
    return found


def deepspeed_config(ctx: Context, value) -> dict:
    """A trl ``deepspeed`` option's config: its JSON file (relative to the root) read, or the mapping itself;
    AesError when the file is missing or unreadable."""
    if isinstance(value, (str, Path)):
        path = ctx.path(str(value))
        try:
            value = json.loads(path.read_text())
        except OSError:
            raise AesError(f"DeepSpeed config {value} not found ({path})") from None
        except ValueError as err:
            raise AesError(f"DeepSpeed config {value} is not JSON: {err}") from None
    return value if isinstance(value, dict) else {}


def deepspeed_stage(ctx: Context, value) -> int | None:
    """The ZeRO stage of a trl ``deepspeed`` option (None: the config names none)."""
    stage = (deepspeed_config(ctx, value).get("zero_optimization") or {}).get("stage")
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
    offload: bool = False  # the optimizer offloaded to the CPU (or NVMe)
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
        offload = _flag(tokens, "--offload_optimizer_device", "--offload-optimizer-device") or \
            (conf.get("deepspeed_config") or {}).get("offload_optimizer_device")
        launch.offload = offload in ("cpu", "nvme")
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


def parameter_count(ctx: Context) -> tuple[int | None, str]:
    """(parameters or None, where the count came from) of ``backbone.name_or_path``, without the network: its shape
    (:func:`aesr1.doctor.plan.backbone_shape`), else its weight files, else the hub's answer to the backbone
    check."""
    from aesr1.doctor import memory, plan

    name = str(ctx.value("backbone.name_or_path", "tiny"))
    try:
        shape, source = plan.backbone_shape(ctx)
        return memory.param_counts(shape)["total"], f"its shape: {source}"
    except plan.PlanError as err:
        unknown = str(err)
    folder = ctx.path(name)
    if folder.is_dir():
        found = folder_parameters(folder)
        return (found, "its weight files") if found else (None, f"no weight files in {folder}")
    if "hub_parameters" in ctx.cache:
        return ctx.cache["hub_parameters"], "the hub's safetensors metadata"
    return None, unknown


def check_backbone(ctx: Context) -> tuple[bool | None, str]:
    name = str(ctx.value("backbone.name_or_path", "tiny"))
    if name == "tiny":
        kind = str(ctx.value("backbone.tiny.family", "qwen2_5_vl"))
        if kind not in FAMILIES:
            return False, f"backbone.tiny.family {kind}: {unsupported()}"
        count = parameter_count(ctx)[0]
        size = f" (~{count / 1e6:.1f}M parameters)" if count else ""
        return True, f"tiny: the embedded {FAMILIES[kind].name}{size}, built by the backbone stage"
    folder = ctx.path(name)
    if folder.is_dir():
        return check_model_folder(folder, name)
    if folder.exists():
        return False, f"backbone.name_or_path {name}: {folder} is a file, not a model folder"
    if looks_like_path(name):
        return False, f"backbone.name_or_path {name}: no such folder ({folder})"
    return check_hub_model(ctx, name)


def unsupported() -> str:
    return f"not a family the policy code handles (aesr1.policy.families: {', '.join(FAMILIES)})"


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
    if model_type not in FAMILIES:
        return False, f"backbone folder {name}: model_type {model_type}: {unsupported()}"
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
    if model_type != "?" and model_type not in FAMILIES:
        return False, f"{name} on {endpoint}: model_type {model_type}: {unsupported()}"
    size = f", {total / 1e9:.2f}B parameters" if total else ""
    return True, f"{name} on {endpoint}: model_type {model_type}{size}" + (" (also in the local cache)" if in_cache
                                                                           else "")


# --- disk

def nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def count(parameters: int) -> str:
    return f"{parameters / 1e9:.3g}B" if parameters >= 1e8 else f"{parameters / 1e6:.3g}M"


def checkpoint_bytes(ctx: Context, stage: str, parameters: int) -> tuple[float, str]:
    """One resumable checkpoint of ``stage`` (memory.checkpoint_bytes of the backbone's shape), and how it was
    counted; without a known shape every parameter counts as trained (an upper bound), a LoRA adapter as nothing."""
    from aesr1.doctor import memory, plan

    section = "sft.train" if stage == "sft" else "rl.grpo"
    mode = ctx.value(f"{section}.mode", "full")
    try:
        shape, _ = plan.backbone_shape(ctx)
    except plan.PlanError:
        if mode == "lora":
            return 0.0, "LoRA adapter: not counted (shape unknown)"
        return parameters * (memory.FROZEN_WEIGHT_BYTES + memory.MASTER_BYTES + memory.ADAM_BYTES), \
            "every parameter counted as trained (shape unknown)"
    need = memory.checkpoint_bytes(shape, mode, int(ctx.value(f"{section}.lora_r", 16)),
                                   bool(ctx.value(f"{section}.freeze_vision", True)))
    return need, f"{mode} {need / GiB:.1f} GiB"


def check_disk(ctx: Context) -> tuple[bool | None, str]:
    """Free space for what sft and rl write. Two resumable checkpoints coexist while the Trainer saves (it writes
    the next before it deletes the last, save_total_limit 1); sft's and rl's never do (a finished stage removes
    its own), so the larger counts; each saved policy is bf16."""
    from aesr1.doctor import memory

    ctx.need_params()
    params, source = parameter_count(ctx)
    folders: dict[Path, float] = {}  # folder -> bytes it needs
    counted = []
    if params is not None:
        for stage, key in (("sft", "sft.checkpoint_root"), ("rl", "rl.checkpoint_root")):
            folder = ctx.path(ctx.value(key, "data/checkpoints"))
            one, how = checkpoint_bytes(ctx, stage, params)
            counted.append(f"{stage} {how}")
            folders[folder] = max(folders.get(folder, 0), memory.CHECKPOINTS_AT_ONCE * one)
        for key, default in (("sft.out_dir", "data/models/sft"), ("rl.out_dir", "data/models/rapo")):
            folder = ctx.path(ctx.value(key, default))
            folders[folder] = folders.get(folder, 0) + params * memory.SAVED_POLICY_BYTES
    else:
        folders = {ctx.path(ctx.value(k, "data/checkpoints")): 0 for k in ("sft.checkpoint_root", "rl.checkpoint_root")}
    devices: dict[int, dict] = {}
    for folder, need in folders.items():
        existing = nearest_existing(folder)
        device = devices.setdefault(existing.stat().st_dev, {"at": existing, "need": GiB, "folders": []})
        device["need"] += need
        device["folders"].append(str(folder.relative_to(ctx.root)) if folder.is_relative_to(ctx.root) else str(folder))
    rule = (f"rule: {memory.CHECKPOINTS_AT_ONCE} resumable checkpoints at once (the Trainer writes the next before "
            f"it deletes the last) of the larger stage, each the bf16 weights (2 B/param) + 12 B per trained "
            f"parameter (fp32 master and AdamW moments; LoRA: 14 B per adapter parameter), + 2 B/param per saved "
            f"sft/rl policy + 1 GiB")
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
    if params is None:
        return None, f"{'; '.join(parts)}; backbone size unknown ({source}): no threshold"
    return ok, (f"{'; '.join(parts)}; {count(params)} params ({source}); one checkpoint: {', '.join(counted)}; "
                f"{rule}")


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
    from aesr1.tracking import served, tracking_uri

    uri = tracking_uri(ctx.root)
    if served(uri):
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
        return mlflow_access(uri, ctx.timeout)
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


def mlflow_access(uri: str, timeout: float) -> tuple[bool, str]:
    """What a stage asks the server first, with this process's credentials (/health answers anyone)."""
    from mlflow.exceptions import MlflowException

    from aesr1.tracking import TrackingAccessError, check_access

    try:
        found = check_access(uri, timeout)
    except TrackingAccessError as err:
        return False, str(err)
    except MlflowException as err:
        return False, f"MLflow server {redact(uri)}: /health OK, but {redact(err.message.splitlines()[0])[:200]}"
    return True, f"MLflow server {redact(uri)}: /health OK; {found}"


def check_prefect(ctx: Context) -> tuple[bool | None, str]:
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise Skip("PREFECT_API_URL is not set: a flow run here starts a temporary local Prefect server")
    import base64

    import httpx

    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    headers = {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"} if auth else {}
    url = api.rstrip("/") + "/admin/version"
    server = f"Prefect server {redact(api)}"
    try:
        response = httpx.get(url, headers=headers, timeout=ctx.timeout)
    except httpx.TimeoutException:
        return False, f"{server}: GET /admin/version no answer within {ctx.timeout:g} s"
    except httpx.HTTPError as err:
        return False, f"{server}: GET /admin/version cannot connect ({type(err).__name__}: {redact(str(err))[:160]})"
    if response.status_code == 401:
        if auth:
            return False, (f"{server} refused (HTTP 401): it does not accept the auth string in "
                           f"PREFECT_API_AUTH_STRING: set the server's PREFECT_SERVER_API_AUTH_STRING there")
        return False, f"{server} refused (HTTP 401): set PREFECT_API_AUTH_STRING (the server's " \
                      f"PREFECT_SERVER_API_AUTH_STRING)"
    if response.status_code != 200:
        return False, f"{server}: GET /admin/version answered HTTP {response.status_code}"
    version = response.text.strip().strip('"')
    how = "with the auth string in PREFECT_API_AUTH_STRING" if auth else "without an auth string (the server asks none)"
    return True, f"{server}: version {version}, {how}"


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
    "prefect": check_prefect,
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

