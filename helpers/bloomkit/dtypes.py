"""The dtype names every recipe accepts, and what they mean on each device."""
from __future__ import annotations

from .errors import UserError

DTYPES = ("fp32", "bf16", "fp16", "int8", "nf4")  # int8/nf4: bitsandbytes weights
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """fp32 on CPU (exact, and fast there), bf16 on CUDA (BLOOM was trained in bf16)."""
    return "bf16" if device == "cuda" else "fp32"


def resolve_dtype(name: str | None, device: str) -> str:
    """Validate a ``--dtype`` for ``device``; ``None`` means the device's default."""
    if name is None:
        return default_dtype(device)
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name == "fp16" and device == "cpu":
        raise UserError("fp16 is not supported on CPU (no fast fp16 kernels; half the ops are "
                        "missing); use --dtype bf16 or --dtype fp32 on CPU, fp16 on CUDA")
    return name


def torch_dtype(name: str):
    import torch

    name = _ALIASES.get(name, name)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "int8": torch.float32, "nf4": torch.float32}[name]


def from_pretrained_dtype(dtype) -> dict:
    """The keyword that sets the weights' dtype in ``from_pretrained`` / ``from_config``:
    ``dtype=`` in transformers 5, ``torch_dtype=`` in 4.x (the legacy stack)."""
    from importlib import metadata

    from packaging.version import Version

    v = Version(metadata.version("transformers"))
    return {"dtype" if v.major >= 5 else "torch_dtype": dtype}
