"""Notebook 01 executed for real by papermill; its recorded results are read back."""
import json

import pytest

from bloomkit import notebooks, results
from conftest import NOTEBOOKS


@pytest.mark.timeout(300)
def test_accelerate_notebook_runs_and_records(tmp_path):
    res = tmp_path / "01.jsonl"
    out = notebooks.execute(NOTEBOOKS / "01_accelerate.ipynb", tmp_path / "01.ipynb",
                            {"RESULTS_PATH": str(res), "BATCH_SIZES": [1, 4], "MAX_NEW_TOKENS": 8})
    recs = results.read_records(res)
    variants = {r["options"]["variant"] for r in recs}
    assert variants == {"in-memory", "disk-offload", "int8"}
    assert len(recs) == 6 and all(r["batch_size"] in (1, 4) for r in recs)
    for r in recs:
        assert r["status"] == "ok" and r["ms_per_token"] > 0 and r["max_new_tokens"] == 8
        if r["options"]["variant"] != "int8":
            assert r["quality"]["identical"], r["quality"]
    assert any(r["options"].get("placement", {}).get("disk") for r in recs)
    nb = json.loads(out.read_text())
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb["cells"] for o in c.get("outputs", [])), "the plot is missing"


def test_unknown_parameter_is_an_error(tmp_path):
    from bloomkit.errors import UserError

    with pytest.raises(UserError, match="no parameter"):
        notebooks.execute(NOTEBOOKS / "01_accelerate.ipynb", tmp_path / "x.ipynb", {"BATCH_SIZE": 3})
    assert not (tmp_path / "x.ipynb").exists()


def test_committed_notebooks_are_clean():
    for path in notebooks.notebooks():
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), path
        params = notebooks.parameters_of(path)
        for name in ("MODEL_NAME", "DTYPE", "BATCH_SIZES", "MAX_NEW_TOKENS", "CYCLES", "RESULTS_PATH"):
            assert name in params, f"{path.name} lacks parameter {name}"
