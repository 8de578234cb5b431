"""Data parallel across processes started by `torchrun` or `accelerate launch` (they set WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT). One process per GPU; only the main process logs, evaluates and
writes checkpoints. Without those variables everything here is a no-op."""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


def device_for_rank(name=None):
    """This process's device: cuda:LOCAL_RANK under a launcher with GPUs, else `name` or the default."""
    if world_size() > 1 and torch.cuda.is_available() and name in (None, "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def init(device):
    """Join the process group once (NCCL on GPUs, gloo on CPU)."""
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast(tensor, source=0):
    """The main process's value on every process."""
    if dist.is_initialized():
        dist.broadcast(tensor, source)
    return tensor


def main_value(value, device):
    """The main process's float `value` on every process (alone: `value`). A device tensor read back is a host
    sync: only where other processes must agree."""
    if not dist.is_initialized():
        return value
    return float(broadcast(torch.tensor(value, device=device)))


def all_reduce_min(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def accumulating(wrapped, last):
    """DDP's no_sync() on every micro-batch but the last: gradients are all-reduced once per optimizer step."""
    if isinstance(wrapped, DistributedDataParallel) and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def wrap(model, device):
    """DistributedDataParallel over the model when several processes train it, else the model."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
