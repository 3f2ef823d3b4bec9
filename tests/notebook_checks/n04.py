"""Notebook 04 (comparison): every strategy launched as its recipe, each identical to plain
``generate`` in fp32; each ms/token recorded with the range of its cycles; the load call beside
the real start to ready (process start included); ZeRO's extra time per step beside one pass over
the weights."""
from bloomkit.measure import report, roofline
from nbtools import ODD

PARAMS = {"trained": {"CYCLES": 2, "MAX_NEW_TOKENS": 8},
          ODD: {"BATCH_SIZES": [1], "MAX_NEW_TOKENS": 4, "CYCLES": 2, "COMPILE": []}}
BUILD = ()
TIMEOUT = 600
PICTURES = ('plot_ms_per_token(report.with_labels', 'roofline.plot(roof)')   # the cells that draw (each must show its picture)
CLAIMS = {"*": ["ms_per_token accelerate fp32 bs1", "ms_per_token ds-inference tp=2 fp32 bs1",
                "ms_per_token ds-zero fp32 cpu bs1", "start_to_ready accelerate fp32",
                "start_to_ready ds-inference tp=2 fp32", "start_to_ready ds-zero fp32 cpu",
                "zero_minus_accelerate_bs1"],
          "trained": ["ms_per_token accelerate fp32 bs8", "ms_per_token ds-zero fp32 cpu bs8",
                      "zero_minus_accelerate_bs8"]}


def _close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def check(run):
    recs = run.records
    assert {r["strategy"] for r in recs} == {"accelerate", "ds-inference", "ds-zero"}
    assert all(r["model"] == run.model and r["status"] == "ok" for r in recs)
    assert all(r["quality"]["identical"] for r in recs), [r["quality"] for r in recs]
    assert {r["world_size"] for r in recs if r["strategy"] == "ds-inference"} == {2}
    for r in recs:   # each ms/token with the range of its own cycles, as the records hold them
        c = run.claim(f"ms_per_token {roofline.label(r)} bs{r['batch_size']}")
        lo, hi = report.ms_spread(r)
        assert _close(c["value"], r["ms_per_token"]) and _close(c["spread"][0], lo) and _close(c["spread"][1], hi)
        assert c["cycles"] == len(r["cycle_seconds"]) and lo <= r["ms_per_token"] <= hi
    for name, c in run.claims.items():
        if name.startswith("start_to_ready "):   # the process's start comes before its load call
            mine = [r for r in recs if roofline.label(r) == name.split(" ", 1)[1]]
            assert mine and _close(c["load_s"], round(mine[0]["load_seconds"], 2), 1e-6)
            assert c["value"] >= c["load_s"] > 0
    for bs in {r["batch_size"] for r in recs}:
        z = [r for r in recs if r["strategy"] == "ds-zero" and r["batch_size"] == bs]
        a = [r for r in recs if r["strategy"] == "accelerate" and r["batch_size"] == bs
             and not r["options"].get("compile")]
        c = run.claim(f"zero_minus_accelerate_bs{bs}")
        assert _close(c["value"], (z[0]["ms_per_token"] - a[0]["ms_per_token"]) * bs) and c["one_pass_ms"] > 0
    # completions whole: each set-up's first completion printed in full
    text = run.text()
    for r in recs:
        assert repr(r["texts"][0]) in text
