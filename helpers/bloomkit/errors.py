"""One-line, actionable errors for everything a user can get wrong.

Every check in the package raises :class:`UserError` with a message that names the
fix.  Command-line entry points wrap their ``main`` in :func:`cli_entry`, which turns
such an error (and the few library errors we can recognise, such as running out of
memory) into a single ``error: ...`` line on stderr and a non-zero exit code, instead
of a traceback.
"""
from __future__ import annotations

import functools
import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or machine; the message says how to fix it."""


def _oneline(text: str) -> str:
    return " ".join(str(text).split())


def translate(exc: BaseException) -> UserError | None:
    """Map well-known library failures onto one-line, actionable errors."""
    if isinstance(exc, UserError):
        return exc
    name = type(exc).__name__
    text = _oneline(exc)
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return UserError(f"out of memory ({text[:160]}); lower --batch_size or --max_new_tokens, "
                         "or offload more (--max_memory / --offload_folder)")
    if isinstance(exc, MemoryError):
        return UserError("out of CPU memory; lower --batch_size, or offload weights to disk "
                         "with --offload_folder")
    return None


def cli_entry(main):
    """Decorate a recipe's ``main(argv=None)`` so bad input ends in one line + exit 2.

    Set ``BLOOMKIT_TRACEBACK=1`` to see the full traceback when debugging.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the point is to catch everything
            err = translate(exc)
            if err is None or os.environ.get("BLOOMKIT_TRACEBACK"):
                raise
            rank = os.environ.get("RANK")
            prefix = f"error (rank {rank})" if rank not in (None, "0") else "error"
            print(f"{prefix}: {_oneline(err)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
