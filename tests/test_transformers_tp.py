"""recipes/transformers_tp.py: transformers' own tensor parallelism (DistributedConfig(tp_size=N),
DTensor) at TP=2 on CPU ranks over gloo — with the package (records, --verify) and copied alone
(bloomkit blocked in every rank): every completion equals plain fp32 ``generate``; what has no plan
or cannot split its key/value heads is refused in one line before loading."""
import pytest

from bloomkit import launch, models
from bloomkit.errors import UserError
from conftest import run_standalone
from test_recipes_standalone import check_completions

RECIPE = "recipes/transformers_tp.py"
N_NEW = 6


@pytest.mark.timeout(300)
def test_tp2_records_verify_and_shards():
    recs = launch.launch_records(RECIPE, ["--name", "tiny-llama", "--batch_size", "1,3", "--max_new_tokens",
                                          str(N_NEW), "--verify", "--benchmark", "--cycles", "1"], 2,
                                 launcher="torchrun")
    assert [r["batch_size"] for r in recs] == [1, 3]
    config = models.load_config(models.resolve_model("tiny-llama"))
    for r in recs:
        assert r["strategy"] == "transformers-tp" and r["world_size"] == 2 and r["status"] == "ok"
        assert r["quality"]["identical"], r["quality"]
        assert r["ms_per_token"] > 0 and r["process_start_to_ready_s"] >= r["load_seconds"] > 0
    shards = recs[0]["options"]["sharded"]
    # the model's own plan: q/k/v and MLP up/gate column-wise (dim 0), o_proj and down_proj row-wise
    for i in range(config.num_hidden_layers):
        for name, dim in [("self_attn.q_proj", 0), ("self_attn.k_proj", 0), ("self_attn.v_proj", 0),
                          ("self_attn.o_proj", 1), ("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1)]:
            s = shards[f"model.layers.{i}.{name}.weight"]
            assert s["placement"] == f"S({dim})", (name, s)
            assert s["local"][dim] * 2 == s["full"][dim] and s["local"][1 - dim] == s["full"][1 - dim], (name, s)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name,needle", [("odd-llama", "cannot split 6 query / 3 key-value heads"),
                                         ("tiny", "bloom has no tensor-parallel plan")])
def test_refused_in_one_line_before_loading(name, needle):
    with pytest.raises(UserError) as exc:
        launch.launch(RECIPE, ["--name", name, "--max_new_tokens", "4"], 2, launcher="torchrun")
    assert needle in str(exc.value), str(exc.value)[-2000:]
    assert "Loading weights" not in str(exc.value)


@pytest.mark.timeout(300)
def test_recipe_alone_equals_generate(tmp_path):
    path = models.resolve_model("tiny-llama")
    proc = run_standalone(tmp_path, RECIPE, ["--name", str(path), "--batch_size", "1,3",
                                             "--max_new_tokens", str(N_NEW), "--benchmark", "--cycles", "1"],
                          nprocs=2, launcher="torchrun", timeout=280)
    check_completions(proc, path, [1, 3], nprocs=2)
    assert proc.stdout.count("*** Start to ready to generate") == 1
    assert proc.stdout.count("*** Performance stats") == 2


@pytest.mark.timeout(200)
def test_recipe_alone_refuses_uneven_heads(tmp_path):
    path = models.resolve_model("odd-llama")
    proc = run_standalone(tmp_path, RECIPE, ["--name", str(path), "--max_new_tokens", "4"], nprocs=2,
                          launcher="torchrun", timeout=180)
    assert proc.returncode != 0
    assert "error: 2 ranks cannot split 6 query / 3 key-value heads evenly" in proc.stderr + proc.stdout
    assert "Loading weights" not in proc.stderr + proc.stdout


@pytest.mark.timeout(300)
def test_beside_autotp_in_one_launch():
    """``ds_inference.py --compare_to transformers_tp``: the same ranks hold the model twice, cut by AutoTP and by
    transformers' plan, and time both in turns: the same tokens (and AutoTP's are plain generate's), each side's
    rank 0 shapes, and one all-reduce timed both ways."""
    recs = launch.launch_records("ds_inference.py", ["--name", "tiny-llama", "--batch_size", "1,3", "--max_new_tokens",
                                                     "4", "--verify", "--compare_to", "transformers_tp", "--pairs", "5"],
                                 2, launcher="torchrun")
    for r in recs:
        c = r["comparison"]
        assert r["quality"]["identical"] and c["same_tokens"] is True
        assert (c["a_label"], c["b_label"]) == ("DeepSpeed AutoTP", "transformers' TP")
        assert len(c["a"]) == len(c["b"]) == 5 and min(c["a"] + c["b"]) > 0
        assert set(c["allreduce_s"]) == {"DeepSpeed inference_all_reduce", "torch.distributed.all_reduce"}
        # attention by whole heads on both sides; the MLP's 176 columns: 88 + 88 against grains of 64
        a, b = c["a_shapes"], c["b_shapes"]
        assert a["model.layers.0.self_attn.k_proj.weight"] == b["model.layers.0.self_attn.k_proj.weight"] == [16, 64]
        assert b["model.layers.0.mlp.up_proj.weight"] == [88, 64] and a["model.layers.0.mlp.up_proj.weight"] == [64, 64]
        assert c["b_sharded"]["model.layers.0.self_attn.o_proj.weight"]["placement"] == "S(1)"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("args,needle", [(["--name", "tiny"], "bloom has no tensor-parallel plan"),
                                         (["--name", "tiny-llama", "--dtype", "int8"], "takes plain weights")])
def test_beside_autotp_refused_in_one_line(args, needle):
    with pytest.raises(UserError) as exc:
        launch.launch("ds_inference.py", args + ["--max_new_tokens", "4", "--compare_to", "transformers_tp"], 2,
                      launcher="torchrun")
    assert needle in str(exc.value) and "Traceback" not in str(exc.value), str(exc.value)[-2000:]
