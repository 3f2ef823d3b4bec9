"""The prompts every strategy is timed on: the blog's 8, the model's own, or the user's file."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

STANDARD_PROMPTS = [
    "DeepSpeed is a machine learning framework",
    "He is working on",
    "He has a",
    "He got all",
    "Everyone is happy and I can",
    "The new movie that got Oscar this year",
    "In the far far distance from our galaxy,",
    "Peace is the only way",
]


HELDOUT_FILE = "heldout_sample.json"  # beside a trained checkpoint: {"texts": [...]}
MODEL_PROMPTS = "prompts.json"  # beside a checkpoint: {"prompts": [...]} (the trained model's are code)


def model_prompts(path) -> list[str] | None:
    """The prompts a model directory ships (``prompts.json``), else ``None`` (the blog's 8).
    The ``trained`` model learnt Python source, so English prompts would teach nothing."""
    f = Path(path) / MODEL_PROMPTS if path is not None else None
    if f is None or not f.is_file():
        return None
    try:
        found = json.loads(f.read_text(encoding="utf-8"))["prompts"]
    except (ValueError, KeyError, TypeError):
        found = None
    if not found or not all(isinstance(x, str) and x for x in found):
        raise UserError(f"{f} is not a prompts file ({{\"prompts\": [\"...\", ...]}}); fix or "
                        "remove it, or pass --prompts_file")
    return list(found)


def make_prompts(batch_size: int, prompts: list[str] | None = None) -> list[str]:
    """``prompts`` (default: the blog's 8) repeated until there are ``batch_size`` rows."""
    if batch_size <= 0:
        raise UserError(f"batch size must be a positive integer, got {batch_size}; "
                        "pass --batch_size 1 or more")
    base = list(prompts or STANDARD_PROMPTS)
    if not base:
        raise UserError("no prompts given; put one prompt per line in --prompts_file")
    return [base[i % len(base)] for i in range(batch_size)]


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {path} does not exist; pass --prompts_file to a text file "
                        "with one prompt per line")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read prompts file {path} ({exc.strerror or exc}); check its "
                        "permissions or pass another --prompts_file") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM (some Windows editors write one) is fine
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"prompts file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on "
                        f"line {line}); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} "
                        "> prompts-utf8.txt`") from None
    if "\x00" in text:
        raise UserError(f"prompts file {path} contains NUL bytes (a binary file?); pass a text "
                        "file with one prompt per line")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"prompts file {path} is empty; put one prompt per line in it")
    return lines


def eval_texts(path, eval_file=None) -> list[str] | None:
    """The text perplexity is measured on: ``eval_file`` (plain UTF-8 text, e.g. a held-out
    slice of your own data), else the ``heldout_sample.json`` shipped beside a trained
    checkpoint (the ``trained`` preset has one), else ``None`` (a random model has nothing
    worth measuring)."""
    if eval_file:
        f = Path(eval_file)
        try:
            text = f.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--eval_file {eval_file} does not exist; pass a UTF-8 text file to "
                            "measure perplexity on") from None
        except UnicodeDecodeError:
            raise UserError(f"--eval_file {eval_file} is not UTF-8 text; save it as UTF-8") from None
        except OSError as exc:
            raise UserError(f"cannot read --eval_file {eval_file} ({exc.strerror or exc}); pass "
                            "a readable text file") from None
        if len(text.split()) < 16:
            raise UserError(f"--eval_file {eval_file} holds almost no text; give it at least a "
                            "few hundred words")
        return [text]
    f = Path(path) / HELDOUT_FILE if path is not None else None
    if f is None or not f.is_file():
        return None
    try:
        return list(json.loads(f.read_text())["texts"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{f} is not a held-out sample ({{\"texts\": [...]}}); remove it or "
                        "regenerate it with python -m bloomkit.train") from None


def shown(text: str) -> str:
    """``text`` as a page shows it: control characters other than newline and tab escaped.  An
    untrained model writes any token, a carriage return too, which in a printed cell would send
    the rest of the line back over its start.

    Example:
        >>> shown("a\\rb\\nc")
        'a\\\\rb\\nc'
    """
    return "".join(c if c in "\n\t" or c.isprintable() else c.encode("unicode_escape").decode() for c in text)
