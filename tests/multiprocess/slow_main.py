"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo): the main process is busy (a save,
an upload) for a while before a barrier; the other waits there. The process group's timeout is params'
``ddp_timeout``, read as the stages read it (aesr1.stage.run_stage)."""

import json
import os
import sys
import time
from pathlib import Path

from aesr1 import distributed
from aesr1.stage import ddp_timeout


def main(params: str, busy_s: str, out: str) -> None:
    distributed.set_timeout(ddp_timeout(params))
    rank = distributed.rank()  # the group is made here, as by a stage's first collective
    seen = {"timeout_s": distributed.timeout_s()}
    if rank == 0:
        time.sleep(float(busy_s))
    try:
        distributed.barrier()
        seen["barrier"] = "passed"
    except RuntimeError as error:  # gloo's own timeout: the run would be killed here
        seen["barrier"] = f"timed out: {str(error)[:200]}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    if seen["barrier"] == "passed":
        distributed.close()
        return
    os._exit(0)  # the group is broken: no clean shutdown to wait for


if __name__ == "__main__":
    main(*sys.argv[1:4])
