"""Train the ``trained`` preset: a small BLOOM that writes recognisable Python.

Every other embedded model is random (its completions are gibberish by design).  This script
builds one that has actually learnt something, without any download: the corpus is the
Python standard library's own source (``.py`` files of the running interpreter, under the
PSF License Agreement), the tokenizer is a byte-level BPE trained on it with the same code
as the embedded presets (:func:`bloomkit.models._save_tokenizer`), and the model is a
``BloomForCausalLM`` trained with AdamW on next-token prediction for a fixed time box.

    python -m bloomkit.train --out models/trained            # the shipped model (~18 min)
    python -m bloomkit.train --out /tmp/t --minutes 0.05 --max_files 20   # a smoke test

Another Python version has another standard library, hence another corpus: that is why the
repository ships the weights (``models/trained/``) instead of rebuilding them.  The run is
seeded (data order, initialisation), but the number of steps a time box allows depends on
the machine; pass ``--max_steps`` for a run that is reproducible step for step.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from . import progress
from .errors import UserError, cli_entry
from .models import _save_tokenizer, build_tokenizer
from .measure.quality import perplexity_of_ids

EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__",
                 "encodings"}  # encodings/: generated codec tables, not prose-like code
MAX_FILE_BYTES = 200_000          # drops generated giants such as pydoc_data/topics.py
HELDOUT_EVERY = 20                # every 20th file (sorted order) is held out
EVAL_TOKENS = 32_768              # held-out tokens the recorded perplexity is computed on
SAMPLE_TOKENS = 4_096             # held-out tokens shipped for the test to recompute
LOSS_CURVE = "loss_curve.png"    # the training loss per step, drawn beside the model
LICENCE = "PSF License Agreement (Python Software Foundation License), permissive"


# ---------------------------------------------------------------------------- corpus

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(max_mb: float = 4.0, max_files: int | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held-out) standard-library files, deterministic for one Python version.

    All ``.py`` files under the stdlib except tests, IDLE, site-packages, codec tables and
    files over 200 kB, in sorted order; every 20th is held out.  The training files are then
    capped at ``max_mb`` megabytes, picked in the order of a hash of their relative path (a
    fixed, alphabet-independent subset).  ``max_files`` keeps only the first N of each split
    in that order (for quick smoke runs)."""
    root = stdlib_root()
    files = [p for p in sorted(root.rglob("*.py"))
             if not EXCLUDED_DIRS & set(p.relative_to(root).parts)
             and p.stat().st_size <= MAX_FILE_BYTES]
    held = [p for i, p in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [p for i, p in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]

    def key(p: Path) -> str:
        return hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest()

    picked, total = [], 0
    for p in sorted(train, key=key):
        if total >= max_mb * 1e6:
            break
        picked.append(p)
        total += p.stat().st_size
    held = sorted(held, key=key)
    if max_files:
        picked, held = picked[:max_files], held[:max(1, max_files // 10)]
    return sorted(picked), held


def read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def encode(tok, texts: list[str], eos_id: int = 2) -> list[int]:
    """One stream: each file's tokens followed by ``</s>``."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return ids


# ---------------------------------------------------------------------------- evaluation

# ---------------------------------------------------------------------------- training

def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bloomkit.train`` (``bloomkit-train``).

    A bad flag ends in one ``error:`` line (exit 2); ``--help`` gives each flag's default and
    what it costs in memory or time.

    Example:
        >>> parser().parse_args(["--out", "/tmp/t", "--minutes", "0.05"]).minutes
        0.05
    """
    from .cli import Parser

    ap = Parser(prog="python -m bloomkit.train", description=__doc__.split("\n")[0],
                epilog="Example (a smoke test, seconds): python -m bloomkit.train --out /tmp/t "
                       "--minutes 0.05 --max_files 20.  Step time and memory grow with "
                       "--batch x --seq_len (activations) and with --hidden and --layers (weights, "
                       "gradients and AdamW's two moments: 16 bytes per parameter in fp32).")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="directory to write the checkpoint to (safetensors weights, tokenizer, "
                         "held-out sample, bloomkit_trained.json); required")
    run = ap.add_argument_group("how long it trains")
    run.add_argument("--minutes", type=float, default=18.0,
                     help="training time box; the steps it allows depend on the machine, and more "
                          "steps give a lower loss (default: %(default)s, the shipped model)")
    run.add_argument("--max_steps", type=int, default=None,
                     help="stop after this many steps, and schedule the learning rate by steps: "
                          "reproducible step for step on any machine (default: none, the time box "
                          "decides)")
    run.add_argument("--seed", type=int, default=1234,
                     help="seeds the data order and the initialisation (default: %(default)s)")
    run.add_argument("--log_every", type=int, default=50,
                     help="print the loss every N steps (default: %(default)s)")
    run.add_argument("--threads", type=int, default=2,
                     help="torch threads; 1 is faster when other jobs share the cores "
                          "(default: %(default)s)")
    data = ap.add_argument_group("corpus and tokenizer (Python's standard library)")
    data.add_argument("--max_mb", type=float, default=4.0,
                      help="training corpus cap in MB; tokenizing takes longer and the token "
                           "tensor grows with it (8 bytes per token) (default: %(default)s)")
    data.add_argument("--max_files", type=int, default=None,
                      help="only the first N training files and N/10 held-out ones: a smoke run in "
                           "seconds (default: every file within --max_mb)")
    data.add_argument("--vocab", type=int, default=4096,
                      help="byte-level BPE vocabulary trained on the corpus; the embedding (tied "
                           "with the LM head) holds vocab x hidden parameters, and the logits of "
                           "each step batch x seq_len x vocab floats (default: %(default)s)")
    data.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="reuse DIR's tokenizer (tokenizer.json) instead of training one: a draft "
                           "for speculative decoding must share its target's vocabulary exactly "
                           "(default: train one; --vocab is then ignored)")
    model = ap.add_argument_group("the model (a BloomForCausalLM) and the optimiser")
    model.add_argument("--hidden", type=int, default=256,
                       help="hidden size; parameters grow as 12 x layers x hidden^2, and step time "
                            "with them (default: %(default)s)")
    model.add_argument("--layers", type=int, default=4,
                       help="transformer blocks; parameters, memory and step time grow linearly "
                            "(default: %(default)s)")
    model.add_argument("--heads", type=int, default=8,
                       help="attention heads; must divide --hidden (head size hidden/heads) "
                            "(default: %(default)s)")
    model.add_argument("--seq_len", type=int, default=128,
                       help="tokens per training row; attention's memory and time grow with its "
                            "square (default: %(default)s)")
    model.add_argument("--batch", type=int, default=16,
                       help="rows per step (batch x seq_len tokens); activation memory and step "
                            "time grow linearly (default: %(default)s)")
    model.add_argument("--lr", type=float, default=2e-3,
                       help="AdamW's peak learning rate: 100-step warm-up, then cosine to 10%% "
                            "(default: %(default)s)")
    return ap


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``python -m bloomkit.train`` and the ``bloomkit-train`` command (argv: ``sys.argv``)."""
    args = parser().parse_args(argv)
    for name in ("minutes", "vocab", "hidden", "layers", "heads", "seq_len", "batch", "threads"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.hidden % args.heads:
        raise UserError(f"--heads {args.heads} does not divide --hidden {args.hidden}")
    if args.max_files is not None and args.max_files <= 0:
        raise UserError(f"--max_files must be positive, got {args.max_files}")
    from .results import check_writable

    check_writable(Path(args.out) / "config.json", "--out")  # before the minutes of training
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise UserError(f"--tokenizer {args.tokenizer}: no tokenizer.json there; pass the directory "
                        "of the model the draft is for (e.g. models/trained)")

    # idle OpenMP threads spinning make multi-thread runs many times slower on shared cores
    # (as the launcher does); only effective before torch is first imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import BloomConfig, BloomForCausalLM, GenerationConfig

    progress.library_bars()   # transformers' "Writing model shards" bar: a terminal's, not a log's
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)

    train_files, held_files = corpus_files(args.max_mb, args.max_files)
    root = stdlib_root()
    train_texts = [read(p) for p in train_files]
    held_texts = [read(p) for p in held_files]
    if args.tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    else:
        tok = build_tokenizer(args.vocab, texts=train_texts)
    vocab = tok.get_vocab_size()
    train_ids = encode(tok, train_texts)
    held_ids = encode(tok, held_texts)
    print(f"corpus: {len(train_files)} train files ({sum(map(len, train_texts)) / 1e6:.2f} M chars, "
          f"{len(train_ids)} tokens), {len(held_files)} held-out files ({len(held_ids)} tokens), "
          f"vocab {vocab}; {time.time() - t0:.1f}s", flush=True)

    config = BloomConfig(vocab_size=vocab, hidden_size=args.hidden, n_layer=args.layers,
                         n_head=args.heads, initializer_range=0.02, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    warmup = 100
    print(f"model: BLOOM hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"{n_params / 1e6:.2f} M parameters; training for {args.minutes:g} min", flush=True)

    model.train()
    t_train, step, ema = time.time(), 0, None
    losses, averages = [], []   # every step's loss and the log's avg: the curve saved beside the model
    tokens_per_step = args.batch * args.seq_len
    # on a terminal: a bar over the steps (--max_steps) or the time box, with loss and tokens/s
    by_steps = args.max_steps is not None
    bar = progress.bar(total=args.max_steps if by_steps else round(budget, 1), desc="training",
                       bar_format="{l_bar}{bar}| " + ("{n_fmt}/{total_fmt} steps " if by_steps else "")
                                  + "[{elapsed}<{remaining}{postfix}]")
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget or (args.max_steps is not None and step >= args.max_steps):
            break
        # schedule by the fraction of the time box used (steps are not known in advance):
        # linear warm-up, then cosine decay to 10 % of the peak
        frac = elapsed / budget if args.max_steps is None else step / args.max_steps
        lr = args.lr * (min(1.0, (step + 1) / warmup) *
                        (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s: s + args.seq_len + 1] for s in starts.tolist()])
        loss = _loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        ema = losses[-1] if ema is None else 0.95 * ema + 0.05 * losses[-1]
        averages.append(ema)
        now = max(time.time() - t_train, 1e-6)
        tokens_per_s = step * tokens_per_step / now
        bar.set_postfix_str(f"step {step}, loss {ema:.3f}, {tokens_per_s:,.0f} tokens/s", refresh=False)
        bar.update(1 if by_steps else min(now, budget) - bar.n)
        if step % args.log_every == 0 or step == 1:
            progress.echo(f"step {step:6d}  loss {losses[-1]:.3f}  (avg {ema:.3f})  lr {lr:.2e}  "
                          f"{tokens_per_s:8,.0f} tokens/s  {now:7.1f}s")
    bar.close()
    train_seconds = time.time() - t_train

    model.eval()
    eval_len = min(256, max(8, len(held_ids) // 2))
    ppl = perplexity_of_ids(model, held_ids, eval_len, EVAL_TOKENS)
    print(f"trained {step} steps in {train_seconds / 60:.1f} min; final train loss {ema:.3f}; "
          f"held-out perplexity {ppl:.2f} (first {min(EVAL_TOKENS, len(held_ids))} held-out "
          f"tokens, windows of {eval_len})", flush=True)

    # the held-out files whose tokens the test recomputes the perplexity on (PSF-licensed text)
    sample_files, n_tok = [], 0
    for p, text in zip(held_files, held_texts):
        sample_files.append((str(p.relative_to(root)), text))
        n_tok += len(tok.encode(text).ids) + 1
        if n_tok > SAMPLE_TOKENS:
            break
    sample_ids = encode(tok, [t for _, t in sample_files])
    sample_ppl = perplexity_of_ids(model, sample_ids, eval_len, SAMPLE_TOKENS)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)  # fp32 (what it was trained in)
    if args.tokenizer:   # the very same files: same ids, same special tokens
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(Path(args.tokenizer) / f, out / f)
    else:
        _save_tokenizer(tok, out, bloom=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False,
                     max_new_tokens=64).save_pretrained(out)
    (out / "heldout_sample.json").write_text(json.dumps(
        {"note": "held-out standard-library files (PSF License Agreement); the test re-measures "
                 "the perplexity on their first tokens", "files": [f for f, _ in sample_files],
         "texts": [t for _, t in sample_files]}, indent=1) + "\n")
    meta = {
        "corpus": "Python standard library source (.py files under sysconfig stdlib, excluding "
                  "test/, tests/, idlelib/, site-packages/, encodings/ and files over 200 kB; "
                  f"training files capped at {args.max_mb:g} MB by hash of path; every "
                  f"{HELDOUT_EVERY}th file in sorted order held out)",
        "corpus_licence": LICENCE,
        "python_version": sys.version.split()[0],
        "python_note": "another Python version has another standard library, so it gives another "
                       "corpus: the weights are shipped rather than rebuilt",
        "train_files": len(train_files), "train_tokens": len(train_ids),
        "heldout_files": len(held_files), "heldout_tokens": len(held_ids),
        "tokenizer": f"reused from {Path(args.tokenizer).resolve().name}/tokenizer.json" if args.tokenizer else "byte-level BPE trained on the corpus",
        "model": {"hidden_size": args.hidden, "n_layer": args.layers, "n_head": args.heads,
                  "vocab_size": vocab, "parameters": n_params, "dtype": "float32"},
        "training": {"optimizer": "AdamW (betas 0.9/0.95, weight decay 0.1)", "peak_lr": args.lr,
                     "schedule": "100-step warm-up, cosine to 10% over the time box",
                     "seq_len": args.seq_len, "batch": args.batch, "seed": args.seed,
                     "minutes_budget": args.minutes, "torch_threads": args.threads,
                     "torch": torch.__version__},
        "steps": step, "train_tokens_seen": step * args.batch * args.seq_len,
        "seconds": round(train_seconds, 1), "final_train_loss": round(ema, 4),
        "heldout_perplexity": round(ppl, 3),
        "heldout_eval": {"tokens": min(EVAL_TOKENS, len(held_ids)), "window": eval_len},
        "heldout_sample_perplexity": round(sample_ppl, 3),
        "heldout_sample_eval": {"file": "heldout_sample.json", "tokens": SAMPLE_TOKENS,
                                "window": eval_len},
        "loss_curve": LOSS_CURVE,
    }
    (out / "bloomkit_trained.json").write_text(json.dumps(meta, indent=2) + "\n")
    curve = plot_loss_curve(losses, averages, out / LOSS_CURVE, tokens_per_step=tokens_per_step,
                            title=f"BLOOM {n_params / 1e6:.2f} M parameters: {step} steps in "
                                  + (f"{train_seconds / 60:.1f} min" if train_seconds >= 60 else
                                     f"{train_seconds:.1f} s") + f", held-out perplexity {ppl:.2f}")
    print(f"loss curve: {curve}", flush=True)
    print(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); "
          f"total {time.time() - t0:.0f}s", flush=True)
    return 0


def plot_loss_curve(losses: list[float], averages: list[float], path: str | Path, *,
                    title: str = "", tokens_per_step: int | None = None) -> Path:
    """Draw a run's training loss per step, with the moving average the log prints as ``avg``,
    to a PNG at ``path``.

    Args:
        losses: the loss of every step, in order (nats per token: cross-entropy).
        averages: the moving average after each step (the log's ``avg``).
        path: where the PNG goes (``bloomkit.train`` puts it beside the model: ``loss_curve.png``).
        title: the figure's title (the run's size, steps and held-out perplexity).
        tokens_per_step: ``batch x seq_len``; when given, a second axis counts the tokens seen.

    Returns:
        ``path``, as a ``Path``.

    Example:
        >>> import tempfile
        >>> png = plot_loss_curve([5.1, 4.8, 4.2], [5.1, 5.09, 5.04], tempfile.mkdtemp() + "/loss.png")
        >>> png.stat().st_size > 1000
        True
    """
    from matplotlib.figure import Figure   # no pyplot: no display backend, no global state

    steps = range(1, len(losses) + 1)
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.8, alpha=0.35, label="loss of each step")
    ax.plot(steps, averages, lw=2, label="moving average (the log's avg)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    if tokens_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                   lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    path = Path(path)
    fig.savefig(path)
    return path


def _loss(model, batch):
    """Next-token cross-entropy of ``batch`` (rows of seq_len + 1 tokens)."""
    import torch

    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             batch[:, 1:].reshape(-1))


if __name__ == "__main__":
    sys.exit(main())
