"""Collectives on torch.distributed, and nothing else: the ops and the accumulator call these.

Collectives run on CPU tensors under gloo and on the current CUDA device under nccl. The
data-parallel reduction of the accumulator's state is RankAccumulator.all_reduce (built on
rankops.ops.accumulate.all_reduce_state); vocabulary-parallel statistics are
rankops.ops.vocab_parallel.token_stats_vocab_parallel.
"""
import datetime
import os

import torch

_EVAL_GROUP_OWNED = False  # init_eval_process_group created the default group


def dist():
    """torch.distributed, once a process group is initialised (a clear error otherwise)."""
    import torch.distributed as td
    if not td.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not td.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group() first (torchrun sets the "
                           "environment for init_method='env://')")
    return td


def comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's tensors must live: CPU for gloo, the current GPU for nccl."""
    backend = str(dist().get_backend(group)).lower()
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device  # multi-backend groups ("cpu:gloo,cuda:nccl") dispatch on the device


def all_reduce_tensor(x: torch.Tensor, op: str, group, device: torch.device) -> torch.Tensor:
    """x all-reduced with op ("sum" or "max") on the group's device, returned on device."""
    td = dist()
    buf = x.to(comm_device(group, device))
    td.all_reduce(buf, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX, group=group)
    return buf.to(device)


def init_eval_process_group(device: str):
    """For `rankops eval` under torchrun: with WORLD_SIZE > 1 in the environment, initialises
    the default process group (nccl for a CUDA device, gloo otherwise) unless it already is,
    and puts each process on its own GPU (cuda:LOCAL_RANK). Returns (device, rank, world_size)."""
    global _EVAL_GROUP_OWNED
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    import torch.distributed as dist
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=30))
        _EVAL_GROUP_OWNED = True
    return device, dist.get_rank(), dist.get_world_size()


def destroy_eval_process_group() -> None:
    """Destroys the process group init_eval_process_group created (if it did)."""
    global _EVAL_GROUP_OWNED
    if _EVAL_GROUP_OWNED:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        _EVAL_GROUP_OWNED = False


def all_reduce_timings(timings: dict, group=None) -> dict:
    """Process-seconds summed (forward_s, metric_s) and the longest wall_s, over the group."""
    total = all_reduce_tensor(torch.tensor([timings["forward_s"], timings["metric_s"]], dtype=torch.float64),
                              "sum", group, torch.device("cpu")).tolist()
    wall = all_reduce_tensor(torch.tensor([timings.get("wall_s", 0.0)], dtype=torch.float64),
                              "max", group, torch.device("cpu")).item()
    return dict(timings, forward_s=total[0], metric_s=total[1], wall_s=wall)
