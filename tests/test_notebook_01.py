"""Notebook 01 executed for real by papermill; its recorded results are read back."""
import json

import pytest

from bloomkit import notebooks, results
from conftest import NOTEBOOKS


@pytest.mark.timeout(300)
def test_accelerate_notebook_runs_and_records(tmp_path):
    """What `make run` does, restricted to notebook 01, with the CI profile."""
    notebooks.run_profile("cpu-tiny", tmp_path, only=["01"])
    out = tmp_path / "01_accelerate.ipynb"
    assert (tmp_path / "01_accelerate.html").stat().st_size > 10_000
    recs = results.read_records(tmp_path / "results.jsonl")
    assert recs == results.read_records(tmp_path / "01_accelerate.jsonl")
    variants = {r["options"]["variant"] for r in recs}
    assert variants == {"in-memory", "disk-offload", "int8"}
    assert len(recs) == 6 and all(r["batch_size"] in (1, 8) for r in recs)
    for r in recs:
        assert r["status"] == "ok" and r["ms_per_token"] > 0 and r["max_new_tokens"] == 20
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


def test_unknown_profile_and_profile_parameter(tmp_path, monkeypatch):
    from bloomkit.errors import UserError

    with pytest.raises(UserError, match="unknown profile"):
        notebooks.run_profile("no-such-profile", tmp_path)
    (tmp_path / "bad.yaml").write_text("common:\n  MODEL_NAME: tiny\n  BATCHSIZES: [1]\n")
    monkeypatch.setattr(notebooks, "PROFILE_DIR", tmp_path)
    with pytest.raises(UserError, match="BATCHSIZES"):
        notebooks.run_profile("bad", tmp_path / "out", only=["01"])
