"""Strategy 3 (DeepSpeed ZeRO-Inference): ZeRO stage 3 with parameters offloaded to CPU or NVMe.

ZeRO-3 keeps every parameter *partitioned*: each rank holds 1/world_size of each tensor (on
the device, in CPU memory with ``offload_param.device=cpu``, or in swap files on a disk with
``device=nvme``).  A forward hook gathers a layer's full weights just before it runs and
frees them right after, so only a few layers are ever resident.  That makes a model of any
size run on one device, at the price of moving every weight over the link (PCIe, or the
disk) once per generated token: offloaded inference is bound by the link's bandwidth and
wants big batches (the same bytes serve every row of the batch).

What this module does, once for the recipe, the server, the notebook and the tests:

* :func:`add_flags` / :class:`ZeroOptions` / :func:`prepare` / :func:`load`: the one ZeRO
  set-up: the flags, typed; every check in the order a user fixes them, the process group, the
  config and the NVMe buffer plan (a :class:`ZeroSetup`); then the model.  :func:`run` is the
  recipe inside the repository, :func:`run_variant` one variant in a notebook, and the server's
  ZeRO strategy loads through the same two calls.
* :func:`ds_config` builds the blog's config from the hidden size (integer bucket sizes,
  NVMe aio buffers sized from the model, optional 4/8-bit group-wise weight quantization).
* :func:`check_nvme_path`, :func:`check_async_io`, :func:`plan_nvme_buffers` check an NVMe
  offload before anything is loaded: the directory exists, is writable, supports
  ``O_DIRECT`` and has room for the weights; libaio and a compiler are there for DeepSpeed's
  ``async_io`` op; the pinned aio buffers fit ``ulimit -l``.
* :func:`load_model` creates ``HfDeepSpeedConfig`` *before* ``from_pretrained`` (so the
  weights are partitioned/offloaded while they load: ``zero.Init``, the path that works for
  a model larger than CPU RAM), then ``deepspeed.initialize``.
* :func:`rank_prompts` / :func:`stream_generate`: with several ranks each rank generates its
  own prompts, none shared with another rank (unique streams, ``synced_gpus=True``); rank 0
  gathers every stream.
* :func:`offload_info` / :func:`variant_label`: what a record says it ran; an NVMe run whose
  partitions all stay under the 1 MiB swap threshold is labelled ``nvme (nothing swapped)``.
* :class:`DiskReads`: bytes read from disk per generated token (psutil's ``io_counters``), per batch size.
* :func:`swap_files` / :func:`swap_session`: what is on the disk, and cleaning it up.
* :func:`read_bandwidth`: the disk's measured ``O_DIRECT`` read bandwidth (the roofline).

Load time (measured on this project's 2-core machine, see notebook 03): the first NVMe run
spends minutes *inside* ``from_pretrained`` because DeepSpeed JIT-compiles its ``async_io``
op (g++, minutes on 2 cores) the moment ``zero.Init`` creates the first swapper; the op is
cached under ``TORCH_EXTENSIONS_DIR`` (bloomkit defaults it to ``<env>/torch_extensions``) afterwards.
:func:`check_async_io` builds/loads it up front and reports the time separately, so the
load time of NVMe offload is the real one (a small factor of CPU offload).
"""
from __future__ import annotations

import contextlib
import functools
import mmap
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import arch, memory

from ..measure import harness
from ..errors import UserError

OFFLOAD_MODES = ("none", "cpu", "nvme")
MIN_AIO_BYTES = 2**20          # DeepSpeed swaps a partition to disk only if it is >= 1 MiB
AIO_ALIGNED_BYTES = 1024       # ... and pads each one to a multiple of 1 KiB per aio thread
DEFAULT_BUFFER_COUNT = 5       # DeepSpeed's default (BLOOM: one block's 4 big matrices + 1 prefetched)
# block_size is also DeepSpeed's smallest swapped partition (max(1 MiB, block_size)): larger blocks
# leave every smaller matrix in RAM, which looks like a speed-up but is not offloading
# intra_op_parallelism 2: each partition is read by two aio threads (halves); on `small`, batch 8 and
# 32, NVMe steps were ~10 % faster than with one thread (3 interleaved runs), batch 1 the same
AIO = {"block_size": MIN_AIO_BYTES, "queue_depth": 8, "intra_op_parallelism": 2,
       "single_submit": False, "overlap_events": True}
QUANT_BITS = (4, 8)
SWAP_ROOT = "zero_stage_3"     # DeepSpeed writes DIR/zero_stage_3/<dtype>params/rank<r>/*.swp


# ---------------------------------------------------------------------------- flags

def offload_mode(cpu_offload: bool = False, nvme_offload_path=None) -> str:
    """``none``, ``cpu`` or ``nvme`` from the anchor's two flags (one at most)."""
    if cpu_offload and nvme_offload_path:
        raise UserError("use one of --cpu_offload or --nvme_offload_path, not both")
    return "nvme" if nvme_offload_path else ("cpu" if cpu_offload else "none")


def add_flags(parser, *, kv_offload: bool = True):
    """ZeRO-Inference's flags, added to ``parser`` where it lacks them.

    ``recipes/ds_zero_inference.py`` declares the ones a user of the copied file needs
    (``--cpu_offload --nvme_offload_path --quant_bits --quant_group_size``); inside the
    repository this adds ``--aio_buffer_count`` and ``--kv_offload`` and gives
    ``--quant_group_size`` the package's checked type.  The server declares them all here.

    Args:
        parser: an ``argparse`` parser (the recipe's own, or :func:`bloomkit.cli.common_parser`).
        kv_offload: list ``--kv_offload`` in the help (the server declares it hidden, and
            refuses it: its batched cache is its own).

    Returns:
        ``parser``.

    Example:
        >>> import argparse
        >>> args = add_flags(argparse.ArgumentParser()).parse_args(["--nvme_offload_path", "/x"])
        >>> ZeroOptions.from_args(args, device="cpu").offload, args.aio_buffer_count
        ('nvme', 5)
    """
    import argparse

    from ..cli import positive_int

    declared = {opt: a for a in parser._actions for opt in a.option_strings}
    if "--quant_group_size" in declared:
        declared["--quant_group_size"].type = positive_int
    flags = {
        "--cpu_offload": dict(action="store_true", help="keep the parameters in CPU memory"),
        "--nvme_offload_path": dict(default=None, help="keep the parameters in swap files in this "
                                                       "directory (a fast local drive)"),
        "--quant_bits": dict(type=int, choices=QUANT_BITS, default=None,
                             help="ZeRO-Inference group-wise weight quantization (--dtype int8 "
                                  "means 8)"),
        "--quant_group_size": dict(type=positive_int, default=None,
                                   help="weights per quantization group (divides every row of the "
                                        "model's matrices); default: the largest of 64, 32, 16, ... "
                                        "that does"),
        "--aio_buffer_count": dict(type=positive_int, default=DEFAULT_BUFFER_COUNT,
                                   help="NVMe read buffers (each as large as the largest weight "
                                        "partition)"),
        "--kv_offload": dict(action="store_true",
                             help="KV cache offloaded to CPU layer by layer (transformers' offloaded "
                                  "cache; CUDA only)" if kv_offload else argparse.SUPPRESS),
    }
    group = parser.add_argument_group("ds-zero (ZeRO-Inference)")
    for flag, kwargs in flags.items():
        if flag not in declared:
            group.add_argument(flag, **kwargs)
    return parser


@dataclass
class ZeroOptions:
    """What a ZeRO-Inference run asks for: the flags of :func:`add_flags`, typed.

    Args:
        offload: where the parameter partitions live between uses: ``none`` (the device),
            ``cpu`` (CPU RAM) or ``nvme`` (swap files in ``nvme_path``).
        nvme_path: the swap directory; read only when ``offload`` is ``nvme``.
        quant_bits: 4 or 8: ZeRO-Inference's group-wise weight quantization; ``None``: none
            (unless ``dtype`` is ``int8``, which means 8).
        quant_group_size: weights per quantization group; ``None``: derived from the model
            (:func:`quant_group_size`).
        aio_buffer_count: NVMe read buffers (:func:`plan_nvme_buffers`).
        kv_offload: transformers' offloaded KV cache (CUDA only).
        dtype: ``fp32``/``bf16``/``fp16``, or ``int8`` (8-bit weights computed in bf16 on CUDA,
            fp32 on CPU).
        device: ``cpu`` or ``cuda``.
    """
    offload: str = "none"
    nvme_path: str | None = None
    quant_bits: int | None = None
    quant_group_size: int | None = None
    aio_buffer_count: int = DEFAULT_BUFFER_COUNT
    kv_offload: bool = False
    dtype: str = "fp32"
    device: str = "cpu"

    @classmethod
    def from_args(cls, args, device: str | None = None) -> "ZeroOptions":
        """From parsed flags (:func:`add_flags` plus the shared ``--dtype`` / ``--device``)."""
        from ..dtypes import default_device, resolve_dtype

        offload = offload_mode(args.cpu_offload, args.nvme_offload_path)
        device = device or getattr(args, "device", None) or default_device()
        return cls(offload=offload, nvme_path=args.nvme_offload_path, quant_bits=args.quant_bits,
                   quant_group_size=args.quant_group_size,
                   aio_buffer_count=getattr(args, "aio_buffer_count", DEFAULT_BUFFER_COUNT),
                   kv_offload=getattr(args, "kv_offload", False),
                   dtype=resolve_dtype(getattr(args, "dtype", None), device), device=device)

    @property
    def bits(self) -> int | None:
        """The weights' bits when quantized (``--dtype int8`` means 8), else ``None``."""
        return self.quant_bits or (8 if self.dtype == "int8" else None)

    @property
    def compute_dtype(self) -> str:
        """The ZeRO model's dtype: ``dtype``, but int8 weights compute in bf16 (CUDA) / fp32."""
        if self.dtype == "int8":
            return "bf16" if self.device == "cuda" else "fp32"
        return self.dtype

    def check(self) -> None:
        """The flags on their own, before anything is read: one line naming the fix."""
        if self.offload not in OFFLOAD_MODES:
            raise UserError(f"unknown offload {self.offload!r}; use one of {', '.join(OFFLOAD_MODES)}")
        if self.offload == "nvme" and not self.nvme_path:
            raise UserError("NVMe offload needs a directory: pass --nvme_offload_path DIR")
        if self.dtype == "nf4":
            raise UserError("--dtype nf4 is bitsandbytes' 4-bit load, an Accelerate feature; "
                            "ZeRO-Inference quantizes its own way: --quant_bits 4 (or 8)")
        if self.quant_bits is not None and self.quant_bits not in QUANT_BITS:
            raise UserError(f"--quant_bits must be 4 or 8, got {self.quant_bits}")
        if self.kv_offload and self.device != "cuda":
            raise UserError("--kv_offload moves the KV cache from the GPU to CPU memory and needs "
                            "CUDA; drop it on CPU")


def _dims(config):
    """``(hidden size, vocab size)`` of any family :mod:`bloomkit.arch` knows."""
    return arch.hidden_of(config), arch.vocab_of(config)


def param_numels(config) -> list[int]:
    """Element counts of the weight matrices ZeRO partitions: the token embedding, then one
    block's matrices as the family builds them (BLOOM: fused q|k|v, dense, 2 MLP; Llama:
    q, k, v (smaller under GQA), o, gate, up, down).  See :func:`bloomkit.arch.weight_matrices`."""
    return arch.weight_matrices(config)


# ---------------------------------------------------------------------------- NVMe buffers

def locked_memory_limit() -> int | None:
    """``ulimit -l`` in bytes (``None``: unlimited)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def can_lock_beyond_limit() -> bool:
    """CAP_IPC_LOCK (root in most containers) lets ``mlock`` ignore ``ulimit -l``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 14))
    except OSError:
        pass
    return False


@dataclass
class BufferPlan:
    buffer_size: int          # elements per buffer: the largest swappable partition, aligned
    buffer_count: int
    locked_bytes: int         # buffer_count * buffer_size * element size, page-locked (mlock)
    memlock_limit: int | None
    swapped: int              # how many weight matrices go to disk (partition >= 1 MiB)


def plan_nvme_buffers(config, dtype: str = "fp32", world_size: int = 1,
                      buffer_count: int = DEFAULT_BUFFER_COUNT, check_limit: bool = True) -> BufferPlan:
    """Size DeepSpeed's NVMe read buffers from the model, and check they can be locked.

    DeepSpeed reads swapped partitions into ``buffer_count`` page-locked buffers of
    ``buffer_size`` elements each; a partition larger than a buffer cannot be swapped in.
    The anchor's ``buffer_size=4e9`` locks 5 x 8 GB; here a buffer is exactly the largest
    partition, so the run locks no more than it needs (and fits ``ulimit -l`` when it can).
    """
    elem = memory.dtype_bytes(dtype if dtype != "int8" else "fp32")
    elem = int(elem)
    parts = [-(-n // world_size) for n in param_numels(config)]
    swappable = [p for p in parts if p * elem >= MIN_AIO_BYTES]
    align = AIO_ALIGNED_BYTES * AIO["intra_op_parallelism"] // elem
    largest = max(swappable) if swappable else MIN_AIO_BYTES // elem
    size = -(-largest // align) * align
    locked = buffer_count * size * elem
    limit = locked_memory_limit()
    if check_limit and limit is not None and locked > limit and not can_lock_beyond_limit():
        raise UserError(
            f"NVMe offload needs {locked / 2**20:.0f} MiB of page-locked aio buffers "
            f"({buffer_count} x {size * elem / 2**20:.1f} MiB, the model's largest partition) but "
            f"`ulimit -l` is {limit / 2**20:.0f} MiB; raise it (ulimit -l unlimited, or "
            "docker run --ulimit memlock=-1), run with more ranks, or use --cpu_offload")
    n_swapped = swapped_partitions(config, dtype if dtype != "int8" else "fp32", world_size)[0]
    return BufferPlan(size, buffer_count, locked, limit, n_swapped)


def swapped_partitions(config, dtype: str = "fp32", world_size: int = 1,
                       quant_bits: int | None = None) -> tuple[int, int]:
    """``(count, largest bytes)`` of the weight partitions DeepSpeed would write to NVMe: each
    rank's share of a matrix, stored in ``dtype`` or at ``quant_bits`` per weight, swaps only
    when it reaches :data:`MIN_AIO_BYTES`."""
    per = quant_bits / 8 if quant_bits else memory.dtype_bytes(dtype)
    parts = [-(-n // world_size) * per for n in param_numels(config)]
    heads_out = 1 if arch.is_tied(config) else 2
    count = heads_out * int(parts[0] >= MIN_AIO_BYTES) + arch.layers_of(config) * sum(
        p >= MIN_AIO_BYTES for p in parts[1:])
    return count, int(max(parts))


def nvme_swap_note(config, dtype: str = "fp32", world_size: int = 1,
                   quant_bits: int | None = None) -> str | None:
    """Why an NVMe run would read nothing from the disk, or ``None`` when it does: a run
    labelled NVMe must say so when every weight stays in RAM (its record carries the note)."""
    count, largest = swapped_partitions(config, dtype, world_size, quant_bits)
    if count:
        return None
    stored = f"{quant_bits}-bit" if quant_bits else dtype
    return (f"nothing is swapped to disk: the largest weight partition is {largest / 2**10:.0f} KiB "
            f"in {stored}, under DeepSpeed's {MIN_AIO_BYTES // 2**20} MiB swap threshold, so every "
            "weight stays in RAM (this measures NVMe offload's bookkeeping, not the disk; use a larger "
            "model, e.g. --name bench, to stream weights from the drive)")


def quant_group_size(config, asked: int | None = None) -> int:
    """Weights per quantization group, which must divide every matrix's row length (the hidden
    size, ``heads * head_dim`` and the MLP width): ``asked`` if it
    does, else a one-line error listing the sizes that do; by default the largest of 64, 32,
    16, ... that does."""
    import math

    hd = arch.head_dim_of(config)
    dims = {arch.hidden_of(config), arch.heads_of(config) * hd, arch.ffn_of(config)}
    g = math.gcd(*dims)
    fits = [x for x in (128, 64, 32, 16, 8, 4, 2, 1) if g % x == 0]
    best = next(x for x in fits if x <= 64)
    if asked is None:
        return best
    if g % asked:
        raise UserError(f"--quant_group_size {asked} does not divide every row of this model's "
                        f"matrices (lengths {', '.join(map(str, sorted(dims)))}); use one of "
                        f"{', '.join(map(str, fits[:5]))} (or leave it out: {best})")
    return asked


# ---------------------------------------------------------------------------- config

def quant_config(bits: int, group_size: int = 64, mode: str = "quantized_initialization") -> dict:
    """ZeRO-Inference weight quantization: ``bits``-bit asymmetric, one scale/min per group of
    ``group_size`` consecutive weights of a row (``group_dim`` 1)."""
    if bits not in QUANT_BITS:
        raise UserError(f"--quant_bits must be 4 or 8, got {bits}")
    if mode not in ("quantized_initialization", "post_init_quant"):
        raise UserError(f"unknown quantization mode {mode!r}; use quantized_initialization")
    return {mode: {"num_bits": bits, "group_size": int(group_size), "group_dim": 1,
                   "symmetric": False}}


def ds_config(hidden_size: int, *, dtype: str = "fp32", offload: str = "none", nvme_path=None,
              world_size: int = 1, buffers: BufferPlan | None = None, quant_bits: int | None = None,
              quant_group_size: int = 64) -> dict:
    """The blog's ZeRO-3 inference config, built from the model's hidden size ``h``.

    Keys: ``reduce_bucket_size`` h*h and ``stage3_prefetch_bucket_size`` 0.9*h*h (both
    integers: current DeepSpeed rejects floats), ``stage3_param_persistence_threshold`` 0
    (partition every parameter, even LayerNorms), ``offload_param`` for CPU / NVMe, and the
    dtype stated explicitly (``fp16``/``bf16`` ``enabled``) so ZeRO keeps the model's dtype.
    ``recipes/ds_zero_inference.py`` writes the same dict out by hand (tested equal).

    Args:
        hidden_size: the model's hidden size (:func:`bloomkit.arch.hidden_of`).
        dtype: ``fp32``, ``bf16`` or ``fp16``: the weights' dtype under ZeRO.
        offload: ``none``, ``cpu`` or ``nvme``.
        nvme_path: the swap directory (``nvme``).
        world_size: ranks (``train_batch_size``: one micro-batch per rank).
        buffers: the NVMe read buffers (:func:`plan_nvme_buffers`; ``nvme`` only).
        quant_bits: 4 or 8 for group-wise weight quantization, ``None`` for none.
        quant_group_size: weights per quantization group (:func:`quant_group_size`).

    Example:
        >>> c = ds_config(1024, dtype="bf16", offload="cpu")
        >>> z = c["zero_optimization"]
        >>> z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["offload_param"]["device"]
        (1048576, 943718, 'cpu')
        >>> c["bf16"], "weight_quantization" in ds_config(1024, quant_bits=4)
        ({'enabled': True}, True)
    """
    if offload not in OFFLOAD_MODES:
        raise UserError(f"unknown offload {offload!r}; use one of {', '.join(OFFLOAD_MODES)}")
    h = int(hidden_size)
    zero = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 0}
    cfg = {"fp16": {"enabled": dtype == "fp16"}, "bf16": {"enabled": dtype == "bf16"},
           "zero_optimization": zero, "steps_per_print": 2000,
           "train_batch_size": world_size, "train_micro_batch_size_per_gpu": 1,
           "wall_clock_breakdown": False}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif offload == "nvme":
        if nvme_path is None or buffers is None:
            raise UserError("NVMe offload needs nvme_path and a buffer plan (plan_nvme_buffers)")
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True,
                                 "buffer_count": buffers.buffer_count,
                                 "buffer_size": buffers.buffer_size}
        cfg["aio"] = dict(AIO)
    if quant_bits:
        cfg["weight_quantization"] = quant_config(quant_bits, quant_group_size)
    return cfg


# ---------------------------------------------------------------------------- path checks

def _aligned_buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes)  # anonymous mmap: page-aligned, as O_DIRECT requires


def check_nvme_path(path, need_bytes: int = 0) -> Path:
    """The NVMe offload directory exists, is writable, has ``need_bytes`` free and supports
    ``O_DIRECT`` (DeepSpeed opens its swap files with it); one-line error otherwise."""
    p = Path(path).expanduser()
    flag = "--nvme_offload_path"
    if not p.exists():
        raise UserError(f"{flag} {path} does not exist; create it (mkdir -p {path}) on a fast "
                        "local NVMe drive, or use --cpu_offload")
    if not p.is_dir():
        raise UserError(f"{flag} {path} is not a directory; pass a directory on a fast local drive")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable; pass a directory you can write to "
                        "(or fix its permissions)")
    usage = shutil.disk_usage(p)
    free = usage.free
    # a file system that reports no size at all (ramfs, some FUSE mounts) cannot be checked
    if need_bytes and usage.total > 0 and free < need_bytes:
        raise UserError(f"{flag} {path} has {free / 2**20:.1f} MiB free but the swapped weights "
                        f"need {need_bytes / 2**20:.1f} MiB; free space there, pick another drive, "
                        "or use --cpu_offload")
    probe = p / f".bloomkit-odirect-{os.getpid()}"
    buf = _aligned_buffer(4096)
    try:
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        except PermissionError:
            raise UserError(f"{flag} {path} is not writable; pass a directory you can write "
                            "to (or fix its permissions)") from None
        except OSError as exc:
            raise UserError(f"{flag} {path} does not support O_DIRECT ({exc.strerror}; e.g. ramfs, "
                            "tmpfs before Linux 6.6, some network/FUSE file systems) which DeepSpeed's async_io "
                            "needs; use a directory on a local ext4/xfs drive") from None
        try:
            os.write(fd, buf)
        except OSError as exc:
            raise UserError(f"{flag} {path}: O_DIRECT write failed ({exc.strerror}); use a "
                            "directory on a local ext4/xfs drive with free space") from None
        finally:
            os.close(fd)
    finally:
        buf.close()
        probe.unlink(missing_ok=True)
    return p


def read_bandwidth(path, nbytes: int = 256 * 2**20, block: int = 4 * 2**20) -> float:
    """Measured sequential read bandwidth (bytes/s) of the drive holding ``path``, with
    ``O_DIRECT`` reads (no page cache), as DeepSpeed's swapper reads: the NVMe roofline."""
    d = Path(path)
    f = d / f".bloomkit-readbw-{os.getpid()}"
    buf = _aligned_buffer(block)
    try:
        buf.write(os.urandom(block))
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            for _ in range(max(1, nbytes // block)):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            t0 = time.perf_counter()
            total = 0
            while True:
                n = os.preadv(fd, [buf], total)
                if n <= 0:
                    break
                total += n
            seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
    except OSError as exc:
        raise UserError(f"cannot measure O_DIRECT reads in {path} ({exc.strerror}); use a "
                        "directory on a local ext4/xfs drive") from None
    finally:
        buf.close()
        f.unlink(missing_ok=True)
    return total / seconds


# ---------------------------------------------------------------------------- async_io op

def aio_build_dir() -> Path:
    """Where the JIT-built ``async_io`` op is cached (``TORCH_EXTENSIONS_DIR``)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("async_io", False))


@contextlib.contextmanager
def _real_stderr():
    """DeepSpeed's compile probe (``has_function``) dup2()s ``sys.stderr.fileno()``; inside a
    Jupyter kernel ``sys.stderr`` may have no file descriptor, which makes the probe report
    libaio as missing.  Give it a real file for the duration."""
    import sys

    try:
        sys.stderr.fileno()
        yield
        return
    except Exception:  # noqa: BLE001 - io.UnsupportedOperation, AttributeError, ...
        pass
    old = sys.stderr
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        try:
            yield
        finally:
            sys.stderr = old


def check_async_io(log=None) -> dict:
    """Make DeepSpeed's ``async_io`` op loadable *now* (building it on first use, which takes
    minutes: g++ on a dozen C++ files), so that it is not silently built inside
    ``from_pretrained``.  Missing libaio or compiler: one line naming the package."""
    import sys

    from deepspeed.ops.op_builder import AsyncIOBuilder

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    builder = AsyncIOBuilder()
    build_dir = aio_build_dir()
    from .. import dsops

    for lock in dsops.clear_stale_locks():
        log(f"removed a stale build lock left by a killed build: {lock}")
    built = (build_dir / "async_io.so").exists()

    def diagnose(reason: str) -> UserError:
        with _real_stderr():
            compatible = builder.is_compatible(verbose=False)
        if not compatible:
            return UserError("NVMe offload needs libaio, which was not found (DeepSpeed's async_io op "
                             "links -laio): apt-get install libaio-dev (Debian/Ubuntu) or yum "
                             "install libaio-devel, or use --cpu_offload")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return UserError("NVMe offload builds DeepSpeed's async_io op with a C++ compiler, "
                             "none found: apt-get install g++, or use --cpu_offload")
        return UserError(f"DeepSpeed's async_io op failed to load ({reason[:160]}); delete "
                         f"{build_dir} to rebuild it, or use --cpu_offload")

    if not built:
        err = diagnose("not built")
        if "failed to load" not in str(err):
            raise err
        log(f"building DeepSpeed's async_io op (one time, a few minutes; cached in {build_dir})")
    t0 = time.perf_counter()
    try:
        with _real_stderr(), contextlib.redirect_stdout(sys.stderr):
            builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - compiler/linker/loader errors of all kinds
        raise diagnose(" ".join(str(exc).split())) from None
    return {"built_now": not built, "seconds": time.perf_counter() - t0, "cache": str(build_dir)}


# ---------------------------------------------------------------------------- distributed

def dist_env(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size).  Outside a launcher it becomes a one-rank group; on CPU DeepSpeed
    uses its CPU accelerator (``DS_ACCELERATOR=cpu``, gloo)."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


_SELF_MADE = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the launcher's process group, or make a one-rank group.  A one-rank group's
    rendezvous variables are removed again afterwards, so processes started later from
    this one (a notebook launching the recipe) do not inherit its port."""
    dist_env(device)
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        own = "RANK" not in os.environ
        if own:
            from ..launch import free_port

            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(free_port())})
        os.environ.setdefault("LOCAL_RANK", "0")  # zero.Init reads it for the local device
        try:
            import io

            # DeepSpeed prints "... shm_comm_op built successfully" here: not the run's output
            with contextlib.redirect_stdout(io.StringIO()):
                deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl",
                                           verbose=False)
            if device == "cpu":
                from .. import dsops

                dsops.release_shm_buffers()  # see dsops: DeepSpeed leaks them otherwise
        finally:
            if own:
                for k in _SELF_MADE:
                    os.environ.pop(k, None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world


# ---------------------------------------------------------------------------- loading

@contextlib.contextmanager
def hf_deepspeed(config: dict):
    """``HfDeepSpeedConfig`` alive for the block: ``from_pretrained`` then builds the model
    under ``deepspeed.zero.Init`` (each parameter partitioned/offloaded as it is created, the
    checkpoint loaded one tensor at a time): no rank ever holds the whole model.

    Unset afterwards, so a later plain ``from_pretrained`` (e.g. ``--verify``'s reference)
    in the same process is not partitioned too.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    dschf = HfDeepSpeedConfig(config)  # noqa: F841 - must stay referenced (weakref inside)
    try:
        yield dschf
    finally:
        unset_hf_deepspeed_config()


@contextlib.contextmanager
def quantized_load_in_model_dtype():
    """Work around a DeepSpeed 0.19 bug in ``quantized_initialization`` (4/8-bit weights).

    Under ``zero.Init`` DeepSpeed quantizes each weight twice: the freshly created one (in the
    model's dtype) and, while loading, the checkpoint's tensor (in the *checkpoint's* dtype),
    viewing both packed results in the model's dtype.  When the two dtypes differ — an fp32
    checkpoint loaded as bf16, the usual case — the scales and minimums come out twice as
    long and ``from_pretrained`` fails with "size mismatch ... consider adding
    ignore_mismatched_sizes=True" (on CUDA and CPU alike).  Here each incoming weight is cast
    to the module's dtype before DeepSpeed quantizes it, which is what a plain load does
    anyway (``copy_`` casts).  Scoped: DeepSpeed's own wrapper is back after the block."""
    from deepspeed.runtime.zero import partition_parameters as pp

    original = pp.wrap_load_from_state_dict

    def wrap(load_from_state_dict):
        quantizing = original(load_from_state_dict)

        @functools.wraps(load_from_state_dict)
        def wrapper(module, state_dict, prefix, *args):
            key, weight = prefix + "weight", getattr(module, "weight", None)
            t = state_dict.get(key)
            if (weight is not None and t is not None and t.is_floating_point()
                    and t.dtype != weight.dtype):
                state_dict[key] = t.to(weight.dtype)
            return quantizing(module, state_dict, prefix, *args)

        return wrapper

    pp.wrap_load_from_state_dict = wrap
    try:
        yield
    finally:
        pp.wrap_load_from_state_dict = original


def load_model(path, dtype: str, config: dict, device: str = "cpu"):
    """The ZeRO-3 model, ready to ``generate``: ``HfDeepSpeedConfig`` first, then
    ``from_pretrained`` (zero.Init), then ``deepspeed.initialize`` -> ``engine.module``."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from ..dtypes import from_pretrained_dtype, torch_dtype

    quantized = bool(config.get("weight_quantization"))
    with hf_deepspeed(config), (quantized_load_in_model_dtype() if quantized else contextlib.nullcontext()):
        model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_dtype(torch_dtype(dtype)))
    model.eval()
    engine = deepspeed.initialize(model=model, config_params=config)[0]
    engine.module.eval()
    module = engine.module
    # keep the engine (and its hooks) alive with the model; not as a submodule (nn.Module's
    # setattr would register it, and model.eval() would then recurse engine <-> module)
    object.__setattr__(module, "_bloomkit_engine", engine)
    del model
    if device == "cuda":
        torch.cuda.synchronize()
    return module


def partition_bytes(model) -> int:
    """Bytes ZeRO keeps for this rank's partitions (offloaded or not); quantized weights
    count at their packed size."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        if t is not None:
            # the parameter's dtype: a partition swapped to disk is a 1-element fp16 stand-in
            total += int(t.ds_numel) * p.element_size()
    return total


# ---------------------------------------------------------------------------- one set-up

@dataclass
class ZeroSetup:
    """A checked ZeRO-Inference run, its process group started, ready to :func:`load`
    (made by :func:`prepare`: the recipe, the server and :func:`run_variant` all use it)."""
    options: ZeroOptions
    path: Path
    config: Any              # the model's transformers config
    dtype: str               # the ZeRO model's dtype (fp32/bf16/fp16: int8 computes in bf16/fp32)
    quant_bits: int | None   # 4 or 8 when the weights are quantized
    group_size: int | None   # weights per quantization group (quantized only)
    rank: int
    world_size: int
    ds_config: dict          # what HfDeepSpeedConfig and deepspeed.initialize get
    info: dict               # the records' options.zero (:func:`load` adds what the load did)
    plan: BufferPlan | None = None                  # NVMe read buffers
    settings: dict = field(default_factory=dict)    # bloomkit.cli.prepare's, when given args

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda``: where the ranks compute."""
        return self.options.device

    @property
    def swap_dir(self) -> str | None:
        """The NVMe swap directory of an NVMe run, else ``None``."""
        return self.options.nvme_path if self.options.offload == "nvme" else None

    def record_options(self) -> dict:
        """The ``options`` of this run's result records."""
        return {"offload": self.options.offload, "quant_bits": self.quant_bits or 0,
                "kv_offload": self.options.kv_offload, "variant": self.info["variant"],
                "zero": self.info}


def prepare(options, path=None, *, extra_check: Callable[[int], None] | None = None,
            log: Callable[[str], None] | None = None) -> ZeroSetup:
    """Check a ZeRO-Inference run in the order a user would fix it, start the process group,
    build the config.

    1. the flags alone (``--compile``, ``nf4``, both offloads, ``--kv_offload`` off CUDA);
    2. given ``args``: the shared flags, the model's files and whether the request fits
       (:func:`bloomkit.cli.prepare`); then the quantization group against the model's rows;
    3. ``extra_check(rank)``, the caller's own (the server: its port);
    4. NVMe: the directory (exists, writable, room, ``O_DIRECT``), the page-locked read
       buffers against ``ulimit -l``, DeepSpeed's ``async_io`` op (built now when missing);
    5. the process group (the launcher's, or a one-rank one: :func:`init_distributed`), the
       config (:func:`ds_config`) and what the records say (:func:`offload_info`).

    Args:
        options: a :class:`ZeroOptions`, or parsed flags (:func:`add_flags` beside
            :func:`bloomkit.cli.common_parser`'s or :func:`bloomkit.cli.add_package_flags`').
        path: the model directory (with a :class:`ZeroOptions`; flags name it with ``--name``).
        extra_check: called with this rank's number after the model checks, before the
            NVMe checks and the process group.
        log: where rank 0's notes go (an NVMe run that swaps nothing says so); default: nowhere.

    Example:
        >>> from bloomkit import models
        >>> setup = prepare(ZeroOptions(offload="cpu"), models.resolve_model("tiny"))
        >>> setup.ds_config["zero_optimization"]["offload_param"], setup.world_size
        ({'device': 'cpu', 'pin_memory': True}, 1)
    """
    from .. import models

    settings: dict = {}
    if not isinstance(options, ZeroOptions):
        args = options
        if getattr(args, "compile", False):
            raise UserError("--compile does not apply to ZeRO-Inference: ZeRO-3 gathers each layer's "
                            "weights in hooks around every module's forward, which a compiled graph "
                            "cannot capture; drop --compile (or use recipes/accelerate_inference.py or "
                            "recipes/ds_inference.py to compile)")
        options = ZeroOptions.from_args(args)
        options.check()
        from ..cli import prepare as check_shared

        settings = check_shared(args)  # shared flags, model files, --json_out: before anything expensive
        path = settings["path"]
    else:
        options.check()
        if path is None:
            raise UserError("prepare(ZeroOptions(...), path): name the model directory")
    path = Path(path)
    config = models.load_config(path)
    bits, dtype = options.bits, options.compute_dtype
    group = quant_group_size(config, options.quant_group_size) if bits else None
    rank, world = dist_env(options.device)
    if extra_check is not None:
        extra_check(rank)
    info = offload_info(config, options.offload, dtype=dtype, world_size=world, quant_bits=bits)
    plan = None
    if options.offload == "nvme":
        check_nvme_path(options.nvme_path, memory.weight_bytes(config, dtype))
        plan = plan_nvme_buffers(config, dtype, world, options.aio_buffer_count)
        if info["nvme_note"] and rank == 0 and log is not None:
            log(f"note: --nvme_offload_path: {info['nvme_note']}")
        info["async_io"] = check_async_io()
        info.update(nvme_path=str(options.nvme_path), aio_buffer_count=plan.buffer_count,
                    aio_buffer_size=plan.buffer_size, aio_locked_bytes=plan.locked_bytes)
    rank, world = init_distributed(options.device)
    cfg = ds_config(arch.hidden_of(config), dtype=dtype, offload=options.offload,
                    nvme_path=options.nvme_path, world_size=world, buffers=plan, quant_bits=bits,
                    quant_group_size=group or 64)
    return ZeroSetup(options=options, path=path, config=config, dtype=dtype, quant_bits=bits,
                     group_size=group, rank=rank, world_size=world, ds_config=cfg, info=info,
                     plan=plan, settings=settings)


def load(setup: ZeroSetup, load_fn: Callable | None = None):
    """The ZeRO-3 model of ``setup``, ready to ``generate``; ``setup.info`` then also holds
    this rank's partition bytes (and for NVMe what is on the disk).

    Args:
        setup: from :func:`prepare`.
        load_fn: ``load_fn(path, dtype, ds_config)`` returning the model (``engine.module``),
            that makes the ``HfDeepSpeedConfig`` / ``from_pretrained`` / ``deepspeed.initialize``
            calls itself (``recipes/ds_zero_inference.py`` passes its own); default
            :func:`load_model`, the same calls (tested equal).

    Example:
        >>> from bloomkit import models
        >>> setup = prepare(ZeroOptions(offload="cpu"), models.resolve_model("tiny"))
        >>> model = load(setup)
        >>> setup.info["partition_bytes"] > 0, next(model.parameters()).numel()  # partitioned
        (True, 0)
    """
    from .. import progress

    progress.library_bars()   # transformers' "Loading weights" on rank 0 where a person watches
    if load_fn is None:
        model = load_model(setup.path, setup.dtype, setup.ds_config, setup.options.device)
    else:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        try:
            model = load_fn(str(setup.path), setup.dtype, setup.ds_config).eval()
        finally:  # a later plain from_pretrained (--verify's reference) is not partitioned
            unset_hf_deepspeed_config()
        harness.cuda_sync()
    setup.info["partition_bytes"] = partition_bytes(model)
    if setup.swap_dir:  # what is on the disk while the model runs
        setup.info["swap_after_load"] = swap_summary(setup.swap_dir)
    return model


# ---------------------------------------------------------------------------- unique streams

def rank_prompts(batch_size: int, base: list[str] | None, rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s rows, from prompts no other rank gets (unique streams).

    With at least ``world_size * batch_size`` different base prompts, rank ``r`` takes rows
    ``r*bs ... (r+1)*bs - 1``: disjoint slices of one global batch.  With fewer, rank ``r`` takes
    every ``world_size``-th prompt starting at ``r`` (disjoint sets), repeated up to
    ``batch_size`` rows, as the blog repeats its 8 prompts.  Fewer different prompts than ranks
    cannot give every rank its own: one-line error."""
    from ..prompts import STANDARD_PROMPTS

    base = list(dict.fromkeys(base or STANDARD_PROMPTS))  # duplicates are not new streams
    n = len(base)
    if n < world_size:
        raise UserError(f"{world_size} ranks need at least {world_size} different prompts for "
                        f"unique streams, got {n}; pass --prompts_file with more prompts")
    if n >= world_size * batch_size:
        return base[rank * batch_size:(rank + 1) * batch_size]
    mine = base[rank::world_size]
    return [mine[i % len(mine)] for i in range(batch_size)]


def stream_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *,
                    world_size: int = 1, **extra) -> harness.Generation:
    """Generate this rank's rows; with several ranks use ``synced_gpus`` (every rank keeps
    stepping until all are done: ZeRO-3 gathers need every rank in every forward) and return
    *all* ranks' rows, rank-major (gathered to every rank)."""
    if world_size == 1:
        return harness.generate(model, tokenizer, prompts, max_new_tokens, **extra)
    import torch.distributed as dist

    gen = harness.generate(model, tokenizer, prompts, max_new_tokens, synced_gpus=True, **extra)
    parts = [None] * world_size
    dist.all_gather_object(parts, (gen.prompts, gen.tokens, gen.texts))
    return harness.Generation(prompts=[p for ps, _, _ in parts for p in ps],
                              tokens=[t for _, ts, _ in parts for t in ts],
                              texts=[x for _, _, xs in parts for x in xs])


def verify_streams(path, record: dict) -> dict:
    """Each rank's stream against plain fp32 ``generate`` of its own prompts (rank 0)."""
    from ..measure import bench, quality

    ref = bench.reference(path, record["prompts"], record["max_new_tokens"]).generation
    rep = quality.compare_tokens(ref, record["tokens"])
    rep["reference"] = "plain fp32 model.generate of each stream's prompts"
    return rep


# ---------------------------------------------------------------------------- swap files

def swap_files(nvme_path) -> list[Path]:
    """The swap files DeepSpeed has written under ``nvme_path`` right now."""
    root = Path(nvme_path) / SWAP_ROOT
    return sorted(root.rglob("*.swp")) if root.exists() else []


def swap_summary(nvme_path) -> dict:
    files = swap_files(nvme_path)
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files if f.exists()),
            "folder": str(Path(nvme_path) / SWAP_ROOT)}


@contextlib.contextmanager
def swap_session(nvme_path, rank: int = 0):
    """Remove this rank's swap folder (and the empty folders above it) on the way out."""
    root = Path(nvme_path) / SWAP_ROOT if nvme_path else None
    try:
        yield root
    finally:
        if root is not None and root.exists():
            for d in root.glob(f"*params/rank{rank}"):
                shutil.rmtree(d, ignore_errors=True)
            for d in sorted(root.glob("*params"), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


# ---------------------------------------------------------------------------- teaching aids

def gather_trace(model, tokenizer, prompt: str = "Peace is the only way") -> list[dict]:
    """One forward pass, recording as each module with weights starts which modules hold
    *gathered* (full, usable) weights: ZeRO-3 materialises a module's partitions just before
    it runs and re-partitions them after, so only a few are ever whole at once."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    leaves = [(n, m) for n, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))]

    def whole(m):
        return all(p.ds_status == ZeroParamStatus.AVAILABLE for p in m.parameters(recurse=False))

    trace, hooks = [], []
    for name, mod in leaves:
        def hook(m, args, name=name):
            trace.append({"running": name,
                          "gathered": [n for n, x in leaves if whole(x)],
                          "local_numel": sum(p.numel() for p in m.parameters(recurse=False)),
                          "full_numel": sum(p.ds_numel for p in m.parameters(recurse=False))})
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        enc = tokenizer([prompt], return_tensors="pt").to(harness.input_device(model))
        with torch.inference_mode():
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return trace


class HookTime:
    """Seconds spent inside the forward hooks of a model's modules, and how many hook calls."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0


@contextlib.contextmanager
def hook_timer(model):
    """Time what ZeRO-3 adds to every forward: the hooks ``deepspeed.initialize`` installed on
    each module (gather the module's partitions before its forward, release them after, plus
    the bookkeeping around them).  Every forward pre-hook and forward hook of ``model``'s
    modules is wrapped with a clock for the duration of the block (a plain model has none)::

        with zero.hook_timer(model) as hooks:
            model.generate(...)
        hooks.seconds, hooks.calls
    """
    spent = HookTime()

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.seconds += time.perf_counter() - t0
                spent.calls += 1
        return wrapper

    saved = []
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, fn in list(hooks.items()):
                saved.append((hooks, key, fn))
                hooks[key] = timed(fn)
    try:
        yield spent
    finally:
        for hooks, key, fn in saved:
            hooks[key] = fn


def roofline_ms_per_token(weight_bytes: int, bandwidth: float, batch_size: int) -> float:
    """Link-bound lower bound: every step reads all weights once over the link, shared by the
    ``batch_size`` rows: ``weight_bytes / bandwidth / batch_size`` (ms)."""
    return weight_bytes / bandwidth / batch_size * 1000.0


# ---------------------------------------------------------------------------- honest labels

def variant_label(offload: str, quant_bits: int | None = None, swapped: int | None = None,
                  dtype: str = "fp32") -> str:
    """What a variant really does, for tables and plots: the weights' format and where they
    live, e.g. ``fp32 cpu``, ``4-bit nvme``.  An NVMe run that swaps no partition (all under
    DeepSpeed's 1 MiB threshold) keeps every weight in RAM, so it is not labelled as reading
    from disk: ``4-bit nvme (nothing swapped)``."""
    weights = f"{quant_bits}-bit" if quant_bits else dtype
    where = offload
    if offload == "nvme" and swapped == 0:
        where = "nvme (nothing swapped)"
    return f"{weights} {where}"


def offload_info(config, offload: str, *, dtype: str = "fp32", world_size: int = 1,
                 quant_bits: int | None = None) -> dict:
    """The facts a ZeRO record carries in ``options.zero`` before anything runs: the offload,
    the bits, the streams, and for NVMe how many partitions really go to disk (and why none,
    when none), plus the honest :func:`variant_label`."""
    info = {"offload": offload, "quant_bits": quant_bits, "streams": world_size}
    if offload == "nvme":
        swapped, _ = swapped_partitions(config, dtype, world_size, quant_bits)
        info.update(swapped_partitions=swapped,
                    nvme_note=nvme_swap_note(config, dtype, world_size, quant_bits))
    info["variant"] = variant_label(offload, quant_bits, info.get("swapped_partitions"), dtype)
    return info


# ---------------------------------------------------------------------------- disk reads

def disk_read_bytes(pid: int | None = None) -> int | None:
    """Bytes process ``pid`` (this one by default; all its threads) has read from block devices
    so far: psutil's ``io_counters().read_bytes`` (on Linux ``read_bytes`` of
    ``/proc/<pid>/io``), so DeepSpeed's ``O_DIRECT`` swap reads count and page-cache hits do
    not.  ``None`` where the system does not report it (macOS, a kernel without task I/O
    accounting) or the process is gone.

    Example:
        >>> disk_read_bytes() >= 0   # on Linux
        True
    """
    import psutil

    try:
        return int(psutil.Process(pid).io_counters().read_bytes)
    except (AttributeError, psutil.Error, OSError):   # AttributeError: no io_counters here
        return None


class DiskReads:
    """Counts the bytes this process reads from disk during each ``generate`` call, per batch
    size: wrap a ``generate_fn`` with :meth:`wrap`, then :meth:`summary` gives the bytes per
    generated token of the timed calls (the first call of a batch size, the warm-up, is left
    out when there are more)."""

    def __init__(self):
        self.calls: dict[int, list[tuple[int, int]]] = {}

    def wrap(self, generate_fn):
        def counted(model, tok, rows, n, *a, **kw):
            before = disk_read_bytes()
            gen = generate_fn(model, tok, rows, n, *a, **kw)
            after = disk_read_bytes()
            if before is not None and after is not None:
                self.calls.setdefault(len(rows), []).append((after - before, n))
            return gen
        return counted

    def summary(self, batch_size: int) -> dict:
        calls = self.calls.get(batch_size, [])
        timed = calls[1:] or calls
        if not timed:
            return {}
        nbytes, steps = sum(c[0] for c in timed), sum(c[1] for c in timed)
        return {"disk_read_bytes_per_step": nbytes / steps,
                "disk_read_bytes_per_token": nbytes / (steps * batch_size),
                "disk_read_calls": len(timed)}


def with_disk_reads(records: list[dict], reads: DiskReads) -> list[dict]:
    """Each record's ``options.zero`` (a copy per record) with the disk bytes read per step and
    per generated token of its batch size on this rank."""
    for r in records:
        opts = dict(r.get("options") or {})
        z = dict(opts.get("zero") or {})
        z.update(reads.summary(r["batch_size"]))
        opts["zero"] = z
        r["options"] = opts
    return records


# ---------------------------------------------------------------------------- runs

def run(args, load_fn: Callable | None = None) -> list[dict]:
    """``recipes/ds_zero_inference.py`` inside the repository: :func:`prepare` (every check,
    the process group, the config), :func:`load` through the recipe's own ``load_model``, then
    :func:`bloomkit.measure.bench.run_recipe`: each rank generates its own prompts (unique
    streams, gathered to rank 0), the disk bytes read per token are counted, ``--verify`` checks
    every stream against plain ``generate``, the records go to ``--json_out``."""
    import copy

    from .. import results
    from ..measure import bench

    setup = prepare(args, log=lambda m: print(m, flush=True))
    rank, world, base = setup.rank, setup.world_size, setup.settings["base_prompts"]
    extra = {"cache_implementation": "offloaded"} if setup.options.kv_offload else {}
    reads = DiskReads()  # bytes this rank reads from disk per generated token

    @reads.wrap
    def gen_fn(model, tok, rows, n):
        mine = rank_prompts(len(rows), base, rank, world)
        return stream_generate(model, tok, mine, n, world_size=world, **extra)

    run_args = copy.copy(args)  # the records are completed (disk reads, streams) and written below
    run_args.json_out = None
    if world > 1:  # every stream is checked against its own prompts, below
        run_args.verify = False
    with swap_session(setup.swap_dir, rank):
        records = bench.run_recipe(run_args, strategy="ds-zero", load=lambda *_: load(setup, load_fn),
                                   options=setup.record_options(), world_size=world,
                                   generate_fn=gen_fn, is_main=rank == 0, token_multiplier=world)
    with_disk_reads(records, reads)
    if rank == 0:
        for r in records:
            if world > 1 and args.verify and r["status"] == "ok":
                r["quality"] = verify_streams(setup.path, r)
                print(f"ds-zero streams bs={r['batch_size']}: identical={r['quality']['identical']}",
                      flush=True)
            z = r["options"]["zero"]
            if setup.swap_dir and "disk_read_bytes_per_token" in z:
                print(f"ds-zero {z['variant']} bs={r['batch_size']}: {z['swapped_partitions']} "
                      f"partitions on disk, {z['disk_read_bytes_per_step'] / 2**20:.2f} MiB read "
                      f"from disk per step ({z['disk_read_bytes_per_token'] / 2**20:.3f} MiB per "
                      "token)", flush=True)
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
    harness.cuda_sync()
    return records


def run_variant(path, name: str, *, offload: str = "none", dtype: str = "fp32", device: str = "cpu",
                quant_bits: int | None = None, quant_group_size: int | None = None, nvme_path=None,
                batch_sizes=(1,), max_new_tokens: int = 20, cycles: int | None = None,
                verify: bool = False, prompts: list[str] | None = None) -> list[dict]:
    """One ZeRO-Inference set-up in *this* process, recorded as the recipe records it (one
    rank): :func:`prepare` -> :func:`load` -> :func:`bloomkit.measure.bench.run_variant`,
    ``options.zero`` with :func:`offload_info`, the partition bytes, the swap files and the disk
    bytes read per token.  Swap files are removed afterwards."""
    import gc

    from ..measure import bench

    setup = prepare(ZeroOptions(offload=offload, nvme_path=nvme_path, quant_bits=quant_bits,
                                quant_group_size=quant_group_size, dtype=dtype, device=device), path)
    reads = DiskReads()
    with swap_session(setup.swap_dir):
        records = bench.run_variant(
            strategy="ds-zero", name=name, path=path, load=lambda *_: load(setup), dtype=dtype,
            device=device, batch_sizes=batch_sizes, max_new_tokens=max_new_tokens,
            options=setup.record_options(), prompts=prompts, cycles=cycles, verify=verify,
            generate_fn=reads.wrap(lambda m, t, p, n: stream_generate(m, t, p, n)))
        gc.collect()
    return with_disk_reads(records, reads)
