#!/usr/bin/env python
"""Recipe: an OpenAI-compatible HTTP server with continuous batching, on any strategy.

The model is loaded exactly as the other recipes load it (same flags); then a scheduler thread
steps a batch that requests join and leave between decode steps. Examples::

    # the embedded tiny BLOOM, in-process (Accelerate)
    python recipes/serve.py --port 8000
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "def __init__(self, ", "max_tokens": 24, "temperature": 0}'
    python -m bloomkit.serve.loadtest --url http://127.0.0.1:8000 --concurrency 1,16
    # tensor parallelism: rank 0 serves HTTP, every rank runs each step (CPU: DS_ACCELERATOR=cpu)
    deepspeed --num_accelerators 2 recipes/serve.py --strategy ds-inference --port 8000
    # ZeRO-3: every rank serves its own requests on --port + rank, all ranks step together
    deepspeed --num_accelerators 2 recipes/serve.py --strategy ds-zero --cpu_offload --port 8000
    # BLOOM-176B on 8x80GB
    deepspeed --num_gpus 8 recipes/serve.py --strategy ds-inference --name bigscience/bloom --dtype bf16
"""
import argparse
import inspect
import socket
import time

from bloomkit import checkpoint, cli, dist, memory, models
from bloomkit.errors import UserError, cli_entry
from bloomkit.measure import harness
from bloomkit.serve import scheduler
from bloomkit.strategies import accel, tp, zero

STRATEGIES = ("accelerate", "ds-inference", "ds-zero")
OWN = {  # each strategy's own flags and their defaults: another strategy's flag is refused
    "accelerate": {"device_map": "auto", "max_memory": None, "offload_folder": None},
    "ds-inference": {"tp_size": None, "kernel_inject": "auto", "save_shards": None,
                     "load_shards": None, "ds_checkpoint": None, "allow_pickle": False},
    "ds-zero": {"cpu_offload": False, "nvme_offload_path": None, "quant_bits": None,
                "quant_group_size": None, "aio_buffer_count": zero.DEFAULT_BUFFER_COUNT,
                "kv_offload": False},
}
NOT_FOR_SERVING = {"benchmark": False, "cycles": 5, "json_out": None, "verify": False,
                   "memory_budget": None, "prompts_file": None, "compare_to": None, "pairs": 5}


def parser():
    p = cli.common_parser(__doc__.splitlines()[1])
    g = p.add_argument_group("serve")
    g.add_argument("--strategy", choices=STRATEGIES, default="accelerate",
                   help="how the model is loaded and run (the flags of that strategy's recipe apply)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (ds-zero: rank r listens on port + r)")
    g.add_argument("--max_queue", type=cli.positive_int, default=256,
                   help="rows that may wait for a place in the batch; beyond: HTTP 429")
    g.add_argument("--request_timeout", type=float, default=300.0,
                   help="seconds a request may take (queue + generation); beyond: HTTP 504")
    g.add_argument("--max_prefill_tokens", type=cli.positive_int, default=4096,
                   help="prompt tokens prefilled in one step (bounds the stall running rows feel)")
    g.add_argument("--max_decode_skips", type=cli.non_negative_int,
                   default=inspect.signature(scheduler.Engine).parameters["max_decode_skips"].default,
                   help="without the prefill thread (--no-overlap_prefill, several ranks, --compile, a GPU): steps "
                        "in a row that may prefill waiting requests instead of decoding the running ones "
                        "(prefill first: lower time to first token; 0: always decode too)")
    g.add_argument("--overlap_prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="prefill arriving requests in a second thread while the running rows decode, so "
                        "they need not wait for the step in flight (default: on where it can run: one "
                        "process on the CPU, eager, weights in place)")
    g.add_argument("--packed_prefill", action="store_true",
                   help="Llama-family models in one process: a step that admits requests prefills them in the "
                        "running rows' decode forward (one pass over the weights for both) instead of a forward "
                        "of their own; implies --no-overlap_prefill")
    g.add_argument("--slot_hold", type=cli.non_negative_int,
                   default=inspect.signature(scheduler.Engine).parameters["slot_hold"].default,
                   help="steps a finished request's place in the KV cache waits for a joining request, which "
                        "then takes it without the cache being copied (0: the cache is compacted at once)")
    g.add_argument("--freezing", action="store_true",
                   help="with --compile on the CPU: inductor takes the weights as constants and pre-packs them "
                        "for the CPU's matrix multiply (faster steps); each compiled graph then holds its own copy "
                        "of the weights, so it is refused when those copies would not fit in free memory")
    g.add_argument("--kv_cache_memory", default=None,
                   help="KV-cache budget per rank, e.g. 2GiB; default: half of the free memory")
    g.add_argument("--served_model_name", default=None, help="the model id of the API (default: --name)")
    accel.add_flags(p)
    tp.add_flags(p)
    zero.add_flags(p, kv_offload=False)   # declared (check_flags refuses it), not listed
    # --batch_size: the most rows in the running batch; --max_new_tokens: a request's default
    # max_tokens (OpenAI's 16) when it names none
    p.set_defaults(batch_size=[32], max_new_tokens=16)
    return p


def check_flags(args) -> None:
    """Refuse, in one line, flags that mean nothing to a server or belong to another strategy."""
    for k, default in NOT_FOR_SERVING.items():
        if getattr(args, k) != default:
            raise UserError(f"--{k} is for the batch recipes, not the server; measure a server with "
                            "python -m bloomkit.serve.loadtest (or benchmarks/serve.py)")
    if args.compile and args.strategy == "ds-zero":
        raise UserError("--compile cannot take ZeRO-3: it gathers each layer's weights in hooks around "
                        "every module, which a compiled graph cannot run; drop --compile")
    if args.freezing and not args.compile:
        raise UserError("--freezing is an option of the compiled forward; add --compile or drop --freezing")
    if args.freezing and args.strategy != "accelerate":
        raise UserError(f"--freezing runs in one process (--strategy accelerate), not {args.strategy}; drop it")
    if args.overlap_prefill and (args.strategy != "accelerate" or args.compile):
        raise UserError("--overlap_prefill runs one process's eager forward (--strategy accelerate without "
                        "--compile): with several ranks every step's collectives must stay in order, and the "
                        "compiled server measured faster prefilling first; drop it")
    if args.packed_prefill and args.strategy != "accelerate":
        raise UserError(f"--packed_prefill runs in one process (--strategy accelerate), not {args.strategy}; drop it")
    if args.packed_prefill and args.overlap_prefill:
        raise UserError("--packed_prefill puts the prefill into the decode step, --overlap_prefill into a thread "
                        "of its own; pick one")
    if len(args.batch_size) != 1:
        raise UserError("--batch_size is the most rows in the running batch here: one number, not a sweep")
    for strategy, flags in OWN.items():
        if strategy == args.strategy:
            continue
        for k, default in flags.items():
            if getattr(args, k) != default and k not in OWN[args.strategy]:
                raise UserError(f"--{k} belongs to --strategy {strategy}, not {args.strategy}")
    if args.strategy == "ds-inference" and args.save_shards:
        raise UserError("--save_shards writes shards once: run recipes/ds_inference.py --save_shards DIR, "
                        "then serve with --load_shards DIR")
    if args.kv_offload:
        raise UserError("--kv_offload does not apply to the server's batched cache; drop it")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                            "or --host") from None


def load(args):
    """(model, its strategy's setup, ranks sharing the cache's heads) by the strategy's own
    ``prepare`` and ``load``; every setup names the model's ``path``, ``device`` and ``dtype``."""
    if args.strategy == "ds-inference":
        tp._quiet_rank()
        setup = tp.prepare(args)
        if dist.rank() == 0:
            check_port(args.host, args.port)
        dist.setup_distributed(setup.device, args.comm_timeout)
        if args.compile:
            tp.compile_safe_all_reduce()   # the all-reduces inside the compiled graph
        tp.warm_imports(setup.config)
        model, _ = tp.load(args, setup)
        return model, setup, setup.tp_size
    if args.strategy == "accelerate":
        setup = accel.prepare(args)
        check_port(args.host, args.port)
        if args.packed_prefill:   # the family from the config, before a big checkpoint loads
            why = scheduler.packed_config_refusal(models.load_config(setup.path), ranks=1, compile=args.compile)
            if why:
                raise UserError(f"--packed_prefill: {why}; drop it")
        model = accel.load(setup)
        if args.compile:
            harness.check_compilable(model)   # offloaded or quantized: one line
        return model, setup, 1
    # ZeRO-3: the recipe's set-up; each rank checks its own port before the process group starts
    setup = zero.prepare(args, extra_check=lambda rank: check_port(args.host, args.port + rank))
    return zero.load(setup), setup, 1


def kv_budget(args, device: str, reserved: int = 0) -> int:
    """--kv_cache_memory, else half of the memory free now less ``reserved`` (bytes that the
    graphs still to be built will take), shared by the ranks on this machine."""
    if args.kv_cache_memory:
        return _size(args.kv_cache_memory)
    if device == "cuda":
        import torch

        return int((torch.cuda.mem_get_info()[0] - reserved) * 0.5)
    import psutil

    return int((psutil.virtual_memory().available - reserved) * 0.5 / dist.local_world_size())


def frozen_copies(args, model, device: str, world: int, available: int | None = None) -> int:
    """--freezing: the bytes its graphs' copies of the weights will take, refused in one line
    (before any graph is built) where they would not fit in ``available`` (default: the memory
    free now); 0 without it."""
    if not args.freezing:
        return 0
    import psutil

    graphs = scheduler.WARM_UP_GRAPHS["packed" if args.packed_prefill else "plain"]
    available = psutil.virtual_memory().available if available is None else available
    why = scheduler.freezing_refusal(model, device=device, ranks=world, graphs=graphs, available=available)
    if why:
        raise UserError(f"--freezing: {why}; drop it")
    return scheduler.frozen_copies_bytes(model, graphs)


def _size(text: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise UserError(f"bad --kv_cache_memory {text!r}; use a size like 2GiB") from None


@cli_entry
def main(argv=None):
    args = parser().parse_args(argv)
    check_flags(args)
    if args.kv_cache_memory:
        _size(args.kv_cache_memory)

    from bloomkit.serve import app as serve_app
    from bloomkit.serve import ranks

    model, setup, kv_share = load(args)
    tok = models.load_tokenizer(setup.path)
    config = models.load_config(setup.path)
    world, rank = dist.world_size(), dist.rank()
    refusal = scheduler.overlap_refusal(model, device=setup.device, ranks=world, compile=args.compile)
    if args.overlap_prefill and refusal:
        raise UserError(f"--overlap_prefill: {refusal}; drop it")
    overlap = refusal is None if args.overlap_prefill is None else args.overlap_prefill
    if args.packed_prefill:
        why = scheduler.packed_refusal(model, ranks=world, compile=args.compile)
        if why:
            raise UserError(f"--packed_prefill: {why}; drop it")
        overlap = False
    reserved = frozen_copies(args, model, setup.device, world)
    engine = scheduler.Engine(
        model, tok, max_batch=args.batch_size[0], max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        kv_bytes_per_token=max(1, memory.kv_cache_bytes_per_token(config, setup.dtype) // kv_share),
        kv_budget_bytes=kv_budget(args, setup.device, reserved), context_limit=checkpoint.context_limit(config),
        max_prefill_tokens=args.max_prefill_tokens, max_decode_skips=args.max_decode_skips,
        device=harness.input_device(model), compile=args.compile, overlap_prefill=overlap,
        packed_prefill=args.packed_prefill, slot_hold=args.slot_hold, freezing=args.freezing,
        sync=None if world == 1 else ranks.Lockstep() if args.strategy == "ds-zero" else ranks.Broadcast())
    if args.compile:   # every rank compiles the same graphs before the first request
        t0 = time.perf_counter()
        engine.batch.warm_up()
        packed = f", {scheduler.prepacked_weights()} linear weights pre-packed" if args.freezing else ""
        print(f"compiled the forward ({harness.compiled_graphs()} graphs{packed}) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    if args.strategy == "ds-inference" and rank > 0:
        ranks.follow(engine.batch)   # rank 0 plans and serves; this rank runs every step with it
        return
    port = args.port + (rank if args.strategy == "ds-zero" else 0)
    model_id = args.served_model_name or args.name
    app = serve_app.create_app(engine, tok, model_id, default_max_tokens=args.max_new_tokens)
    banner = (f"serving {model_id} ({args.strategy}, {setup.dtype}, {world} rank(s), rank {rank}"
              f"{', prefill overlapped' if overlap else ''}{', prefill packed' if args.packed_prefill else ''}"
              f"{', weights frozen' if args.freezing else ''}) on "
              f"http://{args.host}:{port}")
    code = serve_app.serve(app, engine, args.host, port, banner=banner)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
