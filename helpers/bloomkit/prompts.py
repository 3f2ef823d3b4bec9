"""The prompts every strategy is timed on: the blog's 8, or the user's own file."""
from __future__ import annotations

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
