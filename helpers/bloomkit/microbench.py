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
* :func:`compile_speedup` — plain ``generate`` vs static cache + ``torch.compile``, interleaved on
  one model: compile time, time to first token, decode step, recompiles, identical tokens.
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
        if isinstance(out[name], dict):
            out[name]["measured_on"] = time.strftime("%Y-%m-%d")   # the day a notebook cites it by
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
               cycles: int = 3, rounds: int = 2, compile_too: bool = False) -> dict:
    """ms/token of AutoTP at each TP size (best of ``rounds`` launches, the rounds interleaved
    across TP sizes so drift hits all alike) and the ratio to TP = 1 per batch size.

    On a CPU the ranks split the cores (one thread each on 2 cores): TP = 2 there is two memory
    streams, one per core, instead of one process whose threads share each product.
    ``compile_too``: each TP size also with ``--compile`` (rows with ``compiled: true``,
    their decode step and first-call time; ``ratio_to_tp1`` is always against eager TP = 1)."""
    from . import launch

    bs = ",".join(map(str, batch_sizes))
    best: dict[tuple, dict] = {}
    variants = [(tp, c) for tp in tp_sizes for c in ((False, True) if compile_too else (False,))]
    for _ in range(rounds):
        for tp, comp in variants:
            recs = launch.launch_records("ds_inference.py", [
                "--name", name, "--batch_size", bs, "--max_new_tokens", str(new_tokens),
                "--benchmark", "--cycles", str(cycles), *(["--compile"] if comp else [])], tp,
                timeout=1200)
            for r in recs:
                k = (tp, comp, r["batch_size"])
                if k not in best or r["ms_per_token"] < best[k]["ms_per_token"]:
                    best[k] = r
    rows = []
    for tp, comp in variants:
        for b in batch_sizes:
            r = best[(tp, comp, b)]
            row = {"tp_size": tp, "batch_size": b, "ms_per_token": r["ms_per_token"],
                   "ratio_to_tp1": r["ms_per_token"] / best[(tp_sizes[0], False, b)]["ms_per_token"]}
            if compile_too:
                row.update(compiled=comp, decode_ms_per_token=r["decode_ms_per_token"],
                           first_call_s=r["warmup_seconds"], recompiles=r["recompiles"])
            rows.append(row)
    return {"model": name, "new_tokens": new_tokens, "cycles": cycles, "rounds": rounds,
            "cpu_cores": sysinfo.hardware()["cpu_cores"], "rows": rows}


def preshard_load_ratio(name: str = "bench", tp_size: int = 2, repeats: int = 3,
                        dtype: str = "fp32", launcher: str = "deepspeed") -> dict:
    """Start-to-ready of each rank reading only its shard (``--load_shards``) vs every rank
    loading the full checkpoint, at ``tp_size`` ranks; launches interleaved, medians.

    *warm*: files in the page cache (a restart); *cold*: both evicted first
    (``posix_fadvise``), like the first start after a download.  ``launcher``: ``deepspeed``
    or ``torchrun`` (one process fewer per launch; the recipe's load time is the same)."""
    from . import launch
    from .strategies import tp_shards

    path = models.resolve_model(name)
    common = ["--dtype", dtype, "--max_new_tokens", "1", "--batch_size", "1"]
    out = {"model": name, "tp_size": tp_size, "dtype": dtype, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="bloomkit-shards-") as d:
        launch.launch_records("ds_inference.py", ["--name", name, "--save_shards", d, *common],
                              tp_size, launcher=launcher, timeout=900)
        for mode in ("warm", "cold"):
            full, shard = [], []
            for _ in range(repeats):
                for src, acc in ((["--name", name], full), (["--load_shards", d], shard)):
                    if mode == "cold":
                        tp_shards.evict_page_cache(path, d)
                    rec = launch.launch_records("ds_inference.py", [*src, *common], tp_size,
                                                launcher=launcher, timeout=900)[0]
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


def _cold_compile_cache(cold: bool):
    """An empty, temporary inductor cache (torch's own ``fresh_cache``) when ``cold``."""
    import contextlib

    if not cold:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


def compile_speedup(name: str = "bench", dtype: str = "fp32", batch_sizes=(1, 8),
                    new_tokens: int = 20, rounds: int = 5, device: str = "cpu", machine=None,
                    model=None, tokenizer=None, prompts=None, cold: bool = True,
                    compile_s: dict | None = None) -> list[dict]:
    """Plain ``generate`` against ``generate`` with a static KV cache and the decode step
    compiled (:func:`harness.compile_kwargs`), on *one* loaded model, interleaved call by call
    (eager, compiled, eager, ...: :func:`bloomkit.measure.compare.interleaved`) so that drift on
    a shared machine hits both alike.  ``*_step_samples_ms`` and ``*_call_samples_s`` keep every
    timed call, in pairs, for :func:`bloomkit.measure.compare.compare_times`.

    Per batch size: the first compiled call's extra time over an eager call (``compile_s``,
    the one-off price), the median time to first token and decode step of each, their
    ratio, the graphs compiled during the timed rounds (``recompiles``: must be 0), whether
    the tokens are identical, ``pays_off_after_steps`` (``compile_s`` ÷ the time saved per
    decode step: the decode steps, each a token for every row, after which it has paid), and
    the decode step next to the memory bound (every weight read once per step at the measured
    copy bandwidth) and next to the matrix kernels alone
    (:func:`roofline.linears_seconds`), so "what compilation removed" is the part outside
    the linears.  ``model``/``tokenizer``: already loaded (else ``name`` is loaded here).
    ``cold``: compile into an empty inductor cache, as on a first run; inductor keeps compiled
    kernels on disk, and a second run of the same shapes compiles several times faster.
    ``compile_s``: ``{batch size: seconds}`` already measured in this process for shapes compiled
    before this call (a lesson's own ``generate`` call on the same rows and new tokens): the first
    call here then compiles nothing (``compiled_earlier``), and that time is reported instead."""
    from .measure import compare, roofline

    if model is None:
        path, model, tokenizer = _load(name, dtype, device_map="none", device=device)
        config = models.load_config(path)
    else:
        config = model.config
    harness.check_compilable(model)
    machine = machine or roofline.measure(device, dtypes=[dtype])
    mem_ms = memory.weight_bytes(config, dtype) / machine.copy_bandwidth * 1e3
    kw = harness.compile_kwargs(device)
    rows = []
    for bs in batch_sizes:
        rows_in = harness.make_prompts(bs, prompts)

        def call(**extra):
            t0 = time.perf_counter()
            g = harness.generate(model, tokenizer, rows_in, new_tokens, **extra)
            harness.cuda_sync()
            return g, time.perf_counter() - t0

        eager0, eager_s = call()                   # warm-up of the eager path
        eager0, eager_s = call()
        before = harness.compiled_graphs()
        with _cold_compile_cache(cold):            # traces and compiles this batch size
            first, first_s = call(**kw)
        graphs = harness.compiled_graphs()
        earlier = graphs == before                 # nothing compiled: these shapes were compiled before
        known = (compile_s or {}).get(bs) if earlier else None
        gens = {"eager": [], "compiled": []}

        def side(v):
            extra = kw if v == "compiled" else {}
            return lambda: gens[v].append(harness.generate(model, tokenizer, rows_in, new_tokens, **extra))

        # the project's one way to time two sides: in turns, each pair on the same machine state
        secs = compare.interleaved({v: side(v) for v in gens}, cycles=rounds, warmup=0,
                                   sync=harness.cuda_sync)
        runs = {v: list(zip(gens[v], secs[v])) for v in gens}
        row = {"model": name, "dtype": dtype, "device": device, "batch_size": bs,
               "new_tokens": new_tokens, "rounds": rounds, "cold_cache": cold,
               "compile_s": known if known is not None else first_s - eager_s,
               "first_compiled_call_s": eager_s + known if known is not None else first_s,
               "compiled_earlier": earlier,
               "recompiles": harness.compiled_graphs() - graphs,
               "identical": all(g.tokens == eager0.tokens for g, _ in runs["compiled"] + [(first, 0)])}
        for v, calls in runs.items():
            steps = [(g.step_times[-1] - g.step_times[0]) * 1e3 / (len(g.step_times) - 1) for g, _ in calls]
            row[f"{v}_ttft_ms"] = statistics.median(g.step_times[0] * 1e3 for g, _ in calls)
            row[f"{v}_step_ms"] = statistics.median(steps)
            row[f"{v}_ms_per_token"] = statistics.median(s for _, s in calls) * 1e3 / (bs * new_tokens)
            row[f"{v}_step_samples_ms"] = steps              # one per timed call, in the order taken
            row[f"{v}_call_samples_s"] = [s for _, s in calls]
        e, c = row["eager_step_ms"], row["compiled_step_ms"]
        lin = roofline.linears_seconds(model, bs) * 1e3
        row.update(step_ratio=c / e, ms_per_token_ratio=row["compiled_ms_per_token"] / row["eager_ms_per_token"],
                   ttft_ratio=row["compiled_ttft_ms"] / row["eager_ttft_ms"],
                   pays_off_after_steps=(row["compile_s"] * 1e3 / (e - c)) if e > c else None,
                   linears_ms=lin, eager_outside_linears_ms=e - lin, compiled_outside_linears_ms=c - lin,
                   memory_bound_ms=mem_ms, copy_bandwidth_GBps=machine.copy_bandwidth / 1e9,
                   eager_memory_eff=mem_ms / e, compiled_memory_eff=mem_ms / c)
        rows.append(row)
    return rows
