"""Entry point of a training job's process: `python -m maas_trainer.job_process <job dir>`.

Started by the service (directly, or once per worker by torchrun). Reads `run.json`, trains
or resumes, and reports progress on stdout (`maas_jobs.progress`). Exits 0 after writing
the package and `result.json`; on failure it reports the error's code and message first,
so the job fails with a reason instead of an exit status.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maas_jobs.entry import exit_now, run_reporting_failure
from maas_jobs.progress import ProgressReporter, exit_when_parent_dies


def _world(rank: int, world_size: int):
    """This worker's place in the run: gloo on the CPU; on GPUs, NCCL on `cuda:<local rank>`
    with a gloo side group for the CPU-side collectives."""
    import torch

    from maas_trainer.training import World

    if not torch.cuda.is_available():
        if world_size > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo")
        return World(rank, world_size)
    # cuBLAS needs this to honour torch.use_deterministic_algorithms (set before CUDA starts).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = f"cuda:{local_rank}"
    if world_size == 1:
        return World(rank, world_size, device)
    import torch.distributed as dist

    dist.init_process_group("nccl")
    return World(rank, world_size, device, dist.new_group(backend="gloo"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path, help="the job's directory holding run.json")
    arguments, _ = parser.parse_known_args(argv)  # torchrun may append launcher flags
    exit_when_parent_dies()
    # torchrun's environment says which worker this is; a single process is rank 0 of 1.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    reporter = ProgressReporter(enabled=rank == 0)
    failure_reporter = ProgressReporter()  # any rank may be the one that knows what broke

    def train() -> None:
        # Imported here: the parent watch is armed before the slow torch import.
        from maas_trainer.plan import RunConfig
        from maas_trainer.training import run_training

        world = _world(rank, world_size)
        try:
            run_training(RunConfig.read(arguments.workdir), arguments.workdir, reporter, world)
        finally:
            if world.distributed:
                import torch.distributed as dist

                dist.destroy_process_group()

    return run_reporting_failure(train, failure_reporter, "training")


if __name__ == "__main__":
    exit_now(main())
