"""Create (or update) the two work pools the deployments in ``prefect.yaml`` use.

``cpu``: process workers for the pipeline and the ablations. ``gpu``: process workers on
GPU machines for any stage sent there (sft, rl, evaluate). Its runs see every GPU of their
machine unless ``--gpu-devices`` restricts them (``CUDA_VISIBLE_DEVICES``); params.yaml's
``launcher`` starts one process per GPU it sees.

    python -m flows.pools                      # gpu pool's runs see all their machine's GPUs
    python -m flows.pools --gpu-devices 0,1,2,3
"""

from __future__ import annotations

import argparse

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.workers.process import ProcessWorker

CPU_POOL, GPU_POOL = "cpu", "gpu"


# Flow runs use the worker's environment as it is: no `uv run` re-install of the project.
RUN_ENV = {"PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "false"}


def pool_template(env: dict[str, str] | None = None) -> dict:
    """The process worker's job template, with default environment variables for its flow runs."""
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {**RUN_ENV, **(env or {})}
    return template


def create_pools(gpu_devices: str | None = None) -> list[str]:
    gpu_env = {"CUDA_VISIBLE_DEVICES": gpu_devices} if gpu_devices else {}
    pools = {CPU_POOL: pool_template(), GPU_POOL: pool_template(gpu_env)}
    with get_client(sync_client=True) as client:
        for name, template in pools.items():
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template),
                                    overwrite=True)
    return list(pools)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-devices", help="CUDA_VISIBLE_DEVICES for the gpu pool's flow runs (default: all GPUs)")
    args = parser.parse_args(argv)
    print("work pools:", ", ".join(create_pools(args.gpu_devices)))


if __name__ == "__main__":
    main()
