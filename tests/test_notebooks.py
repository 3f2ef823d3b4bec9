"""The notebook registry: every notebook executed by papermill with the CI profile's model
(``trained``) and with a Llama of odd sizes, its named claims checked against its own result
records (``tests/notebook_checks/nNN.py`` says what each notebook must show)."""
import pytest

import nbtools
import notebook_checks
from bloomkit import notebooks
from nbtools import ODD

STEMS = [p.stem for p in notebooks.notebooks()]
CASES = [pytest.param(stem, model, id=f"{stem[:2]}-{model}")
         for stem in STEMS for model in notebook_checks.module(stem).PARAMS]


def test_every_notebook_has_checks_for_both_models():
    for stem in STEMS:
        mod = notebook_checks.module(stem)
        assert {"trained", ODD} <= set(mod.PARAMS), stem
        assert callable(mod.check) and mod.CLAIMS, stem
        assert mod.PICTURES, f"{stem}: every lesson shows at least one picture (notebook_checks PICTURES)"


@pytest.mark.notebooks
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stem, model", CASES)
def test_notebook(stem, model, tmp_path):
    mod = notebook_checks.module(stem)
    nbtools.build(*getattr(mod, "BUILD", ()), *([model] if model != "trained" else []))
    params = notebooks.profile_parameters(notebooks.load_profile("cpu-tiny"), notebooks.NOTEBOOK_DIR / f"{stem}.ipynb")
    params.update(mod.PARAMS[model] or {})
    params["MODEL_NAME"] = model
    records, _ = nbtools.execute(tmp_path, stem, params, timeout=getattr(mod, "TIMEOUT", 600))
    run = notebook_checks.read(stem, model, records, tmp_path / f"{stem}.ipynb")
    wanted = [*mod.CLAIMS.get("*", []), *mod.CLAIMS.get(model, [])]
    missing = [n for n in wanted if n not in run.claims]
    assert not missing, f"{stem} on {model} did not record {missing}; it recorded {sorted(run.claims)}"
    notebook_checks.generic(run)
    notebook_checks.pictures(run, mod.PICTURES)
    mod.check(run)
