#!/usr/bin/env python
"""Speculative decoding on this machine's CPU: ``trained`` (fp32, batch 1) with its draft and with
prompt lookup against plain greedy ``generate``, interleaved; prints and saves JSON.

    python benchmarks/speculative.py [--out benchmarks/results/speculative-cpu.json] [--cycles 5]
                                     [--plot speculative.png] [--from benchmarks/results/speculative-cpu.json]

One cycle = every prompt of ``trained`` once with each method (plain, draft, prompt lookup of 3, 5, 10) and
the same prompts as one batch of 2, 4 and 8 rows with plain ``generate``, the methods taking turns
so each cycle's numbers saw the same machine.  Per method: the tokens are checked equal to plain
greedy ``generate``'s (every prompt), tokens per forward of the model (speculation's whole
point: N tokens from fewer than N forwards), ms per token and the comparison with plain
(``bloomkit.measure.compare``: a verdict needs >= 5 cycles whose ratios all lie on one side of 1).
"Where it stops paying": plain batches make each token cheaper too; the smallest batch whose
per-token time beats the better speculative method at batch 1 is reported.  --plot draws the JSON as
a PNG; with --from it redraws a recorded file without running anything.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bloomkit import models, results, sysinfo
from bloomkit.errors import UserError, cli_entry
from bloomkit.measure import compare
from bloomkit.strategies.speculative import counting_forwards


def forward_cost(model, tok, prompt: str, ks=(1, 2, 4, 10), cycles: int = 20) -> dict:
    """What checking k proposals costs: one forward of k new tokens over the prompt's cache, in
    single-token decode steps (medians of interleaved calls).  Speculation pays when the tokens a
    forward yields exceed what the forward costs; on a model whose weights sit in the CPU's caches a
    forward of k tokens costs more than one of 1, so its speed-up stays below its tokens per forward."""
    x = tok([prompt], return_tensors="pt")
    with torch.inference_mode():
        cache = model(**x, use_cache=True).cache
        ids = x["input_ids"][:, -1:]

        def check(k):
            model(input_ids=ids.repeat(1, k), cache=cache, use_cache=True)
            cache.crop(-k)         # drop the k checked positions: back to the prompt's keys and values

        times = compare.interleaved({k: (lambda k=k: check(k)) for k in ks}, cycles=cycles)
    one = statistics.median(times[ks[0]])
    return {str(k): round(statistics.median(t) / one, 3) for k, t in times.items()}


def run(cycles: int = 5, new_tokens: int = 40, lookups=(3, 5, 10)) -> dict:
    path, draft_path = models.resolve_model("trained"), models.resolve_model("trained-draft")
    tok = models.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_path), dtype=torch.float32).eval()
    prompts = json.loads((path / "prompts.json").read_text())
    prompts = prompts["prompts"] if isinstance(prompts, dict) else prompts

    def gen(rows, **spec):
        x = tok(rows, return_tensors="pt", padding=True)
        at_least = ({"min_length": x["input_ids"].shape[1] + new_tokens} if spec
                    else {"min_new_tokens": new_tokens})
        with torch.inference_mode(), counting_forwards(model) as n:
            out = model.generate(**x, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **at_least, **spec)
        return out[:, x["input_ids"].shape[1]:].tolist(), n[0]

    methods = {"plain": {}, "draft": {"assistant_model": draft},
               **{f"prompt lookup {n}": {"prompt_lookup_num_tokens": n} for n in lookups}}
    plain_tokens = {p: gen([p])[0][0] for p in prompts}
    check, forwards = {}, {}
    for name, spec in methods.items():
        got = {p: gen([p], **spec) for p in prompts}
        check[name] = all(got[p][0][0] == plain_tokens[p] for p in prompts)
        forwards[name] = sum(f for _, f in got.values())
    calls = {name: (lambda spec=spec: [gen([p], **spec) for p in prompts]) for name, spec in methods.items()}
    for bs in (2, 4, 8):
        rows = [prompts[i % len(prompts)] for i in range(bs)]
        calls[f"plain batch {bs}"] = lambda rows=rows, k=len(prompts) // bs: [gen(rows) for _ in range(k)]
    t0 = time.perf_counter()
    times = compare.interleaved(calls, cycles=cycles)
    tokens = len(prompts) * new_tokens      # every call generates this many tokens in all
    out = {"model": "trained", "draft": "trained-draft", "dtype": "fp32", "new_tokens": new_tokens,
           "prompt_lookup_num_tokens": list(lookups), "cycles": cycles, "prompts": len(prompts),
           "seconds": round(time.perf_counter() - t0, 1), "samples_s": times, "methods": {}}
    out["forward_cost_in_steps"] = forward_cost(model, tok, prompts[0])
    print("a forward checking k tokens costs, in single-token steps: "
          + ", ".join(f"k={k}: {v:.2f}" for k, v in out["forward_cost_in_steps"].items()), flush=True)
    for name in calls:
        ms = [t * 1000 / tokens for t in times[name]]
        row = {"ms_per_token": statistics.median(ms), "ms_per_token_range": [min(ms), max(ms)]}
        if name in methods:
            row.update(tokens_identical=check[name],
                       tokens_per_forward=len(prompts) * new_tokens / forwards[name])
        if name != "plain":
            c = compare.compare_times(times[name], times["plain"])
            row["vs_plain_batch_1"] = {"ratio": c.ratio, "low": c.low, "high": c.high, "pairs": c.pairs,
                                       "verdict": c.verdict, "sentence": c.sentence(name, "plain batch 1")}
        out["methods"][name] = row
        print(f"{name:>16}: {row['ms_per_token']:.2f} ms/token"
              + (f", {row['tokens_per_forward']:.2f} tokens per forward, identical {row['tokens_identical']}"
                 if name in methods else "")
              + (f"; {row['vs_plain_batch_1']['sentence']}" if name != "plain" else ""), flush=True)
    best = min((m for m in methods if m != "plain"), key=lambda m: out["methods"][m]["ms_per_token"])
    beaten = [bs for bs in (2, 4, 8) if compare.compare_times(
        times[f"plain batch {bs}"], times[best]).verdict == compare.FASTER]
    out["best_speculative"] = best
    out["plain_batch_that_beats_it"] = beaten[0] if beaten else None
    print(f"the better method at batch 1 is {best}; " + (
        f"plain generate at batch {beaten[0]} gives cheaper tokens (per token, by the rule above)"
        if beaten else "no plain batch up to 8 gives measurably cheaper tokens"), flush=True)
    return out


def plot(out: dict, path) -> Path:
    """Draw ``out`` (the JSON this script writes) as one PNG at ``path``: ms per token of every
    method with the range of its cycles, tokens per forward of each speculative method, and what a
    forward checking k tokens costs in single-token steps."""
    methods = out.get("methods")
    if not methods:
        raise UserError("nothing to draw: the JSON has no 'methods'; pass a file that benchmarks/speculative.py wrote")
    cost = out.get("forward_cost_in_steps") or {}
    fig, axes = results.figure(3 if cost else 2, width=5.5)
    names = list(methods)
    ax = axes[0]
    colors = ["tab:gray" if n == "plain" else "tab:blue" if n.startswith("plain batch") else "tab:orange" for n in names]
    meds = [methods[n]["ms_per_token"] for n in names]
    lo_hi = [methods[n].get("ms_per_token_range") or (m, m) for n, m in zip(names, meds)]
    ax.bar(range(len(names)), meds, color=colors)
    ax.errorbar(range(len(names)), meds, yerr=[[m - r[0] for m, r in zip(meds, lo_hi)], [r[1] - m for m, r in zip(meds, lo_hi)]],
                fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(range(len(names)), [n.replace("prompt lookup", "lookup").replace("plain batch", "batch") for n in names],
                  rotation=30, ha="right")
    ax.set(ylabel=f"ms per token (median; bars: range of {out.get('cycles', '?')} cycles)",
           title=f"{out.get('model')} {out.get('dtype')}: speculative (orange) vs plain batches (blue)")
    if "plain" in methods:
        ax.axhline(methods["plain"]["ms_per_token"], color="tab:gray", ls="--", lw=1)
    ax.grid(True, axis="y", alpha=0.3)
    spec = [n for n in names if "tokens_per_forward" in methods[n]]
    results.plot_bars(axes[1], [n.replace("prompt lookup", "lookup") for n in spec],
                      {"tokens per forward": [methods[n]["tokens_per_forward"] for n in spec],
                       "speed-up over plain": [methods["plain"]["ms_per_token"] / methods[n]["ms_per_token"]
                                               for n in spec]},
                      "per forward / ratio", title="what a forward yields against what it gains")
    if cost:
        ks = sorted(cost, key=int)
        axes[2].plot([int(k) for k in ks], [cost[k] for k in ks], "o-", label="measured")
        axes[2].plot([int(k) for k in ks], [1.0] * len(ks), "--", color="gray", label="free (as one step)")
        axes[2].set(xlabel="tokens checked in one forward (k)", ylabel="cost in single-token steps",
                    title="what checking k proposals costs")
        axes[2].legend(fontsize=8)
        axes[2].grid(True, alpha=0.3)
    hw = out.get("hardware") or {}
    fig.suptitle(f"speculative decoding on {hw.get('cpu', 'this CPU')} ({hw.get('cpu_cores', '?')} cores), "
                 f"measured {out.get('measured_on', '?')}")
    return results.save_png(fig, path)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/speculative-cpu.json", metavar="JSON",
                   help="the result file, rewritten whole (default: %(default)s)")
    p.add_argument("--cycles", type=int, default=5,
                   help="interleaved cycles, each every method over every prompt; 5 or more for a "
                        "verdict, each ~10 s here (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=40,
                   help="new tokens per prompt and call; longer runs give speculation more to guess "
                        "(default: %(default)s)")
    results.add_plot_flags(p, "benchmarks/results/speculative-cpu.json")
    args = p.parse_args(argv)
    recorded = results.check_plot_flags(args)
    if recorded is not None:
        print(f"saved {plot(recorded, args.plot)}")
        return
    torch.set_num_threads(1)
    out = run(args.cycles, args.new_tokens)
    out.update(hardware=sysinfo.hardware(), versions=sysinfo.versions(), measured_on=time.strftime("%Y-%m-%d"))
    results.write_json(args.out, out)
    print(f"saved {args.out}")
    if args.plot:
        print(f"saved {plot(out, args.plot)}")


if __name__ == "__main__":
    main()
