"""Several processes (``accelerate launch``, ``torchrun``): who is main, waiting for it, sharing work.

A stage launched on N processes runs its function on every process (the Trainer needs
them all); only the main process logs, writes files and talks to MLflow. One process
is the ordinary case: every helper here is then a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta
from functools import cache

# How long a collective waits for the slowest process before the run is killed (params' top-level ``ddp_timeout``,
# transformers' name and unit). torch's own default (10 minutes under NCCL) is shorter than the main process's
# saves: gathering and writing a 7B model, merging a LoRA adapter, uploading 16 GB to MLflow while the others
# wait at a barrier.
DEFAULT_TIMEOUT_S = 7200
_timeout_s = DEFAULT_TIMEOUT_S


def launched() -> bool:
    """Started as one of several processes (the launchers set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def set_timeout(seconds: int) -> None:
    """The process group's timeout; set before the group exists (the first collective creates it)."""
    global _timeout_s
    if int(seconds) != _timeout_s and (state.cache_info().currsize or _group_exists()):
        raise RuntimeError("the process group already exists: set its timeout before any collective")
    _timeout_s = int(seconds)


def timeout_s() -> int:
    return _timeout_s


def _group_exists() -> bool:
    return "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized()


@cache
def state():
    """accelerate's process state; it sets up torch.distributed from the launcher's environment.

    On a machine without a GPU the processes talk over gloo (accelerate only picks the
    CPU backend when told to), so ``torchrun --nproc_per_node 2`` works on a laptop. DeepSpeed
    and the Trainer then reuse this group, so its timeout (:func:`set_timeout`) is the run's.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=_timeout_s))


def single_process_group() -> None:
    """A process group of one process, on loopback, when no launcher started this one (``launcher: python``).

    DeepSpeed needs a process group even for one process (ZeRO-3's partitioned load, its
    engine); finding none and no launcher's environment, it looks for MPI and dies without
    mpi4py. Under a launcher the launcher's group serves.
    """
    if launched() or _group_exists():
        return
    import torch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", rank=0,
                                         world_size=1, timeout=timedelta(seconds=_timeout_s))


def world_size() -> int:
    return state().num_processes if launched() else 1


def is_main() -> bool:
    return not launched() or state().is_main_process


def barrier() -> None:
    """Wait until every process gets here (no-op on one process)."""
    if launched():
        state().wait_for_everyone()


def close() -> None:
    """Wait for every process, then close the process group: a gloo group left open at exit can abort the process.

    A stage that never made a group (one process without DeepSpeed) does not import torch for it (3 s on the
    data stages).
    """
    if not _group_exists():
        return
    import torch.distributed

    barrier()
    torch.distributed.destroy_process_group()


def device():
    """This process's device: its own GPU under a launcher, else the GPU or the CPU."""
    return state().device


def rank() -> int:
    """This process's index among the launched processes (0 on one process)."""
    return state().process_index if launched() else 0


def shard(items: list) -> list:
    """This process's contiguous share of ``items`` (accelerate's split); the shares cover each item once."""
    if not launched():
        return list(items)
    with state().split_between_processes(list(items)) as share:
        return list(share)


def gather(values: list) -> list:
    """Concatenate every process's list, in process order (so ``gather(shard(x))`` is ``x``)."""
    if world_size() == 1:
        return list(values)
    from accelerate.utils import gather_object

    return gather_object(values)


def quiet_other_processes() -> None:
    """Only the main process logs at INFO; the others keep warnings and errors."""
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("aesr1").setLevel(logging.WARNING)
