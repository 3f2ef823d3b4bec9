"""Named claims: a lesson's headline values, recorded beside the sentence that states them.

A notebook cell that prints "compiled is 1.4x faster than eager" also records the number it
printed that from, by name, with its spread::

    claims.record("compile_speedup_bs1", c.speedup, spread=(1 / c.high, 1 / c.low),
                  verdict=c.verdict)

The value travels inside the executed notebook as one display output of a MIME type of its
own (the way papermill's scrapbook "glues" values), which front ends and HTML exports do not
render: the learner reads the sentence, a test reads the claim (:func:`read`) and checks it
against the run's records with a tolerance.
"""
from __future__ import annotations

import json
from pathlib import Path

MIME = "application/vnd.bloomkit.claim+json"


def record(name: str, value, *, spread: tuple | None = None, unit: str = "", **extra) -> dict:
    """Record ``value`` under ``name`` in the running notebook's outputs (outside a notebook:
    nothing is shown).

    Args:
        name: a stable identifier (``snake_case``): tests look claims up by it.
        value: a JSON value: a number, a string, a list, a dict.
        spread: ``(low, high)`` of a measured value, when it has one.
        unit: ``ms/token``, ``x``, ``GB``, ...
        extra: anything else a test needs (a verdict, the sample count).

    Example:
        >>> record("weights_gb", 352.0, unit="GB")["value"]
        352.0
    """
    claim = {"name": name, "value": value, "spread": list(spread) if spread else None,
             "unit": unit, **extra}
    json.dumps(claim)   # a claim that cannot be stored fails here, in the cell that makes it
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return claim
    if get_ipython() is not None:
        display({MIME: claim}, raw=True)
    return claim


def read(notebook: str | Path) -> dict[str, dict]:
    """Every claim an executed notebook recorded, by name (the last one wins)."""
    nb = json.loads(Path(notebook).read_text())
    found = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            claim = out.get("data", {}).get(MIME)
            if claim is not None:
                found[claim["name"]] = claim
    return found


def record_comparison(name: str, comparison, a, b, *, sentence: str | None = None, **extra) -> dict:
    """Record a timing comparison (:func:`bloomkit.measure.compare.compare_times`) with the
    interleaved samples it was made from, so a test can recompute the verdict.

    Args:
        name: the claim's name.
        comparison: the :class:`~bloomkit.measure.compare.Comparison` of ``a`` against ``b``.
        a, b: the per-cycle samples of the two sides, in the order they were taken.
        sentence: the sentence the cell prints from it (a test finds it in the cell's output).

    Example:
        >>> from bloomkit.measure.compare import compare_times
        >>> a, b = [1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.1, 1.9, 2.2, 2.0]
        >>> record_comparison("speedup", compare_times(a, b), a, b)["verdict"]
        'faster'
    """
    return record(name, comparison.ratio, spread=(comparison.low, comparison.high), unit="time ratio",
                  verdict=comparison.verdict, pairs=comparison.pairs, a=[float(x) for x in a],
                  b=[float(x) for x in b], sentence=sentence, **extra)


def record_values(name: str, a: float, b: float, resolution: float, *, sentence: str | None = None,
                  unit: str = "", **extra) -> dict:
    """Record a comparison of two values that are not timings (perplexity, agreement) with the
    resolution below which they count as the same
    (:func:`bloomkit.measure.compare.compare_values`).

    Example:
        >>> record_values("bf16_perplexity", 70.01, 70.05, 0.1)["verdict"]
        'the same'
    """
    from .measure.compare import compare_values

    return record(name, float(a), unit=unit, reference=float(b), resolution=float(resolution),
                  verdict=compare_values(a, b, resolution), sentence=sentence, **extra)
