"""Strategy 2: DeepSpeed-Inference tensor parallelism (TP) — every rank busy on every layer.

The recipe's flow, for any causal LM that DeepSpeed's AutoTP knows: check the flags and the
model before anything is loaded, start the process group, load this rank's slice (from the
full checkpoint, from pre-sharded files, or from DeepSpeed's checkpoint json), describe what
each rank holds, then generate or benchmark on every rank and verify on rank 0:
:func:`prepare` (the checks; a :class:`TPSetup`), :func:`load` (the full checkpoint through
``recipes/ds_inference.py``'s own ``load_model`` when :func:`run` is handed it) and :func:`run`.
How the model is cut lives in :mod:`~bloomkit.strategies.autotp`, int8 in
:mod:`~bloomkit.strategies.tp_int8`, pre-sharding in :mod:`~bloomkit.strategies.tp_shards`,
and what only BLOOM needs (ALiBi, the fused-kernel route) in :mod:`~bloomkit.strategies.bloom`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import arch, dist
from ..dist import barrier, broadcast, gather, is_main, rank, world_size
from ..errors import UserError
from . import autotp, bloom, tp_int8


def add_flags(parser) -> None:
    """The strategy's own flags, added to :func:`bloomkit.cli.common_parser` (``recipes/serve.py``):
    ``--kernel_inject`` and :func:`add_package_flags`."""
    parser.add_argument_group("ds-inference (tensor parallelism)").add_argument(
        "--kernel_inject", choices=bloom.KERNEL_INJECT, default="auto",
        help="on: DeepSpeed's fused CUDA kernels (legacy env + CUDA only); off: AutoTP; "
             "auto: kernel injection where it works, else AutoTP")
    add_package_flags(parser)


def add_package_flags(parser) -> None:
    """TP's flags that only the package implements, added to ``recipes/ds_inference.py``'s own
    parser (which has ``--kernel_inject``) when ``bloomkit`` is importable."""
    g = parser.add_argument_group("ds-inference with bloomkit (tensor parallelism)")
    g.add_argument("--tp_size", type=int, default=None,
                   help="tensor-parallel degree; default: the number of launched ranks")
    g.add_argument("--save_shards", default=None, metavar="DIR",
                   help="write each rank's TP shard (safetensors) to DIR once (then run as usual); "
                        "under kernel injection DeepSpeed's own pre-sharded files (load them with "
                        "--ds_checkpoint)")
    g.add_argument("--load_shards", default=None, metavar="DIR",
                   help="load only this rank's shard from DIR (written by --save_shards)")
    g.add_argument("--ds_checkpoint", default=None, metavar="JSON",
                   help="DeepSpeed's checkpoints.json / ds_inference_config.json to load from")
    g.add_argument("--allow_pickle", action="store_true",
                   help="let --ds_checkpoint load pickled .pt/.bin files (they can run code: "
                        "only for files you trust)")
    g.add_argument("--compare_to", choices=["one_process", "eager", "transformers_tp"], default=None,
                   help="also time this launch's generate in turns with another set-up, inside the "
                        "launch (same machine state): one_process = plain generate in rank 0 alone "
                        "with every rank's threads (the others wait); eager = the same TP model "
                        "without --compile (needs --compile); transformers_tp = the same model loaded again through "
                        "transformers' own TP plan (DTensor) on the same ranks; --pairs pairs per batch size at "
                        "min(--max_new_tokens, 8) new tokens (compiled: --max_new_tokens)")
    g.add_argument("--pairs", type=int, default=5, help="interleaved pairs for --compare_to")
    g.add_argument("--comm_timeout", type=int, default=300,
                   help="seconds a collective may wait for a silent rank before failing")


@dataclass
class TPSetup:
    """One TP launch's settings, resolved and checked by :func:`prepare` (the same on every rank)."""

    device: str                      #: ``cpu`` or ``cuda``
    dtype: str                       #: ``fp32``, ``bf16``, ``fp16`` or ``int8``
    path: Path                       #: the model directory loaded (the shard folder with --load_shards)
    label: str                       #: the model's name in records (--name, or the shards' source)
    ref_path: Path                   #: the unsharded model that --verify compares with
    base_prompts: list[str] | None   #: the prompts rows repeat (None: the blog's 8)
    budget: int | None               #: --memory_budget in bytes
    tp_size: int                     #: ranks that share each layer
    engine: str                      #: ``autotp`` or ``kernel-inject``
    config: Any                      #: the model's transformers ``PretrainedConfig``
    ds: dict | None = None           #: the parsed --ds_checkpoint (:func:`bloom.read_ds_checkpoint_json`)


def prepare(args) -> TPSetup:
    """Every check that needs no process group, in the order a user should fix them; nothing
    is loaded yet, so each rank refuses a bad launch in one line before any rank waits.

    Args:
        args: the recipe's parsed flags (``--name --dtype --batch_size ... --kernel_inject
            --tp_size --save_shards --load_shards --ds_checkpoint --allow_pickle`` and the
            package's ``--verify --json_out --compile --device ...``).  With ``--load_shards``,
            ``args.name`` becomes the shard folder.

    Returns:
        the resolved :class:`TPSetup`; raises :class:`~bloomkit.errors.UserError` naming the fix.

    Example:
        >>> import os; _ = os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU: say so, quietly
        >>> from bloomkit import cli
        >>> p = cli.common_parser("tp"); add_flags(p)
        >>> s = prepare(p.parse_args(["--name", "tiny"]))   # one process: TP=1
        >>> (s.tp_size, s.engine, s.dtype)
        (1, 'autotp', 'fp32')
    """
    from .. import cli
    from ..models import load_config
    from . import tp_shards

    if args.dtype == "nf4":
        raise UserError("--dtype nf4 is bitsandbytes' 4-bit load, an Accelerate feature; "
                        "DeepSpeed tensor parallelism quantizes with --dtype int8")
    if sum(bool(x) for x in (args.save_shards, args.load_shards)) > 1:
        raise UserError("--save_shards and --load_shards exclude each other: write the shards "
                        "in one launch, load them in the next")
    if args.load_shards and args.ds_checkpoint:
        raise UserError("pass either --load_shards (bloomkit shards) or --ds_checkpoint "
                        "(DeepSpeed's json), not both")
    source = None
    if args.load_shards:
        index = tp_shards.read_index(args.load_shards)
        source = index.get("source")
        args.name = str(Path(args.load_shards).expanduser())
    shared = cli.prepare(args)  # device, dtype (fp16 on CPU is an error), prompts, json_out, model dir
    device, dtype = shared["device"], shared["dtype"]
    ref_path = shared["path"]
    if args.load_shards and args.verify:  # the fp32 reference needs the unsharded model
        from ..models import resolve_model

        try:
            ref_path = resolve_model(index.get("source_path") or source)
        except UserError:
            raise UserError(f"--verify compares with the unsharded model {source!r}, which is not "
                            "here; drop --verify or make the original model available") from None
    config = load_config(shared["path"])
    tp_size = args.tp_size or world_size()
    autotp.check_tp(config, tp_size, world_size(), device)
    ds = None
    if args.ds_checkpoint:
        ds = bloom.read_ds_checkpoint_json(args.ds_checkpoint, allow_pickle=args.allow_pickle)
    engine = bloom.choose_engine(args.kernel_inject, device, dtype, ds,
                                 model_type=getattr(config, "model_type", "?"))
    if engine == "autotp":
        autotp.check_supported(config)
    if dtype == "int8":
        tp_int8.check_int8(device, engine)
    if args.load_shards:
        tp_shards.check_shards(args.load_shards, tp_size=tp_size, dtype=dtype, engine=engine)
    if ds is not None:
        bloom.check_ds_checkpoint(ds, tp_size=tp_size, engine=engine)
    if args.save_shards and engine == "kernel-inject":
        if args.ds_checkpoint:
            raise UserError("--ds_checkpoint is already DeepSpeed's pre-sharded format; drop "
                            "--save_shards (or use --kernel_inject off to write bloomkit shards)")
        if dtype == "int8":
            raise UserError("under kernel injection --save_shards writes DeepSpeed's fp16 files and "
                            f"int8 is quantized while reading them: {bloom.KERNEL_INT8_ROUTE}")
    if args.compile and dtype == "int8":
        raise UserError("--compile under tensor parallelism takes plain weights (fp32/bf16/fp16); "
                        "int8 slices run eagerly: drop --compile or --dtype int8")
    if args.compile and engine == "kernel-inject":
        raise UserError("--compile applies to AutoTP (--kernel_inject off): DeepSpeed's fused "
                        "kernels are already one launch per block and are not traceable")
    if getattr(args, "compare_to", None) and args.pairs < 1:
        raise UserError(f"--pairs must be >= 1, got {args.pairs} (a verdict needs 5)")
    if getattr(args, "compare_to", None) == "eager" and not args.compile:
        raise UserError("--compare_to eager times the compiled decode step against the eager one: "
                        "add --compile")
    if getattr(args, "compare_to", None) == "one_process" and dtype == "int8":
        raise UserError("--compare_to one_process runs plain generate beside TP in the same dtype; "
                        "int8 exists only under TP: use --dtype fp32 or bf16")
    if getattr(args, "compare_to", None) == "transformers_tp":
        from .native_tp import plan_problem

        why = (plan_problem(config, tp_size)
               or ("transformers' TP takes plain weights: use --dtype fp32 or bf16" if dtype == "int8" else None)
               or ("--compare_to transformers_tp sets AutoTP beside transformers' TP: add --kernel_inject off"
                   if engine != "autotp" else None)
               or ("--compare_to transformers_tp loads the full checkpoint twice: drop --load_shards/--ds_checkpoint"
                   if args.load_shards or args.ds_checkpoint else None))
        if why:
            raise UserError(f"--compare_to transformers_tp: {why}")
    if args.save_shards:
        tp_shards.prepare_dir(args.save_shards)
    return TPSetup(device=device, dtype=dtype, path=shared["path"],
                   label=source or args.name, ref_path=ref_path,
                   base_prompts=shared["base_prompts"], budget=shared["budget"],
                   tp_size=tp_size, engine=engine, config=config, ds=ds)


def _quiet_rank() -> None:
    """Only rank 0 prints: other ranks' stdout goes nowhere (errors still reach stderr); rank 0
    shows transformers' loading bars where a person watches (:func:`bloomkit.progress.library_bars`)."""
    import sys
    import warnings

    from transformers.utils import logging as hf_logging

    from .. import progress

    progress.library_bars()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def load(args, setup: TPSetup, load: Callable | None = None):
    """This rank's TP model from the source the flags name.

    Args:
        args: the parsed flags (``--load_shards`` and ``--save_shards`` are read here).
        setup: what :func:`prepare` resolved (dtype, TP size, engine, the parsed --ds_checkpoint).
        load: for the full checkpoint, ``load(path, dtype, tp_size, kernel_inject, **init_kwargs)``
            making the ``from_pretrained`` + ``deepspeed.init_inference`` calls itself
            (``recipes/ds_inference.py`` passes its ``load_model``; see :func:`autotp.tp_model`);
            default: the package's own, :func:`autotp.load_full` + :func:`autotp.init_engine`.

    Returns:
        ``(model, source)``: the rank's model (``engine.module``, int8-quantized for ``--dtype
        int8`` under AutoTP) and where it came from: ``full``, ``shards`` or ``ds_checkpoint``.

    Example (one process, TP=1)::

        setup = prepare(args)
        model, source = load(args, setup)       # source == "full"
    """
    from . import tp_shards

    kw = dict(dtype=setup.dtype, tp_size=setup.tp_size, engine=setup.engine)
    if args.load_shards:
        return tp_shards.load_rank_shard(args.load_shards, device=setup.device, **kw), "shards"
    if setup.ds is not None:
        return tp_shards.load_ds_checkpoint(setup.ds, setup.config, **kw), "ds_checkpoint"
    # kernel injection: DeepSpeed writes its own pre-sharded files while it cuts the model
    save_dir = args.save_shards if setup.engine == "kernel-inject" else None
    return autotp.tp_model(setup.path, save_dir=save_dir, load=load, **kw), "full"


_load = load  # for run(), whose parameter `load` is the recipe's function


def warm_imports(config) -> None:
    """Import the model class, accelerate and DeepSpeed's layers before the load clock starts:
    "start to ready" then compares reading and placing weights, not Python imports (seconds
    on a busy CPU, the same for every load path)."""
    import importlib

    import accelerate  # noqa: F401
    import deepspeed.module_inject.layers  # noqa: F401
    from transformers import AutoModelForCausalLM

    # imported by DeepSpeed's AutoTP on first use (its expert-parallel map; the GPT-2 block it
    # compares each layer with): about 35 ms of init_inference on a quiet 2-core machine
    for mod in ("deepspeed.module_inject.auto_ep_layer", "transformers.models.gpt2.modeling_gpt2"):
        try:
            importlib.import_module(mod)
        except ImportError:  # other DeepSpeed / transformers versions
            pass

    AutoModelForCausalLM._model_mapping[type(config)]


def run(args, load: Callable | None = None) -> list[dict]:
    """``recipes/ds_inference.py`` inside the repository: check (:func:`prepare`), start the
    process group, load (timed; the full checkpoint through the recipe's own ``load``, see
    :func:`load`), describe, generate or benchmark on every rank, verify; rank 0 prints and
    writes ``--json_out``."""
    from .. import cli, results
    from ..measure import bench, harness
    from . import tp_shards

    _quiet_rank()
    s = prepare(args)
    dist.setup_distributed(s.device, args.comm_timeout)
    if args.compile:
        compile_safe_all_reduce()
    warm_imports(s.config)
    barrier()  # every rank starts the load clock together: a rank still importing is not load time
    with harness.PeakRSS() as rss, harness.LoadTimer() as lt:
        model, source = _load(args, s, load)
    ready_unix_time = time.time()   # the first token is possible from here on
    ready_after_start = bench.process_age_seconds()   # interpreter start, imports, group, load
    load_rss = gather(rss.peak)
    if args.save_shards and s.engine == "kernel-inject":
        barrier()  # every rank has written its tp_RR_PP.pt files (inside init_inference)
        if is_main():
            tp_shards.copy_model_files(s.path, args.save_shards)
            print(f"DeepSpeed wrote {s.tp_size} rank(s) of {s.label} in its kernel layout "
                  f"(pickled .pt files) to {args.save_shards}; start from them with --ds_checkpoint "
                  f"{Path(args.save_shards) / 'ds_inference_config.json'} --allow_pickle "
                  "(--dtype fp16, or int8 quantized while loading)", flush=True)
        barrier()
    elif args.save_shards:
        path = tp_shards.save_rank_shard(model, args.save_shards, tp_size=s.tp_size,
                                         rank=rank(), dtype=s.dtype)
        sizes = gather(path.stat().st_size)
        barrier()
        if is_main():
            tp_shards.write_index(args.save_shards, source=s.path, tp_size=s.tp_size,
                                  dtype=s.dtype, engine=s.engine, name=s.label,
                                  bytes_per_rank=sizes, source_path=s.ref_path)
            print(f"wrote {s.tp_size} TP shard(s) of {s.label} ({s.dtype}) to "
                  f"{args.save_shards}: {', '.join(f'{b / 2**20:.1f} MiB' for b in sizes)}; "
                  f"start from them with --load_shards {args.save_shards}", flush=True)
        barrier()
    options = {"kernel_inject": args.kernel_inject, "load_from": source,
               "shards": str(args.load_shards or args.save_shards or "") or None,
               "load_peak_rss_bytes_per_rank": load_rss, "load_peak_rss_method": rss.method,
               "load_steps_s": getattr(model, "_bloomkit_load_steps", None),
               **autotp.describe(model, s.config, s.tp_size, s.engine, s.dtype)}
    dist.kill_hook()
    records = bench.run_variant(
        strategy="ds-inference", name=s.label, path=s.path, dtype=s.dtype,
        device=s.device, batch_sizes=args.batch_size, max_new_tokens=args.max_new_tokens,
        load=None, model=model, load_seconds=lt.seconds, options=options,
        prompts=s.base_prompts, cycles=args.cycles if args.benchmark else None,
        verify=False, budget=s.budget, world_size=world_size(), compile=args.compile)
    for r in records:
        r["process_start_to_ready_s"] = ready_after_start
        r["ready_unix_time"] = ready_unix_time
    if getattr(args, "compare_to", None):
        compare_in_launch(args, s, model, records)
    if args.verify:
        from ..prompts import eval_texts

        bench.verify_ranks(records, model, harness_tok(s.path), s.ref_path, args.max_new_tokens,
               s.base_prompts, texts=eval_texts(s.ref_path, args.eval_file))
    barrier()
    if is_main():
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
        for r in records:
            print(cli.summary_line(r), flush=True)
    return records


def compare_in_launch(args, s: TPSetup, model, records) -> None:
    """Time this launch's TP ``generate`` in turns with another set-up, inside the launch, so
    each pair of samples saw the same machine (:mod:`bloomkit.measure.compare`'s rule): one
    warm-up each, then ``--pairs`` pairs per batch size at ``min(--max_new_tokens, 8)`` tokens
    (with ``--compile``: at ``--max_new_tokens``, the length the static cache was compiled for).

    * ``one_process``: rank 0 also holds the plain model and runs ``generate`` alone with every
      rank's threads (``torch.set_num_threads``), while the other ranks wait in a barrier
      (gloo: asleep, their CPU time is recorded) — TP=1 on the same cores, in the same minute.
    * ``eager``: every rank runs the same TP model without the compiled decode step.
    * ``transformers_tp``: every rank also loads the model through transformers' own TP plan
      (:func:`bloomkit.strategies.native_tp.load_native`) and runs it on the same process group;
      the record adds what that plan sharded and one all-reduce timed both ways.

    Adds ``comparison`` to each of rank 0's records: the per-pair seconds ``a`` (this launch's
    set-up) and ``b`` (the other), their labels, the tokens each gave.  Collective."""
    import torch

    from ..measure import harness

    tok = harness_tok(s.path)
    # compiled: the launch's own --max_new_tokens, the static cache's length the graph was built
    # for (another length would compile again); eager only: a few tokens are enough
    n_new = args.max_new_tokens if args.compile else min(args.max_new_tokens, 8)
    extra = harness.compile_kwargs(s.device) if args.compile else {}
    threads = torch.get_num_threads()
    plain = None
    if args.compare_to == "one_process" and is_main():
        plain = autotp.load_full(s.ref_path, s.dtype)
        if s.device == "cuda":
            plain = plain.to("cuda")
    native = None
    if args.compare_to == "transformers_tp":
        from . import native_tp

        native = native_tp.load_native(s.ref_path, s.dtype, world_size())

    def side_a(rows):
        return harness.generate(model, tok, rows, n_new, **extra)

    def side_b(rows):
        if args.compare_to == "eager":
            return harness.generate(model, tok, rows, n_new)
        if native is not None:
            return harness.generate(native, tok, rows, n_new)
        out = None
        cpu0 = time.process_time()
        if is_main():
            torch.set_num_threads(threads * world_size())
            try:
                out = harness.generate(plain, tok, rows, n_new)
            finally:
                torch.set_num_threads(threads)
        barrier()   # the other ranks wait here while rank 0 runs alone
        waited.append(time.process_time() - cpu0)
        return out

    for rec in records:
        if rec["status"] != "ok":
            continue
        rows = harness.make_prompts(rec["batch_size"], s.base_prompts)
        a, b, waited = [], [], []
        tokens = {}
        for i in range(1 + args.pairs):      # the first pair warms both up, untimed
            for side, fn, times in (("a", side_a, a), ("b", side_b, b)):
                barrier()
                t0 = time.perf_counter()
                gen = fn(rows)
                if i:
                    times.append(time.perf_counter() - t0)
                if gen is not None:
                    tokens[side] = gen.tokens
        idle = gather(sum(waited))
        if is_main():
            labels = {"one_process": (f"TP={s.tp_size}", f"one process ({threads * world_size()} threads)"),
                      "eager": ("compiled", "eager"),
                      "transformers_tp": ("DeepSpeed AutoTP", "transformers' TP")}[args.compare_to]
            rec["comparison"] = {
                "against": args.compare_to, "a_label": labels[0], "b_label": labels[1],
                "a": a, "b": b, "pairs": args.pairs, "max_new_tokens": n_new,
                "threads_per_rank": threads, "same_tokens": tokens.get("a") == tokens.get("b"),
                "waiting_ranks_cpu_s": idle[1:] if args.compare_to == "one_process" else None}
    if native is not None:
        from . import native_tp

        cost = native_tp.allreduce_seconds(min(r["batch_size"] for r in records), arch.hidden_of(s.config),
                                           next(model.parameters()).dtype)
        if is_main():
            for rec in records:
                if "comparison" in rec:
                    rec["comparison"].update(b_sharded=native_tp.sharded(native), allreduce_s=cost,
                                             a_shapes=native_tp.first_block_shapes(model),
                                             b_shapes=native_tp.first_block_shapes(native),
                                             allreduce_rows=min(r["batch_size"] for r in records))


def compile_safe_all_reduce() -> bool:
    """Make AutoTP's all-reduces traceable before the decode step is compiled.

    On CPU ranks DeepSpeed sums the partial results of each row-parallel layer with its own
    shared-memory kernel, ``torch.ops.deepspeed.inference_all_reduce_``: an in-place op whose
    result ``LinearAllreduce`` ignores (it reads its input tensor back).  Inside a compiled
    graph that mutation is invisible, so the compiled step loses the reduction: wrong tokens,
    and ranks that disagree on how many collectives they run (one waits for ever).  Measured
    on 2 CPU ranks (tiny, fp32): tokens differed from plain ``generate`` and the second call
    hung.  With DeepSpeed's kernel switched off, ``inference_all_reduce`` falls back to
    ``torch.distributed.all_reduce``, which torch.compile traces as a functional collective:
    token-identical, one graph, no recompiles.  Returns whether the shm kernel was on."""
    import deepspeed.comm.comm as dcomm

    backend = getattr(dcomm, "cdb", None)
    was = bool(getattr(backend, "shm_vector_kernel_level", 0))
    if backend is not None:
        backend.shm_vector_kernel_level = 0
    return was


def harness_tok(path):
    from ..models import load_tokenizer

    return load_tokenizer(path)

