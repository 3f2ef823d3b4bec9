#!/usr/bin/env python
"""Serving benchmark, measured on this machine over loopback; prints and saves JSON.

    python benchmarks/serve.py [--out benchmarks/results/serve-cpu.json] [--name small]
                               [--only accelerate tp2]

With --only, the other parts already in --out are kept.

* accelerate: the server (``recipes/serve.py``) under the load-test client at 1, 4 and 16
  concurrent clients; the goals are throughput at 16 clients >= 4x the one-request-at-a-time
  run, and time-to-first-token p50 at 16 clients <= 3x its value with one client.  Measured
  twice: every request 32 tokens long (closed-loop clients then run in lock-step: all 16 come
  back together and are prefilled as one group, the worst case for time to first token), and
  lengths drawn from 16-48 per request (mixed traffic, same mean);
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
MIXED_TOKENS = (16, 48)         # each request draws its length: the same mean, clients out of step
MIXED_RUNS = {1: 16, 16: 48}


def sweep(srv: Server, runs: dict, max_tokens) -> dict:
    expected = asyncio.run(loadtest.reference(srv.url, loadtest.DEFAULT_PROMPTS, max_tokens))
    rows = []
    for c, n in runs.items():
        res = asyncio.run(loadtest.run_load(srv.url, prompts=loadtest.DEFAULT_PROMPTS, max_tokens=max_tokens,
                                            requests=n, concurrency=c, duration=600))
        rows.append(loadtest.summarize(res, expected, {"arrivals": "fixed", "concurrency": c},
                                       loadtest.longest(max_tokens)))
        print(loadtest.table({"runs": rows[-1:]}).splitlines()[1], flush=True)
    return {"expected": expected, "max_tokens": max_tokens, "runs": rows}


def ratios(out: dict) -> dict:
    by = {r["concurrency"]: r for r in out["runs"]}
    return {"throughput_16_over_1": by[16]["output_tokens_per_s"] / by[1]["output_tokens_per_s"],
            "ttft_p50_16_over_1": by[16]["ttft_p50_ms"] / by[1]["ttft_p50_ms"]}


def accelerate(name: str, server_args=()) -> dict:
    t0 = time.perf_counter()
    with Server(["--name", name, *server_args], ready_timeout=600) as srv:
        ready = time.perf_counter() - t0
        out = sweep(srv, RUNS, MAX_TOKENS)
        out["mixed"] = sweep(srv, MIXED_RUNS, MIXED_TOKENS)
    same, mixed = ratios(out), ratios(out["mixed"])
    out.update(ready_seconds=ready, goals={
        **same, "throughput_goal": 4.0, "ttft_goal": 3.0,
        "mixed_throughput_16_over_1": mixed["throughput_16_over_1"],
        "mixed_ttft_p50_16_over_1": mixed["ttft_p50_16_over_1"]})
    print(f"one length ({MAX_TOKENS} tokens, clients in lock-step): throughput at 16 clients = "
          f"{same['throughput_16_over_1']:.2f}x one at a time (goal >= 4); TTFT p50 at 16 = "
          f"{same['ttft_p50_16_over_1']:.2f}x (goal <= 3)", flush=True)
    print(f"mixed lengths ({MIXED_TOKENS[0]}-{MIXED_TOKENS[1]} tokens): throughput at 16 clients = "
          f"{mixed['throughput_16_over_1']:.2f}x; TTFT p50 at 16 = {mixed['ttft_p50_16_over_1']:.2f}x", flush=True)
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
    p.add_argument("--server_args", default="", help="more flags for recipes/serve.py, e.g. --server_args='--compile'")
    args = p.parse_args(argv)
    out = {}
    if os.path.exists(args.out):   # --only: the other parts already there are kept
        out = json.loads(open(args.out).read())
    out.update({"model": args.name, "max_tokens": MAX_TOKENS, "hardware": sysinfo.hardware(),
                "load_average_before": os.getloadavg()})
    if "accelerate" in args.only:
        out["accelerate"] = accelerate(args.name, args.server_args.split())
        out["accelerate"]["server_args"] = args.server_args
    if "tp2" in args.only:
        out["tp2"] = tp2(args.name, out.get("accelerate", {}).get("expected"))
    out["load_average_after"] = os.getloadavg()
    results.write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
