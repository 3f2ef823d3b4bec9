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
