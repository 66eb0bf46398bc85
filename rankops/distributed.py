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


def exchange_rows(row, width: int, group, device: torch.device) -> list:
    """Every process's row of `width` integers, as a list of rows indexed by process: each
    process puts its row (None: zeros) into a [world, width] table of zeros and the table is
    summed over the group, O(world) values and no all-gather. Every process then checks the same
    table, so all of them agree on whether to raise."""
    td = dist()
    table = torch.zeros(td.get_world_size(group), width, dtype=torch.int64)
    if row is not None:
        table[td.get_rank(group)] = torch.tensor(row, dtype=torch.int64)
    return all_reduce_tensor(table, "sum", group, device).tolist()


def check_same(table: list, col: int, message: str, shown=None) -> None:
    """Raises ValueError(message.format(held=...)) where column col of exchange_rows' table
    differs between processes, held naming each process's value ("process 0: 1000, process
    1: 999"); shown maps a value to its display (default: the value itself)."""
    if len({row[col] for row in table}) > 1:
        shown = shown or {}
        raise ValueError(message.format(held=", ".join(f"process {r}: {shown.get(row[col], row[col])}"
                                                       for r, row in enumerate(table))))
