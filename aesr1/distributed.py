"""Several processes (``accelerate launch``, ``torchrun``): who is main, waiting for it, sharing work.

A stage launched on N processes runs its function on every process (the Trainer needs
them all); only the main process logs, writes files and talks to MLflow. One process
is the ordinary case: every helper here is then a no-op.
"""

from __future__ import annotations

import logging
import os
from functools import cache


def launched() -> bool:
    """Started as one of several processes (the launchers set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@cache
def state():
    """accelerate's process state; it sets up torch.distributed from the launcher's environment.

    On a machine without a GPU the processes talk over gloo (accelerate only picks the
    CPU backend when told to), so ``torchrun --nproc_per_node 2`` works on a laptop.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


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

    On one process there is no group, and torch is not imported for nothing (3 s on the data stages).
    """
    if not launched():
        return
    import torch.distributed

    if torch.distributed.is_initialized():
        barrier()
        state().destroy_process_group()


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
