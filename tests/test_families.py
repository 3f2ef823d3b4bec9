"""Any causal LM, not only BLOOM: every family's tiny model through every strategy, fp32,
token for token equal to plain ``generate`` (each recipe's own ``--verify``).

One process per strategy runs the recipe's ``main`` for every model (``family_runs.py``):
Accelerate in one process, ZeRO CPU offload in one process, and tensor parallelism at TP=2
under the ``deepspeed`` launcher on two CPU ranks — including ``odd-llama``, whose 3 KV heads
split unevenly (2 + 1).  GPT-2 is a model DeepSpeed's AutoTP refuses: one line, no traceback.
"""
import json

import pytest

from bloomkit import launch, models
from bloomkit.errors import UserError
from bloomkit.strategies import autotp, bloom
from conftest import ROOT, assert_one_line_error, run_script

FAMILY_MODELS = ["tiny", "tiny-llama", "odd-llama", "tiny-mistral", "tiny-qwen2", "tiny-falcon",
                 "tiny-gpt-neox", "tiny-opt", "tiny-gpt2"]
NO_AUTOTP = {"tiny-gpt2": "does not support 'gpt2'"}
FLAGS = ["--max_new_tokens", "8", "--batch_size", "3"]


def _records(out_dir):
    recs = {p.stem: json.loads(p.read_text()) for p in out_dir.glob("*.json")}
    errs = {p.stem: p.read_text().strip() for p in out_dir.glob("*.err")}
    return recs, errs


def _check_identical(recs, errs, expected_errors=None):
    expected_errors = expected_errors or {}
    for name in FAMILY_MODELS:
        if name in expected_errors:
            assert expected_errors[name] in errs.get(name, ""), (name, errs.get(name))
            assert name not in recs
            continue
        assert name in recs, f"{name}: {errs.get(name)}"
        q = recs[name]["quality"]
        assert q["identical"], (name, q["mismatches"])


@pytest.fixture(scope="module", autouse=True)
def built():
    for name in FAMILY_MODELS:  # built once here, not inside a timed launch
        models.ensure_preset(name)


def _run(tmp_path, recipe, *extra, nprocs=1, timeout=240):
    if nprocs == 1:
        proc = run_script(["tests/family_runs.py", str(tmp_path), recipe, *FAMILY_MODELS, "--",
                           *FLAGS, *extra], timeout=timeout, env=launch.cpu_env(1))
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        launch.launch(ROOT / "tests" / "family_runs.py",
                      [str(tmp_path), recipe, *FAMILY_MODELS, "--", *FLAGS, *extra], nprocs,
                      timeout=timeout)
    return _records(tmp_path)


@pytest.mark.timeout(240)
def test_accelerate_every_family_is_token_identical(tmp_path):
    recs, errs = _run(tmp_path, "recipes/accelerate_inference.py")
    _check_identical(recs, errs)
    assert all(r["strategy"] == "accelerate" for r in recs.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero_cpu_offload_every_family_is_token_identical(tmp_path):
    recs, errs = _run(tmp_path, "recipes/ds_zero_inference.py", "--cpu_offload")
    _check_identical(recs, errs)
    assert all(r["options"]["zero"]["offload"] == "cpu" for r in recs.values())


@pytest.mark.timeout(400)
def test_tp2_every_family_is_token_identical(tmp_path):
    recs, errs = _run(tmp_path, "recipes/ds_inference.py", nprocs=2, timeout=380)
    _check_identical(recs, errs, NO_AUTOTP)
    for name, r in recs.items():
        o = r["options"]
        assert r["world_size"] == 2 and o["engine"] == "autotp", name
        assert sum(o["heads_per_rank"]) == models.PRESETS[name].n_head, (name, o["heads_per_rank"])
        assert ("alibi_heads" in o) == (name == "tiny"), name  # BLOOM's extra, BLOOM's only
    # GQA: the cut follows the KV heads; 3 KV heads over 2 ranks -> 2 + 1 (4 + 2 query heads)
    assert recs["odd-llama"]["options"]["heads_per_rank"] == [4, 2]
    shapes = recs["tiny-llama"]["options"]["rank0_shapes"]
    assert shapes["layers.0.self_attn.k_proj.weight"].startswith("[16, 64]")  # 1 of 2 KV heads
    assert shapes["layers.0.layer_types"]["self_attn.o_proj"] == "LinearAllreduce"


def test_planned_shapes_match_what_a_rank_holds():
    """The per-rank table read from DeepSpeed's own split rules (no launch) for odd-llama."""
    cfg = models.load_config(models.ensure_preset("odd-llama"))
    r0, r1 = autotp.planned_shapes(cfg, 2, rank=0), autotp.planned_shapes(cfg, 2, rank=1)
    k0 = r0.set_index("weight").loc["self_attn.k_proj", "rank 0 shape"]
    k1 = r1.set_index("weight").loc["self_attn.k_proj", "rank 1 shape"]
    assert k0 == [32, 96] and k1 == [16, 96]  # head_dim 16: 2 KV heads, then 1
    assert r0.attrs["heads_per_rank"] == 4 and r1.attrs["heads_per_rank"] == 2
    assert set(r0.loc[r0.split == "row", "weight"]) == {"self_attn.o_proj", "mlp.down_proj"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_llama_preshard_round_trip_at_tp2(tmp_path):
    """--save_shards, then --load_shards --verify: each rank reads only its file, and the
    RoPE buffers no checkpoint holds are rebuilt on the meta skeleton."""
    shards = tmp_path / "shards"
    launch.launch("ds_inference.py", ["--name", "tiny-llama", "--save_shards", str(shards),
                                      *FLAGS], 2, timeout=240)
    index = json.loads((shards / "bloomkit_tp_shards.json").read_text())
    assert index["tp_size"] == 2 and len(index["files"]) == 2
    rec = launch.launch_records("ds_inference.py", ["--load_shards", str(shards), "--verify",
                                                    *FLAGS], 2, timeout=240)[0]
    assert rec["options"]["load_from"] == "shards" and rec["quality"]["identical"]


def test_kernel_injection_is_bloom_only():
    with pytest.raises(UserError, match="fused BLOOM kernels.*--kernel_inject off"):
        bloom.choose_engine("on", "cpu", "fp32", model_type="llama")
    assert bloom.choose_engine("auto", "cuda", "fp16", model_type="llama") == "autotp"


def test_tp_size_beyond_kv_heads_is_one_line():
    """odd-llama has 3 KV heads: TP=4 would leave a rank without one (checked before loading,
    single process: the check needs no process group)."""
    proc = run_script(["recipes/ds_inference.py", "--name", "odd-llama", "--tp_size", "4"],
                      env=launch.cpu_env(1))
    assert_one_line_error(proc, "3 key/value head", "--tp_size 3")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_int8_under_tp_on_a_gqa_model():
    """int8 weights on each rank's slices (7 linears per Llama block), close to fp32."""
    rec = launch.launch_records("ds_inference.py", ["--name", "tiny-llama", "--dtype", "int8",
                                                    "--verify", *FLAGS], 2, timeout=220)[0]
    o, q = rec["options"], rec["quality"]
    assert o["int8_all_int8"] and o["int8_layers"] == 7 * models.PRESETS["tiny-llama"].n_layer
    assert q["teacher_forced_top1"] >= 0.85 and q["logit_rel_rms_err"] <= 0.10, q


def test_decode_breakdown_and_roofline_for_a_llama():
    """The decode breakdown (linears alone vs the whole step, beside the memory and compute
    bounds) works from any config."""
    from bloomkit import microbench

    rows = microbench.decode_breakdown("tiny-llama", batch_sizes=(1,), new_tokens=4, cycles=1)
    assert rows and rows[0]["model"] == "tiny-llama" and rows[0]["step_ms"] > 0
