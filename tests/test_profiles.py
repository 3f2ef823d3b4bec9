"""Every profile against every notebook: names checked, papermill prepares the notebook.

A GPU profile is never *run* on the CPU CI, so this is what keeps it from rotting: a renamed
parameter or a typo in a profile fails here, not on the expensive machine."""
import ast
import json

import pytest
import yaml

from bloomkit import notebooks
from bloomkit.errors import UserError

PROFILES = sorted(p.stem for p in notebooks.PROFILE_DIR.glob("*.yaml"))
NOTEBOOKS = notebooks.notebooks()
SHARED = {"MODEL_NAME", "DTYPE", "BATCH_SIZES", "MAX_NEW_TOKENS", "CYCLES", "RESULTS_PATH"}


def test_the_four_profiles_exist_and_cpu_tiny_is_the_default():
    assert {"cpu-tiny", "cpu-bench", "1xH100", "8xA100-bloom176b"} <= set(PROFILES)
    makefile = (notebooks.ROOT / "Makefile").read_text()
    assert "PROFILE ?= cpu-tiny" in makefile


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_takes_the_shared_names(nb):
    assert SHARED <= set(notebooks.parameters_of(nb)), nb.name


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_line(nb, caplog):
    """papermill infers each parameter's type and help from its line and skips (with a warning
    during `make run`) any line it cannot parse, e.g. one with a second `=` in its comment."""
    import papermill

    with caplog.at_level("WARNING", logger="papermill"):
        found = papermill.inspect_notebook(str(nb))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert set(found) == set(notebooks.parameters_of(nb)), nb.name


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_shape(profile):
    data = yaml.safe_load((notebooks.PROFILE_DIR / f"{profile}.yaml").read_text())
    assert data.get("description"), f"{profile}: say what machine it is for"
    assert {"MODEL_NAME", "DTYPE", "BATCH_SIZES", "MAX_NEW_TOKENS"} <= set(data["common"])
    stems = {p.stem for p in NOTEBOOKS}
    for stem, params in (data.get("notebooks") or {}).items():
        assert stem in stems, f"{profile}: no notebook {stem}"   # a typo would be ignored
        notebooks.check_parameters(notebooks.NOTEBOOK_DIR / f"{stem}.ipynb", params)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_notebook_prepares_with_every_profile(profile, tmp_path):
    prof = notebooks.load_profile(profile)
    for nb in NOTEBOOKS:
        params = notebooks.profile_parameters(prof, nb)
        params["RESULTS_PATH"] = str(tmp_path / f"{nb.stem}.jsonl")
        out = notebooks.execute(nb, tmp_path / nb.name, params, prepare_only=True)
        cells = json.loads(out.read_text())["cells"]
        injected = [c for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
        assert len(injected) == 1, nb.name
        src = "".join(injected[0]["source"])
        got = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(src).body}
        assert got == params, nb.name      # every value arrives as the profile wrote it


def test_unknown_parameter_is_an_error_not_a_warning(tmp_path):
    nb = notebooks.NOTEBOOK_DIR / "04_comparison.ipynb"
    with pytest.raises(UserError, match="no parameter.*BATCH_SIZE\\b.*BATCH_SIZES"):
        notebooks.execute(nb, tmp_path / "x.ipynb", {"BATCH_SIZE": [1]}, prepare_only=True)
    assert not (tmp_path / "x.ipynb").exists()


def test_bad_profile_name_names_the_choices():
    with pytest.raises(UserError, match="cpu-tiny"):
        notebooks.load_profile("cpu-tiyn")


def test_gpu_workflow_runs_a_profile_and_keeps_runs():
    wf = yaml.safe_load((notebooks.ROOT / ".github/workflows/gpu-notebooks.yml").read_text())
    job = wf["jobs"]["notebooks"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    choices = wf[True]["workflow_dispatch"]["inputs"]["profile"]["options"]  # YAML 1.1: on -> True
    assert set(choices) <= set(PROFILES) and job["env"]["PROFILE"].endswith("'1xH100' }}")
    runs = [s.get("run", "") for s in job["steps"]]
    assert any(r.startswith("make run PROFILE=") for r in runs)
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"].startswith("runs/") and upload["if"] == "always()"


def test_a_gpu_profile_on_a_cpu_machine_stops_at_once():
    """`make run PROFILE=1xH100` on a machine without a GPU: one line naming the profile that
    suits, before any model is built or notebook started."""
    import subprocess
    import sys
    import time

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bloomkit.notebooks", "--profile", "1xH100",
                           "--out", "/tmp/bloomkit-never"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("error: profile 1xH100 needs 1 CUDA GPU") and "cpu-tiny" in proc.stderr
    assert time.perf_counter() - t0 < 60


def test_a_long_profile_says_how_long_before_it_starts():
    assert "about 10 minutes" in notebooks.check_machine(notebooks.load_profile("cpu-bench"))
