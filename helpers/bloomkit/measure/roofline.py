"""Roofline: the fastest a strategy *could* generate on this machine, and how close it gets.

A decode step (one new token for every row of the batch) has three lower bounds:

* **memory** — every weight is read once per step: ``weight bytes / memory bandwidth``.
  With tensor parallelism each GPU reads only its ``1/tp`` share, in parallel; ranks on one
  CPU share one memory system, so there the whole model still crosses the same bus.
* **compute** — ``≈ 2 × parameters`` FLOPs per row (plus attention over the context):
  ``batch × 2P / matmul rate`` (split over the GPUs under TP; shared cores on a CPU).
* **link** — bytes that must cross a link every step: ZeRO offload streams every
  parameter from CPU RAM (PCIe on a GPU machine; on a CPU only the other ranks' partitions
  are copied) or NVMe; tensor parallelism all-reduces the activations twice per block.

The step can be no faster than the largest of the three (perfect overlap), and the blog's
metric divides a step by the rows it produces: ``bound per token = step bound / (batch ×
streams)``.  **Efficiency = bound ÷ measured**: 1.0 means the run is as fast as the
hardware allows; the *limited by* column names which bound that was.

The machine's speeds are measured here (:func:`measure`): the copy bandwidth and matmul rate
from :mod:`bloomkit.sysinfo`, and a link bandwidth (pinned host→GPU copy on CUDA; on a CPU
the host memory copy itself, counted as bytes moved).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from .. import arch, memory, sysinfo

_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "float32", "nf4": "float32"}
# int8 weights (LLM.int8() on CPU, DeepSpeed's int8) compute in 16/32-bit: rate of fp32 on CPU


@dataclass
class Machine:
    """Measured speeds of one device (bytes/s, FLOP/s) and how its ranks share memory."""

    device: str
    copy_bandwidth: float                   # bytes read + written per second (large copy)
    link_bandwidth: float                   # bytes moved per second over the offload link
    matmul_rates: dict = field(default_factory=dict)   # dtype -> FLOP/s
    shared_memory: bool = True              # ranks share one memory system (CPU) or not (GPUs)
    matmul_n: int = 1024                    # matrix size of the rate measurement (GPUs need large ones)
    hardware: dict = field(default_factory=dict)
    measured: str = ""

    def matmul_rate(self, dtype: str) -> float:
        key = _TORCH_DTYPE.get(dtype, dtype)
        if key not in self.matmul_rates:
            if not self.measured:
                raise KeyError(f"no matmul rate for {dtype}")
            self.matmul_rates[key] = sysinfo.matmul_rate(n=self.matmul_n, dtype=key, device=self.device)
        return self.matmul_rates[key]

    def to_dict(self) -> dict:
        return asdict(self)


def link_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second that an offloaded parameter crosses on its way to compute.

    CUDA: a pinned host tensor copied to the GPU (PCIe / NVLink-C2C).  CPU: the host copy
    itself (ZeRO's CPU offload on a CPU "device" still gathers every parameter into a
    working buffer): half of :func:`sysinfo.copy_bandwidth`, which counts read + write.
    """
    if device == "cpu":
        return sysinfo.copy_bandwidth(nbytes) / 2
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32).pin_memory()
    dst = torch.empty_like(src, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def save(machine: Machine, path) -> None:
    """Keep a measurement beside the records it explains (``make run``'s report reads it)."""
    from ..results import write_json

    write_json(path, machine.to_dict())


def load(path) -> Machine:
    import json
    from pathlib import Path

    return Machine(**json.loads(Path(path).read_text()))


def machine_path(results_path) -> "Path":
    """Where a notebook keeps its roofline measurement: ``<results>.machine.json``."""
    from pathlib import Path

    p = Path(results_path)
    return p.with_name(p.stem + ".machine.json")


def measure(device: str = "cpu", dtypes=("fp32",)) -> Machine:
    """Measure this machine now (about a second)."""
    import torch

    m = Machine(device=device, copy_bandwidth=sysinfo.copy_bandwidth(device=device),
                link_bandwidth=link_bandwidth(device), shared_memory=device == "cpu",
                # the threads in use now (sysinfo.hardware() is cached from the first call)
                hardware={**sysinfo.hardware(), "torch_threads": torch.get_num_threads()},
                measured=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                # a GPU reaches its matmul rate only on large products (1024^3 runs at ~1/8 of it)
                matmul_n=1024 if device == "cpu" else 8192)
    for dt in dtypes:
        m.matmul_rate(dt)
    return m


@lru_cache(maxsize=32)
def _config(name: str) -> dict:
    from .planner import config_of

    return config_of(name)


def _dims(config) -> dict:
    """``config`` (a transformers config, a dict, a preset name) as the planner's plain dict
    of any family :mod:`bloomkit.arch` knows."""
    from .planner import model_dims

    return model_dims(config)


def zero_offload(options: dict | None) -> str:
    """Where a ZeRO record's parameters lived: ``cpu``, ``nvme`` or ``none``."""
    options = options or {}
    z = options.get("zero") or {}
    if z.get("offload"):
        return z["offload"]
    if options.get("nvme_offload_path"):
        return "nvme"
    return "cpu" if options.get("cpu_offload") else "none"


def step_bounds(config, *, strategy: str, dtype: str, batch_size: int, machine: Machine,
                world_size: int = 1, options: dict | None = None, context: int = 64,
                threads: int | None = None) -> dict:
    """Seconds per decode step for each bound, and which one limits.

    ``world_size``: TP degree for ``ds-inference``; number of independent streams for
    ``ds-zero`` (each rank runs its own batch).  ``options``: the record's strategy flags
    (``{"zero": {"offload": "cpu" | "nvme" | "none", "quant_bits": ...}}`` for ZeRO).
    """
    dims = _dims(config)
    options = options or {}
    h, n_layer = arch.hidden_of(dims), arch.layers_of(dims)
    w = memory.weight_bytes(dims, dtype)
    params = memory.param_count(dims)
    # matmuls + attention: QK and AV, 2 FLOPs per (query head x head_dim) x context token each
    attn_width = arch.heads_of(dims) * arch.head_dim_of(dims)   # = h in BLOOM
    flops_row = 2 * params + 4 * n_layer * attn_width * context
    read_bw = machine.copy_bandwidth                          # bytes/s a weight read streams at
    rate = machine.matmul_rate(dtype)
    tp = world_size if strategy == "ds-inference" else 1
    streams = world_size if strategy == "ds-zero" else 1
    shared = machine.shared_memory
    measured_threads = (machine.hardware or {}).get("torch_threads")
    if shared and threads and measured_threads:
        # CPU: the matmul rate was measured with `measured_threads` threads; a run using
        # `threads` threads in all (ranks x threads per rank) gets that share of the cores
        rate = rate * threads / measured_threads
    act_bytes = memory.dtype_bytes("bf16" if dtype in ("int8", "int4", "nf4") else dtype)

    # memory: one read of the weights per step (per stream under ZeRO: each rank reads the
    # full model); TP on separate GPUs reads 1/tp each in parallel
    mem = (w * streams if shared else w / tp) / read_bw
    comp = batch_size * flops_row * (streams if shared else 1) / (rate if shared else rate * tp)
    link = 0.0
    link_kind = None
    if strategy == "ds-zero":
        offload = zero_offload(options)
        bits = (options.get("zero") or {}).get("quant_bits")
        if bits:  # ZeRO-Inference's group-wise quantized weights: fewer bytes to move and read
            w = params * bits / 8
            mem = (w * streams if shared else w / tp) / read_bw
        if offload in ("cpu", "nvme"):
            link_kind = offload
            # GPU: every parameter crosses PCIe (or comes off NVMe) every step, per stream.
            # CPU: the "device" is host memory, so only the partitions of the *other* ranks
            # are copied in by the all-gather (none with one rank); NVMe is still read.
            if not shared or offload == "nvme":
                moved = w * streams if shared else w
            else:
                moved = w * (streams - 1)
            zinfo = options.get("zero") or {}
            if offload == "nvme" and zinfo.get("swapped_partitions") == 0:
                moved = 0.0  # every partition under DeepSpeed's swap threshold: nothing on disk
            elif offload == "nvme" and zinfo.get("disk_read_bytes_per_step"):
                moved = zinfo["disk_read_bytes_per_step"] * streams  # what really came off disk
            link = moved / (machine.link_bandwidth if offload == "cpu"
                            else options.get("disk_bandwidth") or float("inf"))
    elif strategy == "ds-inference" and tp > 1:
        # two all-reduces of [batch, h] per block, ring: 2 (tp-1)/tp of the buffer per rank
        link_kind = "all-reduce"
        link = 2 * n_layer * batch_size * h * act_bytes * 2 * (tp - 1) / tp / machine.link_bandwidth
    bounds = {"memory": mem, "compute": comp, "link": link}
    limited_by = max(bounds, key=bounds.get)
    return {"memory_s": mem, "compute_s": comp, "link_s": link, "link_kind": link_kind,
            "step_s": bounds[limited_by], "limited_by": limited_by,
            "tokens_per_step": batch_size * streams}


def linears_seconds(model, batch_size: int, repeats: int = 5) -> float:
    """Seconds to run every ``nn.Linear`` of ``model`` once on a ``[batch_size, in]`` input —
    the matrix work of one decode step alone, with nothing of ``generate`` around it.

    This is the *attainable* side of the roofline: what the installed matmul kernels reach
    on these exact shapes (a decode step multiplies a few rows by each weight: GEMV at batch
    1, a thin GEMM at batch 8 — far from the square matrices of :func:`sysinfo.matmul_rate`).
    ``step - linears`` is what ``generate`` spends outside the weights (attention,
    LayerNorm/GELU passes, the logits' sort, Python), ``bound / linears`` what the kernel
    itself leaves on the table.  Best of ``repeats`` after one warm-up pass."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layers to time")
    w = linears[0].weight
    inputs = {n: torch.randn(batch_size, n, dtype=w.dtype, device=w.device)
              for n in {m.in_features for m in linears}}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if w.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for m in linears:
                torch.nn.functional.linear(inputs[m.in_features], m.weight, m.bias)
            if w.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


def _run_threads(record: dict) -> int | None:
    """CPU threads a run used in all: its ranks x each rank's torch threads."""
    per_rank = (record.get("hardware") or {}).get("torch_threads")
    return per_rank * (record.get("world_size") or 1) if per_rank else None


def bound(record: dict, machine: Machine, config=None) -> dict:
    """The roofline of one result record: bound ms/token, limit, and efficiencies."""
    config = config if config is not None else _config(record["model"])
    ctx = 16 + int(record.get("max_new_tokens") or 0) // 2
    b = step_bounds(config, strategy=record["strategy"], dtype=record["dtype"],
                    batch_size=record["batch_size"], machine=machine,
                    world_size=record.get("world_size") or 1, options=record.get("options"),
                    context=ctx, threads=_run_threads(record))
    per_tok = 1000.0 / b["tokens_per_step"]
    out = {"bound_ms_per_token": b["step_s"] * per_tok, "limited_by": b["limited_by"],
           "memory_bound_ms": b["memory_s"] * per_tok, "compute_bound_ms": b["compute_s"] * per_tok,
           "link_bound_ms": b["link_s"] * per_tok}
    measured = record.get("ms_per_token")
    ok = record.get("status") == "ok" and isinstance(measured, (int, float)) and measured > 0
    for key, val in (("efficiency", out["bound_ms_per_token"]), ("memory_efficiency", out["memory_bound_ms"]),
                     ("compute_efficiency", out["compute_bound_ms"])):
        out[key] = val / measured if ok else None
    out["measured_ms_per_token"] = measured if ok else record.get("ms_per_token")
    return out


def label(record: dict) -> str:
    """A short name for a record's variant: strategy, variant/TP/offload, dtype."""
    opt = record.get("options") or {}
    parts = [record["strategy"]]
    if opt.get("variant"):
        parts.append(str(opt["variant"]))
    if record["strategy"] == "ds-inference":
        parts.append(f"tp={record.get('world_size', 1)}")
    if record["strategy"] == "ds-zero":
        if not opt.get("variant"):  # a ZeRO variant names its weights and where they live
            parts.append(f"offload={zero_offload(opt)}")
            if (opt.get("zero") or {}).get("quant_bits"):
                parts.append(f"int{opt['zero']['quant_bits']}")
        if (record.get("world_size") or 1) > 1:
            parts.append(f"streams={record['world_size']}")
    if record["dtype"] not in " ".join(parts).split():
        parts.append(record["dtype"])
    if opt.get("compile") and "compiled" not in " ".join(parts):
        parts.append("compiled")
    return " ".join(parts)


def table(records, machine: Machine, configs: dict | None = None):
    """Roofline table, one row per (set-up, batch size): measured (median and range of the timed
    cycles), bound, efficiency."""
    import statistics

    import pandas as pd

    rows = []
    for r in records:
        cfg = (configs or {}).get(r["model"])
        b = bound(r, machine, cfg)
        cyc = r.get("cycle_seconds") or []
        rng = ""
        if r["status"] == "ok" and len(cyc) > 1:   # the fastest and slowest timed cycle, in ms/token
            scale = r["ms_per_token"] / statistics.median(cyc)
            rng = f"{min(cyc) * scale:.3g}-{max(cyc) * scale:.3g}"
        rows.append({"setup": label(r), "batch_size": r["batch_size"], "status": r["status"],
                     "measured_ms": b["measured_ms_per_token"], "measured_range": rng,
                     "bound_ms": b["bound_ms_per_token"], "limited_by": b["limited_by"],
                     "efficiency": b["efficiency"], "memory_bound_ms": b["memory_bound_ms"],
                     "memory_eff": b["memory_efficiency"], "compute_bound_ms": b["compute_bound_ms"],
                     "compute_eff": b["compute_efficiency"], "link_bound_ms": b["link_bound_ms"]})
    return pd.DataFrame(rows)


def machine_table(machine: Machine):
    """The measured speeds as a small table (GB/s, GFLOP/s)."""
    import pandas as pd

    rows = [{"quantity": "copy bandwidth (read + write)", "value": machine.copy_bandwidth / 1e9, "unit": "GB/s"},
            {"quantity": f"link bandwidth ({'host copy' if machine.device == 'cpu' else 'pinned host→GPU'})",
             "value": machine.link_bandwidth / 1e9, "unit": "GB/s"}]
    for dt, r in machine.matmul_rates.items():
        rows.append({"quantity": f"matmul rate {dt}", "value": r / 1e9, "unit": "GFLOP/s"})
    return pd.DataFrame(rows).set_index("quantity").round(2)


def plot(roof, ax=None):
    """Measured ms/token (markers) against the bound (dashed), per variant and batch size."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    ok = roof[roof["status"] == "ok"]
    for i, (name, g) in enumerate(ok.groupby("setup", sort=False)):
        g = g.sort_values("batch_size")
        color = f"C{i}"
        ax.plot(g["batch_size"], g["measured_ms"].astype(float), "o-", color=color, label=f"{name} measured")
        ax.plot(g["batch_size"], g["bound_ms"], "--", color=color, alpha=0.7, label=f"{name} bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per token")
    ax.set_title("roofline: measured vs lower bound")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return ax
