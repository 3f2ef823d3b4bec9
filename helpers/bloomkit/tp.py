"""Strategy 2: DeepSpeed-Inference tensor parallelism (TP) — every rank busy on every layer.

``deepspeed.init_inference(model, tensor_parallel={"tp_size": N}, dtype=...)`` cuts each
BloomBlock's matrices into N slices, one per rank, and inserts the all-reduces that glue
the partial results back together.  Two engines do that cut:

* **AutoTP** (``replace_with_kernel_inject=False``, today's path): DeepSpeed swaps the block's
  ``nn.Linear`` layers for its own ``LinearLayer`` / ``fused_LinearLayer`` (column-parallel:
  ``query_key_value``, ``mlp.dense_h_to_4h`` — each rank keeps 1/N of the output rows) and
  ``LinearAllreduce`` (row-parallel: ``self_attention.dense``, ``mlp.dense_4h_to_h`` — each
  rank keeps 1/N of the input columns and an all-reduce sums the partial outputs), and
  re-binds BLOOM's ALiBi builder so each rank gets the slopes of its own heads.  Works on
  CUDA and on DeepSpeed's CPU accelerator (ranks talk over gloo).
* **Kernel injection** (``replace_with_kernel_inject=True``, the blog's path): DeepSpeed's
  fused CUDA inference kernels.  DeepSpeed refuses BLOOM there with transformers > 4.43.4,
  and int8 with DeepSpeed >= 0.15.2, so it needs the pinned legacy environment
  (``make setup-legacy``) and a CUDA GPU.  Its int8 quantizes the weights only while it
  reads a checkpoint json (``init_inference(checkpoint=...)`` on a ``meta`` model, as the
  blog and DeepSpeed's own sharding test do): on a model already in memory DeepSpeed 0.15
  skips the quantization (``apply_weight_quantization`` is commented out) and its int8
  kernels then read fp16 weights (DeepSpeed issues #2923, #2956).  So int8 kernels need
  ``--ds_checkpoint``: DeepSpeed's pre-sharded files, which ``--save_shards`` writes under
  kernel injection (``save_mp_checkpoint_path``) from an fp16 run.

int8 under TP on the current stack: AutoTP's layers are not ``nn.Linear``, so quantizers
that look for ``nn.Linear`` (bitsandbytes, torchao's default filter) silently skip them.
:func:`quantize_tp_linears` therefore quantizes the *sharded* weights itself — symmetric
per-output-channel int8 — and runs them with PyTorch's maintained weight-only int8 matmul
(``torch._weight_int8pack_mm``, the kernel torchao's int8 weight-only mode also calls).
"""
from __future__ import annotations

import os
import signal
from datetime import timedelta
from importlib import metadata
from pathlib import Path

from .errors import UserError

KERNEL_INJECT = ("auto", "on", "off")
LEGACY_TRANSFORMERS_MAX = "4.43.4"   # BLOOM kernel injection raises after this
LEGACY_DEEPSPEED_INT8_BELOW = "0.15.2"  # init_inference(dtype=torch.int8) refused from here
LEGACY_HINT = ("create the pinned legacy environment with `make setup-legacy` "
               "(requirements-legacy.txt) on a CUDA machine")
# DeepSpeed's int8 kernels quantize only while reading its checkpoint json: the two runs that get there
KERNEL_INT8_ROUTE = ("--kernel_inject on --dtype fp16 --save_shards DIR, then --dtype int8 "
                     "--ds_checkpoint DIR/ds_inference_config.json --allow_pickle")
INT8_COMPUTE = "bf16"  # int8 weights, bf16 activations (the blog: int8 weights, fp16 compute)
KILL_HOOK_ENV = "BLOOMKIT_TEST_KILL_RANK"  # tests: this rank SIGKILLs itself before generating


# ---------------------------------------------------------------------------- ranks

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


# ---------------------------------------------------------------------------- versions

def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _le(v: str | None, bound: str) -> bool:
    from packaging.version import Version

    return v is not None and Version(v) <= Version(bound)


def _lt(v: str | None, bound: str) -> bool:
    from packaging.version import Version

    return v is not None and Version(v) < Version(bound)


def stack_report(device: str) -> dict:
    """What the installed stack can do for BLOOM kernel injection (no GPU work, no imports of
    deepspeed): the versions and the reasons it cannot, if any."""
    tf, ds = _version("transformers"), _version("deepspeed")
    cuda = False
    if device == "cuda":
        import torch

        cuda = torch.cuda.is_available()
    blockers = []
    if not _le(tf, LEGACY_TRANSFORMERS_MAX):
        blockers.append(f"transformers<={LEGACY_TRANSFORMERS_MAX} (installed {tf})")
    if device != "cuda" or not cuda:
        blockers.append("a CUDA GPU (the fused kernels are CUDA-only; this run is on "
                        f"{'cpu' if device != 'cuda' else 'cuda without a visible GPU'})")
    return {"transformers": tf, "deepspeed": ds, "cuda": cuda, "kernel_inject_blockers": blockers,
            "ds_int8_ok": _lt(ds, LEGACY_DEEPSPEED_INT8_BELOW)}


def choose_engine(kernel_inject: str, device: str, dtype: str, ds_checkpoint: dict | None = None) -> str:
    """``"autotp"`` or ``"kernel-inject"`` for ``--kernel_inject {auto,on,off}``.

    ``auto`` takes kernel injection only where it works (legacy stack + CUDA GPU; for int8 a
    DeepSpeed checkpoint json to quantize while loading; ``ds_checkpoint``, the parsed
    ``--ds_checkpoint``, listing files DeepSpeed's kernel loader can read), else AutoTP;
    ``on`` where it cannot work is a one-line error naming what to install or which flag to use.
    """
    if kernel_inject not in KERNEL_INJECT:
        raise UserError(f"unknown --kernel_inject {kernel_inject!r}; use one of {', '.join(KERNEL_INJECT)}")
    rep = stack_report(device)
    works = not rep["kernel_inject_blockers"]
    int8_blockers = []
    if dtype == "int8" and not rep["ds_int8_ok"]:
        int8_blockers.append(f"deepspeed<{LEGACY_DEEPSPEED_INT8_BELOW} for int8 kernels "
                             f"(installed {rep['deepspeed']})")
    if ds_checkpoint is not None:
        from .tp_shards import kernel_unreadable

        unreadable = kernel_unreadable(ds_checkpoint)
        if unreadable:
            int8_blockers.append(f"--ds_checkpoint files it can torch.load (pickled .pt/.bin, not "
                                 f"{unreadable[0]}; or drop --ds_checkpoint: the model folder loads "
                                 "directly)")
    if dtype == "int8" and ds_checkpoint is None:
        int8_blockers.append(f"a DeepSpeed checkpoint json to quantize while loading ({KERNEL_INT8_ROUTE})")
    if kernel_inject == "off":
        return "autotp"
    if kernel_inject == "auto":
        return "kernel-inject" if works and not int8_blockers else "autotp"
    blockers = rep["kernel_inject_blockers"] + int8_blockers
    if blockers:
        raise UserError("--kernel_inject on: DeepSpeed's BLOOM kernel injection needs "
                        + " and ".join(blockers) + f"; {LEGACY_HINT}, or use --kernel_inject off "
                        "(AutoTP, works on this stack" + (" with int8 weights)" if dtype == "int8" else ")"))
    return "kernel-inject"


# ---------------------------------------------------------------------------- checks

def heads_of(config) -> int:
    return int(getattr(config, "n_head", None) or getattr(config, "num_attention_heads"))


def check_tp(config, tp_size: int, nranks: int, device: str) -> None:
    """Head count divisible by TP, TP equal to the launched ranks, ranks <= devices."""
    heads = heads_of(config)
    if tp_size < 1:
        raise UserError(f"--tp_size must be >= 1, got {tp_size}")
    if heads % tp_size:
        ok = [d for d in range(1, heads + 1) if heads % d == 0]
        raise UserError(f"the model has {heads} attention heads, not divisible by tp_size "
                        f"{tp_size}: each rank must hold whole heads; use a TP size in {ok}")
    if tp_size > nranks:
        raise UserError(f"tp_size {tp_size} but only {nranks} rank(s) launched; start "
                        f"{tp_size} ranks: `deepspeed --num_gpus {tp_size}` on GPUs, "
                        f"`deepspeed --num_accelerators {tp_size}` on CPU, or "
                        f"`torchrun --nproc_per_node {tp_size}`")
    if tp_size < nranks:
        raise UserError(f"{nranks} ranks launched for tp_size {tp_size}; this recipe runs one TP "
                        f"group: launch {tp_size} ranks or pass --tp_size {nranks}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu "
                            "(ranks over gloo) or run on a GPU machine")
        ngpu = torch.cuda.device_count()
        if local_world_size() > ngpu:
            raise UserError(f"{local_world_size()} ranks on this node but only {ngpu} GPU(s); "
                            f"launch at most {ngpu} ranks per node (deepspeed --num_gpus {ngpu}) "
                            "or add nodes (--hostfile / torchrun --nnodes)")


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


# ---------------------------------------------------------------------------- distributed

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


# ---------------------------------------------------------------------------- loading

def compute_dtype(dtype: str, engine: str = "autotp") -> str:
    """The dtype the model is built in: int8 computes in bf16 under AutoTP; DeepSpeed's int8
    kernels compute in fp16 (and expect the rest of the model in fp16)."""
    if dtype == "int8":
        return "fp16" if engine == "kernel-inject" else INT8_COMPUTE
    return dtype


def load_full(path, dtype: str, engine: str = "autotp"):
    """Every rank reads the *whole* checkpoint into CPU RAM (the blog's unsharded path)."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM

    from .dtypes import from_pretrained_dtype, torch_dtype

    return AutoModelForCausalLM.from_pretrained(
        str(path), **from_pretrained_dtype(torch_dtype(compute_dtype(dtype, engine)))).eval()


def meta_model(config, dtype: str, engine: str = "autotp"):
    """The model skeleton on the meta device: shapes only, no bytes, nothing read.

    ``torch.device("meta")`` creates every tensor on the meta device directly and
    ``no_init_weights`` skips the random init of tensors that hold nothing — 6 ms instead of
    35 ms for ``bench`` (warm process) with accelerate's ``init_empty_weights``, which
    allocates each parameter on the CPU first, then moves it, and leaves ``lm_head`` untied."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x (the legacy stack)
        from transformers.modeling_utils import no_init_weights

    from .dtypes import from_pretrained_dtype, torch_dtype

    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, **from_pretrained_dtype(torch_dtype(compute_dtype(dtype, engine))))
    model.tie_weights()
    return model.eval()


def init_engine(model, *, tp_size: int, dtype: str, engine: str, checkpoint=None, base_dir=None,
                save_dir=None):
    """``deepspeed.init_inference`` with TP; returns the DeepSpeed engine.

    ``checkpoint``: DeepSpeed's checkpoint json, read by DeepSpeed onto a ``meta`` ``model``.
    ``save_dir`` (kernel injection): DeepSpeed writes its pre-sharded files there
    (``save_mp_checkpoint_path``: ``ds_inference_config.json``, ``tp_RR_PP.pt``, ``non-tp.pt``)."""
    import deepspeed
    import torch

    from .dtypes import torch_dtype

    ds_dtype = torch.int8 if (dtype == "int8" and engine == "kernel-inject") else \
        torch_dtype(compute_dtype(dtype, engine))
    kw = dict(tensor_parallel={"tp_size": tp_size}, dtype=ds_dtype,
              replace_with_kernel_inject=engine == "kernel-inject")
    if checkpoint is not None:
        kw["checkpoint"] = checkpoint
        if base_dir is not None:
            kw["base_dir"] = str(base_dir)
    if save_dir is not None:
        kw["save_mp_checkpoint_path"] = str(save_dir)
    eng = deepspeed.init_inference(model, **kw)
    register_plain_tensors(eng.module)
    if tp_size > 1 and engine == "autotp":
        keep_alibi_sharded(eng.module)
    return eng


def register_plain_tensors(model) -> list[str]:
    """Make tensors that a module holds as plain attributes part of its ``state_dict``.

    DeepSpeed 0.15's AutoTP (the legacy stack) stores the sliced bias of BLOOM's fused
    ``query_key_value`` as a plain tensor, not a ``Parameter``: it is then missing from
    ``state_dict``, so a pre-sharded checkpoint lacked it and the meta-built model kept
    uninitialised memory there (NaN logits).  Registering each such tensor as a buffer (same
    attribute name, so ``forward`` is unchanged) puts it in the shard and in the load.
    Returns the names registered (none on DeepSpeed 0.19)."""
    import torch

    names = []
    for mname, module in model.named_modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                delattr(module, key)
                module.register_buffer(key, value)
                names.append(f"{mname}.{key}" if mname else key)
    return names


def keep_alibi_sharded(model) -> None:
    """Always hand BLOOM an attention mask under AutoTP.

    DeepSpeed re-binds ``BloomModel.build_alibi_tensor`` so each rank gets its own heads'
    slopes, but transformers 5 skips that builder when ``attention_mask`` is ``None`` (one row,
    no padding) and builds the slopes of *all* heads inline — a shape error at TP > 1.  A
    pre-hook passes an all-ones mask instead, so DeepSpeed's per-rank builder always runs.
    """
    import torch

    def hook(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            x = kwargs.get("input_ids")
            if x is None:
                x = args[0] if args else kwargs.get("inputs_embeds")
            cache = kwargs.get("past_key_values") or kwargs.get("cache")  # renamed in transformers 5
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            kwargs["attention_mask"] = torch.ones(x.shape[0], past + x.shape[1], dtype=torch.long,
                                                  device=x.device)
        return args, kwargs

    model.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def tp_model(path, dtype: str, *, tp_size: int, engine: str, save_dir=None):
    """Full load + ``init_inference``: the TP-sharded model of this rank (int8 quantized)."""
    eng = init_engine(load_full(path, dtype, engine), tp_size=tp_size, dtype=dtype, engine=engine,
                      save_dir=save_dir)
    model = eng.module
    if dtype == "int8" and engine == "autotp":
        quantize_tp_linears(model)
    return model


# ---------------------------------------------------------------------------- int8

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


def quantize_tp_linears(model, *, empty: bool = False, skip=("lm_head",)) -> int:
    """Replace each AutoTP linear (this rank's shard) with an int8 one; returns the count.

    Symmetric per-output-channel int8: ``scale = max|w_row| / 127``.  ``empty=True``
    allocates the int8 layers without quantizing (a pre-sharded int8 checkpoint fills them).
    The ``lm_head`` stays in the compute dtype, like bitsandbytes' default.
    """
    import torch

    from .dtypes import torch_dtype

    cls = _int8_linear_class()
    LinearLayer, LinearAllreduce = tp_linear_classes()
    dt = torch_dtype(INT8_COMPUTE)
    # TP > 1: DeepSpeed's layers; TP = 1 (no AutoTP): the blocks' plain nn.Linear
    targets = [(n, m) for n, m in model.named_modules()
               if n.split(".")[-1] not in skip and (
                   isinstance(m, (LinearLayer, LinearAllreduce))
                   or (type(m) is torch.nn.Linear and ".h." in f".{n}"))]
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


# DeepSpeed's fused block (kernel injection) replaces a BloomBlock's four linears with these
# parameters of ``DeepSpeedBloomInference`` (int8: each carries its scales as ``.scale``)
KERNEL_BLOCK_WEIGHTS = ("attention.attn_qkvw", "attention.attn_ow", "mlp.inter_w", "mlp.output_w")


def is_kernel_block(module) -> bool:
    """A block replaced by DeepSpeed's fused kernels (``DeepSpeedTransformerInference``)."""
    return any(c.__name__ == "DeepSpeedTransformerInference" for c in type(module).__mro__)


def kernel_block_weights(model) -> list[tuple[str, object]]:
    """``(name, tensor)`` of the fused blocks' linear weights (empty under AutoTP)."""
    out = []
    for n, m in model.named_modules():
        if is_kernel_block(m):
            for w in KERNEL_BLOCK_WEIGHTS:
                mod_name, attr = w.rsplit(".", 1)
                t = getattr(m.get_submodule(mod_name), attr, None)
                if t is not None:
                    out.append((f"{n}.{w}", t))
    return out


def heads_on_rank(block) -> int:
    """Attention heads this rank computes in ``block`` (its share of the ALiBi slopes):
    ``self_attention.num_heads`` for a BloomBlock under AutoTP, ``attention.
    num_attention_heads_per_partition`` for DeepSpeed's fused block."""
    attn = getattr(block, "self_attention", None) or getattr(block, "attention", None)
    for name in ("num_heads", "num_attention_heads_per_partition"):
        v = getattr(attn, name, None)
        if isinstance(v, int):
            return v
    return 0


# ---------------------------------------------------------------------------- what a rank holds

def rank_weight_bytes(model) -> int:
    """Bytes of this rank's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key in seen or t.is_meta:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def tp_linear_bytes(model) -> int:
    """Bytes of this rank's block linears (the weights TP cuts and int8 shrinks): weight (or
    int8 weight + scales) of every AutoTP / int8 layer except ``lm_head``."""
    classes = tp_linear_classes()
    total = 0
    for n, m in model.named_modules():
        if n.split(".")[-1] == "lm_head":
            continue
        if isinstance(m, classes):
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "Int8TPLinear":
            total += m.weight_int8.numel() + m.weight_scale.numel() * m.weight_scale.element_size()
        elif type(m).__name__ == "Linear" and n.startswith("transformer.h."):  # TP=1: nn.Linear
            total += m.weight.numel() * m.weight.element_size()
    for _, t in kernel_block_weights(model):
        scale = getattr(t, "scale", None)
        total += t.numel() * t.element_size() + (
            scale.numel() * scale.element_size() if hasattr(scale, "numel") else 0)
    return total


def block_shapes(model, block: int = 0) -> dict:
    """Shapes (and dtype) of one BloomBlock's tensors on this rank, plus embeddings/lm_head,
    and the heads this rank's attention computes (its ALiBi slopes)."""
    out = {}
    prefix = f"transformer.h.{block}."
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n.startswith(prefix) or n.startswith("lm_head") or "word_embeddings." in n:
            out[n.replace(prefix, f"h.{block}.")] = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"
    out["attention_heads_on_rank"] = heads_on_rank(model.transformer.h[block])
    out[f"h.{block}.layer_types"] = {
        n.replace(prefix, ""): type(m).__name__ for n, m in model.named_modules()
        if n.startswith(prefix) and n.count(".") == 4}
    return out


def alibi_heads(config, tp_size: int) -> list[list[int]]:
    """Which attention heads (and so which ALiBi slopes) each rank owns: contiguous blocks."""
    heads = heads_of(config)
    per = heads // tp_size
    return [list(range(r * per, (r + 1) * per)) for r in range(tp_size)]


def alibi_slopes(n_heads: int) -> list[float]:
    """BLOOM's ALiBi slopes (as transformers' ``build_alibi_tensor`` computes them)."""
    import math

    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (i + 1) for i in range(0, 2 * (n_heads - closest), 2)]
    return slopes


def planned_shapes(config, tp_size: int) -> "object":
    """Per-rank shapes of a BloomBlock's weights under AutoTP, from the config alone (no
    model): a pandas table, to read next to :func:`block_shapes` of a real run."""
    import pandas as pd

    h = int(config.hidden_size)
    heads = heads_of(config)
    rows = [
        ("self_attention.query_key_value", "column (fused q,k,v per head)", [3 * h, h],
         [3 * h // tp_size, h], "none"),
        ("self_attention.dense", "row", [h, h], [h, h // tp_size], "all-reduce after"),
        ("mlp.dense_h_to_4h", "column", [4 * h, h], [4 * h // tp_size, h], "none"),
        ("mlp.dense_4h_to_h", "row", [h, 4 * h], [h, 4 * h // tp_size], "all-reduce after"),
        ("input/post_attention_layernorm", "replicated", [h], [h], "none"),
    ]
    df = pd.DataFrame(rows, columns=["weight", "split", "full shape", "per-rank shape", "communication"])
    df.attrs["heads_per_rank"] = heads // tp_size
    return df


def describe(model, config, tp_size: int, engine: str, dtype: str) -> dict:
    """Facts for the result record: per-rank bytes (gathered), rank 0's shapes, ALiBi split.
    Collective: every rank must call it."""
    per_rank = gather(rank_weight_bytes(model))
    heads = gather(heads_on_rank(model.transformer.h[0]))
    info = {"tp_size": tp_size, "engine": engine, "weight_bytes_per_rank": per_rank,
            "linear_bytes_per_rank": gather(tp_linear_bytes(model)),
            "heads_per_rank": heads, "alibi_heads": alibi_heads(config, tp_size)}
    if is_main():
        info["rank0_shapes"] = block_shapes(model)
    if dtype == "int8" and engine == "kernel-inject":
        weights = kernel_block_weights(model)
        info["int8_layers"] = len(weights)
        info["int8_kernel"] = "DeepSpeed's fused int8 kernels (group-wise scales, quantized while loading)"
        info["int8_all_int8"] = bool(weights) and all(str(t.dtype) == "torch.int8" for _, t in weights)
    elif dtype == "int8":
        layers = int8_layers(model)
        info["int8_layers"] = len(layers)
        info["int8_kernel"] = "torch._weight_int8pack_mm (per-channel weight-only int8)"
        info["int8_all_int8"] = all(str(m.weight_int8.dtype) == "torch.int8" for _, m in layers)
    return info


# ---------------------------------------------------------------------------- run

def verify(records, model, tok, path, max_new_tokens: int, base_prompts=None) -> None:
    """Attach ``quality`` (vs plain fp32 ``generate``) to rank 0's records.  Collective:
    rank 0 computes the reference, every rank runs the teacher-forced TP forward."""
    from . import bench, harness, quality

    for rec in records:
        if rec["status"] != "ok":
            continue
        rows = harness.make_prompts(rec["batch_size"], base_prompts)
        ref = ref_logits = None
        if is_main():
            ref, ref_logits = bench.reference(path, rows, max_new_tokens)
        ref_tokens = broadcast(ref.tokens if ref is not None else None)
        if is_main():
            gen = harness.Generation(prompts=rec["prompts"], tokens=rec["tokens"], texts=rec["texts"])
            rec["quality"] = quality.quality_report(ref, ref_logits, gen, model, tok)
        else:
            quality.sequence_logits(model, tok, rows, ref_tokens)


def add_flags(parser) -> None:
    """The strategy's own flags, added to :func:`bloomkit.cli.common_parser`."""
    g = parser.add_argument_group("ds-inference (tensor parallelism)")
    g.add_argument("--tp_size", type=int, default=None,
                   help="tensor-parallel degree; default: the number of launched ranks")
    g.add_argument("--kernel_inject", choices=KERNEL_INJECT, default="auto",
                   help="on: DeepSpeed's fused CUDA kernels (legacy env + CUDA only); off: AutoTP; "
                        "auto: kernel injection where it works, else AutoTP")
    g.add_argument("--save_shards", default=None, metavar="DIR",
                   help="write each rank's TP shard (safetensors) to DIR once (then run as usual); "
                        "under kernel injection DeepSpeed's own pre-sharded files (load them with "
                        "--ds_checkpoint)")
    g.add_argument("--load_shards", default=None, metavar="DIR",
                   help="load only this rank's shard from DIR (written by --save_shards)")
    g.add_argument("--ds_checkpoint", default=None, metavar="JSON",
                   help="DeepSpeed's checkpoints.json / ds_inference_config.json to load from")
    g.add_argument("--allow_pickle", action="store_true",
                   help="let --ds_checkpoint load pickled .pt/.bin files (they can run code: "
                        "only for files you trust)")
    g.add_argument("--comm_timeout", type=int, default=300,
                   help="seconds a collective may wait for a silent rank before failing")


def check_cli(args) -> dict:
    """Every check that needs no process group, in the order a user should fix them."""
    from . import tp_shards
    from .cli import prepare
    from .models import load_config

    if sum(bool(x) for x in (args.save_shards, args.load_shards)) > 1:
        raise UserError("--save_shards and --load_shards exclude each other: write the shards "
                        "in one launch, load them in the next")
    if args.load_shards and args.ds_checkpoint:
        raise UserError("pass either --load_shards (bloomkit shards) or --ds_checkpoint "
                        "(DeepSpeed's json), not both")
    source = None
    if args.load_shards:
        index = tp_shards.read_index(args.load_shards)
        source = index.get("source")
        args.name = str(Path(args.load_shards).expanduser())
    s = prepare(args)  # device, dtype (fp16 on CPU is an error), prompts, json_out, model dir
    s["label"] = source or args.name
    s["ref_path"] = s["path"]
    if args.load_shards and args.verify:  # the fp32 reference needs the unsharded model
        from .models import resolve_model

        try:
            s["ref_path"] = resolve_model(index.get("source_path") or source)
        except UserError:
            raise UserError(f"--verify compares with the unsharded model {source!r}, which is not "
                            "here; drop --verify or make the original model available") from None
    config = load_config(s["path"])
    tp_size = args.tp_size or world_size()
    check_tp(config, tp_size, world_size(), s["device"])
    s["ds"] = None
    if args.ds_checkpoint:
        s["ds"] = tp_shards.read_ds_checkpoint_json(args.ds_checkpoint,
                                                    allow_pickle=args.allow_pickle)
    engine = choose_engine(args.kernel_inject, s["device"], s["dtype"], s["ds"])
    if s["dtype"] == "int8":
        check_int8(s["device"], engine)
    if args.load_shards:
        tp_shards.check_shards(args.load_shards, tp_size=tp_size, dtype=s["dtype"], engine=engine)
    if s["ds"] is not None:
        tp_shards.check_ds_checkpoint(s["ds"], tp_size=tp_size, engine=engine)
    if args.save_shards and engine == "kernel-inject":
        if args.ds_checkpoint:
            raise UserError("--ds_checkpoint is already DeepSpeed's pre-sharded format; drop "
                            "--save_shards (or use --kernel_inject off to write bloomkit shards)")
        if s["dtype"] == "int8":
            raise UserError("under kernel injection --save_shards writes DeepSpeed's fp16 files and "
                            f"int8 is quantized while reading them: {KERNEL_INT8_ROUTE}")
    if args.save_shards:
        tp_shards.prepare_dir(args.save_shards)
    s.update(tp_size=tp_size, engine=engine, config=config)
    return s


def _quiet_rank() -> None:
    """Only rank 0 prints: other ranks' stdout goes nowhere (errors still reach stderr)."""
    import sys
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def load(args, s: dict):
    """This rank's TP model from the source the flags name (full checkpoint, bloomkit shards
    or DeepSpeed's json)."""
    from . import tp_shards

    kw = dict(dtype=s["dtype"], tp_size=s["tp_size"], engine=s["engine"])
    if args.load_shards:
        return tp_shards.load_rank_shard(args.load_shards, device=s["device"], **kw), "shards"
    if s["ds"] is not None:
        return tp_shards.load_ds_checkpoint(s["ds"], s["config"], **kw), "ds_checkpoint"
    # kernel injection: DeepSpeed writes its own pre-sharded files while it cuts the model
    save_dir = args.save_shards if s["engine"] == "kernel-inject" else None
    return tp_model(s["path"], save_dir=save_dir, **kw), "full"


def warm_imports(config) -> None:
    """Import the model class, accelerate and DeepSpeed's layers before the load clock starts:
    "start to ready" then compares reading and placing weights, not Python imports (seconds
    on a busy CPU, the same for every load path)."""
    import importlib

    import accelerate  # noqa: F401
    import deepspeed.module_inject.layers  # noqa: F401
    from transformers import AutoModelForCausalLM

    # imported by DeepSpeed's AutoTP on first use (its expert-parallel map; the GPT-2 block it
    # compares each layer with): about 35 ms of init_inference on a quiet 2-core machine
    for mod in ("deepspeed.module_inject.auto_ep_layer", "transformers.models.gpt2.modeling_gpt2"):
        try:
            importlib.import_module(mod)
        except ImportError:  # other DeepSpeed / transformers versions
            pass

    AutoModelForCausalLM._model_mapping[type(config)]


def run(args) -> list[dict]:
    """The recipe: check, start the process group, load (timed), describe, generate or
    benchmark on every rank, verify; rank 0 prints and writes ``--json_out``."""
    from . import bench, cli, harness, results, tp_shards

    _quiet_rank()
    s = check_cli(args)
    setup_distributed(s["device"], args.comm_timeout)
    warm_imports(s["config"])
    barrier()  # every rank starts the load clock together: a rank still importing is not load time
    with harness.PeakRSS() as rss, harness.LoadTimer() as lt:
        model, source = load(args, s)
    load_rss = gather(rss.peak)
    if args.save_shards and s["engine"] == "kernel-inject":
        barrier()  # every rank has written its tp_RR_PP.pt files (inside init_inference)
        if is_main():
            tp_shards.copy_model_files(s["path"], args.save_shards)
            print(f"DeepSpeed wrote {s['tp_size']} rank(s) of {s['label']} in its kernel layout "
                  f"(pickled .pt files) to {args.save_shards}; start from them with --ds_checkpoint "
                  f"{Path(args.save_shards) / 'ds_inference_config.json'} --allow_pickle "
                  "(--dtype fp16, or int8 quantized while loading)", flush=True)
        barrier()
    elif args.save_shards:
        path = tp_shards.save_rank_shard(model, args.save_shards, tp_size=s["tp_size"],
                                         rank=rank(), dtype=s["dtype"])
        sizes = gather(path.stat().st_size)
        barrier()
        if is_main():
            tp_shards.write_index(args.save_shards, source=s["path"], tp_size=s["tp_size"],
                                  dtype=s["dtype"], engine=s["engine"], name=s["label"],
                                  bytes_per_rank=sizes, source_path=s["ref_path"])
            print(f"wrote {s['tp_size']} TP shard(s) of {s['label']} ({s['dtype']}) to "
                  f"{args.save_shards}: {', '.join(f'{b / 2**20:.1f} MiB' for b in sizes)}; "
                  f"start from them with --load_shards {args.save_shards}", flush=True)
        barrier()
    options = {"kernel_inject": args.kernel_inject, "load_from": source,
               "shards": str(args.load_shards or args.save_shards or "") or None,
               "load_peak_rss_bytes_per_rank": load_rss,
               "load_steps_s": getattr(model, "_bloomkit_load_steps", None),
               **describe(model, s["config"], s["tp_size"], s["engine"], s["dtype"])}
    kill_hook()
    records = bench.run_variant(
        strategy="ds-inference", name=s["label"], path=s["path"], dtype=s["dtype"],
        device=s["device"], batch_sizes=args.batch_size, max_new_tokens=args.max_new_tokens,
        load=None, model=model, load_seconds=lt.seconds, options=options,
        prompts=s["base_prompts"], cycles=args.cycles if args.benchmark else None,
        verify=False, budget=s["budget"], world_size=world_size())
    if args.verify:
        verify(records, model, harness_tok(s["path"]), s["ref_path"], args.max_new_tokens,
               s["base_prompts"])
    barrier()
    if is_main():
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
        for r in records:
            print(cli.summary_line(r), flush=True)
    return records


def harness_tok(path):
    from .models import load_tokenizer

    return load_tokenizer(path)
