"""What each notebook must show, by name: one module per notebook (``n01.py`` for
``01_accelerate.ipynb``), read by the one registry test ``tests/test_notebooks.py``.

A module defines:

* ``PARAMS``: ``{model: papermill parameters}``; ``"trained"`` runs with the ``cpu-tiny`` profile
  (what ``make run`` and CI use), other models with the small parameters given (``None`` takes the
  profile's too);
* ``BUILD``: presets to generate before the notebook runs (outside its time);
* ``TIMEOUT``: seconds for one execution;
* ``CLAIMS``: ``{model: [names]}`` the notebook must record (``"*"``: for every model);
* ``PICTURES``: pieces of source code, one per picture the notebook draws: the cell holding it must
  show an image (``image/png``) when executed, for every model (:func:`pictures`);
* ``check(run)``: assertions on the claims against the result records, with tolerances.

Generic checks (every notebook, every model) are in :func:`generic`: a timing verdict agrees with
its own recorded samples (never that one side must win: that would flake on a shared CPU), a
value comparison agrees with its resolution, every recorded sentence is printed, and what a
learner reads has no warnings, progress debris or internal words.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field

from bloomkit import claims as claims_mod
from bloomkit.measure.compare import compare_times, compare_values

# words that belong to the code base, not to a lesson (markdown and printed outputs)
INTERNAL = re.compile(r"\b(variants?|presets?|harness|issues?|goals?|outside_linears_ms)\b", re.I)
WARNING = re.compile(r"(Warning\b|warnings\.warn|\bWARNING\b|Some parameters are on the meta device|"
                     r"shm_comm_op built|endurance)")


def module(stem: str):
    return importlib.import_module(f"notebook_checks.n{stem[:2]}")


def _text(cell: dict) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            parts.append("".join(o["text"]))
        elif o["output_type"] in ("execute_result", "display_data"):
            data = o.get("data", {})
            parts.append("".join(data.get("text/plain", "")))
        elif o["output_type"] == "error":
            parts.append("\n".join(o.get("traceback", [])))
    return "\n".join(parts)


@dataclass
class Run:
    """One executed notebook: its model, result records, the notebook JSON and its claims."""

    stem: str
    model: str
    records: list[dict]
    nb: dict
    claims: dict[str, dict] = field(default_factory=dict)

    def claim(self, name: str) -> dict:
        assert name in self.claims, f"{self.stem} on {self.model} recorded no claim {name!r}; it has {sorted(self.claims)}"
        return self.claims[name]

    def value(self, name: str):
        return self.claim(name)["value"]

    @property
    def code_cells(self) -> list[dict]:
        return [c for c in self.nb["cells"] if c["cell_type"] == "code"]

    def text(self) -> str:
        """Every printed output, as a learner reads it."""
        return "\n".join(_text(c) for c in self.code_cells)

    def markdown(self) -> str:
        return "\n".join("".join(c["source"]) for c in self.nb["cells"] if c["cell_type"] == "markdown")

    def output_of(self, claim_name: str) -> str:
        """The printed output of the cell that recorded ``claim_name``."""
        for c in self.code_cells:
            for o in c.get("outputs", []):
                got = o.get("data", {}).get(claims_mod.MIME)
                if got and got["name"] == claim_name:
                    return _text(c)
        raise AssertionError(f"no cell recorded {claim_name!r}")


def generic(run: Run) -> None:
    """The checks every notebook passes, whatever its model."""
    for c in run.code_cells:
        for o in c.get("outputs", []):
            assert o["output_type"] != "error", "".join(o.get("traceback", []))[-2000:]
            if o["output_type"] == "stream":
                text = "".join(o["text"])
                assert o["name"] != "stderr" or not text.strip(), \
                    f"{run.stem}: a learner reads stderr output: {text[:300]!r}"
                assert "\r" not in text, f"{run.stem}: progress-bar debris: {text[:200]!r}"
            assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), \
                f"{run.stem}: a progress widget is left in the output"
    shown = run.text()
    m = WARNING.search(shown)
    assert not m, f"{run.stem}: a warning in the outputs: ...{shown[max(0, m.start() - 150):m.end() + 150]}..."
    for where, text in (("markdown", run.markdown()), ("outputs", shown)):
        m = INTERNAL.search(text)
        assert not m, f"{run.stem}: internal word {m.group(0)!r} in the {where}: ...{text[max(0, m.start() - 100):m.end() + 100]}..."
    for name, c in run.claims.items():
        if "a" in c and "b" in c and c.get("unit") == "time ratio":
            again = compare_times(c["a"], c["b"])
            assert again.verdict == c["verdict"], (name, again, c["verdict"])
            assert abs(again.ratio - c["value"]) < 1e-9 and c["pairs"] == len(c["a"]), name
            if c["verdict"] in ("faster", "slower"):
                assert c["pairs"] >= 5, name
        if "resolution" in c and "reference" in c:
            assert compare_values(c["value"], c["reference"], c["resolution"]) == c["verdict"], name
        if c.get("sentence"):
            assert c["sentence"] in run.output_of(name), (name, c["sentence"])


def pictures(run: Run, markers) -> None:
    """Each marker (a piece of source code, e.g. ``"plot_ms_per_token("``) names a cell that draws:
    it is there once, and its executed outputs hold a picture."""
    for marker in markers:
        cells = [c for c in run.code_cells if marker in "".join(c["source"])]
        assert len(cells) == 1, f"{run.stem}: {len(cells)} cells hold {marker!r}; a picture marker names one cell"
        assert any("image/png" in o.get("data", {}) for o in cells[0].get("outputs", [])), \
            f"{run.stem} on {run.model}: the cell drawing with {marker!r} shows no picture (image/png)"


def read(stem: str, model: str, records: list[dict], nb_path) -> Run:
    return Run(stem, model, records, json.loads(open(nb_path).read()), claims_mod.read(nb_path))
