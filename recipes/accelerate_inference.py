#!/usr/bin/env python
"""Recipe: big-model inference with Hugging Face Accelerate (device maps, offload, int8, nf4).

The blog's ``bloom-accelerate-inference.py`` on today's libraries.  Copy this file anywhere: it
needs only torch, transformers and accelerate (bitsandbytes for int8 / nf4).  Examples::

    # BLOOM-176B on 8x80GB, keeping GPU 0 light for generate's logits
    python accelerate_inference.py --name bigscience/bloom --dtype bf16 \\
        --device_map balanced_low_0 --batch_size 1,8,16,32 --benchmark
    # weights beyond 1 MiB of CPU RAM go to disk
    python accelerate_inference.py --name ./my-model --max_memory cpu=1MiB --offload_folder /tmp/offload
    # int8 (LLM.int8()) or 4-bit NormalFloat weights through bitsandbytes
    python accelerate_inference.py --name ./my-model --dtype int8 --batch_size 1,8 --benchmark
    # speculative decoding at batch 1: a small draft with the same tokenizer proposes tokens,
    # the model checks them all in one forward (greedy: exactly the model's own tokens)
    python accelerate_inference.py --name ./my-model --assistant_model ./my-small-model --benchmark
    python accelerate_inference.py --name ./my-model --prompt_lookup 10 --benchmark   # n-grams of the prompt

Inside the repository, where the ``bloomkit`` package is importable, the same file also takes
``--verify`` (token agreement and logit error against plain fp32 ``generate``), ``--eval_file``,
``--json_out`` (result records), ``--memory_budget`` (an out-of-memory sweep on the CPU),
``--compile`` (static KV cache + torch.compile) and ``--device``; ``--name`` may then be one of
the embedded models (``tiny``, ``trained``, ...), and every bad flag or model file is one line.
"""
import argparse
import time
from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

try:  # the repository's package: checks, records, --verify; this file runs without it
    import bloomkit
except ImportError:
    bloomkit = None

# The blog's 8 prompts, repeated up to the batch size.
PROMPTS = ["DeepSpeed is a machine learning framework", "He is working on", "He has a",
           "He got all", "Everyone is happy and I can", "The new movie that got Oscar this year",
           "In the far far distance from our galaxy,", "Peace is the only way"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "none")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="tiny" if bloomkit else None, required=bloomkit is None,
                   help="a local model directory or a hub id (e.g. bigscience/bloom)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8", "nf4"], default=None,
                   help="weights: fp32/bf16/fp16, or bitsandbytes int8 / nf4; default bf16 on "
                        "CUDA, fp32 on CPU")
    p.add_argument("--batch_size", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                   help="rows per generate call; a list like 1,8,32 runs a sweep")
    p.add_argument("--max_new_tokens", type=int, default=100, help="new tokens per row")
    p.add_argument("--prompts_file", default=None, help="one prompt per line (default: the blog's 8)")
    p.add_argument("--benchmark", action="store_true",
                   help="time it: one warm-up, then --cycles timed generate calls")
    p.add_argument("--cycles", type=int, default=5, help="timed calls with --benchmark")
    p.add_argument("--device_map", choices=DEVICE_MAPS, default="auto",
                   help="how modules are placed on GPUs, CPU and disk; balanced_low_0 keeps GPU 0 "
                        "light for generate; none puts the whole model on one device")
    p.add_argument("--max_memory", default=None,
                   help="per-device caps as device=size pairs, e.g. 0=30GiB,1=70GiB,cpu=100GiB")
    p.add_argument("--offload_folder", default=None,
                   help="directory for weights that fit neither the GPUs nor --max_memory cpu")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--assistant_model", default=None, metavar="NAME",
                      help="speculative decoding with this draft model (same tokenizer; batch 1)")
    spec.add_argument("--prompt_lookup", type=int, default=None, metavar="N",
                      help="speculative decoding with up to N tokens copied from matching n-grams of "
                           "the prompt and the text so far (no draft model; batch 1)")
    if bloomkit is not None:
        from bloomkit.cli import add_package_flags

        add_package_flags(p)
    args = p.parse_args(argv)
    if (args.assistant_model or args.prompt_lookup) and max(args.batch_size) > 1:
        p.error("speculative decoding (--assistant_model, --prompt_lookup) runs one row at a time in "
                "transformers' generate: use --batch_size 1")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        p.error(f"--prompt_lookup takes a number of tokens >= 1, got {args.prompt_lookup}")
    return args


def parse_max_memory(spec):
    """``"0=30GiB,cpu=100GiB"`` -> ``{0: "30GiB", "cpu": "100GiB"}`` (accelerate's form)."""
    if not spec:
        return None
    try:
        return {int(k) if k.isdigit() else k: v for k, v in (p.split("=") for p in spec.split(","))}
    except ValueError:
        raise SystemExit(f"error: --max_memory takes device=size pairs like 0=30GiB,cpu=100GiB, "
                         f"got {spec!r}") from None


def load_model(name, dtype="fp32", device_map="auto", max_memory=None, offload_folder=None,
               device="cpu"):
    """``from_pretrained`` with accelerate's big-model placement: the model is built on the meta
    device, a device map is computed from the module sizes and ``max_memory``, and each
    checkpoint tensor goes straight where the map says (GPU, CPU RAM, or ``offload_folder``)."""
    kwargs = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    if device_map == "none":    # the whole model on one device
        kwargs["device_map"] = {"": "cpu" if device == "cpu" else 0}
    elif device_map != "auto" and device == "cpu" and max_memory and not any(
            isinstance(k, int) for k in max_memory):
        kwargs["device_map"] = "sequential"   # no GPUs to balance over: CPU, then disk
    if dtype == "int8":         # LLM.int8(): int8 linear weights, outliers in 16 bits
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float16 if device == "cuda" else torch.float32
    elif dtype == "nf4":        # QLoRA's 4-bit NormalFloat, dequantized inside each matmul
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
    else:
        kwargs["dtype"] = DTYPES[dtype]
    return AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()


def load_assistant(name, model, tokenizer):
    """The draft for speculative decoding, in the model's dtype, on its input device.  It must
    share the model's vocabulary: its token ids are proposed to the model as they are."""
    draft_tokenizer = AutoTokenizer.from_pretrained(name)
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"error: --assistant_model {name} has another vocabulary than the model; a "
                         "draft must use the same tokenizer (or drop --assistant_model)")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(input_device(model)).eval()


def input_device(model):
    """Where generate's inputs go: the first GPU of the device map, else the CPU."""
    gpus = [d for d in getattr(model, "hf_device_map", {}).values() if d not in ("cpu", "disk")]
    return torch.device(gpus[0] if gpus else next(model.parameters()).device)


def generate(model, tokenizer, prompts, max_new_tokens, **speculative):
    """Greedy, exactly ``max_new_tokens`` new tokens per row (the blog's settings).
    ``speculative``: ``assistant_model=`` or ``prompt_lookup_num_tokens=`` (batch 1)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(input_device(model))
    # no early end at the end-of-text token; with a draft, as min_length (the same at batch 1):
    # transformers hands a min_new_tokens processor to the draft's generate too, and warns
    at_least = ({"min_length": inputs["input_ids"].shape[1] + max_new_tokens} if speculative
                else {"min_new_tokens": max_new_tokens})
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **at_least, **speculative)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None):
    args = parse_args(argv)
    if bloomkit is not None:   # the package's checks and records around load_model below
        from bloomkit.errors import cli_entry
        from bloomkit.strategies import accel

        return cli_entry(accel.run)(args, load_model, load_assistant)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    max_memory = parse_max_memory(args.max_memory)
    tokenizer = AutoTokenizer.from_pretrained(args.name, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args.name, dtype, args.device_map, max_memory, args.offload_folder, device)
    speculative = {}
    if args.assistant_model:
        speculative["assistant_model"] = load_assistant(args.assistant_model, model, tokenizer)
    elif args.prompt_lookup:
        speculative["prompt_lookup_num_tokens"] = args.prompt_lookup
    print(f"*** Start to ready to generate: {time.perf_counter() - start:.3f} secs")
    if hasattr(model, "hf_device_map"):   # set when modules went to more than one device
        print(f"*** Modules per device: {dict(Counter(map(str, model.hf_device_map.values())))}")
    base = PROMPTS
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            base = [line.strip() for line in f if line.strip()]
    for bs in args.batch_size:
        prompts = [base[i % len(base)] for i in range(bs)]
        if args.benchmark:   # the blog's method: one warm-up, then timed cycles
            generate(model, tokenizer, prompts, args.max_new_tokens, **speculative)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.cycles):
                texts = generate(model, tokenizer, prompts, args.max_new_tokens, **speculative)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / args.cycles
            print(f"*** Performance stats: bs={bs}, throughput per token including tokenize: "
                  f"{seconds * 1000 / (bs * args.max_new_tokens):.2f} msecs; tokenize and generate "
                  f"{bs * args.max_new_tokens} tokens: {seconds:.3f} secs")
        else:
            texts = generate(model, tokenizer, prompts, args.max_new_tokens, **speculative)
        for prompt, text in zip(prompts, texts):
            print(f"in={prompt!r}\nout={text!r}\n")


if __name__ == "__main__":
    main()
