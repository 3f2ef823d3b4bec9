"""Memory planner: will a model fit, where, and with how large a batch, for each strategy?

Plain arithmetic over the model's shape (see :mod:`bloomkit.memory`; any family
:mod:`bloomkit.arch` knows: BLOOM presets plus published Llama, Qwen2 and Mistral shapes),
no GPU needed:

* **weights per device** — the whole model's bytes divided over the devices that hold them;
* **KV-cache bytes per token** — what every prompt or generated token keeps, per device;
* **largest batch** — what is left on a device after its weights and a reserve, divided by
  what one more row of the batch needs there (its KV cache over the whole sequence plus its
  share of the transient activations and logits);
* **which strategies fit at all**, and where the weights live (GPU, CPU RAM, NVMe).

The three strategies place memory differently:

``accelerate`` (pipeline)
    blocks spread over the GPUs (a balanced device map); every GPU keeps the KV cache of its
    own blocks.  What does not fit can be offloaded to CPU RAM, then disk (slowly).
``ds-inference`` (tensor parallel, TP degree = GPU count)
    every weight matrix is split over the GPUs, and so is the KV cache (by key/value head).
    BLOOM's TP degree must divide its heads; a grouped-query model needs at least as many
    KV heads as GPUs (uneven shards otherwise allowed); nothing is offloaded.
``ds-zero`` (ZeRO-3 inference, parameters partitioned or offloaded)
    each GPU owns 1/N of the parameters and gathers a module whole just before it runs; when
    the shares do not fit on the GPUs they are offloaded to CPU RAM (or NVMe) and streamed in
    module by module.  Each GPU runs its *own* batch, so beside its share (none when
    offloaded) it holds the largest module, the prefetch bucket and the full KV cache of its
    stream.

These are lower bounds on the memory a run needs: real runs also lose memory to allocator
fragmentation and temporary buffers, so a measured out-of-memory can come earlier than the
largest batch printed here (the ``reserve`` argument is that safety margin).
"""
from __future__ import annotations

from .. import arch, memory
from ..errors import UserError

STRATEGIES = ("accelerate", "ds-inference", "ds-zero")

# Published shapes of other families (from their config.json), as plain config dicts:
# grouped-query attention (8 KV heads), gated MLPs (SwiGLU), untied LM heads.
PUBLISHED_CONFIGS = {
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                         vocab_size=128256, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                          vocab_size=128256, tie_word_embeddings=False),
    "Qwen2-72B": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, intermediate_size=29568,
                      vocab_size=152064, tie_word_embeddings=False),   # q, k, v with biases
    "Mistral-7B": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,  # v0.1
                       num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                       vocab_size=32000, tie_word_embeddings=False, sliding_window=4096),
}

# Display names -> keys of bloomkit.models.BLOOM_DIMS (the published BLOOM shapes), or of
# PUBLISHED_CONFIGS.
MODEL_PRESETS = {
    "BLOOM-560m": "bloom-560m",
    "BLOOM-1b1": "bloom-1b1",
    "BLOOM-1b7": "bloom-1b7",
    "BLOOM-3b": "bloom-3b",
    "BLOOM-7b1": "bloom-7b1",
    "BLOOM-176B": "bloom",
    **{name: name for name in PUBLISHED_CONFIGS},
}

# GPU counts a machine comes with (1, 2, 4 or 8 per node; 16 = two nodes).
GPU_COUNTS = (1, 2, 4, 8, 16)


def size_bytes(size) -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``2TB``, an int of bytes, or 0/None for none."""
    if size in (None, 0, "0", ""):
        return 0
    if isinstance(size, (int, float)):
        return int(size)
    from accelerate.utils import convert_file_size_to_int

    text = str(size).strip()
    for unit, factor in (("TiB", 2**40), ("TB", 10**12)):  # accelerate stops at GB
        if text.upper().endswith(unit.upper()) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    try:
        return int(convert_file_size_to_int(text))
    except ValueError:
        raise UserError(f"bad size {size!r}; write it like 80GB, 80GiB or 512GB") from None


def model_dims(model) -> dict:
    """Shape of ``model`` as a plain dict the memory arithmetic reads: a preset name
    (``BLOOM-176B``, ``bloom-7b1``, ``Llama-3.1-8B``, ...), a dict, or a transformers config
    of any family :mod:`bloomkit.arch` knows.  A BLOOM (or a dict naming no ``model_type``)
    gives ``hidden_size, n_layer, n_head, vocab_size``; other families add their
    ``model_type``, KV heads, head size, MLP width and what decides biases and tying (see
    :func:`bloomkit.arch.shape_dict`)."""
    from ..models import BLOOM_DIMS

    if isinstance(model, str):
        key = MODEL_PRESETS.get(model, model)
        if key in PUBLISHED_CONFIGS:
            return arch.shape_dict(PUBLISHED_CONFIGS[key])
        if key not in BLOOM_DIMS:
            raise UserError(f"unknown model {model!r}; use one of {', '.join(MODEL_PRESETS)} or "
                            "pass the dimensions (hidden_size, n_layer, n_head, vocab_size)")
        return dict(BLOOM_DIMS[key])
    readers = {"hidden_size": arch.hidden_of, "n_layer": arch.layers_of, "n_head": arch.heads_of,
               "vocab_size": arch.vocab_of}
    missing = []
    for k, read in readers.items():
        try:
            if not read(model):
                missing.append(k)
        except (TypeError, ValueError):   # int(None): the config does not say
            missing.append(k)
    if missing:
        raise UserError(f"model dimensions miss {', '.join(missing)}; give hidden_size, n_layer, "
                        "n_head and vocab_size")
    return arch.shape_dict(model)


def tp_kv_share(dims: dict, n: int) -> float:
    """Share of the KV cache (and of the attention heads) on the fullest of ``n`` TP ranks:
    AutoTP cuts by key/value head and gives the first ranks one more when they do not divide."""
    kv = arch.kv_heads_of(dims)
    return -(-kv // n) / kv


def tp_problem(dims: dict, n: int) -> str | None:
    """Why tensor parallelism cannot cut ``dims`` ``n`` ways (``None``: it can), by the rules
    of :func:`bloomkit.strategies.autotp.check_tp`: BLOOM's heads (and their ALiBi slopes)
    must divide by ``n``; other families need at least ``n`` key/value heads."""
    heads, kv, h = arch.heads_of(dims), arch.kv_heads_of(dims), arch.hidden_of(dims)
    if arch.family_name(dims) == "bloom":
        if heads % n or h % n:
            return f"TP degree {n} must divide the {heads} heads and hidden size {h}"
    elif kv < n:
        return (f"TP degree {n} would leave a rank without a key/value head: the model has "
                f"{kv} KV heads ({heads} query heads); use {kv} GPUs or fewer per TP group")
    return None


def largest_module_bytes(dims: dict, dtype: str) -> float:
    """Bytes of the largest weight matrix (what ZeRO-3 must gather whole on a GPU)."""
    return max(arch.weight_matrices(dims)) * memory.dtype_bytes(dtype)


def _extra_per_row(dims: dict, seq_len: int, dtype: str, kv_share: float) -> float:
    """Bytes one more batch row needs on a device: ``kv_share`` of its KV cache, plus the
    transient activations and logits of :func:`memory.generate_extra_bytes` (not shared:
    the device that runs the step needs them whole)."""
    total = memory.generate_extra_bytes(dims, 1, seq_len, dtype)
    kv = memory.kv_cache_bytes_per_token(dims, dtype) * seq_len
    return kv * kv_share + (total - kv)


def _max_batch(free: float, per_row: float) -> int:
    return max(int(free // per_row), 0) if per_row > 0 else 0


def plan(model, dtype: str = "bf16", n_gpus: int = 8, gpu_memory="80GB", cpu_ram="512GB",
         nvme="0", prompt_tokens: int = 16, max_new_tokens: int = 100, reserve="2GiB",
         device: str = "GPU") -> list[dict]:
    """One row per strategy: does ``model`` in ``dtype`` fit on ``n_gpus`` x ``gpu_memory``
    (with ``cpu_ram`` and ``nvme`` for offload), and with what largest batch?

    Sequence length = ``prompt_tokens + max_new_tokens`` (the blog: short prompts, 100 new
    tokens).  ``reserve`` is kept free on every GPU (CUDA context, kernel workspaces,
    fragmentation).  ``device`` names the devices in the notes and the table (``CPU`` when a
    machine without GPUs plans for its own RAM as the one device).  Row keys: ``strategy, fits,
    weights_on, devices, device, weights_per_device_bytes, kv_bytes_per_token_per_device,
    max_batch, note``.
    """
    dims = model_dims(model)
    dtype = str(dtype)
    if dtype not in memory.DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, int8, int4")
    if int(n_gpus) < 1:
        raise UserError(f"n_gpus must be at least 1, got {n_gpus}")
    n = int(n_gpus)
    gpu, cpu, disk, res = (size_bytes(gpu_memory), size_bytes(cpu_ram), size_bytes(nvme),
                           size_bytes(reserve))
    usable = gpu - res
    seq = int(prompt_tokens) + int(max_new_tokens)
    w = memory.weight_bytes(dims, dtype)
    kv = memory.kv_cache_bytes_per_token(dims, dtype)
    h = arch.hidden_of(dims)
    rows = []

    # accelerate: pipeline over n GPUs, then CPU, then disk
    per_dev = w / n
    row = {"strategy": "accelerate", "devices": n, "weights_per_device_bytes": per_dev,
           "kv_bytes_per_token_per_device": kv / n}
    if per_dev <= usable:
        per_row = _extra_per_row(dims, seq, dtype, 1 / n)
        row.update(fits=True, weights_on="gpu", max_batch=_max_batch(usable - per_dev, per_row),
                   note=(f"{n} {device}s run one after the other: {n}x the memory, not the speed" if n > 1
                         else f"every block on the one {device}: nothing to spread"))
    else:
        spill = w - n * max(usable, 0)
        where = "cpu" if spill <= cpu else ("nvme" if spill <= cpu + disk else None)
        row.update(fits=where is not None, weights_on=f"gpu+{where}" if where else "-",
                   weights_per_device_bytes=min(per_dev, max(usable, 0)), max_batch=None,
                   note=(f"{spill / 1e9:.0f} GB offloaded to {where}: every token reads it again "
                         "(seconds per token); set max_memory to leave GPU room for the batch"
                         if where else f"{w / 1e9:.0f} GB of weights exceed GPUs + CPU RAM + NVMe"))
    rows.append(row)

    # ds-inference: tensor parallel over all n GPUs (cut by KV head: uneven when they don't divide)
    kv_heads = arch.kv_heads_of(dims)
    share = tp_kv_share(dims, n)
    row = {"strategy": "ds-inference", "devices": n, "weights_per_device_bytes": w / n,
           "kv_bytes_per_token_per_device": kv * -(-kv_heads // n) / kv_heads, "max_batch": None,
           "weights_on": "-"}
    problem = tp_problem(dims, n)
    if problem:
        row.update(fits=False, note=problem)
    elif w / n > usable:
        row.update(fits=False, note=f"{w / n / 1e9:.1f} GB of weights per GPU > "
                                    f"{usable / 1e9:.1f} GB usable; use more GPUs"
                                    + (" or int8" if memory.dtype_bytes(dtype) > 1 else ""))
    else:
        per_row = _extra_per_row(dims, seq, dtype, share)
        row.update(fits=True, weights_on="gpu", max_batch=_max_batch(usable - w / n, per_row),
                   note=(f"every matrix split {n} ways: all {device}s work on every token" if n > 1
                         else f"one {device}: nothing to split (tensor parallelism needs 2 or more)"))
    rows.append(row)

    # ds-zero: ZeRO-3, parameters partitioned over GPUs or offloaded; one stream per GPU
    biggest = largest_module_bytes(dims, dtype)
    bucket = 0.9 * h * h * memory.dtype_bytes(dtype)  # stage3_prefetch_bucket_size
    row = {"strategy": "ds-zero", "devices": n, "kv_bytes_per_token_per_device": kv}
    if w / n + bucket <= usable:
        where, working = "gpu", w / n + biggest + bucket
    elif w <= cpu:
        where, working = "cpu", biggest + bucket
    elif w <= disk:
        where, working = "nvme", biggest + bucket
    else:
        where, working = None, None
    if where is None:
        row.update(fits=False, weights_on="-", weights_per_device_bytes=None, max_batch=None,
                   note=f"{w / 1e9:.0f} GB of parameters fit neither CPU RAM nor NVMe")
    elif working > usable:
        row.update(fits=False, weights_on=where, weights_per_device_bytes=working, max_batch=None,
                   note="the largest module does not fit on one GPU")
    else:
        per_row = _extra_per_row(dims, seq, dtype, 1.0)
        per_gpu = _max_batch(usable - working, per_row)
        row.update(fits=per_gpu > 0, weights_on=where, weights_per_device_bytes=working,
                   max_batch=per_gpu * n,
                   note=(f"parameters {'offloaded to ' + where if where != 'gpu' else 'partitioned over the ' + device + 's' if n > 1 else 'all on the one ' + device}"
                         f", gathered module by module; "
                         + (f"{n} streams of {per_gpu} rows" if n > 1 else f"one stream of {per_gpu} rows")))
    rows.append(row)
    for r in rows:
        r.update(model=model if isinstance(model, str) else "custom", dtype=dtype, n_gpus=n,
                 weights_total_bytes=w, device=device)
    return rows


def peak_bytes(model, dtype: str, batch_size: int, prompt_tokens: int, max_new_tokens: int, *,
               baseline=0, devices: int = 1, kv_share: float | None = None) -> dict:
    """The predicted peak memory of one ``generate`` call on one device, term by term.

    * ``baseline`` — what the process holds before the model (Python, torch, the CUDA context:
      measure it, e.g. RSS after the imports);
    * ``weights`` — ``weight_bytes / devices``;
    * ``kv_cache`` — ``kv_bytes_per_token x batch x (prompt + new tokens)`` (times
      ``kv_share``, the device's share: ``1/devices`` by default), plus one layer's worth
      again: a growing cache concatenates each layer's keys and values into a new tensor,
      so old and new coexist for a moment;
    * ``transient`` — the largest short-lived tensor of the prompt pass
      (:func:`bloomkit.memory.generate_extra_bytes`: the MLP's inner activation, or the
      fp32 attention scores ``batch x heads x prompt x prompt`` of eager attention) and the
      fp32 logits ``batch x vocab`` (twice: scores and their processed copy).

    The sum is what a sampler of the process's memory should see at its highest; on this
    machine the prediction for ``bench`` at two batch sizes is compared with the measured
    peak RSS (``tests/test_planner.py``)."""
    dims = model_dims(model)
    seq = int(prompt_tokens) + int(max_new_tokens)
    share = (1.0 / devices) if kv_share is None else kv_share
    kv_tok = memory.kv_cache_bytes_per_token(dims, dtype)
    kv = kv_tok * batch_size * seq * share
    layers = arch.layers_of(dims)
    extra = memory.generate_extra_bytes(dims, batch_size, int(prompt_tokens), dtype) \
        - kv_tok * batch_size * int(prompt_tokens)
    terms = {"baseline": float(size_bytes(baseline)), "weights": memory.weight_bytes(dims, dtype) / devices,
             "kv_cache": kv + kv / layers, "transient": float(extra)}
    terms["total"] = sum(terms.values())
    return terms


def blog_oom_gap(dtype: str = "bf16", gpu_memory="80GB", reserve="2GiB") -> list[dict]:
    """The blog's out-of-memory batch sizes on 8x80GB (Accelerate 64, DeepSpeed-Inference
    256; published) against this plan: per GPU, what the countable tensors need at the last
    batch that ran and at the one that failed, and how much memory the plan cannot see there
    (``unexplained_bytes``: 0 when the plan itself predicts the failure)."""
    out = []
    # balanced_low_0 (the blog's Accelerate script): blocks on GPUs 1-7, GPU 0 kept light
    for strategy, ran, failed, devices, share in (("accelerate", 32, 64, 7, 1 / 7),
                                                  ("ds-inference", 128, 256, 8, 1 / 8)):
        need = {b: peak_bytes("BLOOM-176B", dtype, b, 16, 100, baseline=reserve, devices=devices,
                              kv_share=share)["total"] for b in (ran, failed)}
        cap = size_bytes(gpu_memory)
        out.append({"strategy": strategy, "ran at": ran, "oom at (published)": failed,
                    "plan needs at last run GB": need[ran] / 1e9,
                    "plan needs at oom GB": need[failed] / 1e9, "GPU GB": cap / 1e9,
                    "unexplained_bytes": max(cap - need[failed], 0.0)})
    return out


def fits(model, strategy: str, dtype: str = "bf16", n_gpus: int = 8, gpu_memory="80GB",
         gpu_only: bool = False, **kw) -> bool:
    """Does ``strategy`` fit (``gpu_only``: with all weights on GPUs, no offload)?"""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    row = next(r for r in plan(model, dtype, n_gpus, gpu_memory, **kw) if r["strategy"] == strategy)
    return row["fits"] and (not gpu_only or row["weights_on"] == "gpu")


def min_gpus(model, strategy: str, dtype: str = "bf16", gpu_memory="80GB", gpu_only: bool = True,
             counts=GPU_COUNTS, **kw) -> int | None:
    """The fewest GPUs (from ``counts``: machines come with 1, 2, 4, 8 GPUs) on which
    ``strategy`` fits; ``None`` if none does."""
    for n in counts:
        if fits(model, strategy, dtype, n, gpu_memory, gpu_only=gpu_only, **kw):
            return n
    return None


def plan_frame(rows: list[dict]):
    """The plan as a table with GB columns (what the notebook prints)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    dev = rows[0].get("device", "GPU") if rows else "GPU"
    unit, div = ("GB", 1e9) if df["weights_total_bytes"].max() >= 1e9 else ("MB", 1e6)
    out = pd.DataFrame({
        "strategy": df["strategy"], "fits": df["fits"],
        "weights on": df["weights_on"].replace({"gpu": dev.lower(), "gpu+cpu": f"{dev.lower()}+cpu",
                                                "gpu+nvme": f"{dev.lower()}+nvme"}),
        f"{unit} per {dev}": (df["weights_per_device_bytes"].astype(float) / div).round(1),
        f"KV {'MB' if unit == 'GB' else 'kB'}/token/{dev}":
            (df["kv_bytes_per_token_per_device"].astype(float) / div * 1e3).round(2),
        "max batch": df["max_batch"].map(lambda v: "-" if v is None or v != v else int(v)),
        "why": df["note"],
    })
    return out.set_index("strategy")


def summary(model, dtype: str = "bf16", gpu_memory="80GB", **kw) -> dict:
    """Fewest GPUs per strategy: with all weights on GPUs, and (ZeRO/accelerate) with offload."""
    return {s: {"gpu_only": min_gpus(model, s, dtype, gpu_memory, True, **kw),
                "with_offload": min_gpus(model, s, dtype, gpu_memory, False, **kw)}
            for s in STRATEGIES}


def config_of(name: str) -> dict:
    """Dimensions of a model *name* without loading (or building) weights: a planning
    preset (``BLOOM-176B``), a ``bloom-*`` / ``bigscience/bloom-*`` name, a generated preset
    (``tiny``, ``small``, ``bench``), else the ``config.json`` of a local or cached checkpoint."""
    from .. import models

    key = MODEL_PRESETS.get(name, name)
    key = key.split("/", 1)[1] if key.startswith("bigscience/") else key
    if key in PUBLISHED_CONFIGS:
        return model_dims(key)
    if key in models.BLOOM_DIMS:
        return dict(models.BLOOM_DIMS[key])
    if name in models.PRESETS:  # the preset's own config (any family), built without weights
        from dataclasses import asdict

        return model_dims(models.family_config(**asdict(models.PRESETS[name])))
    return model_dims(models.load_config(models.resolve_model(name)))


def models_frame():
    """Every planning preset: shape, parameters, weight GB per dtype, KV cache per token."""
    import pandas as pd

    rows = []
    for name in MODEL_PRESETS:
        d = model_dims(name)
        rows.append({"model": name, "family": arch.family_name(d), "hidden_size": arch.hidden_of(d),
                     "n_layer": arch.layers_of(d), "n_head": arch.heads_of(d),
                     "kv_heads": arch.kv_heads_of(d), "head_dim": arch.head_dim_of(d),
                     "ffn": arch.ffn_of(d), "vocab_size": arch.vocab_of(d),
                     "tied": arch.is_tied(d), "params_B": memory.param_count(d) / 1e9,
                     "bf16_GB": memory.weight_bytes(d, "bf16") / 1e9,
                     "int8_GB": memory.weight_bytes(d, "int8") / 1e9,
                     "KV_MB_per_token_bf16": memory.kv_cache_bytes_per_token(d, "bf16") / 1e6})
    return pd.DataFrame(rows).set_index("model").round(2)


def memory_curve(model, dtype: str = "bf16", n_gpus: int = 8, batch_sizes=(1, 8, 32, 128, 512),
                 prompt_tokens: int = 16, max_new_tokens: int = 100):
    """GPU bytes per device against batch size for each strategy that keeps weights on GPU
    (ZeRO with offload: its working set) — the planner's arithmetic as a table to plot."""
    import pandas as pd

    dims = model_dims(model)
    seq = prompt_tokens + max_new_tokens
    w = memory.weight_bytes(dims, dtype)
    h = arch.hidden_of(dims)
    bytes_ = memory.dtype_bytes(dtype)
    zero_ws = largest_module_bytes(dims, dtype) + 0.9 * h * h * bytes_
    rows = []
    for bs in batch_sizes:
        rows.append({"batch_size": bs,
                     "pipeline / TP (per GPU)": w / n_gpus + bs * _extra_per_row(dims, seq, dtype, 1 / n_gpus),
                     "ZeRO offload (per GPU, one stream)": zero_ws + bs * _extra_per_row(dims, seq, dtype, 1.0)})
    return pd.DataFrame(rows).set_index("batch_size") / 1e9


def show(model="BLOOM-176B", dtype="bf16", n_gpus=8, gpu_memory="80GB", cpu_ram="512GB", nvme="0"):
    """Print the plan and the fewest GPUs per strategy (the headless view of the widget)."""
    from IPython.display import display

    print(f"{model} in {dtype} on {n_gpus} x {gpu_memory} GPU, {cpu_ram} CPU RAM, NVMe {nvme or 0}:")
    display(plan_frame(plan(model, dtype, n_gpus, gpu_memory, cpu_ram, nvme)))
    need = summary(model, dtype, gpu_memory, cpu_ram=cpu_ram, nvme=nvme)
    print("fewest GPUs of", gpu_memory, "(weights on GPUs / with offload):",
          {s: (v["gpu_only"], v["with_offload"]) for s, v in need.items()})


def widget(model="BLOOM-176B", dtype="bf16", n_gpus=8, gpu_memory="80GB", cpu_ram="512GB", nvme="0"):
    """An ipywidgets front end to :func:`show`; ``None`` when ipywidgets is not installed."""
    try:
        import ipywidgets as w
    except ImportError:
        return None
    controls = {
        "model": w.Dropdown(options=list(MODEL_PRESETS), value=model, description="model"),
        "dtype": w.Dropdown(options=["fp32", "bf16", "fp16", "int8", "int4"], value=dtype, description="dtype"),
        "n_gpus": w.Dropdown(options=list(GPU_COUNTS), value=n_gpus, description="GPUs"),
        "gpu_memory": w.Dropdown(options=["16GB", "24GB", "32GB", "40GB", "48GB", "80GB", "141GB"],
                                 value=gpu_memory, description="GPU memory"),
        "cpu_ram": w.Text(value=str(cpu_ram), description="CPU RAM"),
        "nvme": w.Text(value=str(nvme), description="NVMe"),
    }

    def safe_show(**kw):
        try:
            show(**kw)
        except Exception as exc:  # noqa: BLE001 - a typo in a text box: say so, keep the widget
            print(f"error: {exc}")

    out = w.interactive_output(safe_show, controls)
    return w.VBox([w.HBox(list(controls.values())[:3]), w.HBox(list(controls.values())[3:]), out])


def measure_peak(path, dtype: str = "fp32", batch_sizes=(1, 32), max_new_tokens: int = 32) -> list[dict]:
    """Check :func:`peak_bytes` on this machine: load ``path`` on the CPU in this process,
    run one greedy ``generate`` per batch size (smallest first, so each peak is the
    largest yet) measuring the process's peak RSS (:class:`~bloomkit.measure.harness.PeakRSS`:
    the kernel's high-water mark where Linux lets it be reset, else sampled every 5 ms; the
    row's ``peak_method`` says which), and return predicted and measured peaks.
    Run it in a fresh process: memory freed by earlier work would be reused, unseen."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from .. import models
    from ..dtypes import from_pretrained_dtype, torch_dtype
    from . import harness

    tok = models.load_tokenizer(path)
    baseline = psutil.Process().memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_dtype(torch_dtype(dtype))).eval()
    out = []
    for bs in sorted(batch_sizes):
        rows = harness.make_prompts(bs)
        prompt = max(len(ids) for ids in tok(rows)["input_ids"])
        with harness.PeakRSS(interval=0.005) as rss, torch.inference_mode():
            harness.generate(model, tok, rows, max_new_tokens)
        pred = peak_bytes(models.load_config(path), dtype, bs, prompt, max_new_tokens, baseline=baseline)
        out.append({"batch_size": bs, "prompt_tokens": prompt, "new_tokens": max_new_tokens,
                    "predicted_bytes": pred["total"], "measured_peak_rss_bytes": rss.peak,
                    "peak_method": rss.method,
                    "ratio": rss.peak / pred["total"], **{f"predicted_{k}_bytes": v for k, v in pred.items()
                                                         if k != "total"}})
    return out
