#!/usr/bin/env python
"""Benchmarks of the foundation (issue 2), measured on this machine; prints and saves JSON.

    python benchmarks/foundation.py [--out benchmarks/results/foundation-cpu.json] [--only PART ...]
                                    [--plot foundation.png] [--from benchmarks/results/foundation-cpu.json]

Parts: harness_overhead (small), decode_breakdown (bench, fp32 and bf16, batch 1 and 8: decode
next to its memory and compute bounds, and the matmul kernels alone vs the whole step),
offload_slowdown (small), compile_speedup (bench: plain generate vs static cache + torch.compile,
interleaved on one model, fp32 at batch 1 and 8 and bf16 at batch 1; compile time beside the speed-up,
the decode step beside its memory bound).  With --only, the other parts already in --out are kept.
--plot draws the parts in the JSON as a PNG; with --from it redraws a recorded file without running.
"""
import argparse
from pathlib import Path

from bloomkit import microbench, results
from bloomkit.errors import UserError, cli_entry

PARTS = {
    "harness_overhead": lambda device: [microbench.harness_overhead("small", bs) for bs in (1, 8)],
    "decode_breakdown": lambda device: [row for dt in ("fp32", "bf16") for row in
                                        microbench.decode_breakdown("bench", dt, device=device)],
    "offload_slowdown": lambda device: [microbench.offload_slowdown("small", bs) for bs in (1, 8)],
    "compile_speedup": lambda device: (microbench.compile_speedup("bench", "fp32", (1, 8), device=device)
                                       + microbench.compile_speedup("bench", "bf16", (1,), device=device)),
}


def plot(out: dict, path) -> Path:
    """Draw the parts present in ``out`` (the JSON this script writes) as one PNG at ``path``:
    the decode step split into its linears and the rest beside the memory bound, the same eager
    beside compiled, disk offload against weights in memory, the harness against a bare loop."""
    hw = out.get("hardware") or {}
    panels = [name for name in ("decode_breakdown", "compile_speedup", "offload_slowdown", "harness_overhead")
              if out.get(name)]
    if not panels:
        raise UserError(f"nothing to draw: the JSON holds none of the parts {', '.join(PARTS)}; pass a file "
                        "that benchmarks/foundation.py wrote")
    fig, axes = results.figure(len(panels), columns=2)
    for name, ax in zip(panels, axes):
        rows = out[name]
        if name == "decode_breakdown":
            groups = [f"{r['model']} {r['dtype']}\nbatch {r['batch_size']}" for r in rows]
            lin = [min(r["linears_ms"], r["step_ms"]) for r in rows]
            results.plot_bars(ax, groups, {"linears alone": lin}, "ms per decode step (median)",
                              title="where the eager decode step goes (stacked) vs the memory bound (--)")
            ax.bar(range(len(rows)), [r["step_ms"] - x for r, x in zip(rows, lin)], 0.8, bottom=lin,
                   label="rest of the step")
            for i, r in enumerate(rows):
                ax.hlines(r["memory_bound_ms"], i - 0.4, i + 0.4, colors="black", linestyles="--",
                          label="memory bound" if i == 0 else None)
            ax.legend(fontsize=8)
        elif name == "compile_speedup":
            results.plot_step_breakdown(rows, ax=ax, title="eager beside compiled (static cache + torch.compile)")
        elif name == "offload_slowdown":
            results.plot_bars(ax, [f"batch {r['batch_size']}" for r in rows],
                              {"weights in memory": [r["in_memory_ms_per_token"] for r in rows],
                               "half offloaded to disk": [r["disk_offload_ms_per_token"] for r in rows]},
                              "ms per token", title=f"Accelerate disk offload ({rows[0]['model']})")
        else:
            results.plot_bars(ax, [f"batch {r['batch_size']}" for r in rows],
                              {"bare loop": [r["bare_ms_per_token"] for r in rows],
                               "harness": [r["harness_ms_per_token"] for r in rows]},
                              "ms per token", title=f"the harness's overhead ({rows[0]['model']})")
    fig.suptitle(f"foundation benchmarks on {hw.get('cpu', 'this machine')} ({hw.get('cpu_cores', '?')} cores)")
    return results.save_png(fig, path)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/foundation-cpu.json", metavar="JSON",
                   help="the result file; with --only, the parts already in it and not rerun are "
                        "kept (default: %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where decode_breakdown and compile_speedup run (the other "
                        "parts always time the CPU) (default: %(default)s)")
    p.add_argument("--only", nargs="*", choices=list(PARTS), default=list(PARTS), metavar="PART",
                   help=f"the parts to run, of {', '.join(PARTS)}; decode_breakdown and "
                        "compile_speedup load the ~300M bench preset (1.2 GB in fp32) and take "
                        "longest, the others the small one (default: every part)")
    results.add_plot_flags(p, "benchmarks/results/foundation-cpu.json")
    args = p.parse_args(argv)
    recorded = results.check_plot_flags(args)
    if recorded is None:
        recorded = microbench.run_parts(PARTS, args.only, args.out, args.device)
    if args.plot:
        print(f"saved {plot(recorded, args.plot)}")


if __name__ == "__main__":
    main()
