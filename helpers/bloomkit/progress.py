"""Progress on long work, shown only where a person is watching.

Loading BLOOM-176B takes minutes, a batch-size sweep or a training run longer: a person at a
terminal should see it move.  A log file, CI's output or an executed notebook should not: a
progress bar redraws itself with ``"\\r"``, which leaves every intermediate state in a file
(and ``tqdm.auto`` leaves a widget in a notebook).  One decision, :func:`watched`, switches all
of it:

* the libraries' own bars (transformers' "Loading weights", huggingface_hub's downloads):
  :func:`library_bars` turns them on or off for the process;
* the package's own loops (the sweep in :func:`bloomkit.measure.bench.run_variant`,
  ``bloomkit.train``, the notebook runner): :func:`bar`, a ``tqdm`` bar that is disabled (draws
  nothing, costs nothing) where nobody watches.

Lines a log should keep (a result, a loss every N steps) are still printed: :func:`echo` prints
them above an open bar, which is redrawn below them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable, Iterable, Iterator, TextIO

from . import dist

FALSE = ("", "0", "false", "no", "off")


def in_notebook_kernel() -> bool:
    """Whether this process is a Jupyter kernel (a notebook in JupyterLab, or papermill executing
    one): its output is saved in the notebook, where a bar is debris."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


def watched(stream: TextIO | None = None) -> bool:
    """Whether a person is watching this process's progress on ``stream``.

    Yes only when all hold: ``stream`` is a terminal (not a file, pipe or captured output), the
    ``CI`` environment variable is unset or false (CI services set ``CI=true``), the process is
    not a Jupyter kernel, and it is rank 0 of a launched job (``RANK``; the other ranks would draw
    the same bar again).

    Args:
        stream: where the progress would go (default: ``sys.stderr``, where tqdm draws).

    Example:
        >>> import io
        >>> watched(io.StringIO())    # a log file or captured output: nobody to show a bar to
        False
    """
    stream = sys.stderr if stream is None else stream
    if os.environ.get("CI", "").strip().lower() not in FALSE:
        return False
    if dist.rank() != 0 or in_notebook_kernel():
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):   # closed, or not a real stream
        return False


def library_bars(stream: TextIO | None = None) -> bool:
    """Switch the libraries' own progress bars on where :func:`watched`, off elsewhere.

    transformers draws "Loading weights" while ``from_pretrained`` reads a checkpoint, and
    huggingface_hub its downloads; both follow ``transformers.utils.logging.enable_progress_bar``
    / ``disable_progress_bar``, which hold for the whole process.  ``HF_HUB_DISABLE_PROGRESS_BARS=1``
    keeps them off even on a terminal.

    Returns:
        whether the bars are now on.

    Example:
        >>> import io
        >>> library_bars(io.StringIO())    # not a terminal: transformers' bars off
        False
    """
    from transformers.utils import logging as hf_logging

    on = watched(stream) and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in FALSE
    if on:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    return on


def bar(iterable: Iterable | None = None, *, stream: TextIO | None = None, **kwargs):
    """A ``tqdm`` progress bar on ``stream`` (default ``sys.stderr``), drawn only where
    :func:`watched`; elsewhere it is disabled: iterating, ``update`` and ``set_postfix_str``
    still work (and count nothing), nothing is written.

    Args:
        iterable: what to iterate over, as ``tqdm(iterable)``; ``None`` for a bar moved by
            ``update`` (set ``total``).
        stream: the terminal to draw on.
        kwargs: tqdm's own: ``desc``, ``total``, ``unit``, ``leave``, ...

    Example:
        >>> import io
        >>> log = io.StringIO()
        >>> [x * x for x in bar(range(3), desc="squares", stream=log)]   # not watched: silent
        [0, 1, 4]
        >>> log.getvalue()
        ''
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=stream, disable=not watched(stream), **kwargs)


def echo(line: str) -> None:
    """Print ``line`` to stdout (flushed: a log keeps it) above any bar open on the terminal,
    which is redrawn below it; where no bar is drawn, a plain ``print``.

    Example:
        >>> echo("step 50  loss 3.21")
        step 50  loss 3.21
    """
    from tqdm import tqdm

    with tqdm.external_write_mode():
        print(line, flush=True)


@contextlib.contextmanager
def ticking(progress, every: float = 1.0, note: Callable[[], str] | None = None) -> Iterator[None]:
    """Redraw ``progress`` (a :func:`bar`) every ``every`` seconds while the block runs, so its
    elapsed time moves while one long step (a notebook, a checkpoint) is under way; nothing where
    the bar is disabled.

    Args:
        progress: the bar.
        every: seconds between redraws.
        note: called at each redraw for the bar's postfix (e.g. the step's own elapsed time).

    Example:
        >>> import io, time
        >>> with bar(total=1, stream=io.StringIO()) as b, ticking(b, 0.01, note=lambda: "busy"):
        ...     time.sleep(0.02)
    """
    if getattr(progress, "disable", True):
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        while True:
            if note is not None:
                progress.set_postfix_str(note(), refresh=False)
            progress.refresh()
            if stop.wait(every):
                return

    thread = threading.Thread(target=tick, name="bloomkit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
