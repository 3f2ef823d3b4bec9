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


def first_block_shapes(model) -> dict[str, list[int]]:
    """This rank's shape of every parameter outside the decoder blocks and of block 0's (whatever
    the engine that cut them: AutoTP's local tensors, or DTensors' local parts)."""
    import re

    out = {}
    for name, p in model.named_parameters():
        if all(n == "0" for n in re.findall(r"\.(\d+)\.", name)):
            out[name] = list(p.to_local().shape if hasattr(p, "to_local") else p.shape)
    return out


def plan_problem(config, tp_size: int) -> str | None:
    """Why transformers' own TP cannot take this model at ``tp_size`` ranks (``None`` if it can):
    no plan for its architecture (``config.base_model_tp_plan``), or heads that do not split
    evenly (transformers would fail mid-forward).  The recipe's ``check_plan`` says the same."""
    from .. import arch

    if tp_size > 1 and not getattr(config, "base_model_tp_plan", None):
        return (f"{arch.model_type(config)} has no tensor-parallel plan in transformers "
                "(config.base_model_tp_plan); DeepSpeed's AutoTP takes it")
    heads, kv_heads = arch.heads_of(config), arch.kv_heads_of(config)
    if heads % tp_size or kv_heads % tp_size:
        return (f"{tp_size} ranks cannot split {heads} query / {kv_heads} key-value heads evenly; "
                f"launch a number of ranks that divides {kv_heads}")
    return None


def load_native(path, dtype: str, tp_size: int):
    """The model through transformers' own TP plan on this launch's ranks: the call the recipe
    makes (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``), used where the
    package sets it beside DeepSpeed's AutoTP in one launch (``--compare_to transformers_tp``).
    Reuses the process group that is already started.  Collective: every rank must call it."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from ..dtypes import torch_dtype

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype(dtype), distributed_config=DistributedConfig(tp_size=tp_size)).eval()


def allreduce_seconds(rows: int, hidden: int, dtype, calls: int = 100, rounds: int = 5) -> dict[str, list[float]]:
    """One all-reduce of a decode step's activations (``rows x hidden``), the two ways a TP layer
    can make it, timed in turns: DeepSpeed's ``inference_all_reduce`` (on CPUs its shared-memory
    kernel when this CPU has the vector level it needs, else the process group's) and
    ``torch.distributed.all_reduce`` on the process group (gloo on CPUs: what DTensor calls).
    Seconds per call, one sample per round.  Collective: every rank must call it."""
    import time

    import deepspeed.comm
    import torch

    x = torch.zeros(rows, hidden, dtype=dtype)
    ways = {"DeepSpeed inference_all_reduce": lambda: deepspeed.comm.inference_all_reduce(x),
            "torch.distributed.all_reduce": lambda: torch.distributed.all_reduce(x)}
    out = {k: [] for k in ways}
    for _ in range(rounds):
        for k, fn in ways.items():
            fn()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out[k].append((time.perf_counter() - t0) / calls)
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

    from .. import cli, dist, models, progress, results
    from ..errors import UserError
    from ..measure import bench, harness
    from ..prompts import eval_texts

    world = dist.world_size()
    s = cli.prepare(args)
    try:
        check(models.load_config(s["path"]), world)
    except SystemExit as exc:
        raise UserError(str(exc).removeprefix("error: ")) from None
    if args.compile:
        raise UserError("--compile is not offered with transformers' tensor parallelism here; "
                        "drop --compile (notebook 05 compiles a one-process model)")
    progress.library_bars()   # loading bars on rank 0 where a person watches; off on the other ranks
    if not dist.is_main():
        import transformers

        transformers.utils.logging.set_verbosity_error()
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
        bench.verify_ranks(records, model, models.load_tokenizer(s["path"]), s["path"], args.max_new_tokens,
               s["base_prompts"], texts=eval_texts(s["path"], args.eval_file))
    if dist.is_main():
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
        for r in records:
            print(cli.summary_line(r), flush=True)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return records
