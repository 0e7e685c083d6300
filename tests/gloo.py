"""A gloo rank for the multi-process tests (DDP, FSDP, quantized bases), set up and torn down in one order.

Every rank meets the others at a barrier before it destroys its group, and drops its models first: a rank that
tears down while its peer still has traffic in flight, or that leaves gloo work to the interpreter's exit, can end
in a C++ `terminate` (SIGABRT) instead of a Python error. The timeout makes an unmatched collective fail, not hang."""
import gc
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


@contextmanager
def gloo_rank(rank: int, tmp, world_size: int = 2):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        yield
        gc.collect()  # the models the body built, and the group references their hooks hold
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()
