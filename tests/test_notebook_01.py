"""Notebook parameters and profiles fail early and clearly; every committed notebook is clean.
(Notebook 01 itself is executed by the registry test, tests/test_notebooks.py, with
tests/notebook_checks/n01.py.)"""
import json

import pytest

from bloomkit import notebooks
from conftest import NOTEBOOKS


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
