"""Notebook 05 (static KV cache, torch.compile, CUDA graphs): compiled tokens equal plain
``generate``, no graph compiled during the timed calls, the eager/compiled comparison per batch
size made of interleaved pairs whose medians are the records' decode steps, the GPU file cited
with the date recorded inside it, BLOOM-176B's memory floor, and the step's breakdown drawn (eager
beside compiled, an image in the executed notebook)."""
import json
import re
import statistics
from pathlib import Path

from bloomkit import memory, models
from nbtools import ODD

PARAMS = {"trained": None, ODD: {"BATCH_SIZES": [1, 4], "MAX_NEW_TOKENS": 6, "CYCLES": 2}}
BUILD = ()
TIMEOUT = 600   # three cold compilations: about 60-90 s on a quiet 2-core machine
PICTURES = ('plot_step_breakdown(rows',)   # the cells that draw (each must show its picture)
CLAIMS = {"*": ["compiled_tokens_identical", "recompiles", "bloom_memory_floor_ms", "gpu_recorded"]}
GPU_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu-h200-bench-100tok.json"


def check(run):
    assert run.value("compiled_tokens_identical") is True
    assert "compiled tokens identical to plain generate: True" in run.output_of("compiled_tokens_identical")
    assert run.value("recompiles") == 0

    recs = run.records
    sizes = sorted({r["batch_size"] for r in recs})
    assert len(recs) == 2 * len(sizes) and {r["options"]["variant"] for r in recs} == {"eager", "compiled"}
    for bs in sizes:
        c = run.claim(f"compile_bs{bs}")
        assert c["pairs"] >= 5 and len(c["a"]) == len(c["b"]) == c["pairs"], c
        assert c["recompiles"] == 0 and c["identical"] is True
        by = {r["options"]["variant"]: r for r in recs if r["batch_size"] == bs}
        for side, key in (("compiled", "a"), ("eager", "b")):
            r = by[side]
            assert r["model"] == run.model and r["ms_per_token"] > 0 and r["ttft_ms"] > 0 and r["hardware"]
            assert r["max_new_tokens"] == c["new_tokens"] and r["cycles"] == c["pairs"]
            # the record's decode step is the median of the very samples the verdict was made from
            assert abs(r["decode_ms_per_token"] * bs - statistics.median(c[key])) < 1e-6, (bs, side)
        assert by["compiled"]["recompiles"] == 0 and by["compiled"]["quality"]["identical"]
        assert f"batch {bs}: {c['sentence']}" in run.output_of(f"compile_bs{bs}")
        # one cold compile per shape: the first batch size's graph is section 2's (same rows, same tokens)
        first = run.claim("compiled_tokens_identical")
        assert c["compiled_earlier"] is (bs == sizes[0]), (bs, c["compiled_earlier"])
        if bs == sizes[0]:
            assert first["rows"] == bs and first["new_tokens"] == c["new_tokens"]
            assert 0 < c["compile_s"] < first["first_call_s"]

    floor = memory.weight_bytes(models.bloom_config("bloom"), "bf16") / 8 / 2.0e12 * 1e3
    assert abs(run.value("bloom_memory_floor_ms") - floor) < 1e-9
    bloom = run.output_of("bloom_memory_floor_ms")
    assert f"memory floor {floor:.1f} ms per step" in bloom and f"{44.02 / floor:.1f}x the floor" in bloom

    gpu = json.loads(GPU_FILE.read_text())
    g = run.claim("gpu_recorded")
    assert g["value"] == GPU_FILE.name and g["measured"] == gpu["machine"]["measured"]
    shown = run.output_of("gpu_recorded")
    assert f"{GPU_FILE.name}" in shown and f"measured {gpu['machine']['measured'][:10]}" in shown
    assert "not in this run" in shown
    for r in gpu["decode_breakdown"]:    # "launch-bound" only where the recorded numbers say so
        bound = r["linears_share"] < 0.5 and r["memory_eff"] < 0.5
        line = next(ln for ln in shown.splitlines() if f"batch {r['batch_size']}: eager step" in ln)
        assert ("it is launch-bound" in line) == bound, line
    if not gpu.get("compile_speedup"):
        assert "holds no compiled (CUDA-graph) run" in shown

    text = run.text()
    for bs in sizes:   # the step's breakdown, per batch size
        assert re.search(rf"batch {bs}: the linears alone take [\d.]+ ms, \d+% of the eager step", text)
    assert "of the memory bound's speed" in text
    assert not re.search(r"\b(anchor|task|note)\b", run.markdown(), re.I)

