#!/usr/bin/env python
"""The GPU benchmark profile: every strategy on one CUDA GPU, the blog's method, one JSON.

Run on a machine with one GPU (not in CI)::

    python benchmarks/gpu.py --out benchmarks/results/gpu.json

It measures the machine (HBM copy bandwidth, bf16 matmul rate), then runs the three
recipes on the ``bench`` preset through the same harness — Accelerate bf16 and int8,
DeepSpeed-Inference (AutoTP, one rank) bf16/fp16, ZeRO-Inference with CPU offload
(bf16, and 4-bit weights), and Accelerate and DeepSpeed bf16 with ``--compile`` (static KV
cache, CUDA graphs) — with a batch-size sweep, and writes every result record plus a roofline
table (bound and efficiency per strategy and batch size).  ``compile_speedup``: eager vs
compiled (CUDA graphs) interleaved on one model, with the compile time; ``--only compile`` runs
just that and the compiled recipes.
"""
import argparse
import json
import time

from bloomkit import launch, microbench, results, sysinfo
from bloomkit.measure import roofline
from bloomkit.errors import cli_entry

RUNS = [  # (label, recipe, extra args)
    ("accelerate bf16", "accelerate_inference.py", ["--dtype", "bf16", "--device_map", "auto"]),
    ("accelerate int8", "accelerate_inference.py", ["--dtype", "int8", "--device_map", "auto"]),
    ("accelerate bf16 compiled", "accelerate_inference.py", ["--dtype", "bf16", "--device_map", "auto", "--compile"]),
    ("ds-inference bf16", "ds_inference.py", ["--dtype", "bf16"]),
    ("ds-inference bf16 compiled", "ds_inference.py", ["--dtype", "bf16", "--compile"]),
    ("ds-inference fp16", "ds_inference.py", ["--dtype", "fp16"]),
    ("ds-zero cpu-offload bf16", "ds_zero_inference.py", ["--dtype", "bf16", "--cpu_offload"]),
    ("ds-zero cpu-offload 4-bit", "ds_zero_inference.py",
     ["--dtype", "bf16", "--cpu_offload", "--quant_bits", "4"]),
]


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--name", default="bench")
    p.add_argument("--batch_size", default="1,8,32,64")
    p.add_argument("--max_new_tokens", default="100")
    p.add_argument("--cycles", default="3")
    p.add_argument("--only", nargs="*", help="labels (prefixes) to run")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    machine = roofline.measure(device="cuda", dtypes=("bf16",))
    out = {"hardware": sysinfo.hardware(), "versions": sysinfo.versions(),
           "machine": machine.to_dict(), "runs": [], "errors": {}}
    out["decode_breakdown"] = microbench.decode_breakdown(args.name, "bf16", device="cuda")
    results.write_json(args.out, out)
    out["compile_speedup"] = microbench.compile_speedup(args.name, "bf16", (1, 8), device="cuda", machine=machine)
    for r in out["compile_speedup"]:
        print(f"compiled (CUDA graphs) bs{r['batch_size']}: step {r['compiled_step_ms']:.2f} ms vs eager "
              f"{r['eager_step_ms']:.2f} ms = {r['eager_step_ms'] / r['compiled_step_ms']:.1f}x; compile "
              f"{r['compile_s']:.0f} s; recompiles {r['recompiles']}; identical tokens {r['identical']}", flush=True)
    results.write_json(args.out, out)
    common = ["--name", args.name, "--batch_size", args.batch_size, "--max_new_tokens",
              args.max_new_tokens, "--benchmark", "--cycles", args.cycles, "--device", "cuda"]
    for label, recipe, extra in RUNS:
        if args.only and not any(label.startswith(o) or (o == "compile" and "compiled" in label)
                                  for o in args.only):
            continue
        t = time.perf_counter()
        try:
            recs = launch.launch_records(recipe, common + extra, 1, device="cuda",
                                         launcher="deepspeed" if recipe.startswith("ds_") else "python",
                                         timeout=900)
        except Exception as exc:  # noqa: BLE001 - keep going, report what failed
            out["errors"][label] = " ".join(str(exc).split())[:400]
            print(f"{label}: FAILED {out['errors'][label]}", flush=True)
            continue
        for r in recs:
            r["options"]["label"] = label
        out["runs"].extend(recs)
        results.write_json(args.out, out)  # after every run: a time limit keeps what finished
        print(f"{label}: {time.perf_counter() - t:.0f} s; " + ", ".join(
            f"bs{r['batch_size']}={r['ms_per_token'] if r['status'] != 'ok' else round(r['ms_per_token'], 3)}"
            for r in recs), flush=True)
    table = roofline.table(out["runs"], machine)
    out["roofline"] = json.loads(table.to_json(orient="records"))
    out["seconds"] = time.perf_counter() - t0
    results.write_json(args.out, out)
    print(results.blog_table(out["runs"], index="label").to_string() if out["runs"] else "")
    print(table.to_string())


if __name__ == "__main__":
    main()
