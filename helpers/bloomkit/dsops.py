"""DeepSpeed's compiled CPU ops: where they are built, and what they leave behind.

DeepSpeed JIT-compiles C++ ops on first use with ``torch.utils.cpp_extension``:

* ``async_io`` (ZeRO NVMe offload, links libaio) — a dozen files, minutes on 2 cores;
* ``deepspeed_shm_comm`` (the shared-memory all-reduce CPU ranks use under tensor parallelism);
* ``pin_memory``.

Three things bite on a small shared machine, and this module handles each once:

1. **The build cache is keyed by source path.**  ``~/.cache/torch_extensions/<op>`` holds one
   build; a second virtual env (a fresh clone, CI) writes its own sources into the same
   folder and rebuilds, invalidating the first.  :func:`use_env_local_build_dir` points
   ``TORCH_EXTENSIONS_DIR`` into the environment itself (``<sys.prefix>/torch_extensions``):
   one build per env, gone with the env.
2. **A build that was killed leaves its ``lock`` file**, and every later load waits on it
   forever (torch's ``FileBaton``).  :func:`clear_stale_locks` removes locks older than any
   real build takes.
3. **The shm all-reduce never frees its buffers**: each rank creates a 66 MB POSIX shared
   memory segment ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` and
   nothing unlinks it, so every multi-rank CPU launch leaks RAM until reboot (we found 20 GB
   of them after a day of tests).  :func:`release_shm_buffers` unlinks each rank's segment as
   soon as every rank has mapped it — the memory then goes away by itself when the ranks
   exit, even on a crash — and :func:`remove_shm_buffers` sweeps a finished launch's port.
4. **Two ``ninja`` builds rebuild each other's ops.**  The env's own ``ninja`` (a pip package)
   and the system's (``/usr/bin/ninja``) write different command lines into the same build
   log, so whichever runs next sees "command line changed" and recompiles the op: a minute or
   two at every DeepSpeed start on 2 busy cores, depending only on whether the env's ``bin``
   happened to be on ``PATH``.  :func:`use_env_local_build_dir` also puts the env's ``bin``
   first on ``PATH`` (inherited by every rank a launcher starts), so one ninja builds.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
STALE_LOCK_S = 900  # no real build of these ops takes 15 minutes, even on 2 busy cores
OPS = ("AsyncIOBuilder", "ShareMemCommBuilder", "PinMemoryBuilder")
PREBUILT_MARK = ".bloomkit-prebuilt"  # written once every op of OPS this DeepSpeed has is built


def use_env_local_build_dir() -> str | None:
    """Default ``TORCH_EXTENSIONS_DIR`` to ``<sys.prefix>/torch_extensions`` when this Python
    is a virtual/conda env we can write to (an explicit setting always wins).  Returns the
    directory in force, or ``None`` for torch's own default."""
    use_env_bin_first()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    prefix = Path(sys.prefix)
    if prefix == Path(sys.base_prefix) and not (prefix / "conda-meta").is_dir():
        return None  # a system Python: keep torch's per-user default
    if not os.access(prefix, os.W_OK):
        return None
    os.environ["TORCH_EXTENSIONS_DIR"] = str(prefix / "torch_extensions")
    return os.environ["TORCH_EXTENSIONS_DIR"]


def use_env_bin_first() -> bool:
    """Put this Python's ``bin`` folder first on ``PATH`` when it holds a ``ninja`` (see 4.
    above): the same build tool for every op load in this process and the ranks it starts.
    Returns whether ``PATH`` changed."""
    env_bin = Path(sys.executable).parent
    if not (env_bin / "ninja").exists():
        return False
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts and parts[0] == str(env_bin):
        return False
    os.environ["PATH"] = os.pathsep.join([str(env_bin)] + [p for p in parts if p != str(env_bin)])
    return True


def build_root() -> Path:
    """The folder that holds one sub-folder per built op."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("async_io", False)).parent


IDLE_LOCK_S = 120  # a lock with no build output written for this long has no build behind it


def clear_stale_locks(max_age_s: float = STALE_LOCK_S, root: Path | None = None,
                      idle_s: float = IDLE_LOCK_S) -> list[Path]:
    """Remove build ``lock`` files left by a killed process; returns what was removed.

    torch takes the lock at *every* load of an op, built or not (it runs ninja, which finds
    nothing to do), so a rank killed in that instant leaves one behind even with no build.
    A lock is stale when older than ``max_age_s``, or older than ``idle_s`` while nothing
    else in its folder was written for ``idle_s`` (a real build keeps writing objects)."""
    root = Path(root) if root else build_root()
    removed = []
    now = time.time()
    for lock in root.glob("*/lock"):
        try:
            age = now - lock.stat().st_mtime
            newest = max((f.stat().st_mtime for f in lock.parent.iterdir() if f != lock), default=0)
            if age > max_age_s or (age > idle_s and now - newest > idle_s):
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            pass
    return removed


def prebuild(names=OPS, log=print, unlock: bool = False) -> dict:
    """Build (or load from the cache) DeepSpeed's CPU ops now: ``make setup`` calls this so no
    test or notebook pays minutes of g++ inside a timed step.  ``unlock`` removes every build
    lock first (setup runs alone; a lock there is from a build that was killed).  Returns
    seconds per op."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for lock in clear_stale_locks(0 if unlock else STALE_LOCK_S):
        log(f"setup: removed the build lock of a killed build: {lock}")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    took = {}
    for name in names:
        builder = acc.create_op_builder(name)
        if builder is None or type(builder).__name__ == "NotImplementedBuilder":
            # an older DeepSpeed (the legacy stack: 0.15 has no CPU async_io / pin_memory)
            log(f"setup: this DeepSpeed has no CPU op {name}; skipped")
            continue
        t0 = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as exc:  # noqa: BLE001 - compiler, linker, missing headers, ...
            last = (" ".join(str(exc).split()) or type(exc).__name__)[:200]
            raise SystemExit(f"setup: DeepSpeed op {name} did not build ({last}); it needs g++ "
                             "(and libaio-dev for async_io); the first run that needs it retries")
        took[name] = round(time.perf_counter() - t0, 1)
        log(f"setup: DeepSpeed op {name} ready ({took[name]} s) in {build_root()}")
    (build_root() / PREBUILT_MARK).write_text(" ".join(took) + "\n")
    return took


# ---------------------------------------------------------------------------- shm all-reduce buffers

def shm_buffers(port: str | int | None = None, rank: int | None = None) -> list[Path]:
    """This user's DeepSpeed all-reduce segments, optionally of one master port / one rank."""
    pattern = f"{SHM_PREFIX}_{os.getuid()}_*_{port if port is not None else '*'}_" \
              f"{rank if rank is not None else '*'}"
    return sorted(SHM_DIR.glob(pattern)) if SHM_DIR.is_dir() else []


def release_shm_buffers() -> int:
    """Unlink this rank's all-reduce segment once every rank has mapped every segment.

    Call on every rank right after ``deepspeed.init_distributed`` on CPU.  DeepSpeed's
    ``shm_initialize`` returns only after it has opened all the other ranks' segments, so
    after a barrier nobody needs the names any more; the mappings stay valid and the kernel
    frees the memory when the last rank exits.  Returns how many names were unlinked."""
    port = os.environ.get("MASTER_PORT")
    if not port:
        return 0
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return remove_shm_buffers(port, rank)


def remove_shm_buffers(port: str | int, rank: int | None = None) -> int:
    """Unlink the segments of a launch on ``port`` (all ranks, or one); how many were removed."""
    n = 0
    for p in shm_buffers(port, rank):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n

