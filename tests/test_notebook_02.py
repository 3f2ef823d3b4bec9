"""Notebook 02 (DeepSpeed-Inference tensor parallelism) executed by papermill: with its default
model (``trained``, int8 under TP with perplexity beside fp32), then with a Llama of odd sizes
(3 key/value heads over 2 ranks, no int8); records and printed lines read back."""
import re

import pytest

import nbtools
from nbtools import ODD


@pytest.fixture(scope="module", autouse=True)
def built():
    nbtools.build(ODD, "tiny", "tiny-llama")


@pytest.mark.notebooks
@pytest.mark.timeout(900)  # about 90 s on a quiet 2-core machine; TP ranks crawl on a busy one
def test_notebook_02_runs_and_records(tmp_path):
    recs, nb = nbtools.execute(tmp_path, "02_ds_inference_tp", {"MAX_NEW_TOKENS": 8, "CYCLES": 1,
                                                                 "SECOND_LAUNCH": False,  # launched by the next test
                                                                 # the lesson's cells start `deepspeed` themselves;
                                                                 # the sweeps' launches take the lighter torchrun
                                                                 "LAUNCHER": "torchrun"})
    assert {r["world_size"] for r in recs} == {1, 2}
    assert all(r["strategy"] == "ds-inference" and r["model"] == "trained" and r["status"] == "ok" for r in recs)
    assert any(r["options"]["load_from"] == "shards" for r in recs)
    tp2 = [r for r in recs if r["world_size"] == 2 and r["dtype"] == "fp32" and r["options"]["load_from"] == "full"]
    assert tp2[0]["options"]["rank0_shapes"]["layers.0.layer_types"]["self_attention.dense"] == "LinearAllreduce"
    assert all(r["quality"]["identical"] for r in tp2)  # --verify: TP=2 fp32 equals plain generate
    q = tp2[0]["quality"]
    assert q["perplexity"] == pytest.approx(q["reference_perplexity"], rel=1e-4)
    comp = [r for r in recs if r["options"].get("compile")]   # TP=2 with the decode step compiled
    assert comp and all(r["world_size"] == 2 and r["recompiles"] == 0 and r["quality"]["identical"] for r in comp)
    i8 = [r for r in recs if r["dtype"] == "int8"]
    assert i8 and i8[0]["options"]["int8_all_int8"]
    q8 = i8[0]["quality"]
    # measured: int8 perplexity within 0.1 % of fp32's, teacher-forced top-1 1.0 (MAX_NEW_TOKENS 8)
    assert abs(q8["perplexity"] / q8["reference_perplexity"] - 1) < 0.02, q8
    assert q8["teacher_forced_top1"] >= 0.9 and q8["logit_rel_rms_err"] < 0.05, q8
    text = nbtools.all_output(nb)
    assert "the same text: True" in text           # the 20-line script equals the recipe
    assert "TP=2 int8: perplexity" in text and "fp32 perplexity" in nbtools.output(nb, "results.quality_table(")
    assert "TP=2 int8" in nbtools.output(nb, "results.completions(")
    assert "x faster than TP=1" in text or "x slower than TP=1" in text
    lesson = " ".join("".join(c["source"]) for c in nb["cells"])
    assert not re.search(r"\b(issues?|anchor|task|goal|note)\b", lesson, re.I)  # words of the project, not the lesson


@pytest.mark.notebooks
@pytest.mark.timeout(900)  # about 90 s on a quiet 2-core machine; TP ranks crawl on a busy one
def test_tp_notebook_on_odd_llama(tmp_path):
    recs, nb = nbtools.execute(tmp_path, "02_ds_inference_tp", {"MODEL_NAME": ODD, "MAX_NEW_TOKENS": 8, "CYCLES": 1,
                                                                 "RUN_INT8": False, "COMPILE": False,
                                                                 "LAUNCHER": "torchrun"})
    assert {r["world_size"] for r in recs} == {1, 2}
    assert all(r["model"] == ODD and r["status"] == "ok" for r in recs)
    full = [r for r in recs if r["world_size"] == 2 and r["options"]["load_from"] == "full"]
    o = full[0]["options"]
    assert o["heads_per_rank"] == [4, 2] and o["kv_heads"] == 3  # 3 KV heads over 2 ranks: 2 + 1
    assert "alibi_heads" not in o
    assert o["rank0_shapes"]["layers.0.self_attn.k_proj.weight"].startswith("[32, 96]")
    assert any(r["options"]["load_from"] == "shards" for r in recs)
    tokens = {(r["world_size"], r["batch_size"], r["options"]["load_from"]): r["tokens"] for r in recs}
    for (n, bs, src), toks in tokens.items():
        assert toks == tokens[(1, bs, "full")], (n, bs, src)
    assert "perplexity" not in full[0]["quality"]  # no held-out text shipped with a preset
    text = nbtools.all_output(nb)
    assert "the same text: True" in text
    assert f"skipped: {ODD} is a llama model, without ALiBi slopes to split" in text
    assert "skipped: the fused kernels are BLOOM's" in text
    assert f"no held-out text for {ODD}, so no perplexity" in text
    launch2 = nbtools.output(nb, "dev2 = DEVICE")
    assert "tiny, TP=2 on cpu (autotp): query heads per rank [2, 2]" in launch2
    assert "True" in launch2 and "False" not in launch2
    alibi = nbtools.output(nb, "def rank0_block")
    assert "tiny: ALiBi heads per rank [[0, 1], [2, 3]]" in alibi
    assert f"{ODD}: no ALiBi in the record" in alibi
    nbtools.kv_lines(text)
