#!/usr/bin/env python
"""Serving benchmark, measured on this machine over loopback; prints and saves JSON.

    python benchmarks/serve.py [--out benchmarks/results/serve-cpu.json] [--name small]
                               [--only accelerate tp2]

With --only, the other parts already in --out are kept.

* accelerate: the server (``recipes/serve.py``) under the load-test client at 1, 4 and 16
  concurrent clients; the goals are throughput at 16 clients >= 4x the one-request-at-a-time
  run, and time-to-first-token p50 at 16 clients <= 3x its value with one client;
* tp2: the same greedy requests to a TP=2 server on two CPU ranks: the same tokens as the
  Accelerate server (and its throughput at 1 and 16 clients).

Every answer under load is checked against the answer its prompt got alone (``mismatches``).
On a shared 2-core machine the absolute numbers move with the other jobs (the record keeps the
load average); the ratios are measured within one run, one server.
"""
import argparse
import asyncio
import json
import os
import time

from bloomkit import results, sysinfo
from bloomkit.errors import cli_entry
from bloomkit.serve import loadtest
from bloomkit.serve.proc import Server

MAX_TOKENS = 32
RUNS = {1: 16, 4: 24, 16: 48}   # concurrency -> requests


def sweep(srv: Server, runs: dict, max_tokens: int) -> dict:
    expected = asyncio.run(loadtest.reference(srv.url, loadtest.DEFAULT_PROMPTS, max_tokens))
    rows = []
    for c, n in runs.items():
        res = asyncio.run(loadtest.run_load(srv.url, prompts=loadtest.DEFAULT_PROMPTS, max_tokens=max_tokens,
                                            requests=n, concurrency=c, duration=600))
        rows.append(loadtest.summarize(res, expected, {"arrivals": "fixed", "concurrency": c}))
        print(loadtest.table({"runs": rows[-1:]}).splitlines()[1], flush=True)
    return {"expected": expected, "runs": rows}


def accelerate(name: str) -> dict:
    t0 = time.perf_counter()
    with Server(["--name", name], ready_timeout=600) as srv:
        ready = time.perf_counter() - t0
        out = sweep(srv, RUNS, MAX_TOKENS)
    by = {r["concurrency"]: r for r in out["runs"]}
    out.update(ready_seconds=ready, goals={
        "throughput_16_over_1": by[16]["output_tokens_per_s"] / by[1]["output_tokens_per_s"],
        "throughput_goal": 4.0,
        "ttft_p50_16_over_1": by[16]["ttft_p50_ms"] / by[1]["ttft_p50_ms"],
        "ttft_goal": 3.0})
    g = out["goals"]
    print(f"throughput at 16 clients = {g['throughput_16_over_1']:.2f}x one at a time (goal >= 4); "
          f"TTFT p50 at 16 = {g['ttft_p50_16_over_1']:.2f}x (goal <= 3)", flush=True)
    return out


def tp2(name: str, reference: dict | None = None) -> dict:
    with Server(["--name", name, "--strategy", "ds-inference"], nprocs=2, ready_timeout=600) as srv:
        out = sweep(srv, {1: 8, 16: 32}, MAX_TOKENS)
    if reference is None:
        with Server(["--name", name], ready_timeout=600) as srv:
            reference = asyncio.run(loadtest.reference(srv.url, loadtest.DEFAULT_PROMPTS, MAX_TOKENS))
    out["same_tokens_as_accelerate"] = out["expected"] == reference
    print(f"TP=2 answers equal the Accelerate server's: {out['same_tokens_as_accelerate']}", flush=True)
    return out


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", default="benchmarks/results/serve-cpu.json")
    p.add_argument("--name", default="small")
    p.add_argument("--only", nargs="*", choices=["accelerate", "tp2"], default=["accelerate", "tp2"])
    args = p.parse_args(argv)
    out = {}
    if os.path.exists(args.out):   # --only: the other parts already there are kept
        out = json.loads(open(args.out).read())
    out.update({"model": args.name, "max_tokens": MAX_TOKENS, "hardware": sysinfo.hardware(),
                "load_average_before": os.getloadavg()})
    if "accelerate" in args.only:
        out["accelerate"] = accelerate(args.name)
    if "tp2" in args.only:
        out["tp2"] = tp2(args.name, out.get("accelerate", {}).get("expected"))
    out["load_average_after"] = os.getloadavg()
    results.write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
