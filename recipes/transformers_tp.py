#!/usr/bin/env python
"""Recipe: transformers' own tensor parallelism (PyTorch DTensor, no DeepSpeed), one process per rank.

Copy this file anywhere: it needs only torch and transformers.  ``torchrun`` starts one process
per rank; ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`` (N = the
launched ranks) starts the process group (gloo on CPU, NCCL on GPUs), builds the model on the
meta device, and each rank reads only its slice of every weight the model's tensor-parallel plan
names (``config.base_model_tp_plan``: query/key/value and MLP-up column-wise, attention output
and MLP-down row-wise); the ranks sum their partial results after each row-wise layer.  The
spelling before transformers 5.2x was ``from_pretrained(..., tp_plan="auto")`` (still accepted,
with a FutureWarning).  Examples::

    # 8 GPUs, bf16, a model with a plan (Llama, Qwen, Mistral, Gemma, ...; BLOOM has none)
    torchrun --nproc_per_node 8 transformers_tp.py --name meta-llama/Llama-3.1-70B --dtype bf16 \\
        --batch_size 1,8,16,32 --benchmark
    # TP=2 on this machine's CPU (ranks over gloo)
    torchrun --nproc_per_node 2 transformers_tp.py --name ./my-llama --batch_size 1,8 --benchmark

Each rank must hold whole key/value heads: N has to divide ``num_key_value_heads`` (and the
query heads); the recipe checks that, and that the model has a plan, before loading.

Inside the repository, where the ``bloomkit`` package is importable, the same file also takes
``--verify`` (token agreement and logit error against plain fp32 ``generate``), ``--json_out``
(result records), ``--eval_file``, ``--memory_budget`` and ``--device``; ``--name`` may then be
an embedded model (``tiny-llama``, ``bench-llama``), and every bad flag or model file is one line::

    torchrun --nproc_per_node 2 recipes/transformers_tp.py --name tiny-llama --verify --benchmark
"""
import argparse
import os
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

try:  # the repository's package: checks, records, --verify; this file runs without it
    import bloomkit
except ImportError:
    bloomkit = None

# The blog's 8 prompts, repeated up to the batch size.
PROMPTS = ["DeepSpeed is a machine learning framework", "He is working on", "He has a",
           "He got all", "Everyone is happy and I can", "The new movie that got Oscar this year",
           "In the far far distance from our galaxy,", "Peace is the only way"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="tiny-llama" if bloomkit else None, required=bloomkit is None,
                   help="a local model directory or a hub id whose config has a tensor-parallel plan")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and compute (fp16: CUDA only); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch_size", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                   help="rows per generate call; a list like 1,8,32 runs a sweep")
    p.add_argument("--max_new_tokens", type=int, default=100, help="new tokens per row")
    p.add_argument("--prompts_file", default=None, help="one prompt per line (default: the blog's 8)")
    p.add_argument("--benchmark", action="store_true",
                   help="time it: one warm-up, then --cycles timed generate calls")
    p.add_argument("--cycles", type=int, default=5, help="timed calls with --benchmark")
    if bloomkit is not None:
        from bloomkit.cli import add_package_flags

        add_package_flags(p)
    return p.parse_args(argv)


def check_plan(config, tp_size: int) -> None:
    """Refuse, before anything loads, what transformers would fail on mid-forward: no plan for
    this architecture, or heads that do not split evenly over the ranks."""
    if tp_size > 1 and not getattr(config, "base_model_tp_plan", None):
        raise SystemExit(f"error: {config.model_type} has no tensor-parallel plan in transformers "
                         "(config.base_model_tp_plan); use DeepSpeed's AutoTP (ds_inference.py) for it")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp_size or kv_heads % tp_size:
        raise SystemExit(f"error: {tp_size} ranks cannot split {heads} query / {kv_heads} key-value heads "
                         f"evenly; launch a number of ranks that divides {kv_heads}")


def load_model(name, dtype="fp32", tp_size=1):
    """Every rank builds the model on the meta device and reads only its slice of each planned
    weight; ``tp_size=1`` is plain ``from_pretrained``.  Returns a transformers model whose planned
    weights are DTensors (``param.to_local()``: this rank's part)."""
    if tp_size == 1:
        return AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype]).eval()
    return AutoModelForCausalLM.from_pretrained(
        name, dtype=DTYPES[dtype], distributed_config=DistributedConfig(tp_size=tp_size)).eval()


def generate(model, tokenizer, prompts, max_new_tokens):
    """Greedy, exactly ``max_new_tokens`` new tokens per row (the blog's settings)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None):
    args = parse_args(argv)
    if bloomkit is not None:   # the package's checks, records and verification around load_model
        from bloomkit.errors import cli_entry
        from bloomkit.strategies import native_tp

        return cli_entry(native_tp.run)(args, load=load_model, check=check_plan)
    start = time.perf_counter()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    check_plan(AutoConfig.from_pretrained(args.name), world)
    if rank > 0:   # one rank reports loading
        transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.name, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args.name, dtype, world)
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
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
