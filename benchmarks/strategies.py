#!/usr/bin/env python
"""Benchmarks of the DeepSpeed strategies (issues 3 and 4), measured on this machine; prints and saves JSON.

    python benchmarks/strategies.py [--out benchmarks/results/strategies-cpu.json] [--only tp preshard zero]

With --only, the other parts already in --out are kept.

* tp: AutoTP ms/token at TP = 1, 2, 4 on ``small``, batch 1 and 8, ratio to TP = 1;
* preshard: "start to ready" from per-rank shards vs the full checkpoint at TP = 2 on ``bench``
  (warm and cold page cache);
* zero: ZeRO-Inference none / cpu / nvme / nvme 4-bit on ``small`` at batch 1, 8, 32, NVMe next
  to its disk-read roofline.

Every number is a real launch of the recipes; a run of all three takes about 10 minutes on 2 cores.
"""
import argparse

from bloomkit import microbench
from bloomkit.errors import cli_entry

PARTS = {
    "tp": lambda: microbench.tp_scaling("small"),
    "preshard": lambda: microbench.preshard_load_ratio("bench", 2, repeats=5),
    "zero": lambda: microbench.zero_offload("small"),
}


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default="benchmarks/results/strategies-cpu.json")
    p.add_argument("--only", nargs="*", choices=sorted(PARTS), default=list(PARTS))
    args = p.parse_args(argv)
    microbench.run_parts(PARTS, args.only, args.out)


if __name__ == "__main__":
    main()
