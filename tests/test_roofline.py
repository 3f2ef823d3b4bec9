"""Roofline bounds: hand-computed cases (the anchor's blog checks) and a measured run."""
import pytest

from bloomkit import memory, models
from bloomkit.measure import planner, roofline

BLOOM = planner.model_dims("BLOOM-176B")
W_BF16 = 2 * 176_247_271_424            # 352.5 GB (see test_planner)
# A GPU node described by the numbers the anchor notes use for its blog check (~2 TB/s HBM
# per A100): inputs to the arithmetic, not measurements of this project.
A100X8 = roofline.Machine(device="cuda", copy_bandwidth=2e12, link_bandwidth=25e9,
                          matmul_rates={"bfloat16": 312e12, "float16": 312e12}, shared_memory=False)


def rec(strategy, bs, ms, world_size=1, dtype="bf16", **options):
    return {"strategy": strategy, "model": "bloom", "dtype": dtype, "batch_size": bs,
            "world_size": world_size, "max_new_tokens": 100, "status": "ok", "ms_per_token": ms,
            "options": options}


def test_blog_check_tensor_parallel_is_memory_bound_at_50_percent():
    # anchor: "352 GB over 8 A100s at ~2 TB/s = 22 ms per step vs 44 ms measured (50 %)"
    b = roofline.bound(rec("ds-inference", 1, 44.02, world_size=8, dtype="fp16"), A100X8, BLOOM)
    assert b["limited_by"] == "memory"
    assert b["bound_ms_per_token"] == pytest.approx(W_BF16 / 8 / 2e12 * 1e3)  # 22.0 ms
    assert b["efficiency"] == pytest.approx(22.03 / 44.02, rel=1e-3)


def test_blog_check_pipeline_reads_everything_on_one_gpu_at_a_time():
    # "pipeline (one GPU at a time) = 176 ms vs 230 ms"
    b = roofline.bound(rec("accelerate", 1, 230.38), A100X8, BLOOM)
    assert b["bound_ms_per_token"] == pytest.approx(W_BF16 / 2e12 * 1e3)  # 176 ms
    assert b["efficiency"] == pytest.approx(176.2 / 230.38, rel=1e-3)


def test_large_batch_becomes_compute_bound():
    params = 176_247_271_424
    b = roofline.bound(rec("accelerate", 512, 1.0), A100X8, BLOOM)
    assert b["limited_by"] == "compute"
    flops_row = 2 * params + 4 * 70 * 14336 * (16 + 50)
    assert b["compute_bound_ms"] == pytest.approx(flops_row / 312e12 * 1e3)
    # the memory bound per token shrinks as 1/batch, compute stays
    b1 = roofline.bound(rec("accelerate", 1, 1.0), A100X8, BLOOM)
    assert b["memory_bound_ms"] == pytest.approx(b1["memory_bound_ms"] / 512)
    assert b["compute_bound_ms"] == pytest.approx(b1["compute_bound_ms"])


def test_zero_offload_is_link_bound_and_counts_streams():
    b = roofline.bound(rec("ds-zero", 1, 283, world_size=8, zero={"offload": "cpu", "streams": 8}), A100X8, BLOOM)
    assert b["limited_by"] == "link"
    # every stream pulls all 352 GB over its own 25 GB/s link per step; 8 streams -> 8 tokens
    assert b["link_bound_ms"] == pytest.approx(W_BF16 / 25e9 * 1e3 / 8)
    assert roofline.label(rec("ds-zero", 1, 283, world_size=8, zero={"offload": "cpu"})) == \
        "ds-zero offload=cpu streams=8 bf16"
    # no offload (parameters partitioned over the GPUs): no link term from offload
    b = roofline.bound(rec("ds-zero", 1, 283, world_size=8, zero={"offload": "none"}), A100X8, BLOOM)
    assert b["link_bound_ms"] == 0 and b["limited_by"] == "memory"


def test_cpu_ranks_share_one_memory_bus():
    cpu = roofline.Machine(device="cpu", copy_bandwidth=20e9, link_bandwidth=10e9,
                           matmul_rates={"float32": 50e9}, shared_memory=True)
    cfg = models.PRESETS["bench"].__dict__
    w = memory.weight_bytes(cfg, "fp32")
    tp1 = roofline.bound({**rec("ds-inference", 1, 100, world_size=1, dtype="fp32"), "model": "bench"}, cpu, cfg)
    tp2 = roofline.bound({**rec("ds-inference", 1, 100, world_size=2, dtype="fp32"), "model": "bench"}, cpu, cfg)
    assert tp1["memory_bound_ms"] == pytest.approx(w / 20e9 * 1e3)
    assert tp2["memory_bound_ms"] == pytest.approx(tp1["memory_bound_ms"])  # same bus
    assert tp2["link_bound_ms"] > 0 == tp1["link_bound_ms"]
    oom = roofline.bound({**rec("accelerate", 8, "oom", dtype="fp32"), "status": "oom", "model": "bench"}, cpu, cfg)
    assert oom["efficiency"] is None and oom["bound_ms_per_token"] > 0


def test_cpu_threads_scale_the_compute_bound_and_one_zero_rank_copies_nothing():
    cpu = roofline.Machine(device="cpu", copy_bandwidth=20e9, link_bandwidth=10e9,
                           matmul_rates={"float32": 50e9}, shared_memory=True,
                           hardware={"torch_threads": 2})
    cfg = models.PRESETS["bench"].__dict__

    def one(strategy, threads, ws=1, **opt):
        r = {**rec(strategy, 8, 100, world_size=ws, dtype="fp32", **opt), "model": "bench",
             "hardware": {"torch_threads": threads}}
        return roofline.bound(r, cpu, cfg)

    two, single = one("accelerate", 2), one("accelerate", 1)
    assert single["compute_bound_ms"] == pytest.approx(2 * two["compute_bound_ms"])
    assert one("ds-inference", 1, ws=2)["compute_bound_ms"] == pytest.approx(two["compute_bound_ms"])
    z1 = one("ds-zero", 2, zero={"offload": "cpu"})
    assert z1["link_bound_ms"] == 0          # host memory is the device: nothing to copy
    z2 = one("ds-zero", 1, ws=2, zero={"offload": "cpu"})
    w = memory.weight_bytes(cfg, "fp32")
    assert z2["link_bound_ms"] == pytest.approx(w / 10e9 * 1e3 / (8 * 2))  # other rank's half, x2 ranks


def test_measured_machine_and_a_real_record(tiny_path):
    from bloomkit.measure import bench
    from bloomkit.strategies import accel

    m = roofline.measure("cpu", dtypes=("fp32",))
    assert m.copy_bandwidth > 1e8 and m.link_bandwidth > 1e8 and m.matmul_rate("fp32") > 1e8
    recs = bench.run_variant(strategy="accelerate", name="tiny", path=tiny_path, batch_sizes=[1],
                             max_new_tokens=4, cycles=1,
                             load=lambda p, dt, dev: accel.load_model(p, dt, device=dev))
    df = roofline.table(recs, m)
    row = df.iloc[0]
    assert row["setup"] == "accelerate fp32" and row["limited_by"] in ("memory", "compute")
    assert 0 < row["efficiency"] < 1   # nothing beats the hardware
    assert set(roofline.machine_table(m)["unit"]) == {"GB/s", "GFLOP/s"}
