"""Running a notebook under papermill in a test (the registry, ``tests/test_notebooks.py``).

Each notebook is executed twice: with its default model (``trained``, the small BLOOM trained on
Python's standard library) and with a model that is not a BLOOM, of odd sizes:

``odd-llama`` (Llama-style: hidden 96, 6 query heads sharing 3 key/value heads, RoPE, SwiGLU
MLP, untied head) shows that no cell assumes BLOOM: shapes come from ``bloomkit.arch`` and the
records, the BLOOM-only cells (ALiBi slopes per rank, kernel injection) say why they are
skipped, and what depends on the model is derived (ZeRO's quantization group: 64 does not
divide 96).  Each notebook also compares its model with one of another family (its
``SECOND_MODEL``: a Llama beside a BLOOM, the tiny BLOOM beside anything else).
"""
import json
import time

from bloomkit import models, notebooks, results
from conftest import NOTEBOOKS

ODD = "odd-llama"


def build(*names: str) -> None:
    """Generate presets once, outside any timed notebook."""
    for name in names:
        models.ensure_preset(name)


def execute(tmp_path, stem: str, params: dict, timeout: int | None = None) -> tuple[list[dict], dict]:
    """Run ``notebooks/<stem>.ipynb`` with ``params``; its result records and the executed
    notebook (JSON)."""
    res = tmp_path / "results.jsonl"
    t0 = time.perf_counter()
    out = notebooks.execute(NOTEBOOKS / f"{stem}.ipynb", tmp_path / f"{stem}.ipynb",
                            {"RESULTS_PATH": str(res), **params}, timeout=timeout)
    print(f"{stem} with {params.get('MODEL_NAME', 'its default model')}: {time.perf_counter() - t0:.1f} s")
    return (results.read_records(res) if res.exists() else []), json.loads(out.read_text())
