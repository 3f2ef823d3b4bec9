"""Measurements about the harness itself and the machine, for the closing numbers.

* :func:`harness_overhead` — is the shared harness free?  The same model and prompts,
  timed by a bare ``tokenize + generate`` loop and by :func:`harness.time_generation`,
  interleaved in one process so drift hits both alike.
* :func:`decode_vs_roofline` — batch-1 decode time next to its memory-bandwidth bound
  (every weight is read once per step: ``weight bytes / measured copy bandwidth``).
* :func:`offload_slowdown` — disk-offloaded vs in-memory ms/token on the same model.
"""
from __future__ import annotations

import statistics
import tempfile
import time

from . import accel, harness, memory, models, sysinfo


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


def decode_vs_roofline(name: str = "bench", dtype: str = "fp32", new_tokens: int = 20,
                       cycles: int = 3, device: str = "cpu") -> dict:
    """Batch-1 ms/token against ``weight_bytes / copy_bandwidth`` (efficiency = bound/measured)."""
    path, model, tok = _load(name, dtype, device_map="none", device=device)
    config = models.load_config(path)
    t = harness.time_generation(lambda: harness.generate(model, tok, harness.make_prompts(1), new_tokens),
                                batch_size=1, max_new_tokens=new_tokens, cycles=cycles)
    bw = sysinfo.copy_bandwidth(device=device)
    bound_ms = memory.weight_bytes(config, dtype) / bw * 1e3
    return {"model": name, "dtype": dtype, "ms_per_token": t.ms_per_token,
            "copy_bandwidth_GBps": bw / 1e9, "weight_MB": memory.weight_bytes(config, dtype) / 1e6,
            "roofline_ms_per_token": bound_ms, "measured_over_roofline": t.ms_per_token / bound_ms,
            "efficiency": bound_ms / t.ms_per_token}


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
            out[f"{label}_placement"] = accel.placement(model)
            del model
    out["slowdown"] = out["disk_offload_ms_per_token"] / out["in_memory_ms_per_token"]
    return out
