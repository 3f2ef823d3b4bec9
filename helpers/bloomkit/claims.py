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
