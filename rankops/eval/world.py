"""The processes of one evaluation.

`World` is what `evaluate` needs to know about them: this process's rank, how many there are,
and the few collectives the run uses. One process is `World()`, for which every collective is
the identity, so the evaluation loop is written once for one process or many.

`EvalProcessGroup` is the process group `rankops eval` starts when it runs under torchrun
(WORLD_SIZE > 1 in the environment): a context manager that creates the default group only
if none exists, and destroys on exit exactly the group it created.

    >>> with EvalProcessGroup("cuda") as processes:
    ...     results = evaluate(lm, corpus, device=processes.device, distributed=processes.world.size > 1)
"""
import datetime
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from rankops.distributed import all_reduce_tensor

__all__ = ["EvalProcessGroup", "World"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    group: Optional[object] = None  # a torch.distributed group; None: the default group

    @classmethod
    def default_group(cls) -> "World":
        """The processes of the initialised default torch.distributed group (ValueError if none)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, items: Sequence) -> list:
        """This process's share: items j with j % size == rank (all of them for one process)."""
        return list(items[self.rank::self.size])

    def sum_accumulator(self, acc) -> None:
        if self.size > 1:
            acc.all_reduce(self.group)

    def reduce_timings(self, timings: dict) -> dict:
        """Process-seconds summed (forward_s, metric_s) and the longest wall_s."""
        if self.size == 1:
            return timings
        cpu = torch.device("cpu")
        seconds = torch.tensor([timings["forward_s"], timings["metric_s"]], dtype=torch.float64)
        forward_s, metric_s = all_reduce_tensor(seconds, "sum", self.group, cpu).tolist()
        wall = torch.tensor([timings.get("wall_s", 0.0)], dtype=torch.float64)
        wall_s = all_reduce_tensor(wall, "max", self.group, cpu).item()
        return dict(timings, forward_s=forward_s, metric_s=metric_s, wall_s=wall_s)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier(group=self.group)


class EvalProcessGroup:
    """The default process group of a `rankops eval` run under torchrun, owned while in use.

    On entry, with WORLD_SIZE > 1 in `environ`: puts each process on its own GPU
    (cuda:LOCAL_RANK) when `device` is "cuda", and initialises the default group (nccl for a
    CUDA device, gloo otherwise) unless one already is. With WORLD_SIZE 1 or unset it does
    nothing. `device` (str) and `world` (World) then say where and as which process to run.
    On exit it destroys the group if, and only if, it created it.
    """

    def __init__(self, device: str, environ: Mapping[str, str] = os.environ):
        self.device = device
        self.world = World()
        self.owns_group = False
        self._environ = environ

    def __enter__(self) -> "EvalProcessGroup":
        if int(self._environ.get("WORLD_SIZE", "1")) <= 1:
            return self
        import torch.distributed as dist
        if self.device == "cuda":
            self.device = f"cuda:{int(self._environ.get('LOCAL_RANK', '0'))}"
        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
            self.owns_group = True
        self.world = World(dist.get_rank(), dist.get_world_size())
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False
