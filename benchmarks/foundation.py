#!/usr/bin/env python
"""Benchmarks of the foundation (issue 2), measured on this machine; prints and saves JSON.

    python benchmarks/foundation.py [--out benchmarks/results/foundation-cpu.json]
"""
import argparse
import json

from bloomkit import microbench, results, sysinfo
from bloomkit.errors import cli_entry


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default="benchmarks/results/foundation-cpu.json")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = {"hardware": sysinfo.hardware(), "versions": sysinfo.versions()}
    out["harness_overhead"] = [microbench.harness_overhead("small", bs) for bs in (1, 8)]
    out["decode_vs_roofline"] = [microbench.decode_vs_roofline("bench", dt, device=args.device)
                                 for dt in ("fp32", "bf16")]
    out["offload_slowdown"] = [microbench.offload_slowdown("small", bs) for bs in (1, 8)]
    results.write_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("hardware", "versions")}, indent=1))


if __name__ == "__main__":
    main()
