"""Notebook 02 (DeepSpeed-Inference tensor parallelism): what it must show, checked against its
result records.

* rank 0's shapes of a real TP=2 launch are the planner's (``autotp.planned_shapes``, DeepSpeed's
  own split rule: whole key/value heads, MLP widths in grains of 64), for the notebook's model and
  its second model (``tiny-llama``: MLP 176 = 64 + 112; ``odd-llama``: 3 key/value heads = 2 + 1),
  rank 1 through its bytes of block linears;
* TP=2 in fp32 gives plain ``generate``'s tokens (``--verify``);
* TP against one process, and compiled against eager, each timed in turns inside one launch;
* "start to ready" as three nested clocks (load, process start, launch);
* perplexity (``trained`` only: ``odd-llama`` ships no held-out text) compared with a stated
  resolution.
"""
import json

from bloomkit import models
from bloomkit.strategies import autotp
from nbtools import ODD

# the sweeps' launches take the lighter torchrun (the lesson's own cells start `deepspeed`)
PARAMS = {"trained": {"LAUNCHER": "torchrun"},
          ODD: {"MAX_NEW_TOKENS": 8, "CYCLES": 1, "RUN_INT8": False, "COMPILE": False, "LAUNCHER": "torchrun"}}
BUILD = ("tiny", "tiny-llama")
TIMEOUT = 600
PICTURES = ('plot_ms_per_token(timed',)   # the cells that draw (each must show its picture)
_ALL = ["script_same_text", "start_to_ready_full", "start_to_ready_shards", "rank0_shapes_vs_plan", "linear_bytes_per_rank",
        "tp_fp32_identical", "tp_vs_one_process_bs1", "tp_vs_one_process_bs8", "second_fp32_identical",
        "second_rank0_shapes_vs_plan"]
CLAIMS = {"*": _ALL,
          "trained": ["tp_compiled_vs_eager", "tp_compiled_checks", "ppl_tp_2_fp32", "ppl_tp_2_int8",
                      "native_vs_autotp_rank0", "native_vs_autotp_bs1", "native_vs_autotp_bs8", "allreduce_us"]}


def _shape(text: str) -> list:
    return json.loads(text.rsplit(" ", 1)[0])


def _plan(name: str, tp: int, rank: int = 0) -> dict:
    p = autotp.planned_shapes(models.load_config(models.resolve_model(name)), tp, rank)
    return {w: list(s) for w, s, split in zip(p.weight, p[f"rank {rank} shape"], p.split) if split != "replicated"}


def _rows(name: str) -> set:
    p = autotp.planned_shapes(models.load_config(models.resolve_model(name)), 2)
    return set(p.weight[p.split == "row"])


def _check_shapes(claim: dict, options: dict, name: str, tp: int) -> None:
    """Planned == held in the claim, == the record's own shapes, == the plan recomputed here."""
    plan = _plan(name, tp)
    assert sorted(claim) == sorted(plan), (name, sorted(claim), sorted(plan))
    for w, (planned, held) in claim.items():
        assert planned == held == plan[w] == _shape(options["rank0_shapes"][f"layers.0.{w}.weight"]), (name, w)


def _check_clocks(claim: dict, rec: dict) -> None:
    assert 0 < claim["load_s"] <= claim["process_start_to_ready_s"] <= claim["launch_to_ready_s"], claim
    assert claim["load_s"] == rec["load_seconds"]
    assert claim["process_start_to_ready_s"] == rec["process_start_to_ready_s"]


def check(run) -> None:
    recs = run.records
    assert recs and all(r["strategy"] == "ds-inference" and r["status"] == "ok" for r in recs)
    assert {r["world_size"] for r in recs} == {1, 2}
    main = [r for r in recs if r["model"] == run.model]
    full2 = [r for r in main if r["world_size"] == 2 and r["options"]["load_from"] == "full"
             and r["dtype"] == "fp32" and not r["options"].get("compile")]
    shards = [r for r in main if r["options"]["load_from"] == "shards"]
    assert full2 and shards

    # shapes and bytes: the plan is what DeepSpeed holds
    _check_shapes(run.value("rank0_shapes_vs_plan"), full2[0]["options"], run.model, 2)
    lin = run.value("linear_bytes_per_rank")
    assert lin["planned"] == lin["held"] == full2[0]["options"]["linear_bytes_per_rank"], lin
    second = "tiny" if run.model == ODD else "tiny-llama"
    sec = run.claim("second_rank0_shapes_vs_plan")
    assert sec["model"] == second
    second_rec = json.loads(json.dumps(sec["value"]))
    if second == "tiny-llama":   # MLP 176 in grains of 64: rank 0 holds one grain, not 88
        assert second_rec["mlp.gate_proj"][1] == [64, 64] and second_rec["mlp.down_proj"][1] == [64, 64]
    for w, (planned, held) in second_rec.items():
        assert planned == held == _plan(second, 2)[w], (second, w)
    if second == "tiny":         # a BLOOM: 4 heads, and their ALiBi slopes, 2 + 2
        assert sec["heads_per_rank"] == [2, 2] and sec["alibi_heads"] == [[0, 1], [2, 3]]
    else:
        assert sec["alibi_heads"] is None
    types = full2[0]["options"]["rank0_shapes"]["layers.0.layer_types"]
    for w, (planned, _) in run.value("rank0_shapes_vs_plan").items():   # row-parallel: an all-reduce after
        assert (types[w] == "LinearAllreduce") == (w in _rows(run.model)), (w, types[w])
    assert run.value("script_same_text") is True     # the 20-line script writes the recipe's text
    if run.model == ODD:         # 3 key/value heads over 2 ranks: 2 + 1
        o = full2[0]["options"]
        assert o["heads_per_rank"] == [4, 2] and o["kv_heads"] == 3 and "alibi_heads" not in o
        assert _shape(o["rank0_shapes"]["layers.0.self_attn.k_proj.weight"]) == [32, 96]

    # tokens: TP=2 fp32 is plain generate's, in every batch size, and every TP size agrees
    ident = run.value("tp_fp32_identical")
    assert all(ident.values()) and len(ident) == len(full2)
    assert all(r["quality"]["identical"] for r in full2)
    assert all(run.value("second_fp32_identical").values())
    toks = {(r["world_size"], r["batch_size"], r["options"]["load_from"]): r["tokens"] for r in main
            if r["dtype"] == "fp32" and not r["options"].get("compile")}
    for (n, bs, src), t in toks.items():
        assert t == toks[(1, bs, "full")], (n, bs, src)

    # TP against one process: pairs taken in turns inside the launch, the samples of its record
    for r in full2:
        c = run.claim(f"tp_vs_one_process_bs{r['batch_size']}")
        cmp = r["comparison"]
        assert c["a"] == cmp["a"] and c["b"] == cmp["b"] and c["pairs"] >= 5 and c["same_tokens"] is True

    # transformers' own TP beside AutoTP on the second model's launch (tiny-llama has a plan; a BLOOM has none)
    if second == "tiny-llama":
        cut = run.value("native_vs_autotp_rank0")   # {weight: [transformers' rank 0, AutoTP's rank 0]}
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):    # both cut attention by whole heads
            tf, auto = cut[f"layers.0.self_attn.{w}.weight"]
            assert tf == auto, (w, tf, auto)
        assert cut["layers.0.mlp.gate_proj.weight"] == [[88, 64], [64, 64]]    # equal halves vs grains of 64
        assert cut["layers.0.mlp.down_proj.weight"] == [[64, 88], [64, 64]]
        assert cut["embed_tokens.weight"] == [[512, 64], [1024, 64]]       # vocabulary rows vs whole
        for bs in (1, 8):
            c = run.claim(f"native_vs_autotp_bs{bs}")
            assert c["pairs"] >= 5 and c["same_tokens"] is True, c
        ar = run.value("allreduce_us")
        assert ar["deepspeed"] > 0 and ar["gloo"] > 0
    else:
        assert not any(n.startswith("native_vs") for n in run.claims)

    # start to ready: three nested clocks, each the record's
    _check_clocks(run.value("start_to_ready_full"), full2[0])
    _check_clocks(run.value("start_to_ready_shards"), shards[0])

    if run.model == "trained":
        comp = [r for r in recs if r["options"].get("compile")]
        assert comp and all(r["world_size"] == 2 for r in comp)
        c = run.claim("tp_compiled_vs_eager")
        assert c["a"] == comp[0]["comparison"]["a"] and c["b"] == comp[0]["comparison"]["b"]
        assert run.value("tp_compiled_checks") == {"recompiles": 0, "same_tokens_as_eager": True,
                                                  "identical_to_plain_generate": True}
        fp = run.claim("ppl_tp_2_fp32")   # fp32 under TP: the reference's perplexity
        q = full2[0]["quality"]
        assert fp["value"] == q["perplexity"] and fp["reference"] == q["reference_perplexity"]
        assert abs(fp["value"] / fp["reference"] - 1) < 1e-4 and fp["verdict"] == "the same"
        assert fp["resolution"] == q["perplexity_resolution"] >= 0.005   # measured, never below the printed digits
        i8 = [r for r in recs if r["dtype"] == "int8"]
        assert i8 and i8[0]["options"]["int8_all_int8"]
        q8, c8 = i8[0]["quality"], run.claim("ppl_tp_2_int8")
        assert c8["value"] == q8["perplexity"] and c8["reference"] == q8["reference_perplexity"]
        # measured: int8 perplexity within 0.1 % of fp32's, teacher-forced top-1 near 1
        assert abs(q8["perplexity"] / q8["reference_perplexity"] - 1) < 0.02, q8
        assert q8["teacher_forced_top1"] >= 0.9 and q8["logit_rel_rms_err"] < 0.05, q8
    else:
        assert all("perplexity" not in (r.get("quality") or {}) for r in recs)   # no held-out text
        assert not any(n.startswith("ppl_") for n in run.claims)
