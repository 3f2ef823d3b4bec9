"""transformers' own tensor parallelism (``DistributedConfig(tp_size=N)``, PyTorch DTensor) inside
the repository: ``recipes/transformers_tp.py``'s load, with the package's checks, records and
``--verify`` around it.

What DeepSpeed's AutoTP does by replacing modules after a full load, transformers does from the
model's own plan (``config.base_model_tp_plan``) while loading: each rank reads only its slice.
"""
from __future__ import annotations

from typing import Callable

STRATEGY = "transformers-tp"


def sharded(model) -> dict[str, dict]:
    """What this rank holds of each parameter the plan split: ``{name: {"placement", "local",
    "full"}}`` (DTensor placements: ``Shard(0)`` column-wise, ``Shard(1)`` row-wise)."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "to_local") and hasattr(p, "placements"):
            out[name] = {"placement": str(p.placements[0]), "local": list(p.to_local().shape),
                         "full": list(p.shape)}
    return out


def run(args, load: Callable, check: Callable) -> list[dict]:
    """``recipes/transformers_tp.py`` inside the repository: the shared flags checked, the recipe's
    ``check(config, tp_size)`` before anything loads (as a one-line error), then the recipe's
    ``load(name, dtype, tp_size)`` timed, generation or the benchmark on every rank, ``--verify``
    (collective: every rank runs the teacher-forced forward); rank 0 prints and writes ``--json_out``.

    Args:
        args: the recipe's parsed flags (with :func:`bloomkit.cli.add_package_flags`).
        load: the recipe's ``load_model``.
        check: the recipe's ``check_plan``.
    """
    import torch

    from .. import cli, dist, models, results
    from ..errors import UserError
    from ..measure import bench, harness
    from ..prompts import eval_texts
    from .tp import verify

    world = dist.world_size()
    s = cli.prepare(args)
    try:
        check(models.load_config(s["path"]), world)
    except SystemExit as exc:
        raise UserError(str(exc).removeprefix("error: ")) from None
    if args.compile:
        raise UserError("--compile is not offered with transformers' tensor parallelism here; "
                        "drop --compile (notebook 05 compiles a one-process model)")
    if not dist.is_main():
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    with harness.LoadTimer() as lt:   # "start to ready": the recipe's load, every rank reading its slices
        model = load(str(s["path"]), s["dtype"], world)
    ready_after_start = bench.process_age_seconds()
    records = bench.run_variant(
        strategy=STRATEGY, name=args.name, path=s["path"], dtype=s["dtype"], device=s["device"],
        batch_sizes=args.batch_size, max_new_tokens=args.max_new_tokens, model=model,
        load_seconds=lt.seconds, options={"tp_size": world, "engine": "transformers DTensor",
                                          "sharded": sharded(model)},
        prompts=s["base_prompts"], cycles=args.cycles if args.benchmark else None,
        budget=s["budget"], world_size=world)
    for r in records:
        r["process_start_to_ready_s"] = ready_after_start
    if args.verify:
        verify(records, model, models.load_tokenizer(s["path"]), s["path"], args.max_new_tokens,
               s["base_prompts"], texts=eval_texts(s["path"], args.eval_file))
    if dist.is_main():
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
        for r in records:
            print(cli.summary_line(r), flush=True)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return records
