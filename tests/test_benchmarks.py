"""The strategy benchmarks (benchmarks/strategies.py) on the tiny model: real launches, the
numbers they derive are consistent with the records they read."""
import time

import pytest

from bloomkit import microbench


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tp_scaling_ratios_come_from_the_records():
    out = microbench.tp_scaling("tiny", tp_sizes=(1, 2), batch_sizes=(1, 4), new_tokens=4,
                                cycles=1, rounds=1)
    rows = {(r["tp_size"], r["batch_size"]): r for r in out["rows"]}
    assert set(rows) == {(1, 1), (1, 4), (2, 1), (2, 4)}
    for (tp, bs), r in rows.items():
        assert r["ms_per_token"] > 0
        assert r["ratio_to_tp1"] == pytest.approx(r["ms_per_token"] / rows[(1, bs)]["ms_per_token"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preshard_load_ratio_measures_both_paths_warm_and_cold():
    out = microbench.preshard_load_ratio("tiny", 2, repeats=1, launcher="torchrun")
    for mode in ("warm", "cold"):
        m = out[mode]
        assert len(m["full_s"]) == len(m["shards_s"]) == 1
        assert m["ratio"] == pytest.approx(m["shards_median_s"] / m["full_median_s"])
    assert len(out["shard_bytes_per_rank"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero_offload_table_and_roofline(tmp_path):
    out = microbench.zero_offload("tiny", batch_sizes=(2,), new_tokens=2, cycles=1,
                                  nvme_dir=tmp_path)
    assert {r["variant"] for r in out["rows"]} == {"none", "cpu", "nvme", "nvme 4-bit"}
    assert out["nvme_over_disk_roofline"][2] > 0 and out["nvme_4bit_speedup"][2] > 0
    # the disk measured right before and after each NVMe launch
    assert set(out["disk_read_GBps"]) == {"nvme", "nvme 4-bit"}
    assert all(len(v) == 2 and min(v) > 0 for v in out["disk_read_GBps"].values())
    assert list(tmp_path.iterdir()) == []  # the NVMe folder and its swap files are gone


def test_decode_breakdown_splits_the_step_into_kernels_and_the_rest():
    rows = microbench.decode_breakdown("tiny", "fp32", batch_sizes=(1, 4), new_tokens=3, cycles=1)
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["step_ms"] == pytest.approx(r["ms_per_token"] * r["batch_size"])
        assert r["outside_linears_ms"] == pytest.approx(r["step_ms"] - r["linears_ms"])
        assert 0 < r["linears_ms"] and 0 < r["linears_share"]
        assert r["efficiency"] == pytest.approx(max(r["memory_eff"], r["compute_eff"]))
        assert r["kernel_memory_eff"] == pytest.approx(r["memory_bound_ms"] / r["linears_ms"])
    # the compute bound grows with the batch, the memory bound does not
    assert rows[1]["compute_bound_ms"] == pytest.approx(4 * rows[0]["compute_bound_ms"])
    assert rows[1]["memory_bound_ms"] == rows[0]["memory_bound_ms"]


def test_run_parts_keeps_the_parts_it_did_not_run(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    parts = {"a": lambda x: {"value": x}, "b": lambda x: {"value": 2 * x}}
    microbench.run_parts(parts, ["a", "b"], out, 1)
    microbench.run_parts(parts, ["b"], out, 5)         # only b again: a's result stays
    got = json.loads(out.read_text())
    day = time.strftime("%Y-%m-%d")                    # each part says the day it was measured
    assert got["a"] == {"value": 1, "measured_on": day} and got["b"] == {"value": 10, "measured_on": day}
    assert {"hardware", "versions"} <= set(got)
    microbench.run_parts(parts, ["a", "b"], out, 3)    # a full run starts over
    assert json.loads(out.read_text())["a"] == {"value": 3, "measured_on": day}
    assert "b {" in capsys.readouterr().out


def test_decode_breakdown_refuses_quantized_weights_in_one_line():
    from bloomkit.errors import UserError

    with pytest.raises(UserError, match="use fp32, bf16 or fp16"):
        microbench.decode_breakdown("tiny", "int8", batch_sizes=(1,))
