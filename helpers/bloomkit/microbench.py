"""Measurements about the harness itself and the machine, for the closing numbers.

* :func:`harness_overhead` — is the shared harness free?  The same model and prompts,
  timed by a bare ``tokenize + generate`` loop and by :func:`harness.time_generation`,
  interleaved in one process so drift hits both alike.
* :func:`decode_breakdown` — decode time next to its memory-bandwidth bound (every weight is
  read once per step: ``weight bytes / measured copy bandwidth``) and its compute bound, and
  where the step goes: the matmul kernels alone (:func:`roofline.linears_seconds`) vs
  everything else ``generate`` does.
* :func:`offload_slowdown` — disk-offloaded vs in-memory ms/token on the same model.
* :func:`tp_scaling` — DeepSpeed-Inference AutoTP ms/token for each TP size (real CPU ranks).
* :func:`preshard_load_ratio` — "start to ready" from per-rank shards vs the full checkpoint.
* :func:`zero_offload` — ZeRO-Inference ms/token for none / cpu / nvme (+ 4-bit) offload, NVMe
  next to its disk-read roofline.

The multi-process ones launch the recipes exactly as a user would (``bloomkit.launch``), so
what they time is the recipe's own record.
"""
from __future__ import annotations

import statistics
import tempfile
import time

from . import memory, models, sysinfo

from .measure import bench, harness

from .strategies import accel


def run_parts(parts: dict, only, out_path, *args) -> dict:
    """Run the named benchmark ``parts`` (name -> function called with ``args``), print each
    result and write them with the machine's hardware and versions to ``out_path`` (JSON,
    atomically).  When only some parts run, the others already in ``out_path`` are kept."""
    import json
    from pathlib import Path

    from . import results

    out = {}
    if set(only) != set(parts) and Path(out_path).exists():
        out = json.loads(Path(out_path).read_text())
    out.update(hardware=sysinfo.hardware(), versions=sysinfo.versions())
    for name in only:
        out[name] = parts[name](*args)
        print(name, json.dumps(out[name], indent=1), flush=True)
    results.write_json(out_path, out)
    return out


def _load(name, dtype="fp32", **kw):
    path = models.resolve_model(name)
    return path, accel.load_model(path, dtype, **kw), models.load_tokenizer(path)


def harness_overhead(name: str = "small", batch_size: int = 1, new_tokens: int = 20,
                     rounds: int = 7) -> dict:
    """Median time of a bare loop vs the harness, interleaved; ``overhead`` = ratio - 1."""
    import torch

    path, model, tok = _load(name, device_map="none")
    prompts = harness.make_prompts(batch_size)
    kw = harness.greedy_kwargs(new_tokens, tok)

    def bare():
        t0 = time.perf_counter()
        inputs = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, **kw)
        tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return time.perf_counter() - t0

    def via_harness():
        t = harness.time_generation(lambda: harness.generate(model, tok, prompts, new_tokens),
                                    batch_size=batch_size, max_new_tokens=new_tokens, cycles=1,
                                    warmup=0)
        return t.cycle_seconds[0]

    bare(), via_harness()  # warm-up both
    b, h = [], []
    for _ in range(rounds):
        b.append(bare())
        h.append(via_harness())
    mb, mh = statistics.median(b), statistics.median(h)
    return {"model": name, "batch_size": batch_size, "new_tokens": new_tokens,
            "bare_ms_per_token": mb * 1e3 / (batch_size * new_tokens),
            "harness_ms_per_token": mh * 1e3 / (batch_size * new_tokens),
            "overhead": mh / mb - 1}


def decode_breakdown(name: str = "bench", dtype: str = "fp32", batch_sizes=(1, 8),
                     new_tokens: int = 20, cycles: int = 3, device: str = "cpu",
                     machine=None) -> list[dict]:
    """One decode step split in two, measured in one process: the model's linear layers run
    alone (the kernels' ceiling on these shapes) and the rest of ``generate``; each next to
    the memory bound (``weight bytes / copy bandwidth``) and the compute bound (``2 x
    parameters x batch / matmul rate`` of square matrices).  ``efficiency`` is the roofline
    panel's (bound / step); ``kernel_*_eff`` say how much of it the kernels alone reach.
    ``machine``: speeds already measured (:func:`roofline.measure`), else measured here."""
    from .measure import roofline
    from .errors import UserError

    if dtype not in ("fp32", "bf16", "fp16"):
        raise UserError(f"decode_breakdown times plain {dtype} weights it cannot multiply; "
                        "use fp32, bf16 or fp16")
    machine = machine or roofline.measure(device, dtypes=[dtype])
    path, model, tok = _load(name, dtype, device_map="none", device=device)
    config = models.load_config(path)
    params = memory.param_count(config)
    bw, rate = machine.copy_bandwidth, machine.matmul_rate(dtype)
    mem_ms = memory.weight_bytes(config, dtype) / bw * 1e3
    rows = []
    for bs in batch_sizes:
        prompts = harness.make_prompts(bs)
        t = harness.time_generation(lambda: harness.generate(model, tok, prompts, new_tokens),
                                    batch_size=bs, max_new_tokens=new_tokens, cycles=cycles)
        step_ms = t.ms_per_token * bs
        lin_ms = roofline.linears_seconds(model, bs) * 1e3
        comp_ms = 2 * params * bs / rate * 1e3
        bound = max(mem_ms, comp_ms)
        rows.append({"model": name, "dtype": dtype, "batch_size": bs,
                     "ms_per_token": t.ms_per_token, "step_ms": step_ms,
                     "linears_ms": lin_ms, "outside_linears_ms": step_ms - lin_ms,
                     "linears_share": lin_ms / step_ms,
                     "memory_bound_ms": mem_ms, "compute_bound_ms": comp_ms,
                     "copy_bandwidth_GBps": bw / 1e9, "matmul_GFLOPs": rate / 1e9,
                     "linears_GBps": memory.weight_bytes(config, dtype) / lin_ms / 1e6,
                     "linears_GFLOPs": 2 * params * bs / lin_ms / 1e6,
                     "efficiency": bound / step_ms, "memory_eff": mem_ms / step_ms,
                     "compute_eff": comp_ms / step_ms,
                     "kernel_memory_eff": mem_ms / lin_ms, "kernel_compute_eff": comp_ms / lin_ms})
    del model
    return rows


def offload_slowdown(name: str = "small", batch_size: int = 1, new_tokens: int = 20,
                     cycles: int = 3, cpu_fraction: float = 0.5) -> dict:
    """Disk offload (``cpu_fraction`` of the weights kept in RAM) vs all in memory."""
    path = models.resolve_model(name)
    config = models.load_config(path)
    weights = memory.weight_bytes(config, "fp32")
    prompts = harness.make_prompts(batch_size)
    out = {"model": name, "batch_size": batch_size, "cpu_fraction": cpu_fraction}
    with tempfile.TemporaryDirectory() as folder:
        variants = {
            "in_memory": dict(device_map="none"),
            "disk_offload": dict(device_map="auto", offload_folder=folder,
                                 max_memory={"cpu": f"{int(weights * cpu_fraction) // 1024}KiB"}),
        }
        for label, kw in variants.items():
            model = accel.load_model(path, "fp32", **kw)
            tok = models.load_tokenizer(path)
            t = harness.time_generation(lambda: harness.generate(model, tok, prompts, new_tokens),
                                        batch_size=batch_size, max_new_tokens=new_tokens,
                                        cycles=cycles)
            out[f"{label}_ms_per_token"] = t.ms_per_token
            out[f"{label}_placement"] = bench.placement(model)
            del model
    out["slowdown"] = out["disk_offload_ms_per_token"] / out["in_memory_ms_per_token"]
    return out


# ---------------------------------------------------------------------------- strategies

def _median(xs):
    return statistics.median(xs) if xs else None


def tp_scaling(name: str = "small", tp_sizes=(1, 2, 4), batch_sizes=(1, 8), new_tokens: int = 20,
               cycles: int = 3, rounds: int = 2) -> dict:
    """ms/token of AutoTP at each TP size (best of ``rounds`` launches, the rounds interleaved
    across TP sizes so drift hits all alike) and the ratio to TP = 1 per batch size."""
    from . import launch

    bs = ",".join(map(str, batch_sizes))
    best: dict[tuple[int, int], float] = {}
    for _ in range(rounds):
        for tp in tp_sizes:
            recs = launch.launch_records("ds_inference.py", [
                "--name", name, "--batch_size", bs, "--max_new_tokens", str(new_tokens),
                "--benchmark", "--cycles", str(cycles)], tp, timeout=900)
            for r in recs:
                k = (tp, r["batch_size"])
                best[k] = min(best.get(k, float("inf")), r["ms_per_token"])
    rows = [{"tp_size": tp, "batch_size": b, "ms_per_token": best[(tp, b)],
             "ratio_to_tp1": best[(tp, b)] / best[(tp_sizes[0], b)]}
            for tp in tp_sizes for b in batch_sizes]
    return {"model": name, "new_tokens": new_tokens, "cycles": cycles, "rounds": rounds,
            "cpu_cores": sysinfo.hardware()["cpu_cores"], "rows": rows}


def preshard_load_ratio(name: str = "bench", tp_size: int = 2, repeats: int = 3,
                        dtype: str = "fp32") -> dict:
    """Start-to-ready of each rank reading only its shard (``--load_shards``) vs every rank
    loading the full checkpoint, at ``tp_size`` ranks; launches interleaved, medians.

    *warm*: files in the page cache (a restart); *cold*: both evicted first
    (``posix_fadvise``), like the first start after a download."""
    from . import launch
    from .strategies import tp_shards

    path = models.resolve_model(name)
    common = ["--dtype", dtype, "--max_new_tokens", "1", "--batch_size", "1"]
    out = {"model": name, "tp_size": tp_size, "dtype": dtype, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="bloomkit-shards-") as d:
        launch.launch_records("ds_inference.py", ["--name", name, "--save_shards", d, *common],
                              tp_size, timeout=900)
        for mode in ("warm", "cold"):
            full, shard = [], []
            for _ in range(repeats):
                for src, acc in ((["--name", name], full), (["--load_shards", d], shard)):
                    if mode == "cold":
                        tp_shards.evict_page_cache(path, d)
                    rec = launch.launch_records("ds_inference.py", [*src, *common], tp_size,
                                                timeout=900)[0]
                    acc.append(rec["load_seconds"])
            out[mode] = {"full_s": full, "shards_s": shard, "full_median_s": _median(full),
                         "shards_median_s": _median(shard),
                         "ratio": _median(shard) / _median(full)}
        out["shard_bytes_per_rank"] = tp_shards.read_index(d).get("bytes_per_rank")
    return out


def zero_offload(name: str = "small", batch_sizes=(1, 8, 32), new_tokens: int = 20,
                 cycles: int = 2, dtype: str = "fp32", nvme_dir=None) -> dict:
    """ZeRO-Inference ms/token for none / cpu / nvme offload and nvme with 4-bit weights, one
    launch each; NVMe per-token time divided by its disk-read roofline (weight bytes ÷
    measured O_DIRECT read bandwidth ÷ batch size) and the 4-bit/full speed ratio.

    A virtual disk's bandwidth can change several-fold within minutes, so it is measured right
    before and right after each NVMe launch, and the roofline uses the mean of the two around
    the ``nvme`` launch (all measurements are kept)."""
    from . import launch
    from .strategies import zero

    path = models.resolve_model(name)
    wbytes = memory.weight_bytes(models.load_config(path), dtype)
    bs = ",".join(map(str, batch_sizes))
    with tempfile.TemporaryDirectory(prefix="bloomkit-nvme-", dir=nvme_dir) as nv:
        variants = {"none": [], "cpu": ["--cpu_offload"], "nvme": ["--nvme_offload_path", nv],
                    "nvme 4-bit": ["--nvme_offload_path", nv, "--quant_bits", "4"]}
        rows, disk_bw = [], {}
        for label, flags in variants.items():
            nvme = "--nvme_offload_path" in flags
            before = zero.read_bandwidth(nv) if nvme else None
            recs = launch.launch_records("ds_zero_inference.py", [
                "--name", name, "--dtype", dtype, "--batch_size", bs, "--max_new_tokens",
                str(new_tokens), "--benchmark", "--cycles", str(cycles), *flags], 1,
                launcher="python", timeout=900)
            if nvme:
                disk_bw[label] = [before / 1e9, zero.read_bandwidth(nv) / 1e9]
            for r in recs:
                rows.append({"variant": label, "batch_size": r["batch_size"],
                             "ms_per_token": r["ms_per_token"], "load_s": r["load_seconds"]})
    read_bw = statistics.mean(disk_bw["nvme"]) * 1e9
    ms = {(r["variant"], r["batch_size"]): r["ms_per_token"] for r in rows}
    nvme_vs_roofline = {b: ms[("nvme", b)] / zero.roofline_ms_per_token(wbytes, read_bw, b)
                        for b in batch_sizes}
    return {"model": name, "dtype": dtype, "new_tokens": new_tokens, "weight_bytes": wbytes,
            "disk_read_GBps": disk_bw, "rows": rows,
            "nvme_over_disk_roofline": nvme_vs_roofline,
            "nvme_4bit_speedup": {b: ms[("nvme", b)] / ms[("nvme 4-bit", b)] for b in batch_sizes}}
