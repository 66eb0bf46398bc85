"""Collectives on torch.distributed, and nothing else: the ops and the accumulator call these.

Collectives run on CPU tensors under gloo and on the current CUDA device under nccl. The
data-parallel reduction of the accumulator's state is RankAccumulator.all_reduce (built on
rankops.ops.accumulate.all_reduce_state); vocabulary-parallel statistics are
rankops.ops.vocab_parallel.token_stats_vocab_parallel.
"""
import torch


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
