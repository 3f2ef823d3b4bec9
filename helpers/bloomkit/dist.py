"""Ranks and the process group, for every launched strategy (TP, ZeRO, serving).

Launchers (``deepspeed``, ``torchrun``) start one process per rank and describe the job in
environment variables: ``RANK`` (this process among all), ``WORLD_SIZE``, ``LOCAL_RANK``
(among the processes of this host: which GPU it binds) and ``LOCAL_WORLD_SIZE``.  Nothing
here imports a strategy: it is the floor they stand on.
"""
from __future__ import annotations

import os
import signal
from datetime import timedelta

KILL_HOOK_ENV = "BLOOMKIT_TEST_KILL_RANK"  # tests: this rank SIGKILLs itself before generating

def rank() -> int:
    return int(os.environ.get("RANK", 0))

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))

def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))

def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))

def is_main() -> bool:
    return rank() == 0

def setup_distributed(device: str, timeout_s: int = 300) -> None:
    """Pick DeepSpeed's accelerator, bind this rank's GPU, start the process group (gloo on
    CPU, nccl on CUDA) — only when more than one rank was launched."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        import torch

        torch.cuda.set_device(local_rank())
    if world_size() > 1:
        import deepspeed

        if device == "cpu" and "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
            # DeepSpeed's launcher sets LOCAL_SIZE, torchrun only LOCAL_WORLD_SIZE; DeepSpeed's
            # shared-memory all-reduce reads LOCAL_SIZE to know whether all ranks share a host
            os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
        if device == "cpu":  # init_distributed loads the shm op: never wait on a dead rank's lock
            from . import dsops

            dsops.clear_stale_locks()
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl",
                                   timeout=timedelta(seconds=timeout_s))
        if device == "cpu":
            from . import dsops

            dsops.release_shm_buffers()  # DeepSpeed never frees its 66 MB/rank /dev/shm segments
        if device == "cpu" and int(os.environ.get("LOCAL_SIZE", 0)) != world_size():
            # Ranks on several hosts: DeepSpeed 0.19's CPU shm all-reduce is only initialised
            # when all ranks are local, yet still called (a segfault); use gloo's all-reduce.
            from deepspeed.comm import comm as ds_comm

            if getattr(ds_comm, "cdb", None) is not None:
                ds_comm.cdb.shm_vector_kernel_level = 0

def barrier() -> None:
    if world_size() > 1:
        import deepspeed.comm as dist

        dist.barrier()

def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as tdist

    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out

def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]

def kill_hook() -> None:
    """Test hook: with ``BLOOMKIT_TEST_KILL_RANK=R`` rank R dies by SIGKILL here (a crashed
    rank), so a test can check that the launch ends instead of hanging."""
    r = os.environ.get(KILL_HOOK_ENV)
    if r is not None and r != "" and int(r) == rank():
        os.kill(os.getpid(), signal.SIGKILL)

