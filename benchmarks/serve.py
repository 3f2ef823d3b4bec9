#!/usr/bin/env python
"""Serving benchmark, measured on this machine over loopback; prints and saves JSON.

    python benchmarks/serve.py [--out benchmarks/results/serve-cpu.json] [--name small]
                               [--only accelerate tp2] [--server_args='--compile']
                               [--plot serve.png] [--from benchmarks/results/serve-cpu.json]

With --only, the other parts already in --out are kept.  --plot draws the JSON as latency against
throughput (TTFT and TPOT p50 against output tokens/s, one line per server, one point per client
count, the rounds' range as error bars: how vLLM's and DeepSpeed-FastGen's serving results are shown);
with --from it redraws a recorded file without running anything.

* accelerate: the server (``recipes/serve.py``) under the load-test client at 1, 4 and 16
  concurrent clients; the goals are throughput at 16 clients >= 4x the one-request-at-a-time
  run, and time-to-first-token p50 at 16 clients <= 3x its value with one client.  Two kinds
  of traffic: lengths drawn from 16-48 tokens per request (*mixed*: clients out of step, each
  new request joins a running batch) and every request 32 tokens long (*one length*:
  closed-loop clients that start together stay in lock-step, so all 16 come back at once, a
  burst of 16 prompts to prefill: the worst case for time to first token).  Two servers,
  measured side by side: the default one (prefill in a second thread beside the decode step,
  ``--overlap_prefill``) and ``--no-overlap_prefill`` (prefill first, between decode steps).
  Every run is repeated in ``--rounds`` rounds that alternate servers and client counts, so
  each ratio compares runs minutes apart at most; the ratio kept is the median of the rounds'.
* burst: in-process, what a lock-step round asks of the model: 16 prompts prefilled as one
  group, against one prompt alone (the compute every request of such a round waits for);
* tp2: the same greedy requests to a TP=2 server on two CPU ranks: the same tokens as the
  Accelerate server (and its throughput at 1 and 16 clients).

* peers (``--only peers``, not run by default): our server beside other engines' servers on the same
  checkpoint (``bloomkit.serve.peers``: vLLM from ``.venv-vllm``, ``transformers serve
  --continuous-batching``), one client and the same requests for all (standard OpenAI fields
  only), the model's own prompts, at 1, 4, 8 and 16 clients, both kinds of traffic, the servers taking
  turns in every round; greedy answers compared with ours; each ratio through the comparison rule
  over the rounds.  A peer that cannot serve the model is recorded with its reason.  Kept per
  model under ``peers``:  ``python benchmarks/serve.py --only peers --name trained --rounds 5``.
* guidellm (``--only guidellm``, not run by default): our server measured by a third-party client,
  GuideLLM (``make setup-guidellm``), and by our load test in alternating rounds, the same synthetic
  requests (GuideLLM's 32-token prompts asking for 32 tokens) at 1 and 8 in flight, both reports side
  by side with their definitions, and tokens per sampling step from our server's ``/metrics`` around each
  run.  Kept per model under ``guidellm``:  ``python benchmarks/serve.py --only guidellm --name trained
  --rounds 3 --out benchmarks/results/serve-guidellm-cpu.json``.
* lever (``--only lever``, not run by default): one of our server's flags measured by itself: our
  server with ``--server_args`` and another with ``--server_args`` plus ``--lever_args``, the same
  answers, taking turns in every round (and starting in the other order each round), mixed lengths at
  8 and 16 clients.  Kept per model and flags under ``levers``:  ``python benchmarks/serve.py --only
  lever --name small-llama --server_args=' --compile --packed_prefill' --lever_args=' --freezing'
  --rounds 5 --out benchmarks/results/serve-levers-cpu.json``.

Every answer under load is checked against the answer its prompt got alone (``mismatches``).
The metrics are vLLM ``bench serve``'s, by its definitions (numpy percentiles; the record's
``metric_definitions``), each run with its per-request samples; ``length_control`` says how output
lengths were held equal (``ignore_eos``, which this server honours).
On a shared 2-core machine the absolute numbers move with the other jobs (the record keeps the
load average); the ratios are measured within one round.
"""
import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time

from bloomkit import results, sysinfo
from bloomkit.errors import UserError, cli_entry
from bloomkit.measure import compare
from bloomkit.serve import loadtest
from bloomkit.serve.proc import Server

TRAFFIC = {"mixed": (16, 48), "one_length": 32}   # max_tokens: a range drawn per request, or one number
RUNS = {1: 12, 4: 16, 16: 48}                      # concurrency -> requests per run
SERVERS = {"overlap": [], "prefill_first": ["--no-overlap_prefill"]}


def run(srv: Server, max_tokens, c: int, n: int, expected: dict) -> dict:
    res = asyncio.run(loadtest.run_load(srv.url, prompts=loadtest.DEFAULT_PROMPTS, max_tokens=max_tokens,
                                        requests=n, concurrency=c, duration=600))
    return loadtest.summarize(res, expected, {"arrivals": "fixed", "concurrency": c}, loadtest.longest(max_tokens))


def ratios(rounds: list[list[dict]]) -> dict:
    """Each round's 16-client value over its 1-client value; the median of the rounds."""
    def ratio(key):
        per = []
        for rows in rounds:
            by = {r["concurrency"]: r for r in rows}
            per.append(by[16][key] / by[1][key])
        return statistics.median(per), per

    def median(key, c):
        return statistics.median(next(r for r in rows if r["concurrency"] == c)[key] for rows in rounds)
    thr, thr_rounds = ratio("output_tokens_per_s")
    ttft, ttft_rounds = ratio("ttft_p50_ms")
    return {"throughput_16_over_1": thr, "ttft_p50_16_over_1": ttft,
            "per_round": {"throughput_16_over_1": thr_rounds, "ttft_p50_16_over_1": ttft_rounds},
            "median_ttft_p50_ms": {c: median("ttft_p50_ms", c) for c in (1, 16)},
            "median_output_tokens_per_s": {c: median("output_tokens_per_s", c) for c in (1, 16)}}


def accelerate(name: str, server_args=(), rounds: int = 3) -> dict:
    out = {}
    # --compile: prefill first only (no prefill thread beside a compiled forward)
    servers = {"prefill_first": []} if "--compile" in server_args else SERVERS
    with contextlib.ExitStack() as stack:
        srvs = {}
        for label, extra in servers.items():
            t0 = time.perf_counter()
            srvs[label] = stack.enter_context(Server(["--name", name, *server_args, *extra], ready_timeout=600))
            out[label] = {"server_args": [*server_args, *extra], "ready_seconds": time.perf_counter() - t0}
        expected = {t: asyncio.run(loadtest.reference(next(iter(srvs.values())).url, loadtest.DEFAULT_PROMPTS, mt))
                    for t, mt in TRAFFIC.items()}
        out["length_control"] = asyncio.run(loadtest.length_control(next(iter(srvs.values())).url)).record()
        for label in servers:
            for t, mt in TRAFFIC.items():
                out[label][t] = {"max_tokens": mt, "rounds": []}
        for k in range(rounds):
            for t, mt in TRAFFIC.items():
                for label, srv in srvs.items():
                    rows = [run(srv, mt, c, n, expected[t]) for c, n in RUNS.items()]
                    out[label][t]["rounds"].append(rows)
                    r = ratios([rows])
                    print(f"round {k + 1} {t:>10} {label:>13}: TTFT p50 {rows[0]['ttft_p50_ms']:.0f} -> "
                          f"{rows[-1]['ttft_p50_ms']:.0f} ms ({r['ttft_p50_16_over_1']:.2f}x), throughput "
                          f"{r['throughput_16_over_1']:.2f}x, mismatches {sum(x['mismatches'] for x in rows)}",
                          flush=True)
    for label in servers:
        for t in TRAFFIC:
            out[label][t].update(ratios(out[label][t]["rounds"]))
    out["expected"] = expected
    out["goals"] = {"throughput_goal": 4.0, "ttft_goal": 3.0}
    for t, mt in TRAFFIC.items():
        lengths = f"{mt[0]}-{mt[1]} tokens" if isinstance(mt, tuple) else f"{mt} tokens each"
        for label in servers:
            r = out[label][t]
            print(f"{t} ({lengths}), {label}: throughput at 16 clients = {r['throughput_16_over_1']:.2f}x one at a "
                  f"time (goal >= 4: {'met' if r['throughput_16_over_1'] >= 4 else 'not met'}); TTFT p50 at 16 = "
                  f"{r['ttft_p50_16_over_1']:.2f}x one client's (goal <= 3: "
                  f"{'met' if r['ttft_p50_16_over_1'] <= 3 else 'not met'}); median of {rounds} rounds", flush=True)
    if len(servers) < 2:
        return out
    a, b = (out[s]["mixed"]["median_ttft_p50_ms"] for s in ("overlap", "prefill_first"))
    # the two servers ran in alternating rounds: each round gives one pair, and the verdict follows
    # bloomkit.measure.compare's rule (>= 5 pairs, and every pair on the same side)
    per_round = {c: [[next(r for r in rows if r["concurrency"] == c)["ttft_p50_ms"] for rows in out[s]["mixed"]["rounds"]]
                     for s in ("overlap", "prefill_first")] for c in (1, 16)}
    cmp = {c: compare.compare_times(*per_round[c]) for c in (1, 16)}
    out["ttft_p50_overlap_vs_prefill_first"] = {c: {"ratio": x.ratio, "low": x.low, "high": x.high, "pairs": x.pairs,
                                                    "verdict": x.verdict} for c, x in cmp.items()}
    print(f"mixed traffic, TTFT p50 (median of the rounds): at 16 clients {a[16]:.0f} ms with the prefill thread, "
          f"{b[16]:.0f} ms prefilling first: {cmp[16].sentence('the prefill thread', 'prefilling first')}; "
          f"with one client {a[1]:.0f} vs {b[1]:.0f} ms: {cmp[1].sentence('the prefill thread', 'prefilling first')}",
          flush=True)
    return out


def burst(name: str, repeats: int = 5) -> dict:
    """In-process, no HTTP: what one lock-step round asks of the model — the prefill of 16 prompts
    as one left-padded group — against one prompt's prefill, interleaved ``repeats`` times."""
    from bloomkit import models
    from bloomkit.serve.scheduler import KVBatch
    from bloomkit.strategies import accel

    path = models.resolve_model(name)
    tok = models.load_tokenizer(path)
    batch = KVBatch(accel.load_model(str(path), "fp32", device="cpu").eval(), tok.pad_token_id)
    prompts = [tok(p)["input_ids"] for p in loadtest.DEFAULT_PROMPTS]
    group = [prompts[i % len(prompts)] for i in range(16)]
    one, many = [], []
    for _ in range(repeats + 1):   # the first round warms up
        for ids, times in (([prompts[0]], one), (group, many)):
            t0 = time.perf_counter()
            batch.prefill(ids)
            times.append(time.perf_counter() - t0)
    one_ms, many_ms = statistics.median(one[1:]) * 1e3, statistics.median(many[1:]) * 1e3
    out = {"prefill_1_ms": one_ms, "prefill_16_ms": many_ms, "ratio": many_ms / one_ms,
           "padded_tokens_16": 16 * max(map(len, group)), "prompt_tokens_16": sum(map(len, group))}
    print(f"a lock-step round prefills 16 prompts as one group: {many_ms:.0f} ms, {out['ratio']:.1f}x one prompt's "
          f"{one_ms:.0f} ms ({out['padded_tokens_16']} padded tokens for {out['prompt_tokens_16']} prompt tokens), "
          "and every request of the round waits for the whole group", flush=True)
    return out


def tp2(name: str, reference: dict | None = None) -> dict:
    mt = TRAFFIC["one_length"]
    with Server(["--name", name, "--strategy", "ds-inference"], nprocs=2, ready_timeout=600) as srv:
        expected = asyncio.run(loadtest.reference(srv.url, loadtest.DEFAULT_PROMPTS, mt))
        out = {"expected": expected, "max_tokens": mt,
               "length_control": asyncio.run(loadtest.length_control(srv.url)).record(),
               "runs": [run(srv, mt, c, n, expected) for c, n in {1: 8, 16: 32}.items()]}
    if reference is None:
        with Server(["--name", name], ready_timeout=600) as srv:
            reference = asyncio.run(loadtest.reference(srv.url, loadtest.DEFAULT_PROMPTS, mt))
    out["same_tokens_as_accelerate"] = out["expected"] == reference
    print(f"TP=2 answers equal the Accelerate server's: {out['same_tokens_as_accelerate']}", flush=True)
    return out


PEER_RUNS = {1: 12, 4: 16, 8: 32, 16: 48}               # concurrency -> requests per run, for the servers side by side


def _same_text(a: str, b: str) -> bool:
    """Two servers' greedy answers agree (a character cut in half at the end, U+FFFD, is not a difference:
    one server streams it, another holds it back)."""
    return a.rstrip("\ufffd") == b.rstrip("\ufffd")


def peers(name: str = "trained", kinds=("vllm", "transformers"), rounds: int = 5, runs: dict | None = None,
          tp: int = 1, server_args=(), peer_args=()) -> dict:
    """Our server beside other engines' servers (``bloomkit.serve.peers``: vLLM where ``.venv-vllm``
    exists, ``transformers serve --continuous-batching``) on the same checkpoint, measured by the same
    client with the same requests: standard OpenAI fields only (``extensions="none"``, so no server is
    asked for more than the API promises; greedy answers are equal, so are their lengths), the trained
    model's own prompts, at 1, 4, 8 and 16 clients, mixed lengths and one length, the servers taking turns
    in every round.  A peer that cannot serve the model (vLLM's head sizes, transformers' BLOOM) is
    recorded with its one-line reason.  Per peer and client count: our output tokens/s and TTFT p50
    against the peer's, through :func:`bloomkit.measure.compare.compare_times` over the rounds (a
    verdict needs 5).  ``tp`` > 1: every server splits the model over that many ranks (ours: DeepSpeed
    AutoTP on CPU ranks; vLLM: ``--tensor-parallel-size``; transformers serve has no TP and is refused).
    ``server_args``: more flags for our server (e.g. ``--packed_prefill``), recorded with it;
    ``peer_args``: more flags for every peer's server (e.g. ``--compile`` for ``transformers serve``)."""
    from bloomkit import models
    from bloomkit.prompts import model_prompts
    from bloomkit.serve import peers as engines

    runs = runs or PEER_RUNS
    path = models.resolve_model(name)
    prompts = model_prompts(path) or loadtest.DEFAULT_PROMPTS
    out = {"model": name, "measured_on": time.strftime("%Y-%m-%d"), "tp": tp, "server_args": list(server_args),
           "peer_args": list(peer_args),
           "prompts": prompts, "extensions": "none", "runs_per_concurrency": runs,
           "servers": {}, "refused": {}, "traffic": {}, "versions": sysinfo.versions()}
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        strategy = ["--strategy", "ds-inference"] if tp > 1 else []
        srvs = {"ours": stack.enter_context(Server(["--name", str(path), *strategy, *server_args], nprocs=tp,
                                                   ready_timeout=1200))}   # --compile: minutes of graphs
        out["servers"]["ours"] = {"engine": "bloomkit (recipes/serve.py, " + (f"DeepSpeed AutoTP, {tp} ranks)" if tp > 1
                                                                             else "Accelerate)"),
                                  "start_s": time.perf_counter() - t0}
        for kind in kinds:
            try:
                srvs[kind] = stack.enter_context(engines.Peer(kind, path, tp=tp, extra_args=peer_args))
            except UserError as exc:
                out["refused"][kind] = str(exc)
                print(f"{kind}: {exc}", flush=True)
                continue
            out["servers"][kind] = srvs[kind].describe()
        for t, mt in TRAFFIC.items():
            answers = {s: asyncio.run(loadtest.reference(srv.url, prompts, mt, extensions="none"))
                       for s, srv in srvs.items()}
            out["traffic"][t] = {
                "max_tokens": mt,
                "same_answers_as_ours": {s: all(_same_text(a[p], answers["ours"][p]) for p in prompts)
                                         for s, a in answers.items() if s != "ours"},
                "expected": answers, **{s: {"max_tokens": mt, "rounds": []} for s in srvs}}
        for k in range(rounds):
            for t, mt in TRAFFIC.items():
                got = asyncio.run(engines.measure_round(srvs, prompts=prompts, max_tokens=mt, runs=runs,
                                                        expected=out["traffic"][t]["expected"]))
                for s, rows in got.items():   # rows only, no samples: MBs else
                    out["traffic"][t][s]["rounds"].append(rows)
                    print(f"round {k + 1} {t:>10} {s:>12}: " + ", ".join(
                        f"C={r['concurrency']} {r['output_tokens_per_s']:.0f} tok/s TTFT p50 {r['ttft_p50_ms']:.0f} ms "
                        f"{r['cores_busy']:.1f} cores" for r in rows) + f", errors {sum(r['errors'] for r in rows)}, "
                        f"mismatches {sum(r['mismatches'] for r in rows)}", flush=True)
    out["ours_vs_peers"] = {}
    for t, part in out["traffic"].items():
        for s in srvs:
            if s == "ours":
                continue
            for c in runs:
                def per_round(server, key):
                    return loadtest.per_round(part[server]["rounds"], c, key)
                # time per output token (1 / throughput) and TTFT: lower is better, compared round by round
                spt = {x: [1 / v for v in per_round(x, "output_tokens_per_s")] for x in ("ours", s)}
                thr = compare.compare_times(spt["ours"], spt[s])
                ttft = compare.compare_times(per_round("ours", "ttft_p50_ms"), per_round(s, "ttft_p50_ms"))
                row = {"traffic": t, "peer": s, "concurrency": c,
                       "output_tokens_per_s": {x: statistics.median(per_round(x, "output_tokens_per_s"))
                                               for x in ("ours", s)},
                       "ttft_p50_ms": {x: statistics.median(per_round(x, "ttft_p50_ms")) for x in ("ours", s)},
                       "throughput": {"ours_over_peer": 1 / thr.ratio, "verdict": thr.verdict, "pairs": thr.pairs,
                                      "sentence": thr.sentence("ours", s) + " per output token"},
                       "ttft_p50": {"ours_over_peer": ttft.ratio, "verdict": ttft.verdict, "pairs": ttft.pairs,
                                    "sentence": ttft.sentence("ours", s) + " to the first token"}}
                out["ours_vs_peers"].setdefault(s, []).append(row)
                print(f"{t}, {c} client(s): output tokens/s ours {row['output_tokens_per_s']['ours']:.0f}, {s} "
                      f"{row['output_tokens_per_s'][s]:.0f} ({row['throughput']['sentence']}); TTFT p50 ours "
                      f"{row['ttft_p50_ms']['ours']:.0f} ms, {s} {row['ttft_p50_ms'][s]:.0f} ms "
                      f"({row['ttft_p50']['sentence']})", flush=True)
    return out


LEVER_RUNS = {8: 32, 16: 48}                              # concurrency -> requests per run, for a lever's A/B


def lever(name: str, server_args=(), lever_args=(), rounds: int = 5, runs: dict | None = None) -> dict:
    """One lever of our server measured by itself: two of our servers on the same checkpoint, one
    with ``server_args`` and one with ``server_args`` + ``lever_args`` (e.g. ``--freezing``),
    under the same client with mixed lengths (the traffic where rows join and leave every step),
    taking turns in every round and starting in the other order each round.  Their greedy answers
    must agree; per client count, output tokens/s and TTFT p50 with the lever against without,
    through :func:`bloomkit.measure.compare.compare_times` over the rounds (a verdict needs 5)."""
    from bloomkit import models
    from bloomkit.prompts import model_prompts
    from bloomkit.serve import peers as engines

    runs = runs or LEVER_RUNS
    path = models.resolve_model(name)
    prompts = model_prompts(path) or loadtest.DEFAULT_PROMPTS
    mt = TRAFFIC["mixed"]
    out = {"model": name, "measured_on": time.strftime("%Y-%m-%d"), "server_args": list(server_args),
           "lever_args": list(lever_args), "prompts": prompts, "extensions": "none",
           "runs_per_concurrency": runs, "servers": {}, "versions": sysinfo.versions()}
    flags = {"without": list(server_args), "with": [*server_args, *lever_args]}
    with contextlib.ExitStack() as stack:
        srvs = {}
        for k, extra in flags.items():
            t0 = time.perf_counter()
            srvs[k] = stack.enter_context(Server(["--name", str(path), *extra], ready_timeout=1500))
            out["servers"][k] = {"args": extra, "start_s": time.perf_counter() - t0}
        answers = {k: asyncio.run(loadtest.reference(srv.url, prompts, mt, extensions="none"))
                   for k, srv in srvs.items()}
        if not all(_same_text(answers["with"][p], answers["without"][p]) for p in prompts):
            raise UserError(f"{' '.join(lever_args)} changed the greedy answers; a lever must not")
        part = out["traffic"] = {"mixed": {"max_tokens": mt, "expected": answers["without"],
                                           **{k: {"max_tokens": mt, "rounds": []} for k in srvs}}}
        part = part["mixed"]
        for r in range(rounds):
            order = list(srvs) if r % 2 == 0 else list(srvs)[::-1]
            got = asyncio.run(engines.measure_round({k: srvs[k] for k in order}, prompts=prompts, max_tokens=mt,
                                                    runs=runs, expected=answers))
            for k in srvs:
                part[k]["rounds"].append(got[k])
                print(f"round {r + 1} {k:>8} {' '.join(lever_args)}: " + ", ".join(
                    f"C={x['concurrency']} {x['output_tokens_per_s']:.0f} tok/s TTFT p50 {x['ttft_p50_ms']:.0f} ms"
                    for x in got[k]) + f", errors {sum(x['errors'] for x in got[k])}, "
                    f"mismatches {sum(x['mismatches'] for x in got[k])}", flush=True)
    out["with_vs_without"] = []
    label = "with " + " ".join(lever_args)
    for c in runs:
        def per_round(k, key):
            return loadtest.per_round(part[k]["rounds"], c, key)
        thr = compare.compare_times([1 / v for v in per_round("with", "output_tokens_per_s")],
                                    [1 / v for v in per_round("without", "output_tokens_per_s")])
        ttft = compare.compare_times(per_round("with", "ttft_p50_ms"), per_round("without", "ttft_p50_ms"))
        row = {"concurrency": c,
               "output_tokens_per_s": {k: statistics.median(per_round(k, "output_tokens_per_s")) for k in srvs},
               "ttft_p50_ms": {k: statistics.median(per_round(k, "ttft_p50_ms")) for k in srvs},
               "throughput": {"with_over_without": 1 / thr.ratio, "verdict": thr.verdict, "pairs": thr.pairs,
                              "sentence": thr.sentence(label, "without") + " per output token"},
               "ttft_p50": {"with_over_without": ttft.ratio, "verdict": ttft.verdict, "pairs": ttft.pairs,
                            "sentence": ttft.sentence(label, "without") + " to the first token"}}
        out["with_vs_without"].append(row)
        print(f"{c} clients, {' '.join(lever_args)}: output tokens/s {row['output_tokens_per_s']['with']:.0f} with, "
              f"{row['output_tokens_per_s']['without']:.0f} without ({row['throughput']['sentence']}); TTFT p50 "
              f"{row['ttft_p50_ms']['with']:.0f} against {row['ttft_p50_ms']['without']:.0f} ms", flush=True)
    return out


GUIDELLM_RUNS = {1: 16, 8: 64}                          # streams -> requests per run, for GuideLLM and ours alike


def _server_counters(srv: Server) -> dict:
    """Our server's counters now (``/metrics``): generated tokens, sampling steps, requests served;
    and the CPU seconds its processes have used."""
    import httpx
    import psutil

    from bloomkit.serve.app import read_metrics

    m = read_metrics(httpx.get(srv.url + "/metrics", timeout=30).text)
    cpu = 0.0
    for pid in srv.pids():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            cpu += t.user + t.system
    return {"tokens": m.get("bloomkit_generation_tokens_total", 0.0), "steps": m.get("bloomkit_steps_total", 0.0),
            "requests": sum(v for k, v in m.items() if k.startswith("bloomkit_requests_total")), "cpu_s": cpu}


def _server_side(before: dict, after: dict, wall_s: float) -> dict:
    """What our server did during one client's run of ``wall_s`` seconds (the client's measured
    duration): its tokens, sampling steps (prefills and decode steps), requests and CPU seconds;
    tokens per step (how many rows a step carried, on average), steps per second, and cores used
    (CPU seconds over ``wall_s``; it idles outside the measured window)."""
    d = {k: after[k] - before[k] for k in before}
    return {**d, "tokens_per_step": d["tokens"] / d["steps"] if d["steps"] else None,
            "steps_per_s": d["steps"] / wall_s if wall_s else None,
            "cores_used": d["cpu_s"] / wall_s if wall_s else None}


def _guidellm_row(summary: dict, sent: list[tuple[str, str]], expected: dict, concurrency: int) -> dict:
    """One GuideLLM run as a row beside the load test's: the same keys where the definitions agree
    (``output_tokens_per_s``; TTFT, TPOT and E2E p50/p90/p99 by vLLM's definitions, recomputed from
    its per-request timings), its own summary under ``guidellm``, its answers checked against ours."""
    checked = [(p, t) for p, t in sent if p in expected]
    row = {"arrivals": "fixed", "concurrency": concurrency, "requests": summary["requests"]["total"],
           "errors": summary["requests"]["errored"] + summary["requests"]["incomplete"],
           "completed": summary["requests"]["successful"], "wall_s": summary["duration_s"],
           "output_tokens_per_s": summary["output_tokens_per_s"], "requests_per_s": summary["requests_per_s"],
           "output_tokens": summary["output_tokens"],
           **{k: v for k, v in summary["vllm_definitions"].items() if k.endswith("_ms")},
           "mismatches": sum(1 for p, t in checked if not _same_text(t, expected[p])),
           "unchecked": len(sent) - len(checked), "guidellm": summary}
    return row


def guidellm_part(name: str = "trained", rounds: int = 3, runs: dict | None = None, prompt_tokens: int = 32,
                  output_tokens: int = 32) -> dict:
    """Our server measured by two clients in alternating rounds: GuideLLM (``bloomkit.serve.guidellm``,
    from ``.venv-guidellm``) and our load test (``bloomkit.serve.loadtest``), with the same requests:
    GuideLLM's synthetic prompts of ``prompt_tokens`` tokens (taken from a first GuideLLM run, which
    also warms the server), each asking for ``output_tokens`` tokens with ``ignore_eos``, at 1 and 8
    requests in flight (``runs``: streams -> requests), the clients taking turns (which goes first
    alternates).  Both reports side by side, by their own definitions and by vLLM's; every answer
    checked against the prompt's answer alone; our server's ``/metrics`` read around each run (tokens
    per sampling step: how full each client kept the batch); per client count, our load test's output
    tokens/s against GuideLLM's through :func:`bloomkit.measure.compare.compare_times` over the rounds."""
    import tempfile
    from pathlib import Path

    from bloomkit.serve import guidellm as gl

    if not gl.available():
        raise UserError(f"the guidellm part needs GuideLLM in .venv-guidellm: run `{gl.SETUP}`")
    runs = runs or GUIDELLM_RUNS
    out = {"model": name, "dtype": "fp32", "measured_on": time.strftime("%Y-%m-%d"),
           "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "runs_per_concurrency": runs,
           "versions": {"ours": sysinfo.versions(), "guidellm": gl.versions()},
           "clients": {"guidellm": {"definitions": gl.DEFINITIONS, "max_tokens": output_tokens, "rounds": []},
                       "loadtest": {"definitions": loadtest.METRIC_DEFINITIONS, "max_tokens": output_tokens,
                                    "rounds": []}}}
    with tempfile.TemporaryDirectory(prefix="bloomkit-guidellm-") as tmp, \
            Server(["--name", name, "--dtype", "fp32"], ready_timeout=600) as srv:
        n, c = max(runs.values()), max(runs)
        warm = gl.run_guidellm(srv.url, name, streams=c, requests=n, prompt_tokens=prompt_tokens,
                               output_tokens=output_tokens, out_dir=Path(tmp) / "warm-up")
        prompts = [p for p, _ in gl.answers(json.loads(Path(warm["report"]).read_text()))]
        out["command"] = warm["command"].replace(str(Path(tmp) / "warm-up"), "OUT_DIR")
        out["prompts"] = prompts
        out["expected"] = expected = asyncio.run(loadtest.reference(srv.url, prompts, output_tokens))
        out["length_control"] = asyncio.run(loadtest.length_control(srv.url)).record()
        for k in range(rounds):
            order = ("guidellm", "loadtest") if k % 2 == 0 else ("loadtest", "guidellm")
            rows = {x: [] for x in order}
            for c, n in runs.items():
                for client in order:
                    before = _server_counters(srv)
                    if client == "guidellm":
                        res = gl.run_guidellm(srv.url, name, streams=c, requests=n, prompt_tokens=prompt_tokens,
                                              output_tokens=output_tokens, out_dir=Path(tmp) / f"r{k}-c{c}")
                        sent = gl.answers(json.loads(Path(res["report"]).read_text()))
                        row = _guidellm_row(res["runs"][0], sent, expected, c)
                        row["same_prompts"] = set(p for p, _ in sent) <= set(prompts)
                    else:
                        res = asyncio.run(loadtest.run_load(srv.url, prompts=prompts, max_tokens=output_tokens,
                                                            requests=n, concurrency=c, duration=600))
                        row = loadtest.summarize(res, expected, {"arrivals": "fixed", "concurrency": c},
                                                 output_tokens, samples=False)
                    row["server"] = _server_side(before, _server_counters(srv), row["wall_s"])
                    rows[client].append(row)
            for client, rs in rows.items():
                out["clients"][client]["rounds"].append(rs)
                print(f"round {k + 1} {client:>9}: " + ", ".join(
                    f"C={r['concurrency']} {r['output_tokens_per_s']:.0f} tok/s TTFT p50 {r['ttft_p50_ms']:.0f} ms "
                    f"{r['server']['tokens_per_step']:.2f} tokens/step {r['server']['steps_per_s']:.0f} steps/s "
                    f"{r['server']['cores_used']:.2f} cores" for r in rs)
                    + f", errors {sum(r['errors'] for r in rs)}, mismatches {sum(r['mismatches'] for r in rs)}",
                    flush=True)
    out["loadtest_vs_guidellm"] = []
    for c in runs:
        def per_round(client, key):
            return [next(r for r in rows if r["concurrency"] == c)[key] for rows in out["clients"][client]["rounds"]]
        # time per output token (1 / throughput): lower is better, compared round by round
        thr = compare.compare_times(*[[1 / v for v in per_round(x, "output_tokens_per_s")]
                                      for x in ("loadtest", "guidellm")])
        def server(client, key):
            return statistics.median(next(r for r in rows if r["concurrency"] == c)["server"][key] or 0
                                     for rows in out["clients"][client]["rounds"])
        steps = {x: server(x, "tokens_per_step") for x in ("loadtest", "guidellm")}
        row = {"concurrency": c,
               "output_tokens_per_s": {x: statistics.median(per_round(x, "output_tokens_per_s"))
                                       for x in ("loadtest", "guidellm")},
               "ttft_p50_ms": {x: statistics.median(per_round(x, "ttft_p50_ms")) for x in ("loadtest", "guidellm")},
               "tpot_p50_ms": {x: statistics.median(per_round(x, "tpot_p50_ms")) for x in ("loadtest", "guidellm")},
               "tokens_per_step": steps,
               "server_steps_per_s": {x: server(x, "steps_per_s") for x in ("loadtest", "guidellm")},
               "server_cores_used": {x: server(x, "cores_used") for x in ("loadtest", "guidellm")},
               "throughput": {"loadtest_over_guidellm": 1 / thr.ratio,
                              "per_round": [a / b for a, b in zip(per_round("loadtest", "output_tokens_per_s"),
                                                                  per_round("guidellm", "output_tokens_per_s"))],
                              "verdict": thr.verdict, "pairs": thr.pairs,
                              "sentence": thr.sentence("our load test", "GuideLLM") + " per output token"}}
        out["loadtest_vs_guidellm"].append(row)
        print(f"C={c}: output tokens/s measured by our load test {row['output_tokens_per_s']['loadtest']:.0f}, by "
              f"GuideLLM {row['output_tokens_per_s']['guidellm']:.0f} ({row['throughput']['sentence']}); tokens "
              f"per step {steps['loadtest']:.2f} vs {steps['guidellm']:.2f}, server steps/s "
              f"{row['server_steps_per_s']['loadtest']:.0f} vs {row['server_steps_per_s']['guidellm']:.0f}; TTFT p50 "
              f"{row['ttft_p50_ms']['loadtest']:.0f} vs {row['ttft_p50_ms']['guidellm']:.0f} ms", flush=True)
    return out


def traffic_name(max_tokens) -> str:
    """A part's traffic, named by its ``max_tokens``: a range drawn per request, or one length."""
    if isinstance(max_tokens, (list, tuple)) and len(max_tokens) == 2:
        return f"lengths {max_tokens[0]}-{max_tokens[1]} (mixed)"
    return f"{max_tokens} tokens each (one length)" if max_tokens is not None else "traffic not recorded"


def series(out: dict) -> dict[str, dict[str, list[dict]]]:
    """Every server's load-test rows in a result of this script, by traffic: ``{traffic: {server:
    rows}}``.  A part with ``rounds`` gives :func:`bloomkit.serve.loadtest.median_rows`, one with
    ``runs`` its rows; a server is named by its path in the JSON (``accelerate/overlap``, ``tp2``),
    so a new part is drawn as one more line."""
    found: dict[str, dict[str, list[dict]]] = {}

    def visit(node, path):
        if not isinstance(node, dict):
            return
        if isinstance(node.get("rounds"), list) and node["rounds"]:
            rows = loadtest.median_rows(node["rounds"])
        elif isinstance(node.get("runs"), list) and node["runs"]:
            rows = [r for r in node["runs"] if isinstance(r, dict) and "output_tokens_per_s" in r]
        else:
            for k, v in node.items():
                if k not in ("expected", "metric_definitions", "hardware", "length_control"):
                    visit(v, [*path, k])
            return
        if rows:
            label = "/".join(p for p in path if p not in TRAFFIC) or "server"
            found.setdefault(traffic_name(node.get("max_tokens", out.get("max_tokens"))), {})[label] = rows

    visit(out, [])
    return found


def plot(out: dict, path):
    """Draw ``out`` (the JSON this script writes) as one PNG at ``path``: for each kind of traffic,
    TTFT and TPOT p50 against output tokens/s, one line per server
    (:func:`bloomkit.serve.loadtest.plot_latency_throughput`)."""
    parts = series(out)
    if not parts:
        raise UserError("nothing to draw: the JSON has no load-test runs ('rounds' or 'runs'); pass a file "
                        "that benchmarks/serve.py wrote")
    fig, axes = results.figure(2 * len(parts), width=6.0, height=4.5, columns=2)
    for i, (traffic, by_server) in enumerate(parts.items()):
        loadtest.plot_latency_throughput(by_server, axes[2 * i:2 * i + 2], ("ttft", "tpot"), title=traffic)
    hw = out.get("hardware") or {}
    fig.suptitle(f"serving {out.get('model', '?')} on {hw.get('cpu', 'this CPU')} ({hw.get('cpu_cores', '?')} cores): "
                 "median of the rounds, points named by their concurrent clients (C)", fontsize=11)
    return results.save_png(fig, path)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/serve-cpu.json", metavar="JSON",
                   help="the result file; parts not run (--only) are kept from it (default: %(default)s)")
    p.add_argument("--name", default="small",
                   help="the model every server loads; larger ones take longer per step (default: %(default)s)")
    p.add_argument("--only", nargs="*", choices=["accelerate", "burst", "tp2", "peers", "guidellm", "lever"],
                   default=["accelerate", "burst", "tp2"],
                   help="the parts to run; tp2 starts a server of two ranks, each holding half of the weights; "
                        "peers starts vLLM (make setup-vllm) and transformers serve beside ours on --name, "
                        "kept per model under 'peers'; guidellm measures ours with GuideLLM (make setup-guidellm) "
                        "and our load test in turns, kept per model under 'guidellm'; lever measures our server with "
                        "--lever_args against without them (default: accelerate burst tp2)")
    p.add_argument("--peers", nargs="*", default=["vllm", "transformers"],
                   help="the engines of the peers part (bloomkit.serve.peers.PEERS) (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1,
                   help="the peers part with every server split over this many ranks: ours on DeepSpeed AutoTP "
                        "CPU ranks, vLLM with --tensor-parallel-size (a core per rank); transformers serve has no "
                        "TP; kept under 'peers' as 'NAME tp=N' (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of every run (ratio: their median); each round adds minutes "
                        "(default: %(default)s)")
    p.add_argument("--server_args", default="",
                   help="more flags for recipes/serve.py, e.g. --server_args='--compile'; with --only peers, kept under "
                        "'peers' as 'NAME FLAGS' (default: none)")
    p.add_argument("--peer_args", default="",
                   help="with --only peers, more flags for every peer's server, e.g. --peer_args='--compile' "
                        "(transformers serve's own torch.compile); kept under 'peers' as 'NAME FLAGS, peers "
                        "FLAGS' (default: none)")
    p.add_argument("--lever_args", default="",
                   help="with --only lever, the flags measured: our server with --server_args and these against "
                        "with --server_args alone, e.g. --server_args=' --compile' --lever_args=' --freezing'; kept "
                        "under 'levers' as 'NAME FLAGS + LEVER' (default: none)")
    results.add_plot_flags(p, "benchmarks/results/serve-cpu.json")
    args = p.parse_args(argv)
    # stopped with SIGTERM (kill, a CI timeout): unwind, so every server started here is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    recorded = results.check_plot_flags(args)
    if recorded is not None:
        print(f"saved {plot(recorded, args.plot)}")
        return
    results.check_writable(args.out, "--out")
    if args.peer_args.strip() and "peers" not in args.only:
        raise UserError("--peer_args are the peers' flags: pass them with --only peers")
    if bool(args.lever_args.strip()) != ("lever" in args.only):
        raise UserError("--only lever measures --lever_args: pass both, e.g. --only lever --lever_args=' --freezing'")
    if args.tp < 1 or (args.tp > 1 and "peers" not in args.only):
        raise UserError(f"--tp {args.tp}: pass --tp 1 or more, with --only peers (the tp2 part has its own two ranks)")
    out = {}
    if os.path.exists(args.out):   # --only: the other parts already there are kept
        out = json.loads(open(args.out).read())
    out.update({"hardware": sysinfo.hardware(), "load_average_before": os.getloadavg(),
                "metric_definitions": loadtest.METRIC_DEFINITIONS})
    if set(args.only) - {"peers", "guidellm"}:   # the model of accelerate/burst/tp2 (peers, guidellm: per model)
        out["model"] = args.name
    if "accelerate" in args.only:
        out["accelerate"] = accelerate(args.name, args.server_args.split(), args.rounds)
    if "burst" in args.only:
        out["burst"] = burst(args.name)
    if "tp2" in args.only:
        out["tp2"] = tp2(args.name, out.get("accelerate", {}).get("expected", {}).get("one_length"))
    if "peers" in args.only:
        key = " ".join([args.name, *([f"tp={args.tp}"] if args.tp > 1 else []), *args.server_args.split()])
        key += f", peers {args.peer_args.strip()}" if args.peer_args.strip() else ""
        out.setdefault("peers", {})[key] = peers(args.name, args.peers, args.rounds, tp=args.tp,
                                                 server_args=args.server_args.split(),
                                                 peer_args=args.peer_args.split())
    if "lever" in args.only:
        key = " ".join([args.name, *args.server_args.split(), "+", *args.lever_args.split()])
        out.setdefault("levers", {})[key] = lever(args.name, args.server_args.split(), args.lever_args.split(),
                                                  args.rounds)
    if "guidellm" in args.only:
        out.setdefault("guidellm", {})[args.name] = guidellm_part(args.name, args.rounds)
    out["load_average_after"] = os.getloadavg()
    results.write_json(args.out, out)
    print(f"wrote {args.out}")
    if args.plot:
        print(f"saved {plot(out, args.plot)}")


if __name__ == "__main__":
    main()
