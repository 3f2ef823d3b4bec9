"""Run one strategy variant the same way everywhere: load once, then per batch size
generate (or benchmark), optionally verify against plain ``generate``, and return result
records.  Recipes reach it through :func:`bloomkit.cli.run`; notebooks call it directly.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

from . import harness, quality

from .. import memory, models, progress, results
from ..prompts import model_prompts


class Reference(NamedTuple):
    generation: harness.Generation   # plain greedy fp32 ``generate``, with per-step scores
    logits: object                   # teacher-forced logits of those tokens
    perplexity: float | None         # on ``texts``, when given
    perplexity_windows: list | None = None   # its per-window losses (the evaluation's resolution)


def reference(path, prompts: list[str], max_new_tokens: int, texts: list[str] | None = None) -> Reference:
    """Plain fp32 ``generate`` on CPU, with per-step scores and teacher-forced logits (and
    the held-out perplexity on ``texts``): the truth every strategy is compared with (loads
    the whole model: small models only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..dtypes import from_pretrained_dtype

    model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_dtype(torch.float32)).eval()
    tok = models.load_tokenizer(path)
    gen = harness.generate(model, tok, prompts, max_new_tokens, device="cpu", return_scores=True)
    logits = quality.sequence_logits(model, tok, gen.prompts, gen.tokens, device="cpu")
    ppl, windows = quality.perplexity(model, tok, texts, device="cpu", windows=True) if texts else (None, None)
    del model
    return Reference(gen, logits, ppl, windows)


def run_variant(*, strategy: str, name: str, load: Callable | None = None, path: str | Path | None = None,
                dtype: str = "fp32", device: str = "cpu", batch_sizes=(1,), max_new_tokens: int = 100,
                options: dict | None = None, prompts: list[str] | None = None,
                cycles: int | None = None, verify: bool = False, budget: int | None = None,
                world_size: int = 1, generate_fn: Callable | None = None,
                token_multiplier: int = 1, model=None, load_seconds: float | None = None,
                compile: bool = False, eval_file: str | None = None) -> list[dict]:
    """Result records of one strategy variant, one per batch size.

    ``load(path, dtype, device)`` builds the model ("start to ready" is timed around it);
    pass ``model`` (and ``load_seconds``) instead to reuse one already loaded.
    ``cycles``: ``None`` generates once; a number benchmarks (1 warm-up + ``cycles``).
    ``budget``: bytes standing in for device memory — batch sizes whose estimated need
    (weights + KV cache + activations) exceeds it are recorded as ``oom``, like the blog's
    tables; a real out-of-memory error during a sweep is recorded the same way.
    ``generate_fn(model, tok, prompts, n)`` replaces :func:`harness.generate`.
    ``token_multiplier``: ranks that each generate their own stream count all ranks' tokens.
    ``compile``: a static KV cache and the decode step compiled (:func:`harness.compile_kwargs`);
    the warm-up call pays the compilation, recorded as ``warmup_seconds``, and ``recompiles``
    counts graphs built during the timed cycles (0 when shapes are stable).
    ``verify`` also measures held-out perplexity beside the reference's when there is text for
    it (``eval_file``, or the sample a trained checkpoint ships: :func:`quality.eval_texts`).
    Prompts default to the model's own (``prompts.txt`` in its directory), else the blog's 8.
    """
    path = Path(path) if path is not None else models.resolve_model(name)
    config = models.load_config(path)
    prompts = prompts or model_prompts(path)
    texts = quality.eval_texts(path, eval_file) if verify else None
    options = dict(options or {})
    if model is None:
        with harness.LoadTimer() as lt:
            model = load(path, dtype, device)
        load_seconds = lt.seconds
        ready_after_start = process_age_seconds()   # the real start to ready: process start included
    else:
        ready_after_start = None
    if hasattr(model, "hf_device_map"):
        options.setdefault("placement", placement(model))
    tok = models.load_tokenizer(path)
    extra = {}
    if compile:
        harness.check_compilable(model)
        extra = harness.compile_kwargs(device)
        options["compile"] = True
    gen_fn = generate_fn or (lambda m, t, p, n: harness.generate(m, t, p, n, **extra))
    records, ppl, ref_ppl, ppl_windows, ref_windows = [], None, None, None, None
    # one step per batch size, on a terminal only (rank 0; nothing in logs or notebooks)
    sweep = progress.bar(batch_sizes, desc=f"{strategy} {name}", leave=False,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} batch sizes [{elapsed}{postfix}]")
    for bs in sweep:   # (the bar closes itself when the loop ends, or raises)
        sweep.set_postfix_str(f"bs={bs} running" + (f"; last {_sweep_note(records[-1])}" if records else ""))
        rows = harness.make_prompts(bs, prompts)
        common = dict(strategy=strategy, model=name, dtype=dtype, batch_size=bs,
                      max_new_tokens=max_new_tokens, load_seconds=load_seconds,
                      world_size=world_size, options=options, cycles=cycles)
        need = memory.weight_bytes(config, dtype) + memory.generate_extra_bytes(
            config, bs, 64 + max_new_tokens, dtype)
        if budget is not None and need > budget:
            records.append(results.make_record(**common, status=results.OOM,
                                               error=f"estimated {need} B > budget {budget} B"))
            continue
        try:
            one = lambda: gen_fn(model, tok, rows, max_new_tokens)  # noqa: E731
            if cycles:
                timing = harness.time_generation(one, batch_size=bs * token_multiplier,
                                                 max_new_tokens=max_new_tokens, cycles=cycles)
                gen = timing.generation
            else:
                timing, gen = None, one()
        except Exception as exc:  # noqa: BLE001
            if not harness.is_oom(exc) or len(batch_sizes) == 1:
                raise
            records.append(results.make_record(**common, status=results.OOM, error=str(exc)[:200]))
            continue
        qual = None
        if verify:
            # perplexity does not depend on the batch: measured once per variant (and reference)
            ref = reference(path, rows, max_new_tokens, texts if ref_ppl is None else None)
            if ref_ppl is None:
                ref_ppl, ref_windows = ref.perplexity, ref.perplexity_windows
            qual = quality.quality_report(ref.generation, ref.logits, gen, model, tok, texts=texts,
                                          reference_perplexity=ref_ppl, perplexity_value=ppl,
                                          reference_windows=ref_windows, perplexity_windows=ppl_windows)
            ppl, ppl_windows = qual.get("perplexity"), qual.get("perplexity_windows")
        records.append(results.make_record(**common, timing=timing, generation=gen, quality=qual))
    for r in records:   # imports, process group and load, from the process's own start
        r["process_start_to_ready_s"] = ready_after_start
    if world_size > 1:  # a collective: every rank's own generation peak beside this rank's
        from ..dist import gather

        per_rank = gather([r.get("peak_rss_bytes") for r in records])
        for i, r in enumerate(records):
            r["peak_rss_bytes_per_rank"] = [p[i] if i < len(p) else None for p in per_rank]
    return records


def _sweep_note(record: dict) -> str:
    """The sweep bar's word on the last batch size: its ms/token, or why it has none."""
    ms, bs = record.get("ms_per_token"), record["batch_size"]
    if record["status"] != "ok":
        return f"bs={bs} {record['status']}"
    return f"bs={bs} {ms:.2f} ms/token" if isinstance(ms, float) else f"bs={bs} done"


def process_age_seconds() -> float | None:
    """Seconds since this process started (``/proc/self/stat`` start time against
    ``/proc/uptime``): for a launched recipe, the interpreter start, imports, process group and
    model load before the first token is possible.  ``None`` where /proc does not say."""
    import os

    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_recipe(args, *, strategy: str, load: Callable, options: dict, world_size: int = 1,
        generate_fn: Callable | None = None, is_main: bool = True, token_multiplier: int = 1) -> list[dict]:
    """A recipe's run: validate the shared flags, :func:`run_variant`, write and print.

    ``load(path, dtype, device)`` returns the model; see ``run_variant`` for the rest.
    """
    from ..cli import prepare, summary_line

    s = prepare(args)
    records = run_variant(
        strategy=strategy, name=args.name, path=s["path"], dtype=s["dtype"], device=s["device"],
        batch_sizes=args.batch_size, max_new_tokens=args.max_new_tokens, load=load,
        options=options, prompts=s["base_prompts"], cycles=args.cycles if args.benchmark else None,
        verify=args.verify and is_main, budget=s["budget"], world_size=world_size,
        generate_fn=generate_fn, token_multiplier=token_multiplier, compile=args.compile,
        eval_file=args.eval_file)
    if is_main:
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
        for r in records:
            print(summary_line(r), flush=True)
    return records


def placement(model) -> dict:
    """How many modules of the loaded model sit on each device (``hf_device_map``)."""
    hf_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    return {str(k): v for k, v in Counter(str(v) for v in hf_map.values()).items()}


def verify_ranks(records, model, tok, path, max_new_tokens: int, base_prompts=None, texts=None) -> None:
    """Attach ``quality`` (vs plain fp32 ``generate``) to rank 0's records of a launch whose ranks share
    one model (tensor parallelism: DeepSpeed's AutoTP or transformers' own).  Collective:
    rank 0 computes the reference, every rank runs the teacher-forced TP forward (and the
    perplexity forward on ``texts``)."""
    from ..dist import broadcast, is_main

    for rec in records:
        if rec["status"] != "ok":
            continue
        rows = harness.make_prompts(rec["batch_size"], base_prompts)
        ref = None
        if is_main():
            ref = reference(path, rows, max_new_tokens, texts)
        ref_tokens = broadcast(ref.generation.tokens if ref is not None else None)
        if is_main():
            gen = harness.Generation(prompts=rec["prompts"], tokens=rec["tokens"], texts=rec["texts"])
            rec["quality"] = quality.quality_report(ref.generation, ref.logits, gen, model, tok,
                                                    texts=texts, reference_perplexity=ref.perplexity,
                                                    reference_windows=ref.perplexity_windows)
        else:
            quality.sequence_logits(model, tok, rows, ref_tokens)
            if texts:
                quality.perplexity(model, tok, texts)
