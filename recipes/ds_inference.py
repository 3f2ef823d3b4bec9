#!/usr/bin/env python
"""Recipe: DeepSpeed-Inference tensor parallelism (AutoTP or kernel injection), one process per rank.

The blog's ``bloom-ds-inference.py`` on today's libraries.  Copy this file anywhere: it needs
only torch, transformers and deepspeed.  The launcher starts one process per rank; each reads
the whole checkpoint, ``deepspeed.init_inference`` keeps that rank's slice of every layer (N = the
launched ranks: whole key/value heads, MLP columns in grains of 64, so a width that 64·N does not
divide gives the first ranks more) and the ranks sum their partial results after each row-parallel layer.  Examples::

    # BLOOM-176B on 8x80GB, bf16 (AutoTP; the blog's fused kernels need transformers<=4.43.4)
    deepspeed --num_gpus 8 ds_inference.py --name bigscience/bloom --dtype bf16 \\
        --batch_size 1,8,16,32 --benchmark
    # TP=2 on this machine's CPU (DeepSpeed's CPU accelerator, ranks over gloo)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 ds_inference.py --name ./my-model --batch_size 1,8
    torchrun --nproc_per_node 2 ds_inference.py --name ./my-model --benchmark --cycles 3

Inside the repository, where the ``bloomkit`` package is importable, the same file also takes
``--verify`` (token agreement and logit error against plain fp32 ``generate``), ``--json_out``
(result records), ``--eval_file``, ``--memory_budget``, ``--compile`` and ``--device``; TP's
``--tp_size``, ``--comm_timeout``, ``--save_shards DIR`` / ``--load_shards DIR`` (each rank writes,
then reads, only its own slice: a fast start), ``--ds_checkpoint JSON`` (``--allow_pickle``:
DeepSpeed's checkpoint json), ``--dtype int8`` (int8 AutoTP slices, or DeepSpeed's int8 kernels
from its pre-sharded files) and ``--compare_to one_process|eager`` (``--pairs N``: TP against one
process, or compiled against eager, timed in turns inside the launch); ``--name`` may then be an embedded model (``tiny``, ``tiny-llama``,
...), and every bad flag or model file is one line::

    deepspeed --num_accelerators 2 recipes/ds_inference.py --name bench --save_shards /tmp/bench-tp2
    deepspeed --num_accelerators 2 recipes/ds_inference.py --load_shards /tmp/bench-tp2 --verify
"""
import argparse
import glob
import os
import time

import torch
import transformers

if not torch.cuda.is_available():   # DeepSpeed's CPU accelerator: chosen when deepspeed is imported
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

try:  # the repository's package: checks, records, --verify, pre-sharding; this file runs without it
    import bloomkit
except ImportError:
    bloomkit = None

# The blog's 8 prompts, repeated up to the batch size.
PROMPTS = ["DeepSpeed is a machine learning framework", "He is working on", "He has a",
           "He got all", "Everyone is happy and I can", "The new movie that got Oscar this year",
           "In the far far distance from our galaxy,", "Peace is the only way"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAST_BLOOM_KERNEL_TRANSFORMERS = "4.43.4"   # DeepSpeed refuses to inject BLOOM's kernels beyond
# from_pretrained's dtype keyword: `torch_dtype` before transformers 5 (the blog's fused kernels
# need such a stack); ignored there, the model would load in fp32 and take twice the memory
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="tiny" if bloomkit else None, required=bloomkit is None,
                   help="a local model directory or a hub id (e.g. bigscience/bloom)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"], default=None,
                   help="weights and compute: fp32/bf16/fp16 (fp16: CUDA only); int8 needs bloomkit "
                        "(see above); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch_size", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                   help="rows per generate call; a list like 1,8,32 runs a sweep")
    p.add_argument("--max_new_tokens", type=int, default=100, help="new tokens per row")
    p.add_argument("--prompts_file", default=None, help="one prompt per line (default: the blog's 8)")
    p.add_argument("--benchmark", action="store_true",
                   help="time it: one warm-up, then --cycles timed generate calls")
    p.add_argument("--cycles", type=int, default=5, help="timed calls with --benchmark")
    p.add_argument("--kernel_inject", choices=["auto", "on", "off"], default="auto",
                   help="on: DeepSpeed's fused CUDA kernels (replace_with_kernel_inject); off: AutoTP "
                        "(any architecture DeepSpeed knows); auto: the kernels where they work (BLOOM, "
                        f"CUDA, transformers<={LAST_BLOOM_KERNEL_TRANSFORMERS}), else AutoTP")
    # `deepspeed ds_inference.py` appends --local_rank=K; the rank itself comes from LOCAL_RANK
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    if bloomkit is not None:
        from bloomkit.cli import add_package_flags
        from bloomkit.strategies import tp

        add_package_flags(p)
        tp.add_package_flags(p)   # --tp_size --save_shards --load_shards --ds_checkpoint ...
    args = p.parse_args(argv)
    if bloomkit is None and args.dtype == "int8":
        p.error("--dtype int8 needs the bloomkit repository: DeepSpeed's int8 kernels quantize only "
                "while reading its pre-sharded checkpoint (--ds_checkpoint), and int8 AutoTP slices "
                "are bloomkit's own; use --dtype bf16 or fp16 here")
    return args


def _full_attention_mask(module, args, kwargs):
    """BLOOM under AutoTP: DeepSpeed gives each rank the ALiBi slopes of its own heads through
    ``build_alibi_tensor``, which transformers 5 skips when no attention mask is passed (one
    unpadded row; a teacher-forced forward): pass an all-ones mask, as long as the keys."""
    if kwargs.get("attention_mask") is None:
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs["inputs_embeds"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        keys = cache.get_mask_sizes(x.shape[1], 0)[0] if cache is not None else x.shape[1]
        kwargs["attention_mask"] = torch.ones(x.shape[0], keys, dtype=torch.long, device=x.device)
    return args, kwargs


def load_model(name, dtype="fp32", tp_size=1, kernel_inject=False, **init_kwargs):
    """Every rank reads the whole checkpoint into CPU RAM; ``deepspeed.init_inference`` then keeps
    this rank's slice of each layer (on its GPU, if any).  Returns ``engine.module``: a transformers
    model whose layers DeepSpeed replaced.  ``init_kwargs`` go to ``init_inference`` as they are."""
    model = AutoModelForCausalLM.from_pretrained(name, **{DTYPE_KW: DTYPES[dtype]}).eval()
    # init_inference casts every tensor to `dtype`: keep the fp32 buffers computed at construction
    # and kept out of checkpoints (RoPE's inv_freq), as plain from_pretrained keeps them
    computed = {(m, k): b.clone() for m, mod in model.named_modules() for k, b in mod._buffers.items()
                if b is not None and k in mod._non_persistent_buffers_set}
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=DTYPES[dtype],
                                      replace_with_kernel_inject=kernel_inject, **init_kwargs)
    model = engine.module
    for (m, k), b in computed.items():
        mod = model.get_submodule(m)
        mod._buffers[k] = b.to(mod._buffers[k].device)
    if tp_size > 1 and not kernel_inject and model.config.model_type == "bloom":
        model.transformer.register_forward_pre_hook(_full_attention_mask, with_kwargs=True)
    return model.eval()


def generate(model, tokenizer, prompts, max_new_tokens):
    """Greedy, exactly ``max_new_tokens`` new tokens per row (the blog's settings)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def use_kernels(kernel_inject, model_type, device):
    """--kernel_inject auto: DeepSpeed's fused BLOOM kernels where the stack allows them."""
    if kernel_inject != "auto":
        return kernel_inject == "on"
    import transformers
    from packaging.version import Version

    return (model_type == "bloom" and device == "cuda"
            and Version(transformers.__version__) <= Version(LAST_BLOOM_KERNEL_TRANSFORMERS))


def main(argv=None):
    args = parse_args(argv)
    if bloomkit is not None:   # the package's checks, records and load paths around load_model
        from bloomkit.errors import cli_entry
        from bloomkit.strategies import tp

        return cli_entry(tp.run)(args, load=load_model)
    start = time.perf_counter()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:   # TP size = the ranks the launcher started
        if device == "cpu":   # DeepSpeed's shared-memory all-reduce reads LOCAL_SIZE (torchrun
            # sets only LOCAL_WORLD_SIZE): without it, it is never set up yet still called (a crash)
            os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
        if device == "cpu":   # DeepSpeed's CPU all-reduce never unlinks its shared memory; once
            torch.distributed.barrier()   # every rank has mapped it, unlink this rank's segment:
            for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_"   # freed
                               f"{os.environ['MASTER_PORT']}_{rank}"):                   # at exit
                os.unlink(f)
    tokenizer = AutoTokenizer.from_pretrained(args.name, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kernels = use_kernels(args.kernel_inject, AutoConfig.from_pretrained(args.name).model_type, device)
    model = load_model(args.name, dtype, world, kernels)
    if rank == 0:
        print(f"*** Start to ready to generate: {time.perf_counter() - start:.3f} secs", flush=True)
    base = PROMPTS
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            base = [line.strip() for line in f if line.strip()]
    for bs in args.batch_size:
        prompts = [base[i % len(base)] for i in range(bs)]
        if args.benchmark:   # the blog's method: one warm-up, then timed cycles (every rank)
            generate(model, tokenizer, prompts, args.max_new_tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.cycles):
                texts = generate(model, tokenizer, prompts, args.max_new_tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / args.cycles
            if rank == 0:
                print(f"*** Performance stats: bs={bs}, throughput per token including tokenize: "
                      f"{seconds * 1000 / (bs * args.max_new_tokens):.2f} msecs; tokenize and generate "
                      f"{bs * args.max_new_tokens} tokens: {seconds:.3f} secs", flush=True)
        else:
            texts = generate(model, tokenizer, prompts, args.max_new_tokens)
        if rank == 0:   # every rank holds the same tokens: one prints
            for prompt, text in zip(prompts, texts):
                print(f"in={prompt!r}\nout={text!r}\n", flush=True)


if __name__ == "__main__":
    main()
