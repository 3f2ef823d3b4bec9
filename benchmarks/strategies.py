#!/usr/bin/env python
"""Benchmarks of the DeepSpeed strategies, measured on this machine; prints and saves JSON.

    python benchmarks/strategies.py [--out benchmarks/results/strategies-cpu.json]
                                    [--only tp tp_compile preshard zero zero_nvme_4bit native_tp]
                                    [--plot strategies.png] [--from benchmarks/results/strategies-cpu.json]

With --only, the other parts already in --out are kept.  --plot draws the parts in the JSON as a
PNG; with --from it redraws a recorded file without running anything.

* tp: AutoTP ms/token at TP = 1, 2, 4 on ``small``, batch 1 and 8, ratio to TP = 1;
* tp_compile: ``bench`` at TP = 1 and 2 (CPU ranks: one memory stream per core), eager and with
  ``--compile``, every ratio against eager TP = 1;
* preshard: "start to ready" from per-rank shards vs the full checkpoint at TP = 2 on ``bench``
  (warm and cold page cache);
* zero: ZeRO-Inference none / cpu / nvme on ``small`` at batch 1, 8, 32, NVMe next to its
  disk-read roofline.  Its "nvme 4-bit" rows are *not* a disk figure: on ``small`` only one
  4-bit partition (the embedding) reaches DeepSpeed's 1 MiB swap threshold, every other matrix
  stays in RAM; they are relabelled so (``zero_nvme_4bit`` is the disk figure);
* zero_nvme_4bit: fp32 vs 4-bit weights, both swapped to NVMe, on ``bench`` (97 fp32 / 73 4-bit
  partitions on disk), launches interleaved (fp32, 4-bit, fp32, 4-bit, ...) with the bytes each
  read from disk per token (``/proc/<pid>/io``) and the disk's bandwidth measured around each.

* native_tp: transformers' own TP (``recipes/transformers_tp.py``) against DeepSpeed's AutoTP at TP=2 on
  ``bench-llama``, launches taking turns over 5 rounds, both checked against plain fp32 ``generate``.

Every number is a real launch of the recipes (2 cores: ``zero_nvme_4bit`` takes ~15 minutes).
"""
import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bloomkit import launch, microbench, models
from bloomkit.errors import UserError, cli_entry
from bloomkit.measure import compare
from bloomkit.strategies import zero


def zero_nvme_4bit(name: str = "bench", batch_sizes=(1, 8), new_tokens: int = 8, cycles: int = 1,
                   rounds: int = 2, nvme_dir=None) -> dict:
    """fp32 vs 4-bit ZeRO-Inference with every swappable partition on NVMe, interleaved launches.

    Refuses a model whose 4-bit partitions would not reach the disk (the figure would then
    measure RAM, not NVMe).  Per launch and batch size: ms/token, partitions on disk, bytes read
    from disk per step and per token during the timed cycles, and the disk's O_DIRECT read
    bandwidth (mean of the measurements before and after the launch)."""
    path = models.resolve_model(name)
    config = models.load_config(path)
    variants = {"fp32": None, "4-bit": 4}
    swapped = {label: zero.swapped_partitions(config, "fp32", 1, bits)[0] for label, bits in variants.items()}
    if not swapped["4-bit"]:
        raise UserError(f"{name}: no 4-bit partition reaches DeepSpeed's 1 MiB swap threshold, so a 4-bit "
                        "NVMe run would read nothing from disk; use a larger model (bench)")
    bs = ",".join(map(str, batch_sizes))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bloomkit-nvme-", dir=nvme_dir or os.path.expanduser("~")) as nv:
        for k in range(rounds):
            for label, bits in variants.items():
                before = zero.read_bandwidth(nv)
                recs = launch.launch_records("ds_zero_inference.py", [
                    "--name", name, "--batch_size", bs, "--max_new_tokens", str(new_tokens),
                    "--benchmark", "--cycles", str(cycles), "--nvme_offload_path", nv,
                    *(["--quant_bits", str(bits)] if bits else [])], 1, launcher="python", timeout=1800)
                after = zero.read_bandwidth(nv)
                for r in recs:
                    z = r["options"]["zero"]
                    rows.append({"variant": z["variant"], "round": k, "batch_size": r["batch_size"],
                                 "ms_per_token": r["ms_per_token"], "load_s": r["load_seconds"],
                                 "swapped_partitions": z["swapped_partitions"],
                                 "swap_bytes_on_disk": z["swap_after_load"]["bytes"],
                                 "disk_read_bytes_per_step": z.get("disk_read_bytes_per_step"),
                                 "disk_read_bytes_per_token": z.get("disk_read_bytes_per_token"),
                                 "disk_read_GBps": (before + after) / 2e9})
                print(rows[-1], flush=True)
    summary = {}
    for v in dict.fromkeys(r["variant"] for r in rows):
        for b in batch_sizes:
            rs = [r for r in rows if r["variant"] == v and r["batch_size"] == b]
            ms = statistics.median(r["ms_per_token"] for r in rs)
            per_token = statistics.median(r["disk_read_bytes_per_token"] or 0 for r in rs)
            bw = statistics.mean(r["disk_read_GBps"] for r in rs) * 1e9
            roof = per_token / bw * 1000 if bw else None
            summary.setdefault(v, {})[b] = {
                "ms_per_token": ms, "disk_read_bytes_per_token": per_token,
                "disk_read_bytes_per_step": statistics.median(r["disk_read_bytes_per_step"] or 0 for r in rs),
                "disk_roofline_ms_per_token": roof, "over_disk_roofline": ms / roof if roof else None}
    fp32, q4 = (zero.variant_label("nvme", bits, swapped[label]) for label, bits in variants.items())
    return {"model": name, "dtype": "fp32", "new_tokens": new_tokens, "cycles": cycles, "rounds": rounds,
            "swapped_partitions": {fp32: swapped["fp32"], q4: swapped["4-bit"]}, "rows": rows,
            "summary": summary,
            "nvme_4bit_speedup": {b: summary[fp32][b]["ms_per_token"] / summary[q4][b]["ms_per_token"]
                                  for b in batch_sizes},
            # launches alternated fp32, 4-bit, ...: one pair per round; a verdict needs >= 5 (bloomkit.measure.compare)
            "nvme_4bit_vs_fp32": {b: _verdict(rows, q4, fp32, b) for b in batch_sizes}}


def _verdict(rows: list[dict], a: str, b: str, batch_size: int) -> dict:
    pick = lambda v: [r["ms_per_token"] for r in rows if r["variant"] == v and r["batch_size"] == batch_size]
    c = compare.compare_times(pick(a), pick(b))
    return {"ratio": c.ratio, "low": c.low, "high": c.high, "pairs": c.pairs, "verdict": c.verdict,
            "sentence": c.sentence(a, b)}


def native_vs_autotp(name: str = "bench-llama", batch_sizes=(1, 8), new_tokens: int = 16, cycles: int = 2,
                     rounds: int = 5) -> dict:
    """transformers' own tensor parallelism (``recipes/transformers_tp.py``, DTensor) against DeepSpeed's
    AutoTP (``recipes/ds_inference.py``), both TP=2 on CPU ranks, one launch of each per round, taking
    turns.  The first round checks both against plain fp32 ``generate`` (``--verify``); per batch size
    the rounds' ms/token pair up for :func:`bloomkit.measure.compare.compare_times` (a verdict needs 5)."""
    bs = ",".join(map(str, batch_sizes))
    engines = {"transformers": ("transformers_tp.py", "torchrun"), "deepspeed": ("ds_inference.py", "deepspeed")}
    rows = []
    for k in range(rounds):
        for label, (script, launcher) in engines.items():
            recs = launch.launch_records(script, [
                "--name", name, "--batch_size", bs, "--max_new_tokens", str(new_tokens), "--benchmark",
                "--cycles", str(cycles), *(["--verify"] if k == 0 else [])], 2, launcher=launcher, timeout=1800)
            for r in recs:
                rows.append({"engine": label, "round": k, "batch_size": r["batch_size"],
                             "ms_per_token": r["ms_per_token"], "load_s": r["load_seconds"],
                             "identical": (r.get("quality") or {}).get("identical")})
            print(rows[-1], flush=True)
    summary = {}
    for b in batch_sizes:
        pick = lambda e: [r["ms_per_token"] for r in rows if r["engine"] == e and r["batch_size"] == b]  # noqa: E731
        c = compare.compare_times(pick("transformers"), pick("deepspeed"))
        summary[b] = {"ratio": c.ratio, "low": c.low, "high": c.high, "pairs": c.pairs, "verdict": c.verdict,
                      "sentence": c.sentence("transformers' TP", "DeepSpeed AutoTP") + f" at batch {b}"}
        print(summary[b]["sentence"], flush=True)
    return {"model": name, "dtype": "fp32", "tp_size": 2, "new_tokens": new_tokens, "cycles": cycles,
            "rounds": rounds, "rows": rows, "summary": summary,
            "identical": {e: all(r["identical"] for r in rows if r["engine"] == e and r["round"] == 0)
                          for e in engines}}


def honest_zero(part: dict) -> dict:
    """The ``zero`` part with its NVMe 4-bit rows labelled by what they did: on a model whose
    4-bit partitions mostly stay under the 1 MiB swap threshold, "nvme 4-bit" is not a disk
    figure (idempotent; applied to measurements already in the file too)."""
    if not part or "rows" not in part:
        return part
    config = models.load_config(models.resolve_model(part["model"]))
    n_fp32 = zero.swapped_partitions(config, part.get("dtype", "fp32"))[0]
    n_4bit = zero.swapped_partitions(config, quant_bits=4)[0]
    part["swapped_partitions"] = {"nvme": n_fp32, "nvme 4-bit": n_4bit}
    if n_4bit * 2 < n_fp32:  # most of its matrices stay in RAM
        label = f"nvme 4-bit ({n_4bit} of {n_fp32} partitions on disk, the rest in RAM)"
        for r in part["rows"]:
            if r["variant"] == "nvme 4-bit":
                r["variant"] = label
        if "nvme_4bit_speedup" in part:
            part["nvme_4bit_vs_fp32_not_a_disk_figure"] = part.pop("nvme_4bit_speedup")
        part["nvme_4bit_note"] = (f"{part['model']}: in 4-bit only {n_4bit} partition(s) reach DeepSpeed's 1 MiB "
                                  f"swap threshold (fp32: {n_fp32}), so its 4-bit run reads almost nothing "
                                  "from disk; the 4-bit NVMe figure is zero_nvme_4bit (bench)")
    return part


PARTS = {
    "tp": lambda: microbench.tp_scaling("small"),
    "tp_compile": lambda: microbench.tp_scaling("bench", (1, 2), (1, 8), cycles=3, rounds=1, compile_too=True),
    "preshard": lambda: microbench.preshard_load_ratio("bench", 2, repeats=5),
    "zero": lambda: honest_zero(microbench.zero_offload("small")),
    "zero_nvme_4bit": lambda: zero_nvme_4bit("bench"),
    "native_tp": lambda: native_vs_autotp("bench-llama"),
}


def _by(rows: list[dict], key: str) -> dict:
    """``rows`` grouped by ``key``, in first-seen order."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _median_range(values: list[float]) -> tuple[float, tuple[float, float]]:
    return statistics.median(values), (min(values), max(values))


def plot(out: dict, path) -> Path:
    """Draw the parts present in ``out`` (the JSON this script writes) as one PNG at ``path``,
    a panel per part; where a part kept several rounds or repeats, the bar is their median and
    its error bar their range."""
    from bloomkit import results

    panels = [name for name in PARTS if out.get(name)]
    if not panels:
        raise UserError(f"nothing to draw: the JSON holds none of the parts {', '.join(PARTS)}; pass a file "
                        "that benchmarks/strategies.py wrote")
    fig, axes = results.figure(len(panels))
    for name, ax in zip(panels, axes):
        part = out[name]
        rows = part.get("rows") or []
        if name in ("tp", "tp_compile"):
            for (bs, compiled), rs in _by([{**r, "key": (r["batch_size"], r.get("compiled"))} for r in rows],
                                          "key").items():
                label = f"batch {bs}" + ({True: ", compiled", False: ", eager"}.get(compiled, ""))
                ax.plot([r["tp_size"] for r in rs], [r["ms_per_token"] for r in rs], "o-", label=label)
            ax.set(xlabel="TP ranks (CPU processes)", ylabel="ms per token", yscale="log",
                   xticks=sorted({r["tp_size"] for r in rows}))
            ax.set_title(f"{name}: AutoTP on {part['model']}, {part.get('cpu_cores', '?')} cores", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        elif name == "preshard":
            modes = [m for m in ("warm", "cold") if m in part]
            med = {k: [_median_range(part[m][f"{k}_s"]) for m in modes] for k in ("full", "shards")}
            results.plot_bars(ax, [f"{m} page cache" for m in modes],
                              {"full checkpoint": [v[0] for v in med["full"]],
                               "per-rank shards": [v[0] for v in med["shards"]]},
                              "seconds to ready (median)",
                              spread={"full checkpoint": [v[1] for v in med["full"]],
                                      "per-rank shards": [v[1] for v in med["shards"]]},
                              title=f"preshard: load at TP={part['tp_size']} on {part['model']}")
        elif name == "zero":
            variants = _by(rows, "variant")
            sizes = sorted({r["batch_size"] for r in rows})
            results.plot_bars(ax, [f"batch {b}" for b in sizes],
                              {v[:40]: [next((r["ms_per_token"] for r in rs if r["batch_size"] == b), None)
                                        for b in sizes] for v, rs in variants.items()},
                              "ms per token", log=True, title=f"zero: ZeRO-Inference offload on {part['model']}")
        else:   # zero_nvme_4bit and native_tp: rounds of launches taking turns
            key = "variant" if name == "zero_nvme_4bit" else "engine"
            sides = _by(rows, key)
            sizes = sorted({r["batch_size"] for r in rows})
            stats = {k: [_median_range([r["ms_per_token"] for r in rs if r["batch_size"] == b]) for b in sizes]
                     for k, rs in sides.items()}
            results.plot_bars(ax, [f"batch {b}" for b in sizes], {k: [v[0] for v in st] for k, st in stats.items()},
                              f"ms per token (median of {part.get('rounds', '?')} rounds)",
                              spread={k: [v[1] for v in st] for k, st in stats.items()}, log=True,
                              title=(f"zero_nvme_4bit: weights swapped to disk, {part['model']}"
                                     if name == "zero_nvme_4bit" else
                                     f"native_tp: TP={part['tp_size']} on {part['model']}"))
    hw = out.get("hardware") or {}
    fig.suptitle(f"strategy benchmarks on {hw.get('cpu', '?')} ({hw.get('cpu_cores', '?')} cores; a part "
                 "measured on another machine names it in the JSON)")
    return results.save_png(fig, path)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/strategies-cpu.json", metavar="JSON",
                   help="the result file; with --only, the parts already in it and not rerun are "
                        "kept, with the machine they were measured on (default: %(default)s)")
    p.add_argument("--only", nargs="*", choices=sorted(PARTS), default=list(PARTS), metavar="PART",
                   help=f"the parts to run, of {', '.join(PARTS)} (each described above); each "
                        "launches the recipes for real on CPU ranks: minutes each on 2 cores, "
                        "zero_nvme_4bit ~15, swapping the bench model's weights to a temporary "
                        "folder under HOME (default: every part)")
    from bloomkit import results

    results.add_plot_flags(p, "benchmarks/results/strategies-cpu.json")
    args = p.parse_args(argv)
    recorded = results.check_plot_flags(args)
    if recorded is not None:
        print(f"saved {plot(recorded, args.plot)}")
        return
    before = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    out = microbench.run_parts(PARTS, args.only, args.out)
    if set(args.only) != set(PARTS) and "hardware" in before:
        # the parts kept from the file were measured on the machine named at the top: keep it
        # there, and name this machine inside the parts measured now
        for name in args.only:
            out[name].update(hardware=out["hardware"], versions=out["versions"])
        out.update(hardware=before["hardware"], versions=before["versions"])
    if "zero" in out and "zero" not in args.only:  # earlier measurements, labelled by what they did
        out["zero"] = honest_zero(out["zero"])
    results.write_json(args.out, out)
    if args.plot:
        print(f"saved {plot(out, args.plot)}")


if __name__ == "__main__":
    main()
