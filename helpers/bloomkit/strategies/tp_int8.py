"""int8 weights under tensor parallelism (AutoTP), for any architecture.

AutoTP's layers are not ``nn.Linear``, so quantizers that look for ``nn.Linear``
(bitsandbytes, torchao's default filter) silently skip them.  :func:`quantize_tp_linears`
therefore quantizes the *sharded* weights itself — symmetric per-output-channel int8 — and
runs them with PyTorch's maintained weight-only int8 matmul (``torch._weight_int8pack_mm``,
the kernel torchao's int8 weight-only mode also calls).  The output projection (``lm_head``)
stays in the compute dtype, like bitsandbytes' default.
"""
from __future__ import annotations

from ..errors import UserError

INT8_COMPUTE = "bf16"  # int8 weights, bf16 activations (the blog: int8 weights, fp16 compute)

def check_int8(device: str, engine: str) -> None:
    """int8 needs a backend for the chosen engine and device."""
    if engine == "kernel-inject":
        return  # choose_engine already required deepspeed < 0.15.2
    import torch

    fn = getattr(torch, "_weight_int8pack_mm", None)
    key = "CPU" if device == "cpu" else "CUDA"
    has = fn is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::_weight_int8pack_mm", key)
    if fn is None or (device == "cpu" and not has):
        raise UserError(f"int8 under AutoTP needs PyTorch's weight-only int8 matmul "
                        f"(torch._weight_int8pack_mm, torch>=2.3; installed {torch.__version__}); "
                        "pip install 'torch>=2.3', or use --dtype bf16")

def tp_linear_classes() -> tuple:
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    return (LinearLayer, LinearAllreduce)

def _int8_matmul(x2d, qweight, scale):
    """``x @ (qweight * scale).T`` with PyTorch's weight-only int8 kernel where it exists for
    the device; elsewhere (a CUDA build without it) dequantize this one matrix on the fly."""
    import torch

    try:
        return torch._weight_int8pack_mm(x2d.contiguous(), qweight, scale)
    except (RuntimeError, NotImplementedError):
        return torch.nn.functional.linear(x2d, qweight.to(x2d.dtype) * scale[:, None])

def _int8_linear_class():
    import torch

    class Int8TPLinear(torch.nn.Module):
        """One rank's slice of a TP linear, weights int8 (per-output-channel scales)."""

        def __init__(self, out_features, in_features, has_bias, dtype, device, mp_group,
                     all_reduce):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("weight_int8", torch.empty(out_features, in_features,
                                                            dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
            # column-parallel: this rank's slice of the bias; row-parallel: the full bias
            # (added once, after the all-reduce)
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                           requires_grad=False) if has_bias else None
            self.mp_group = mp_group
            self.all_reduce = all_reduce

        def forward(self, x):
            shape = x.shape
            y = _int8_matmul(x.reshape(-1, shape[-1]).to(self.weight_scale.dtype),
                             self.weight_int8, self.weight_scale)
            y = y.reshape(*shape[:-1], self.out_features)
            if self.all_reduce and self.mp_group is not None:
                import deepspeed.comm as dist

                dist.inference_all_reduce(y, group=self.mp_group)
            if self.bias is not None:
                y = y + self.bias
            return y

        def extra_repr(self):
            return (f"in={self.in_features}, out={self.out_features}, int8, "
                    f"{'row-parallel + all-reduce' if self.all_reduce else 'column-parallel'}")

    return Int8TPLinear

def quantize_tp_linears(model, *, empty: bool = False) -> int:
    """Replace each AutoTP linear (this rank's shard) with an int8 one; returns the count.

    Symmetric per-output-channel int8: ``scale = max|w_row| / 127``.  ``empty=True``
    allocates the int8 layers without quantizing (a pre-sharded int8 checkpoint fills them).
    The output projection (``lm_head``, GPT-NeoX's ``embed_out``) stays in the compute
    dtype, like bitsandbytes' default.
    """
    import torch

    from ..dtypes import torch_dtype

    cls = _int8_linear_class()
    LinearLayer, LinearAllreduce = tp_linear_classes()
    dt = torch_dtype(INT8_COMPUTE)
    head = model.get_output_embeddings()
    # TP > 1: DeepSpeed's layers; TP = 1 (no AutoTP): the plain nn.Linear layers
    targets = [(n, m) for n, m in model.named_modules()
               if m is not head and "lm_head" not in n.split(".") and (
                   isinstance(m, (LinearLayer, LinearAllreduce)) or type(m) is torch.nn.Linear)]
    for name, mod in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        w = mod.weight
        q = cls(w.shape[0], w.shape[1], mod.bias is not None, dt, w.device,
                getattr(mod, "mp_group", None), isinstance(mod, LinearAllreduce))
        if not empty:
            with torch.no_grad():
                wf = w.detach().float()
                scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
                q.weight_int8.copy_(torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8))
                q.weight_scale.copy_(scale.to(dt))
                if mod.bias is not None:
                    q.bias.copy_(mod.bias.detach().to(dt))
        setattr(parent, name.rsplit(".", 1)[-1], q)
    if not targets:
        raise UserError("int8: no AutoTP linear layers found to quantize; this DeepSpeed version "
                        "names them differently — use --dtype bf16")
    return len(targets)

def int8_layers(model) -> list[tuple[str, object]]:
    """``(name, module)`` of every int8 TP linear in ``model``."""
    cls_name = "Int8TPLinear"
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == cls_name]

