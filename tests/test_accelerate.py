"""Strategy 1 (Accelerate): every device map and offload variant equals plain generate in
fp32; int8 agrees within a stated bound; the recipe runs for real; bad input is one line."""
import sys

import pytest

from bloomkit.measure import bench
from bloomkit.strategies import accel
from conftest import assert_one_line_error, read_json, run_recipe_inprocess, run_script

RECIPE = "recipes/accelerate_inference.py"
INT8_MIN_TOP1 = 0.85      # teacher-forced top-1 agreement of LLM.int8() with fp32 on tiny
INT8_MAX_REL_RMS = 0.10   # relative RMS logit error


def _variant(path, dtype="fp32", bs=8, **kw):
    load = lambda p, dt, dev: accel.load_model(p, dt, device=dev, **kw)  # noqa: E731
    return bench.run_variant(strategy="accelerate", name="tiny", path=path, dtype=dtype,
                             batch_sizes=[bs], max_new_tokens=16, load=load, verify=True)[0]


@pytest.mark.parametrize("device_map", ["auto", "balanced", "balanced_low_0", "sequential", "none"])
def test_device_maps_are_token_identical(tiny_path, device_map):
    rec = _variant(tiny_path, device_map=device_map)
    q = rec["quality"]
    assert q["identical"], q["mismatches"]
    assert q["min_ref_margin"] > 1e-3


def test_cpu_and_disk_offload_is_token_identical(tiny_path, tmp_path):
    rec = _variant(tiny_path, device_map="auto", max_memory={"cpu": "490KiB"},
                   offload_folder=tmp_path / "off")
    assert rec["options"]["placement"].get("disk", 0) >= 1, rec["options"]["placement"]
    assert rec["options"]["placement"].get("cpu", 0) >= 1, rec["options"]["placement"]
    assert rec["quality"]["identical"], rec["quality"]["mismatches"]


def test_int8_reports_agreement_within_bound(tiny_path):
    from bitsandbytes.nn import Linear8bitLt

    rec = _variant(tiny_path, dtype="int8", device_map="auto")
    q = rec["quality"]
    assert q["teacher_forced_top1"] >= INT8_MIN_TOP1, q
    assert q["logit_rel_rms_err"] <= INT8_MAX_REL_RMS, q
    model = accel.load_model(tiny_path, "int8", device_map="auto")
    linears = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    assert len(linears) == 4 * model.config.n_layer
    assert all(m.weight.dtype.itemsize == 1 for m in linears)


def test_int8_and_nf4_perplexity_on_the_trained_model():
    """On real weights the quantized loads are measured where it matters: held-out perplexity
    beside fp32's (the shipped sample), plus agreement.  nf4 is BitsAndBytesConfig 4-bit."""
    from bitsandbytes.nn import Linear4bit

    from bloomkit import models

    path = models.resolve_model("trained")
    for dtype in ("int8", "nf4"):
        load = lambda p, dt, dev: accel.load_model(p, dt, device=dev)  # noqa: E731
        rec = bench.run_variant(strategy="accelerate", name="trained", path=path, dtype=dtype,
                                batch_sizes=[2], max_new_tokens=8, load=load, verify=True)[0]
        q = rec["quality"]
        assert rec["prompts"][0].startswith("def "), "the trained model's own prompts"
        assert 1 < q["reference_perplexity"] < 200, q
        assert abs(q["perplexity"] / q["reference_perplexity"] - 1) < 0.05, (dtype, q)
        assert q["teacher_forced_top1"] >= 0.8, (dtype, q)
    model = accel.load_model(path, "nf4")
    fours = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(fours) == 4 * model.config.n_layer


def test_plan_bloom_176b_on_8_gpus_keeps_gpu0_light():
    from bloomkit import models

    cfg = models.bloom_config("bloom")
    dmap = accel.plan_device_map(cfg, {i: "80GiB" for i in range(8)}, "bf16", "balanced_low_0")
    blocks = accel.device_map_summary(dmap, cfg, "bf16")["blocks"]
    assert blocks.sum() == 70
    assert blocks.get("0", 0) <= 1 and "cpu" not in blocks.index and "disk" not in blocks.index


def test_parse_max_memory():
    assert accel.parse_max_memory("0=30GiB,1=70GiB,cpu=100GiB") == {0: "30GiB", 1: "70GiB", "cpu": "100GiB"}
    assert accel.parse_max_memory(None) is None


@pytest.mark.timeout(120)
def test_recipe_benchmark_sweep_writes_records(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nA second, longer prompt for the batch\n")
    out = tmp_path / "r.json"
    proc = run_script([RECIPE, "--batch_size", "1,3", "--max_new_tokens", "6", "--benchmark",
                       "--cycles", "2", "--prompts_file", str(prompts), "--json_out", str(out),
                       "--verify", "--max_memory", "cpu=490KiB", "--offload_folder",
                       str(tmp_path / "off")])
    assert proc.returncode == 0, proc.stderr
    recs = read_json(out)
    assert [r["batch_size"] for r in recs] == [1, 3]
    r = recs[1]
    assert r["prompts"] == ["Hello there", "A second, longer prompt for the batch", "Hello there"]
    assert [len(t) for t in r["tokens"]] == [6, 6, 6]
    assert r["ms_per_token"] > 0 and len(r["cycle_seconds"]) == 2 and r["load_seconds"] > 0
    assert r["quality"]["identical"] and r["strategy"] == "accelerate" and r["dtype"] == "fp32"
    assert "accelerate tiny fp32" in proc.stdout


@pytest.mark.timeout(120)
def test_recipe_memory_budget_records_oom(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script([RECIPE, "--batch_size", "1,512", "--max_new_tokens", "4",
                       "--memory_budget", "2MiB", "--json_out", str(out)])
    assert proc.returncode == 0, proc.stderr
    recs = read_json(out)
    assert [r["status"] for r in recs] == ["ok", "oom"] and recs[1]["ms_per_token"] == "oom"


BAD = [
    (["--name", "/no/such/model"], ["not found"]),
    (["--dtype", "int4"], ["unknown dtype"]),
    (["--dtype", "fp16"], ["bf16"]),
    (["--batch_size", "0"], ["batch size"]),
    (["--batch_size", "-3"], ["batch size"]),
    (["--offload_folder", "/proc/forbidden/offload"], ["--offload_folder"]),
    (["--max_memory", "cpu"], ["device=size"]),
    (["--max_memory", "0=1GiB,cpu=1GiB"], ["GPU 0"]),
    (["--prompts_file", "/no/such/prompts.txt"], ["--prompts_file"]),
    (["--verify", "--eval_file", "/no/such/text.txt"], ["--eval_file"]),
    (["--dtype", "nf4", "--compile"], ["--compile"]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(tmp_path, args, needles, capsys):
    out = tmp_path / "r.json"
    proc = run_recipe_inprocess(RECIPE, ["--max_new_tokens", "2", "--json_out", str(out), *args], capsys)
    assert_one_line_error(proc, *needles)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.timeout(60)
def test_bad_input_in_a_real_process_is_one_line(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script([RECIPE, "--max_new_tokens", "2", "--json_out", str(out), "--dtype", "int4"])
    assert_one_line_error(proc, "unknown dtype")
    assert not out.exists()


@pytest.mark.timeout(60)
def test_int8_without_bitsandbytes_is_one_line(tmp_path):
    """bitsandbytes absent (import blocked in the child): one line naming the install."""
    out = tmp_path / "r.json"
    code = ("import sys, runpy; sys.modules['bitsandbytes'] = None; "
            f"sys.argv = ['{RECIPE}', '--dtype', 'int8', '--json_out', '{out}']; "
            f"runpy.run_path('{RECIPE}', run_name='__main__')")
    proc = run_script([sys.executable, "-c", code])
    assert_one_line_error(proc, "bitsandbytes")
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_gpu_bf16_and_int8(tmp_path):
    for dtype in ("bf16", "int8"):
        out = tmp_path / f"{dtype}.json"
        proc = run_script([RECIPE, "--name", "small", "--device", "cuda", "--dtype", dtype,
                           "--batch_size", "1,8", "--benchmark", "--cycles", "2",
                           "--max_new_tokens", "20", "--verify", "--json_out", str(out)])
        assert proc.returncode == 0, proc.stderr
        recs = read_json(out)
        assert all(r["cuda_max_allocated_bytes"] for r in recs)
        assert recs[0]["quality"]["teacher_forced_top1"] >= (0.95 if dtype == "bf16" else INT8_MIN_TOP1)
