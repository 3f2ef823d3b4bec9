"""Notebook 01 executed for real by papermill (its default model, then a Llama of odd
sizes); its recorded results are read back.  Also: every committed notebook is clean."""
import json

import pytest

import nbtools
from bloomkit import notebooks, results
from conftest import NOTEBOOKS
from nbtools import ODD

VARIANTS = {"in-memory", "compiled", "bf16", "disk-offload", "int8", "nf4"}
QUANTIZED = {"int8", "nf4"}
# measured (trained, CPU): every variant's held-out perplexity within 0.1 % of fp32's 83.0
PPL_BOUND = 1.5


@pytest.fixture(scope="module", autouse=True)
def built():
    nbtools.build(ODD, "tiny", "tiny-llama")


@pytest.mark.notebooks
@pytest.mark.timeout(300)
def test_accelerate_notebook_runs_and_records(tmp_path):
    """What `make run` does, restricted to notebook 01, with the CI profile (the trained BLOOM)."""
    notebooks.run_profile("cpu-tiny", tmp_path, only=["01"])
    out = tmp_path / "01_accelerate.ipynb"
    assert (tmp_path / "01_accelerate.html").stat().st_size > 10_000
    recs = results.read_records(tmp_path / "results.jsonl")
    assert recs == results.read_records(tmp_path / "01_accelerate.jsonl")
    assert {r["options"]["variant"] for r in recs} == VARIANTS
    assert len(recs) == 2 * len(VARIANTS) and all(r["batch_size"] in (1, 8) for r in recs)
    for r in recs:
        assert r["model"] == "trained" and r["status"] == "ok" and r["ms_per_token"] > 0
        assert r["max_new_tokens"] == 20
        q = r["quality"]
        if r["dtype"] == "fp32":            # in memory and offloaded: exactly plain generate
            assert q["identical"], q
        # held-out perplexity beside the fp32 reference's, quantized within a sane bound
        assert q["perplexity"] > 1 and q["reference_perplexity"] > 1, q
        assert q["perplexity"] < PPL_BOUND * q["reference_perplexity"], (r["options"]["variant"], q)
        for tokens in r["tokens"]:          # a completion, not one token repeated
            assert len(set(tokens)) > 2, (r["options"]["variant"], r["texts"])
    assert any(r["options"].get("placement", {}).get("disk") for r in recs)
    compiled = [r for r in recs if r["options"].get("compile")]
    assert {r["options"]["variant"] for r in compiled} == {"compiled"}
    assert all(r["recompiles"] == 0 and r["warmup_seconds"] > max(r["cycle_seconds"]) for r in compiled)
    nb = json.loads(out.read_text())
    assert nbtools.output(nb, 'measure("compiled"').count("graphs compiled during the timed calls: 0") == 2
    table = nbtools.output(nb, "results.quality_table(")
    assert all(v in table for v in VARIANTS) and "fp32 perplexity on held-out text" in table
    assert nbtools.output(nb, "results.completions(").count("def __init__(self,") == len(VARIANTS)
    offload = nbtools.output(nb, "DISK_READ_GBPS * 1e9) * 1e3")
    assert "would add" in offload and "BLOOM-176B" in offload and "minutes per token" in offload
    speed = nbtools.output(nb, "for label, recs in quantized.items():")
    assert all(f"{q}, batch 1:" in speed for q in QUANTIZED)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb["cells"] for o in c.get("outputs", [])), "the plot is missing"
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("name") == "stderr"
                and "not available" in "".join(o["text"])], "planning for absent GPUs is quiet"


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


@pytest.mark.notebooks
@pytest.mark.timeout(240)
def test_accelerate_notebook_on_odd_llama(tmp_path):
    """Any model: a Llama of odd sizes (no held-out text, so no perplexity), small sweep."""
    recs, nb = nbtools.execute(tmp_path, "01_accelerate", {"MODEL_NAME": ODD, "BATCH_SIZES": [1, 4],
                                                           "MAX_NEW_TOKENS": 8, "CYCLES": 1, "COMPILE": False})
    assert {r["options"]["variant"] for r in recs} == VARIANTS - {"compiled"}
    for r in recs:
        assert r["model"] == ODD and r["status"] == "ok" and r["ms_per_token"] > 0
        assert "perplexity" not in r["quality"]
        if r["dtype"] == "fp32":
            assert r["quality"]["identical"], r["quality"]
    assert "ships no held-out text" in nbtools.output(nb, "results.quality_table(")
    plans = nbtools.output(nb, "kept whole:")
    assert "kept whole: ['LlamaDecoderLayer']" in plans and "kept whole: ['BloomBlock']" in plans
    assert "model.layers" in plans and "transformer.h" in plans
    checks = nbtools.output(nb, "def second_variant")
    assert "tiny" in checks and "True" in checks and "False" not in checks
    nbtools.kv_lines(nbtools.all_output(nb))
