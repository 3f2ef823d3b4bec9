"""What every recipe shares: its command-line flags and its run loop.

Shared flags (underscores, as in the blog's scripts): ``--name --dtype --batch_size
--max_new_tokens --prompts_file --benchmark --cycles --json_out`` plus ``--verify``
(compare with plain ``generate``) and ``--memory_budget`` (CPU stand-in for device memory
in a batch-size sweep).  Each recipe adds its strategy flags and a ``load`` function;
:func:`run` does the rest — the same way for every strategy, so their numbers compare.
"""
from __future__ import annotations

import argparse
import sys

from . import models, prompts, results

from .dtypes import DTYPES, default_device, resolve_dtype
from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (exit 2), not a usage dump."""

    def error(self, message):  # noqa: D401
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size must be integers like 8 or 1,8,32, got {text!r}")
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch size must be a positive integer, got {text!r}; "
                                         "pass --batch_size 1 or more")
    return sizes


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {v}")
    return v


def dtype_arg(text: str) -> str:
    if text not in DTYPES + ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)}")
    return text


def common_parser(description: str) -> Parser:
    """The package's parser with every shared flag (the server and the TP / ZeRO recipes)."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("shared by every recipe")
    g.add_argument("--name", default="tiny", help=NAME_HELP)
    g.add_argument("--dtype", type=dtype_arg, default=None,
                   help="fp32, bf16, fp16 (CUDA only), int8, or nf4 (4-bit, Accelerate only); "
                        "default fp32 on CPU, bf16 on CUDA")
    g.add_argument("--batch_size", type=batch_sizes, default=[1],
                   help="rows per generate call; a list like 1,8,32 runs a sweep")
    g.add_argument("--max_new_tokens", type=positive_int, default=100,
                   help="new tokens per row (exactly this many: EOS is suppressed)")
    g.add_argument("--prompts_file", default=None,
                   help="one prompt per line, used instead of the blog's 8 prompts")
    g.add_argument("--benchmark", action="store_true",
                   help="time it: one warm-up, then --cycles timed generate calls")
    g.add_argument("--cycles", type=positive_int, default=5, help="timed calls with --benchmark")
    _package_flags(p)
    return p


NAME_HELP = ("model: a preset (tiny, small, bench, tiny-llama, ...), trained (the small BLOOM trained "
             "on Python's stdlib), a local HF directory, or a hub id already in the local cache "
             "(e.g. bigscience/bloom)")
# A standalone recipe's own flags, checked the package's way once bloomkit is importable.
_TYPES = {"--dtype": dtype_arg, "--batch_size": batch_sizes, "--max_new_tokens": positive_int,
          "--cycles": positive_int}


def add_package_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What the package adds to a standalone recipe's own parser (``recipes/*.py`` call it when
    ``bloomkit`` is importable).

    Args:
        parser: the recipe's ``argparse`` parser, holding its shared flags (``--name``,
            ``--dtype``, ``--batch_size``, ...) and its strategy's flags.

    A bad flag then ends in one ``error:`` line (exit 2) instead of argparse's usage dump, the
    shared flags get the package's checked types, ``--name`` also takes the embedded models,
    and the package's flags are added: ``--json_out``, ``--verify``, ``--eval_file``,
    ``--memory_budget``, ``--compile``, ``--device`` (and the launcher's ``--local_rank``).

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--batch_size", default=[1])
        >>> add_package_flags(p).parse_args(["--batch_size", "1,8", "--verify"]).batch_size
        [1, 8]
    """
    parser.error = Parser.error.__get__(parser)
    for action in parser._actions:          # argparse keeps no public list of its actions
        for opt in action.option_strings:
            if opt in _TYPES:
                action.type, action.choices = _TYPES[opt], None
            if opt == "--name":
                action.help = NAME_HELP
    _package_flags(parser)
    return parser


def _package_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bloomkit (the repository's package)")
    g.add_argument("--json_out", default=None, help="write the result record(s) here (JSON)")
    g.add_argument("--verify", action="store_true",
                   help="also run plain fp32 generate and report token agreement / logit error "
                        "(loads the whole model once more: small models only)")
    g.add_argument("--eval_file", default=None,
                   help="with --verify: a UTF-8 text file to measure held-out perplexity on "
                        "(default: the sample a trained checkpoint ships, e.g. --name trained)")
    g.add_argument("--memory_budget", default=None,
                   help="CPU stand-in for device memory in a sweep, e.g. 4GiB: batch sizes whose "
                        "estimated need exceeds it are recorded as oom")
    g.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile of the decode step (CUDA graphs on GPU); "
                        "the first call compiles (recorded as warmup_seconds)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    # `deepspeed script.py` appends --local_rank=K to each rank's command line (unless it is given
    # --no_local_rank); the rank itself is read from LOCAL_RANK, which every launcher sets.
    if not any("--local_rank" in a.option_strings for a in p._actions):
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def budget_bytes(text: str | None) -> int | None:
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise UserError(f"bad --memory_budget {text!r}; use a size like 4GiB") from None


def prepare(args) -> dict:
    """Validate the shared flags before anything expensive; returns the resolved settings."""
    device = args.device or default_device()
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    dtype = resolve_dtype(args.dtype, device)
    results.check_writable(args.json_out)
    budget = budget_bytes(args.memory_budget)
    path = models.resolve_model(args.name)
    base = (prompts.read_prompts_file(args.prompts_file) if args.prompts_file
            else prompts.model_prompts(path))
    if args.eval_file:
        prompts.eval_texts(path, args.eval_file)  # a bad file is refused now, not after the run
    # the model's files (config, shard headers, tokenizer) and whether the request can fit:
    # here, so every recipe and every rank refuses a broken model before loading anything
    from . import checkpoint
    from .dist import world_size

    info = checkpoint.check_model_dir(path)
    world = world_size()
    offloaded = any(getattr(args, k, None) for k in ("offload_folder", "nvme_offload_path",
                                                     "cpu_offload", "max_memory"))
    checkpoint.check_generation(
        info.config, dtype=dtype, device=device, batch_size=max(args.batch_size),
        max_new_tokens=args.max_new_tokens, world_size=world,
        prompt_len=checkpoint.prompt_tokens(info.tokenizer, base or prompts.STANDARD_PROMPTS),
        # one CUDA process: a device map may keep weights in CPU RAM beside the GPUs
        weights_elsewhere=offloaded or (device == "cuda" and world == 1))
    return {"device": device, "dtype": dtype, "base_prompts": base, "path": path,
            "budget": budget}


def summary_line(r: dict) -> str:
    head = f"{r['strategy']} {r['model']} {r['dtype']} ws={r['world_size']} bs={r['batch_size']}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}"
    parts = [head, f"load {r['load_seconds']:.2f}s"]
    if isinstance(r["ms_per_token"], float):
        parts.append(f"{r['ms_per_token']:.3f} ms/token")
        if r.get("ttft_ms") is not None and r.get("decode_ms_per_token") is not None:
            parts.append(f"first token {r['ttft_ms']:.1f} ms, decode {r['decode_ms_per_token']:.3f} ms/token")
        if (r.get("options") or {}).get("compile"):
            parts.append(f"compiled (first call {r['warmup_seconds']:.1f}s, {r['recompiles']} recompiles)")
    q = r.get("quality")
    if q:
        parts.append(f"identical={q['identical']} token_match={q['token_match']:.3f} "
                     f"top1={q['teacher_forced_top1']:.3f}")
        if q.get("perplexity") is not None:
            ref = q.get("reference_perplexity")
            parts.append(f"held-out perplexity {q['perplexity']:.2f}"
                         + (f" (fp32 {ref:.2f})" if ref is not None else ""))
    parts.append(f"first row: {r['texts'][0][:60]!r}")
    return " | ".join(parts)
