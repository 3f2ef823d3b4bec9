#!/usr/bin/env python
"""Recipe: DeepSpeed ZeRO-Inference (ZeRO stage 3, weights offloaded to CPU or NVMe).

The blog's ``bloom-ds-zero-inference.py`` on today's libraries.  Copy this file anywhere: it
needs only torch, transformers and deepspeed (libaio for NVMe).  Each rank generates its own
prompts (unique streams); rank 0 prints every rank's completions.  Examples::

    # BLOOM-176B, weights in CPU RAM: one GPU, or 8 GPUs (8 streams) with the blog's benchmark
    deepspeed --num_gpus 1 ds_zero_inference.py --name bigscience/bloom --dtype bf16 --cpu_offload
    deepspeed --num_gpus 8 ds_zero_inference.py --name bigscience/bloom --dtype bf16 --cpu_offload \
        --batch_size 1,8 --benchmark
    # two CPU ranks (DeepSpeed's CPU accelerator, gloo); `python ds_zero_inference.py` runs one
    deepspeed --num_accelerators 2 ds_zero_inference.py --name ./my-model --cpu_offload
    # weights in swap files on a local NVMe drive; 4-bit group-wise weights in CPU RAM
    deepspeed --num_gpus 1 ds_zero_inference.py --name ./my-model --nvme_offload_path /mnt/nvme/zero
    python ds_zero_inference.py --name ./my-model --cpu_offload --quant_bits 4

Inside the repository, where the ``bloomkit`` package is importable, the same file also takes
``--verify`` (every stream against plain fp32 ``generate``), ``--json_out`` (records, with the
disk bytes read per token), ``--aio_buffer_count``, ``--kv_offload`` (CUDA), ``--dtype int8``,
``--eval_file``, ``--memory_budget``, ``--device``; ``--name`` may then be an embedded model
(``tiny``, ``small``, ...), and every bad flag, model file or NVMe directory is one line.
"""
import argparse
import glob
import math
import os
import socket
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

try:  # the repository's package: checks, records, --verify; this file runs without it
    import bloomkit
except ImportError:
    bloomkit = None

# The blog's 8 prompts, repeated up to the batch size.
PROMPTS = ["DeepSpeed is a machine learning framework", "He is working on", "He has a",
           "He got all", "Everyone is happy and I can", "The new movie that got Oscar this year",
           "In the far far distance from our galaxy,", "Peace is the only way"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# NVMe: DeepSpeed's async I/O settings; a partition smaller than block_size (1 MiB) stays in RAM
AIO = {"block_size": 2**20, "queue_depth": 8, "intra_op_parallelism": 2, "single_submit": False,
       "overlap_events": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="tiny" if bloomkit else None, required=bloomkit is None,
                   help="a local model directory or a hub id (e.g. bigscience/bloom)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="the weights' dtype; default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch_size", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                   help="rows per generate call on each rank; a list like 1,8,32 runs a sweep")
    p.add_argument("--max_new_tokens", type=int, default=100, help="new tokens per row")
    p.add_argument("--prompts_file", default=None, help="one prompt per line (default: the blog's 8)")
    p.add_argument("--benchmark", action="store_true",
                   help="time it: one warm-up, then --cycles timed generate calls")
    p.add_argument("--cycles", type=int, default=5, help="timed calls with --benchmark")
    p.add_argument("--cpu_offload", action="store_true", help="keep the parameters in CPU memory")
    p.add_argument("--nvme_offload_path", default=None,
                   help="keep the parameters in swap files in this directory (a fast local drive)")
    p.add_argument("--quant_bits", type=int, choices=(4, 8), default=None,
                   help="ZeRO-Inference group-wise weight quantization")
    p.add_argument("--quant_group_size", type=int, default=None,
                   help="weights per quantization group; default: the largest of 64, 32, 16, ... "
                        "that divides every row of the model's matrices")
    # `deepspeed script.py` appends --local_rank=K; the rank itself is read from the environment
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    if bloomkit is not None:
        from bloomkit.cli import add_package_flags
        from bloomkit.strategies import zero

        zero.add_flags(add_package_flags(p))
    args = p.parse_args(argv)
    if args.cpu_offload and args.nvme_offload_path:
        p.error("use one of --cpu_offload or --nvme_offload_path, not both")
    return args


def init_distributed(device):
    """Join the launcher's process group (``deepspeed``, ``torchrun``), or make a one-rank one."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python ds_zero_inference.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # DeepSpeed's CPU all-reduce never unlinks its shared memory; once every rank has
        dist.barrier()  # mapped it, unlink this rank's: the memory goes when the ranks exit
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_"
                           f"{os.environ['MASTER_PORT']}_{rank}"):
            os.unlink(f)
    return rank, dist.get_world_size()


def weight_shapes(config):
    """The largest weight (elements) and the gcd of every matrix's row length, read off the
    model built on the meta device (shapes, no bytes)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    matrices = [p for p in skeleton.parameters() if p.dim() == 2]
    return max(p.numel() for p in matrices), math.gcd(*(p.shape[-1] for p in matrices))


def ds_config(hidden_size, dtype="fp32", offload="none", nvme_path=None, world_size=1,
              quant_bits=None, quant_group_size=64, buffer_count=5, buffer_size=None):
    """The blog's ZeRO-3 inference config, sized from the model's hidden size."""
    h = hidden_size
    config = {
        "fp16": {"enabled": dtype == "fp16"},   # the model's dtype, stated (else ZeRO keeps fp32)
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": {
            "stage": 3,                                        # partition the parameters
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": h * h,
            "stage3_prefetch_bucket_size": int(0.9 * h * h),   # an integer: DeepSpeed refuses floats
            "stage3_param_persistence_threshold": 0,           # partition even the LayerNorms
        },
        "steps_per_print": 2000,
        "train_batch_size": world_size,     # required by deepspeed.initialize: 1 per rank
        "train_micro_batch_size_per_gpu": 1,
        "wall_clock_breakdown": False,
    }
    if offload == "cpu":
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif offload == "nvme":
        config["zero_optimization"]["offload_param"] = {
            "device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True,
            "buffer_count": buffer_count, "buffer_size": buffer_size}
        config["aio"] = dict(AIO)
    if quant_bits:
        config["weight_quantization"] = {"quantized_initialization": {
            "num_bits": quant_bits, "group_size": quant_group_size, "group_dim": 1,
            "symmetric": False}}
    return config


def nvme_buffer_size(largest, dtype, world_size):
    """Elements per NVMe read buffer: this rank's share of the largest weight (the blog's
    fixed 4e9 locks 5 x 8 GB), rounded up to whole aio blocks of every aio thread."""
    itemsize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    part = max(-(-largest // world_size), AIO["block_size"] // itemsize)
    align = 1024 * AIO["intra_op_parallelism"] // itemsize
    return -(-part // align) * align


def load_model(name, dtype, ds_config):
    """``HfDeepSpeedConfig`` first, so ``from_pretrained`` builds the model under
    ``zero.Init`` (each weight partitioned / offloaded as it loads: no rank ever holds the whole
    model), then ``deepspeed.initialize``; returns the engine's module, ready to ``generate``."""
    import deepspeed
    from deepspeed.runtime.zero import partition_parameters as pp

    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay referenced while loading
    quantize = pp.wrap_load_from_state_dict
    if "weight_quantization" in ds_config:
        # DeepSpeed 0.19 quantizes each checkpoint tensor in its own dtype but reads the result
        # in the model's ("size mismatch" for an fp32 checkpoint loaded as bf16): cast first.
        def cast_then_quantize(load_from_state_dict):
            quantizing = quantize(load_from_state_dict)

            def wrapper(module, state_dict, prefix, *args):
                weight, t = getattr(module, "weight", None), state_dict.get(prefix + "weight")
                if weight is not None and t is not None and t.is_floating_point():
                    state_dict[prefix + "weight"] = t.to(weight.dtype)
                return quantizing(module, state_dict, prefix, *args)
            return wrapper
        pp.wrap_load_from_state_dict = cast_then_quantize
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    finally:
        pp.wrap_load_from_state_dict = quantize
    return deepspeed.initialize(model=model, config=ds_config)[0].module.eval()


def rank_prompts(base, batch_size, rank, world_size):
    """This rank's rows, from prompts no other rank gets: a slice of one global batch when
    there are enough different prompts, else every world_size-th one, repeated."""
    base = list(dict.fromkeys(base))
    if len(base) < world_size:
        raise SystemExit(f"error: {world_size} ranks need {world_size} different prompts")
    if len(base) >= world_size * batch_size:
        return base[rank * batch_size:(rank + 1) * batch_size]
    mine = base[rank::world_size]
    return [mine[i % len(mine)] for i in range(batch_size)]


def generate(model, tokenizer, prompts, max_new_tokens, world_size=1):
    """Greedy, exactly ``max_new_tokens`` new tokens per row; with several ranks every rank
    keeps stepping until all are done (``synced_gpus``: each forward gathers on every rank)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             synced_gpus=world_size > 1)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None):
    args = parse_args(argv)
    if bloomkit is not None:   # the package's checks and records around load_model above
        from bloomkit.errors import cli_entry
        from bloomkit.strategies import zero

        return cli_entry(zero.run)(args, load_model)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":   # DeepSpeed's CPU accelerator: set before deepspeed is imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    offload = "nvme" if args.nvme_offload_path else "cpu" if args.cpu_offload else "none"
    rank, world = init_distributed(device)

    hf_config = AutoConfig.from_pretrained(args.name)
    largest, rows = weight_shapes(hf_config)
    group = args.quant_group_size or next(g for g in (64, 32, 16, 8, 4, 2, 1) if rows % g == 0)
    if args.quant_bits and rows % group:
        raise SystemExit(f"error: --quant_group_size {group} does not divide the rows ({rows})")
    buffer_size = nvme_buffer_size(largest, dtype, world) if offload == "nvme" else None
    config = ds_config(hf_config.hidden_size, dtype, offload, args.nvme_offload_path, world,
                       args.quant_bits, group, buffer_size=buffer_size)
    tokenizer = AutoTokenizer.from_pretrained(args.name, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args.name, dtype, config)
    if rank == 0:
        print(f"*** Start to ready to generate: {time.perf_counter() - start:.3f} secs")
    base = PROMPTS
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            base = [line.strip() for line in f if line.strip()]
    for bs in args.batch_size:
        prompts = rank_prompts(base, bs, rank, world)
        if args.benchmark:   # the blog's method: one warm-up, then timed cycles
            generate(model, tokenizer, prompts, args.max_new_tokens, world)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.cycles):
                texts = generate(model, tokenizer, prompts, args.max_new_tokens, world)
            sync()
            seconds = (time.perf_counter() - t0) / args.cycles
            tokens = bs * args.max_new_tokens * world   # every rank generates its own batch
            if rank == 0:
                print(f"*** Performance stats: bs={bs}, throughput per token including tokenize: "
                      f"{seconds * 1000 / tokens:.2f} msecs; tokenize and generate {tokens} tokens "
                      f"on {world} rank(s): {seconds:.3f} secs")
        else:
            texts = generate(model, tokenizer, prompts, args.max_new_tokens, world)
        streams = [None] * world   # every rank's rows, printed by rank 0 in rank order
        dist.all_gather_object(streams, list(zip(prompts, texts)))
        if rank == 0:
            for prompt, text in (row for stream in streams for row in stream):
                print(f"in={prompt!r}\nout={text!r}\n")


if __name__ == "__main__":
    main()
