"""One-line, actionable errors for everything a user can get wrong.

Every check in the package raises :class:`UserError` with a message that names the
fix.  Command-line entry points wrap their ``main`` in :func:`cli_entry`, which turns
such an error (and the few library errors we can recognise, such as running out of
memory) into a single ``error: ...`` line on stderr and a non-zero exit code, instead
of a traceback.
"""
from __future__ import annotations

import functools
import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or machine; the message says how to fix it."""


def _oneline(text: str) -> str:
    return " ".join(str(text).split())


# Out-of-memory failures that arrive without torch's type, by the text their library gives
# them: DeepSpeed's inference kernels (a C++ ``std::runtime_error`` when the workspace for
# activations and the KV cache does not fit; inference v2's KV-cache allocator), and what
# torch reports after a kernel outside its allocator failed to allocate (bitsandbytes'
# CUDA/cuBLASLt kernels: a ``torch.AcceleratorError``) or when the CPU allocator is refused
# (a plain ``RuntimeError``).
OOM_MESSAGES = (
    "workspace can't be allocated",                 # DeepSpeed inference (inference_context.h)
    "insufficient memory to allocate kv-caches",    # DeepSpeed inference v2 (ragged/kv_cache.py)
    "cuda error: out of memory",                    # cudaErrorMemoryAllocation from a kernel
    "cublas_status_alloc_failed",                   # cuBLAS / cuBLASLt handle or workspace
    "defaultcpuallocator: can't allocate memory",   # torch's CPU allocator (no type of its own)
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of memory": ``torch.OutOfMemoryError`` (CUDA, and any
    device torch allocates on), Python's ``MemoryError``, else one of :data:`OOM_MESSAGES`.

    Example:
        >>> is_oom(MemoryError()), is_oom(RuntimeError("Workspace can't be allocated, no enough memory."))
        (True, True)
        >>> is_oom(ValueError("out of range"))
        False
    """
    torch = sys.modules.get("torch")   # an exception of torch's needs torch imported
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    text = " ".join(str(exc).lower().split())
    return any(m in text for m in OOM_MESSAGES)


def translate(exc: BaseException) -> UserError | None:
    """Map well-known library failures onto one-line, actionable errors."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, MemoryError):
        return UserError("out of CPU memory; lower --batch_size, or offload weights to disk "
                         "with --offload_folder")
    if is_oom(exc):
        return UserError(f"out of memory ({_oneline(exc)[:160]}); lower --batch_size or "
                         "--max_new_tokens, or offload more (--max_memory / --offload_folder)")
    return None


def cli_entry(main):
    """Decorate a recipe's ``main(argv=None)`` so bad input ends in one line + exit 2.

    Set ``BLOOMKIT_TRACEBACK=1`` to see the full traceback when debugging.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the point is to catch everything
            err = translate(exc)
            if err is None or os.environ.get("BLOOMKIT_TRACEBACK"):
                raise
            rank = os.environ.get("RANK")
            prefix = f"error (rank {rank})" if rank not in (None, "0") else "error"
            print(f"{prefix}: {_oneline(err)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
