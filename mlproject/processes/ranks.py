"""Which process this is in a job of several, read from the launcher's environment (torchrun, Slurm's srun, or this
job's own launch of torchrun) before any process group exists; and rank 0's decisions handed to the others.

Only global rank 0 talks to the tracking server. The others get what they need from it (the resolved
configuration, a resumed run's checkpoint) through the process group, so that no node needs a shared file system.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mlproject.processes import stopping

log = logging.getLogger(__name__)

# How long a rank waits for the others in a collective before the job fails: a rank that died must not leave
# the rest hanging until a CI timeout, and rank 0's start (tracking server, data) must not trip it.
TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Place:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = ""  # torchrun, slurm, or "" for a single process

    @property
    def zero(self) -> bool:
        return self.rank == 0


def place(environ: Mapping[str, str] = os.environ) -> Place:
    """torchrun (TorchElastic) sets RANK, WORLD_SIZE and LOCAL_RANK; srun sets SLURM_PROCID and SLURM_NTASKS."""
    if "TORCHELASTIC_RUN_ID" in environ:
        return Place(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]), "torchrun")
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        world, rank = int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"])
        return Place(rank, world, int(environ.get("SLURM_LOCALID", "0")), "slurm")
    return Place()


def needs_launch(devices: int, num_nodes: int, here: Place) -> bool:
    """Several devices asked for, and no launcher started the processes: this job launches them (torchrun)."""
    return here.world == 1 and not here.launcher and devices * num_nodes > 1


def join(here: Place, gpu: bool) -> None:
    """Join the job's process group now, before any Trainer: Lightning reuses it, and rank 0 can hand the others
    its decisions first. NCCL between GPUs, gloo between CPUs."""
    import torch
    import torch.distributed as dist

    if here.world == 1 or dist.is_initialized():
        return
    if here.launcher == "slurm":  # srun names no rendezvous: Lightning's, from the node list and the job id
        from lightning_fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()
        os.environ.setdefault("MASTER_ADDR", slurm.main_address)
        os.environ.setdefault("MASTER_PORT", str(slurm.main_port))
    if gpu:
        torch.cuda.set_device(here.local_rank)
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend, rank=here.rank, world_size=here.world, timeout=TIMEOUT)
    log.debug("rank %d of %d joined the process group (%s)", here.rank, here.world, backend)


def share(value: Any, here: Place) -> Any:
    """Rank 0's `value`, on every rank (the others pass None)."""
    if here.world == 1:
        return value
    import torch.distributed as dist

    box = [value if here.zero else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(flag: bool, world: int) -> bool:
    """Whether any rank says so: the ranks decide together, so that none stops alone inside a collective."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def leave() -> None:
    """Ends this rank's process group once its job is over, so that gloo's threads are joined before the
    interpreter exits: left to the exit, a rank now and then aborts there ("terminate called without an active
    exception") and its launcher stops the others as if it had failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def stop_together(world: int) -> Iterator[Callable[[], None]]:
    """A check() the ranks call at the same points: they stop together on any rank's signal. One process: signals
    stop it at once, and check() does nothing."""
    if world == 1:
        yield lambda: None
        return
    with stopping.together(lambda flag: agree(flag, world)) as check:
        yield check
