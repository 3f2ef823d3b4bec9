"""The benchmarks of today's levers on small models: real launches and real generate calls, the
verdicts they print recomputed from the samples they saved (bloomkit.measure.compare)."""
import importlib.util

import pytest

from bloomkit.measure import compare
from conftest import ROOT


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_native_tp_against_autotp_both_identical():
    out = script("strategies").native_vs_autotp("tiny-llama", batch_sizes=(1, 3), new_tokens=4, cycles=1, rounds=1)
    assert out["identical"] == {"transformers": True, "deepspeed": True}
    assert {(r["engine"], r["batch_size"]) for r in out["rows"]} == {
        (e, b) for e in ("transformers", "deepspeed") for b in (1, 3)}
    for b, s in out["summary"].items():
        assert s["pairs"] == 1 and s["verdict"] == compare.TOO_FEW   # one round: no verdict


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_speculative_benchmark_tokens_identical_and_verdicts_from_samples():
    out = script("speculative").run(cycles=2, new_tokens=6)
    rows = out["methods"]
    lookups = [f"prompt lookup {n}" for n in (3, 5, 10)]
    assert {"plain", "draft", *lookups, "plain batch 2", "plain batch 4", "plain batch 8"} == set(rows)
    assert rows["plain"]["tokens_per_forward"] == 1.0
    for m in ("plain", "draft", *lookups):
        assert rows[m]["tokens_identical"], m
    cost = out["forward_cost_in_steps"]   # a forward of k tokens, in single-token steps
    assert set(cost) == {"1", "2", "4", "10"} and cost["1"] == 1.0
    for name, r in rows.items():
        if name == "plain":
            continue
        again = compare.compare_times(out["samples_s"][name], out["samples_s"]["plain"])
        assert r["vs_plain_batch_1"]["verdict"] == again.verdict == compare.TOO_FEW   # 2 cycles
