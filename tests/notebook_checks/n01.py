"""Notebook 01 (Accelerate): device maps, fp32 identity of every placement, the timing
comparisons (interleaved pairs, checked by the generic rule), perplexity with its resolution,
the footprints.  ``odd-llama`` ships no held-out text: no perplexity claims."""
from bloomkit import arch, models, prompts
from bloomkit.strategies import accel
from nbtools import ODD

PARAMS = {"trained": None,
          ODD: {"BATCH_SIZES": [1, 4], "MAX_NEW_TOKENS": 8, "CYCLES": 1, "COMPILE": False}}
BUILD = ("tiny", "tiny-llama")
TIMEOUT = 600
PICTURES = ('plot_ms_per_token(records',)   # the cells that draw (each must show its picture)
SETUPS = ("in-memory", "compiled", "bf16", "disk-offload", "int8", "nf4")
_COMMON = ["device_map_blocks", "load_seconds", "offload_extra_ms_per_step", "offload_step_batch", "batch_gain",
           "footprint_bytes", "second_maps", "fp32_identical", "offload_bs1", "bf16_bs1", "int8_bs1", "nf4_bs1"]
CLAIMS = {"*": _COMMON,
          "trained": ["compile_bs1", "compile_bs8", "bf16_bs8", "int8_bs8", "nf4_bs8", "offload_bs8",
                      *(f"perplexity_{s}" for s in SETUPS)],
          ODD: ["bf16_bs4", "int8_bs4", "nf4_bs4", "offload_bs4"]}


def check(run):
    recs = run.records
    by = {}
    for r in recs:
        by.setdefault(r["options"]["variant"], []).append(r)
    want = set(SETUPS) - ({"compiled"} if run.model == ODD else set())
    assert set(by) == want, sorted(by)
    for r in recs:
        assert r["model"] == run.model and r["status"] == "ok" and r["ms_per_token"] > 0
        for tokens in r["tokens"]:            # a completion, not one token repeated
            assert len(set(tokens)) > 1 or run.model == ODD, r["texts"]

    # device maps of BLOOM-176B on 8 x 80 GiB: every block placed once; balanced equals Accelerate's own plan
    blocks = run.value("device_map_blocks")
    assert all(sum(b.values()) == 70 for b in blocks.values()), blocks
    plan = accel.plan_device_map(models.bloom_config("bloom"), {i: "80GiB" for i in range(8)}, "bf16", "balanced")
    assert blocks["balanced"] == {str(d): len(b) for d, b in accel.blocks_by_device(plan, models.bloom_config("bloom")).items()}
    assert blocks["balanced_low_0"].get("0", 0) == 0
    shown = run.output_of("device_map_blocks")
    assert f"balanced: {min(blocks['balanced'].values())} to {max(blocks['balanced'].values())} blocks per GPU" in shown

    # fp32: every placement (in memory, compiled, offloaded, the second model's) gives plain generate's tokens
    ident = run.value("fp32_identical")
    assert ident and all(row[3] for row in ident), ident
    assert {row[0] for row in ident} == {run.model, "tiny" if run.model == ODD else "tiny-llama"}
    for r in recs:
        if r["dtype"] == "fp32":
            assert r["quality"]["identical"], (r["options"]["variant"], r["quality"])
    for r in by.get("compiled", []):
        assert r["recompiles"] == 0 and r["warmup_seconds"] > max(r["cycle_seconds"]), r
    assert any(r["options"].get("placement", {}).get("disk") for r in by["disk-offload"])

    # the load time is named for what it is and is the records' own
    load = run.value("load_seconds")
    assert abs(load["from_pretrained"] - by["in-memory"][0]["load_seconds"]) < 1e-6 and load["imports"] > 0
    assert "from_pretrained took" in run.output_of("load_seconds")

    # comparisons: 5 interleaved pairs each (the generic check recomputes every verdict)
    for name, c in run.claims.items():
        if c.get("unit") == "time ratio":
            assert c["pairs"] >= 5, name
    extra = run.value("offload_extra_ms_per_step")
    for bs, e in extra.items():
        c = run.claim(f"offload_bs{bs}")
        assert e == [(a - b) * int(bs) for a, b in zip(c["a"], c["b"])], bs

    # footprints: bf16 is half of fp32; quantized models are smaller than fp32
    fp = run.value("footprint_bytes")
    assert abs(fp["bf16"] / fp["in-memory"] - 0.5) < 0.01, fp
    assert fp["nf4"] < fp["int8"] < fp["in-memory"], fp

    # the second family's plan: no block cut, every block placed
    for name, by_dev in run.value("second_maps").items():
        placed = [i for b in by_dev.values() for i in b]
        assert len(placed) == len(set(placed)), (name, by_dev)
        cfg = models.load_config(models.resolve_model(name))
        assert sorted(placed) == list(range(arch.layers_of(cfg))), (name, by_dev)

    # perplexity (trained only): the records' values, compared within the evaluation's measured resolution
    if run.model == "trained":
        for s in SETUPS:
            c = run.claim(f"perplexity_{s}")
            q = by[s][0]["quality"]
            assert abs(c["value"] - q["perplexity"]) < 1e-9 and abs(c["reference"] - q["reference_perplexity"]) < 1e-9
            assert c["resolution"] == q["perplexity_resolution"] >= 0.005   # measured on the same windows
            if s in ("in-memory", "compiled", "disk-offload"):
                assert c["verdict"] == "the same", c
    else:
        assert not any(n.startswith("perplexity_") for n in run.claims)
        assert all("perplexity" not in r["quality"] for r in recs)

    # completions are shown whole, with their prompts
    text = run.text()
    for rs in by.values():
        r = rs[0]
        assert prompts.shown(r["prompts"][0] + r["texts"][0]) in text, r["options"]["variant"]
