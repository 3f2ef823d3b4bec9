"""Memory planner against hand-computed BLOOM arithmetic and the blog's claims."""
import pytest

from bloomkit import memory
from bloomkit.measure import planner
from bloomkit.errors import UserError

# Hand computation for BLOOM-176B (h = 14336, 70 blocks, vocab 250880):
#   per block 12*h^2 + 13*h = 2_466_250_752 + 186_368 = 2_466_437_120; x 70 = 172_650_598_400
#   embedding 250880 * 14336 = 3_596_615_680; 4 LayerNorm vectors of h = 57_344
BLOOM_176B_PARAMS = 172_650_598_400 + 3_596_615_680 + 57_344  # 176_247_271_424
# BLOOM-7b1 (h = 4096, 30 blocks): 30 * (12*4096^2 + 13*4096) + 250880*4096 + 4*4096,
# which is the parameter count published on its model card.
BLOOM_7B1_PARAMS = 7_069_016_064


def row(rows, strategy):
    return next(r for r in rows if r["strategy"] == strategy)


def test_param_counts_and_the_blogs_352_gb():
    assert memory.param_count(planner.model_dims("BLOOM-176B")) == BLOOM_176B_PARAMS
    assert memory.param_count(planner.model_dims("BLOOM-7b1")) == BLOOM_7B1_PARAMS
    rows = planner.plan("BLOOM-176B", "bf16", n_gpus=8)
    total = row(rows, "ds-inference")["weights_total_bytes"]
    assert total == 2 * BLOOM_176B_PARAMS
    assert round(total / 1e9) == 352  # "BLOOM-176B needs 352 GB of bf16 weights"
    assert row(rows, "ds-inference")["weights_per_device_bytes"] == pytest.approx(total / 8)
    assert round(total / 8 / 1e9) == 44


def test_kv_cache_per_token():
    rows = planner.plan("BLOOM-176B", "bf16", n_gpus=8)
    # 2 (key, value) * 70 layers * 14336 * 2 bytes = 4_014_080 B per token, over 8 GPUs
    assert row(rows, "ds-inference")["kv_bytes_per_token_per_device"] == 4_014_080 / 8
    assert row(rows, "ds-zero")["kv_bytes_per_token_per_device"] == 4_014_080  # own stream
    # int8 weights, bf16 cache
    assert memory.kv_cache_bytes_per_token(planner.model_dims("BLOOM-176B"), "int8") == 4_014_080


def test_bloom_176b_gpu_counts_match_the_blog():
    # bf16: 352 GB > 4 x 80 GB, so tensor parallelism needs the 8-GPU node
    assert not planner.fits("BLOOM-176B", "ds-inference", "bf16", 4, "80GB")
    assert planner.fits("BLOOM-176B", "ds-inference", "bf16", 8, "80GB")
    assert planner.min_gpus("BLOOM-176B", "ds-inference", "bf16", "80GB") == 8
    # int8: 176 GB -> 44 GB per GPU on 4 x 80 GB
    assert planner.min_gpus("BLOOM-176B", "ds-inference", "int8", "80GB") == 4
    assert not planner.fits("BLOOM-176B", "ds-inference", "int8", 2, "80GB")
    # ZeRO offload: one GPU with the parameters in 512 GB of CPU RAM
    assert planner.min_gpus("BLOOM-176B", "ds-zero", "bf16", "80GB", gpu_only=False) == 1
    one = row(planner.plan("BLOOM-176B", "bf16", n_gpus=1, cpu_ram="512GB"), "ds-zero")
    assert one["fits"] and one["weights_on"] == "cpu" and one["max_batch"] > 0
    # ... but not with 256 GB of CPU RAM and no NVMe; with 1 TB of NVMe it does
    assert not planner.fits("BLOOM-176B", "ds-zero", "bf16", 1, cpu_ram="256GB")
    nv = row(planner.plan("BLOOM-176B", "bf16", 1, cpu_ram="256GB", nvme="1TB"), "ds-zero")
    assert nv["fits"] and nv["weights_on"] == "nvme"
    # accelerate on 1 GPU only with offload, never GPU-only
    assert planner.fits("BLOOM-176B", "accelerate", "bf16", 1) is True
    assert planner.fits("BLOOM-176B", "accelerate", "bf16", 1, gpu_only=True) is False


def test_largest_batch_hand_computed():
    # BLOOM-7b1 bf16 on one 80 GB GPU, 2 GiB reserve, sequence 16 + 100 = 116 tokens
    dims = planner.model_dims("BLOOM-7b1")
    w = 2 * BLOOM_7B1_PARAMS
    free = 80e9 - 2 * 2**30 - w
    kv_row = 2 * 30 * 4096 * 2 * 116                       # 57_016_320 B
    mlp = 4 * 4096 * 116 * 2                                # MLP activation, one row
    scores = 32 * 116 * 116 * 4                             # attention scores, fp32
    logits = 250880 * 4 * 2                                 # fp32 logits, one step
    per_row = kv_row + max(mlp, scores) + logits
    assert memory.generate_extra_bytes(dims, 1, 116, "bf16") == per_row
    r = row(planner.plan("BLOOM-7b1", "bf16", n_gpus=1, gpu_memory="80GB"), "ds-inference")
    assert r["max_batch"] == int(free // per_row)
    # one more row would not fit, the largest does
    assert r["max_batch"] * per_row <= free < (r["max_batch"] + 1) * per_row


def test_tp_degree_must_divide_heads():
    r = row(planner.plan("BLOOM-7b1", "bf16", n_gpus=3), "ds-inference")
    assert not r["fits"] and "divide" in r["note"]


def test_custom_dims_and_bad_input():
    dims = {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1024}
    rows = planner.plan(dims, "fp32", n_gpus=1, gpu_memory="1GB", reserve=0)
    assert all(r["fits"] for r in rows)
    with pytest.raises(UserError, match="BLOOM-176B"):
        planner.plan("BLOOM-9000")
    with pytest.raises(UserError, match="80GB"):
        planner.plan("BLOOM-560m", gpu_memory="eighty")
    with pytest.raises(UserError, match="strategy"):
        planner.fits("BLOOM-560m", "magic")
    frame = planner.plan_frame(planner.plan("BLOOM-176B", "bf16", 8))
    assert list(frame.index) == list(planner.STRATEGIES)
    assert frame.loc["ds-inference", "GB per GPU"] == 44.1


def test_dims_by_name_without_weights():
    assert planner.config_of("BLOOM-176B") == planner.config_of("bigscience/bloom") == planner.model_dims("BLOOM-176B")
    assert planner.config_of("bloom-7b1")["hidden_size"] == 4096
    assert planner.config_of("bench") == {"hidden_size": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 8192}
    frame = planner.models_frame()
    assert frame.loc["BLOOM-176B", "bf16_GB"] == 352.49 and frame.loc["BLOOM-7b1", "params_B"] == 7.07
    curve = planner.memory_curve("BLOOM-176B", "bf16", 8, batch_sizes=(1, 512))
    assert 44.06 < curve.iloc[0, 0] < 44.2   # 352.5 GB / 8 + one row of cache and activations
    assert (curve.diff().iloc[1] > 0).all()   # more rows, more memory


def test_widget_and_headless_view(capsys):
    ui = planner.widget("BLOOM-7b1", "int8", 1, "80GB")
    assert ui is not None and len(ui.children) == 3
    planner.show("BLOOM-176B", "int8", 4, "80GB")
    out = capsys.readouterr().out
    assert "BLOOM-176B in int8 on 4 x 80GB" in out and "'ds-inference': (4, 4)" in out


@pytest.mark.timeout(240)
def test_predicted_peak_is_within_20_percent_of_measured_rss():
    """The planner's terms (baseline + weights + KV cache + transient) against the peak RSS of
    real generate calls on `bench` (1.2 GB fp32) at two batch sizes, in a fresh process."""
    import json
    import subprocess
    import sys

    code = ("import json; from bloomkit import models; from bloomkit.measure import planner; "
            "print(json.dumps(planner.measure_peak(models.resolve_model('bench'), 'fp32', (1, 32), 16)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["batch_size"] for r in rows] == [1, 32]
    for r in rows:
        assert 0.8 <= r["ratio"] <= 1.2, r
    grew = rows[1]["measured_peak_rss_bytes"] - rows[0]["measured_peak_rss_bytes"]
    assert grew > 0.5 * (rows[1]["predicted_kv_cache_bytes"] - rows[0]["predicted_kv_cache_bytes"])


def test_blog_oom_batches_are_beyond_what_the_plan_can_count():
    rows = {r["strategy"]: r for r in planner.blog_oom_gap()}
    assert set(rows) == {"accelerate", "ds-inference"}
    for r in rows.values():
        assert r["plan needs at last run GB"] < r["plan needs at oom GB"] < r["GPU GB"]
        assert r["unexplained_bytes"] > 10e9
