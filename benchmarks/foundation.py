#!/usr/bin/env python
"""Benchmarks of the foundation (issue 2), measured on this machine; prints and saves JSON.

    python benchmarks/foundation.py [--out benchmarks/results/foundation-cpu.json] [--only PART ...]

Parts: harness_overhead (small), decode_breakdown (bench, fp32 and bf16, batch 1 and 8: decode
next to its memory and compute bounds, and the matmul kernels alone vs the whole step),
offload_slowdown (small), compile_speedup (bench: plain generate vs static cache + torch.compile,
interleaved on one model, fp32 at batch 1 and 8 and bf16 at batch 1; compile time beside the speed-up,
the decode step beside its memory bound).  With --only, the other parts already in --out are kept.
"""
import argparse

from bloomkit import microbench
from bloomkit.errors import cli_entry

PARTS = {
    "harness_overhead": lambda device: [microbench.harness_overhead("small", bs) for bs in (1, 8)],
    "decode_breakdown": lambda device: [row for dt in ("fp32", "bf16") for row in
                                        microbench.decode_breakdown("bench", dt, device=device)],
    "offload_slowdown": lambda device: [microbench.offload_slowdown("small", bs) for bs in (1, 8)],
    "compile_speedup": lambda device: (microbench.compile_speedup("bench", "fp32", (1, 8), device=device)
                                       + microbench.compile_speedup("bench", "bf16", (1,), device=device)),
}


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
    args = p.parse_args(argv)
    microbench.run_parts(PARTS, args.only, args.out, args.device)


if __name__ == "__main__":
    main()
