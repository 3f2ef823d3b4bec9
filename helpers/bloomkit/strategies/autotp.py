"""Strategy 2's engine: DeepSpeed AutoTP cuts any supported causal LM into tensor-parallel slices.

``deepspeed.init_inference(model, tensor_parallel={"tp_size": N}, dtype=...)`` walks the
model, recognises each block's linear layers and swaps them for DeepSpeed's own:

* column-parallel ``LinearLayer`` for the layers that fan *out* (the query/key/value
  projections — fused ``query_key_value`` in BLOOM, GPT-NeoX and Falcon, ``q_proj``/``k_proj``/
  ``v_proj`` in Llama, Mistral, Qwen2 and OPT — and the MLP's up/gate projections): each rank
  keeps 1/N of the output rows, i.e. its share of the attention heads;
* row-parallel ``LinearAllreduce`` for the layers that fan *in* (the attention output and
  the MLP's down projection): each rank keeps 1/N of the input columns and an all-reduce
  sums the partial outputs.

With grouped-query attention the cut follows the *key/value* heads: each rank keeps whole
KV heads and the query heads that share them; when the KV heads do not divide by N,
DeepSpeed gives the first ranks one more (uneven shards).  Works on CUDA and on DeepSpeed's
CPU accelerator (ranks talk over gloo).  What only BLOOM needs (ALiBi slopes per rank, the
fused-kernel route) lives in :mod:`bloomkit.strategies.bloom`.
"""
from __future__ import annotations

from .. import arch
from ..dist import gather, is_main, local_world_size
from ..errors import UserError
from . import bloom, tp_int8


def check_tp(config, tp_size: int, nranks: int, device: str) -> None:
    """Can this launch cut the model ``tp_size`` ways?  Checked before anything is loaded.

    Each rank must hold whole attention heads.  BLOOM's ALiBi slopes are split by query head,
    so its heads must divide by ``tp_size``.  Other families are cut by *key/value* head
    (DeepSpeed's ``get_shard_size``): the first ``kv_heads % tp_size`` ranks take one more,
    so any ``tp_size`` up to the KV-head count works, evenly or not.  Then: TP equal to the
    launched ranks, ranks <= devices."""
    heads, kv = arch.heads_of(config), arch.kv_heads_of(config)
    if tp_size < 1:
        raise UserError(f"--tp_size must be >= 1, got {tp_size}")
    if bloom.is_bloom(config) and heads % tp_size:
        ok = [d for d in range(1, heads + 1) if heads % d == 0]
        raise UserError(f"the model has {heads} attention heads, not divisible by tp_size "
                        f"{tp_size}: each rank must hold whole heads and their ALiBi slopes; use a "
                        f"TP size in {ok}")
    if kv < tp_size:
        raise UserError(f"the model has {kv} key/value head(s) ({heads} query heads): tp_size "
                        f"{tp_size} would leave a rank without one; use --tp_size {kv} or less")
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


def check_supported(config) -> None:
    """Does DeepSpeed's AutoTP know this architecture?  Asked of DeepSpeed itself
    (``AutoTP.supported``) on a meta-device skeleton, before any weight is read."""
    from deepspeed.module_inject.auto_tp import AutoTP

    if not AutoTP.supported(meta_model(config, "fp32")):
        raise UserError(f"DeepSpeed's AutoTP does not support {arch.model_type(config)!r} models "
                        "(its list of unsupported architectures); serve this model with "
                        "recipes/accelerate_inference.py or recipes/ds_zero_inference.py")


def compute_dtype(dtype: str, engine: str = "autotp") -> str:
    """The dtype the model is built in: int8 computes in bf16 under AutoTP; DeepSpeed's int8
    kernels compute in fp16 (and expect the rest of the model in fp16)."""
    if dtype == "int8":
        return "fp16" if engine == "kernel-inject" else tp_int8.INT8_COMPUTE
    return dtype


def load_full(path, dtype: str, engine: str = "autotp"):
    """Every rank reads the *whole* checkpoint into CPU RAM (the blog's unsharded path)."""
    from transformers import AutoModelForCausalLM

    from ..dtypes import from_pretrained_dtype, torch_dtype

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

    from ..dtypes import from_pretrained_dtype, torch_dtype

    kw = from_pretrained_dtype(torch_dtype(compute_dtype(dtype, engine)))
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, **kw)
    if any(b.is_meta for b in model.buffers()):
        # buffers computed at construction and kept out of checkpoints (RoPE's inv_freq):
        # nothing would fill them, so build again with real buffers and meta parameters only
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, **kw)
    model.tie_weights()
    return model.eval()


def init_engine(model, *, tp_size: int, dtype: str, engine: str, checkpoint=None, base_dir=None,
                save_dir=None):
    """``deepspeed.init_inference`` with TP, plus the fix-ups today's DeepSpeed and transformers
    need; returns the DeepSpeed engine (the rank's model is ``engine.module``).

    Args:
        model: the whole model (read by :func:`load_full`), or a ``meta`` skeleton
            (:func:`meta_model`) that ``checkpoint`` fills.
        tp_size: ranks sharing each layer (the launched ranks; the process group is up).
        dtype: ``fp32``/``bf16``/``fp16``, or ``int8``: DeepSpeed's ``dtype=torch.int8`` under
            kernel injection, else built in :func:`compute_dtype` and quantized afterwards
            (:func:`bloomkit.strategies.tp_int8.quantize_tp_linears`).
        engine: ``autotp`` (``replace_with_kernel_inject=False``) or ``kernel-inject``.
        checkpoint: DeepSpeed's checkpoint json, read by DeepSpeed onto a ``meta`` ``model``
            (``base_dir``: where its files are).
        save_dir: kernel injection only: DeepSpeed writes its pre-sharded files there
            (``save_mp_checkpoint_path``: ``ds_inference_config.json``, ``tp_RR_PP.pt``, ``non-tp.pt``).

    Fix-ups: buffers computed at construction (RoPE's ``inv_freq``) keep their values and fp32
    (DeepSpeed casts them to ``dtype``, or leaves a ``meta`` model's uninitialised); plain tensor
    attributes join the ``state_dict`` (:func:`register_plain_tensors`); BLOOM at TP > 1 always
    gets an attention mask (:func:`bloomkit.strategies.bloom.keep_alibi_sharded`).
    ``recipes/ds_inference.py``'s ``load_model`` makes the same calls for a full load.

    Example:
        >>> import os; _ = os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU: say so, quietly
        >>> from bloomkit import models
        >>> path = models.resolve_model("tiny")
        >>> eng = init_engine(load_full(path, "fp32"), tp_size=1, dtype="fp32", engine="autotp")
        >>> type(eng.module).__name__
        'BloomForCausalLM'
    """
    import deepspeed
    import torch

    from ..dtypes import torch_dtype

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
    # Buffers that no checkpoint holds (RoPE's inv_freq, computed at construction in fp32):
    # DeepSpeed casts them to ``dtype`` (bf16 rounds them) and re-allocates a meta-device model
    # with ``to_empty``, which leaves them uninitialised: keep them and put them back
    computed = {(mod_name, key): buf.detach().clone() for mod_name, mod in model.named_modules()
                for key, buf in mod._buffers.items()
                if buf is not None and key in mod._non_persistent_buffers_set and not buf.is_meta}
    eng = deepspeed.init_inference(model, **kw)
    for (mod_name, key), buf in computed.items():
        mod = eng.module.get_submodule(mod_name)
        mod._buffers[key] = buf.to(mod._buffers[key].device)
    register_plain_tensors(eng.module)
    if tp_size > 1 and engine == "autotp" and bloom.is_bloom(eng.module.config):
        bloom.keep_alibi_sharded(eng.module)
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


def tp_model(path, dtype: str, *, tp_size: int, engine: str, save_dir=None, load=None):
    """Full load + ``init_inference``: the TP-sharded model of this rank (int8 quantized).

    ``load(path, dtype, tp_size, kernel_inject, **init_kwargs)``, when given, makes the
    ``from_pretrained`` + ``init_inference`` calls and returns ``engine.module`` (the recipe's
    ``load_model``); it gets the dtype to build in (``bf16`` for int8 AutoTP, quantized here
    afterwards) and ``save_mp_checkpoint_path`` when DeepSpeed writes its shards.
    Default: :func:`load_full` + :func:`init_engine`, the same calls (tested equal)."""
    if load is not None:
        if dtype == "int8" and engine == "kernel-inject":   # bloom.choose_engine routes it so
            raise UserError("DeepSpeed's int8 kernels load from its pre-sharded files: "
                            + bloom.KERNEL_INT8_ROUTE)
        kw = {"save_mp_checkpoint_path": str(save_dir)} if save_dir is not None else {}
        model = load(str(path), compute_dtype(dtype, engine), tp_size, engine == "kernel-inject", **kw)
        register_plain_tensors(model)   # DeepSpeed 0.15's plain-tensor bias into the shards
    else:
        model = init_engine(load_full(path, dtype, engine), tp_size=tp_size, dtype=dtype,
                            engine=engine, save_dir=save_dir).module
    if dtype == "int8" and engine == "autotp":
        tp_int8.quantize_tp_linears(model)
    return model


def heads_on_rank(block, config=None) -> int:
    """Query heads this rank computes in decoder ``block``, read from the weights it holds:
    its query rows ÷ ``head_dim`` (a fused q,k,v projection holds ``heads + 2·kv_heads``
    head-rows in the config's proportion).  DeepSpeed's fused BLOOM block says it directly
    (``attention.num_attention_heads_per_partition``)."""
    attn = getattr(block, "attention", None)
    if bloom.is_kernel_block(block):
        return int(attn.num_attention_heads_per_partition)
    heads, kv, hd = arch.heads_of(config), arch.kv_heads_of(config), arch.head_dim_of(config)
    for name, m in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        w = getattr(m, "weight_int8", None)
        w = w if w is not None else getattr(m, "weight", None)
        if w is None or w.dim() != 2:
            continue
        if leaf == "q_proj":
            return w.shape[0] // hd
        if leaf in ("query_key_value", "qkv_proj", "Wqkv"):
            return (w.shape[0] // hd) * heads // (heads + 2 * kv)
    return 0


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
    """Bytes of this rank's decoder-block linears (the weights TP cuts and int8 shrinks):
    weight (or int8 weight + scales) of every linear inside the decoder layers."""
    try:
        prefix = arch.decoder_blocks(model)[0] + "."
    except ValueError:  # a single block
        prefix = ""
    classes = tp_int8.tp_linear_classes()
    total = 0
    for n, m in model.named_modules():
        if not n.startswith(prefix):
            continue
        if isinstance(m, classes) or type(m).__name__ == "Linear":
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "Int8TPLinear":
            total += m.weight_int8.numel() + m.weight_scale.numel() * m.weight_scale.element_size()
    for _, t in bloom.kernel_block_weights(model):
        scale = getattr(t, "scale", None)
        total += t.numel() * t.element_size() + (
            scale.numel() * scale.element_size() if hasattr(scale, "numel") else 0)
    return total


def block_shapes(model, config, block: int = 0) -> dict:
    """Shapes (and dtype) of one decoder block's tensors on this rank (``layers.{block}.*``),
    plus the embeddings and the output head, the block's layer types, and the query heads
    this rank computes."""
    prefix, blocks = arch.decoder_blocks(model)
    prefix = f"{prefix}.{block}."
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    ends = {n for n, m in model.named_modules() if m is emb or (head is not None and m is head)}
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n.startswith(prefix) or n.rsplit(".", 1)[0] in ends:
            out[n.replace(prefix, f"layers.{block}.")] = f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"
    out["attention_heads_on_rank"] = heads_on_rank(blocks[block], config)
    depth = prefix.count(".") + 1
    out[f"layers.{block}.layer_types"] = {
        n.replace(prefix, ""): type(m).__name__ for n, m in model.named_modules()
        if n.startswith(prefix) and n.count(".") == depth}
    return out


def tp_grain_size() -> int:
    """The MLP / output-head granularity DeepSpeed's AutoTP cuts by (``tensor_parallel.tp_grain_size``
    of ``init_inference``'s config; 64 by default): read from DeepSpeed's own config class."""
    from deepspeed.inference.config import DeepSpeedTPConfig

    return int(DeepSpeedTPConfig().tp_grain_size)


def planned_shapes(config, tp_size: int, rank: int = 0, grain: int | None = None) -> "object":
    """Per-rank shapes of one decoder block's linears under AutoTP, from the config alone: a
    pandas table, to read next to :func:`block_shapes` of a real run.

    DeepSpeed is asked, not imitated: ``AutoTP.tp_parser`` on a meta-device skeleton names the
    row-parallel layers (an all-reduce after them; AutoTP adds any ``down_proj``), every other
    linear is column-parallel, and DeepSpeed's ``get_shard_size`` -- with the metadata AutoTP
    builds (``AutoTPMeta.from_model_config`` with ``init_inference``'s default ``tp_grain_size``,
    :func:`tp_grain_size`) and the layer's name inside the block, as AutoTP passes them -- gives
    the rows (or columns) ``rank`` keeps:

    * attention projections whose width divides by the key/value heads: whole key/value heads
      (the first ``kv_heads % tp_size`` ranks one more);
    * MLP layers (a name with ``mlp``, ``gate_proj``/``up_proj``/``down_proj``, ...): in grains of
      ``grain`` columns, the first ranks one grain more, the remainder of a width that is no
      multiple of the grain to the last rank; a width under one grain near-evenly.

    So a Llama MLP of width 176 at TP=2 is cut 64 + 112 (two whole grains of 64, one per rank,
    and the remaining 48 columns to the last rank), not 88 + 88.  ``grain``: another ``tp_grain_size`` than DeepSpeed's default."""
    import pandas as pd
    import torch
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size

    model = meta_model(config, "fp32")
    allreduce = {n for _, names in AutoTP.tp_parser(model) for n in names}
    meta = AutoTPMeta.from_model_config(config, tp_grain_size=grain or tp_grain_size())
    prefix, blocks = arch.decoder_blocks(model)
    rows = []
    for name, m in blocks[0].named_modules():
        if isinstance(m, torch.nn.Linear):
            out_f, in_f = m.weight.shape
            is_row = "down_proj" in name or any(name.endswith(a.lstrip(".")) for a in allreduce)
            if is_row:
                shard = [out_f, get_shard_size(in_f, tp_size, meta, name, rank)]
            else:
                shard = [get_shard_size(out_f, tp_size, meta, name, rank), in_f]
            rows.append((name, "row" if is_row else "column", [out_f, in_f], shard,
                         "all-reduce after" if is_row else "none"))
    rows.append(("norms", "replicated", [arch.hidden_of(config)], [arch.hidden_of(config)], "none"))
    df = pd.DataFrame(rows, columns=["weight", "split", "full shape", f"rank {rank} shape",
                                     "communication"])
    heads, kv = arch.heads_of(config), arch.kv_heads_of(config)
    kv_rank = kv // tp_size + (1 if rank < kv % tp_size else 0)
    df.attrs.update(kv_heads_per_rank=kv_rank, heads_per_rank=kv_rank * heads // kv,
                    grain=meta.tp_grain_size)
    return df


def describe(model, config, tp_size: int, engine: str, dtype: str) -> dict:
    """Facts for the result record: per-rank bytes and heads (gathered), rank 0's shapes;
    BLOOM adds its ALiBi split.  Collective: every rank must call it."""
    _, blocks = arch.decoder_blocks(model)
    per_rank = gather(rank_weight_bytes(model))
    heads = gather(heads_on_rank(blocks[0], config))
    info = {"tp_size": tp_size, "engine": engine, "architecture": arch.model_type(config),
            "weight_bytes_per_rank": per_rank, "linear_bytes_per_rank": gather(tp_linear_bytes(model)),
            "heads_per_rank": heads, "kv_heads": arch.kv_heads_of(config)}
    if bloom.is_bloom(config):
        info["alibi_heads"] = bloom.alibi_heads(config, tp_size)
    if is_main():
        info["rank0_shapes"] = block_shapes(model, config)
    if dtype == "int8" and engine == "kernel-inject":
        weights = bloom.kernel_block_weights(model)
        info["int8_layers"] = len(weights)
        info["int8_kernel"] = "DeepSpeed's fused int8 kernels (group-wise scales, quantized while loading)"
        info["int8_all_int8"] = bool(weights) and all(str(t.dtype) == "torch.int8" for _, t in weights)
    elif dtype == "int8":
        layers = tp_int8.int8_layers(model)
        info["int8_layers"] = len(layers)
        info["int8_kernel"] = "torch._weight_int8pack_mm (per-channel weight-only int8)"
        info["int8_all_int8"] = all(str(m.weight_int8.dtype) == "torch.int8" for _, m in layers)
    return info


