"""Strategy 2 (DeepSpeed-Inference TP): real multi-rank launches on CPU (gloo).

TP=2 and TP=4 equal single-process fp32 ``generate`` token for token (tiny, and a 6-head
BLOOM built here); bf16 slices are half the bytes and close to fp32; int8 really stores the
rank's shards as int8; bad input is one line; a killed rank ends the launch; two "nodes" on
loopback (torchrun --nnodes, deepspeed --hostfile --no_ssh); the notebook runs.
"""
import json
import time

import pytest

from bloomkit import dist, launch
from bloomkit.measure import bench, harness, quality
from bloomkit.strategies import autotp, bloom
from conftest import assert_one_line_error, run_recipe_inprocess

RECIPE = "recipes/ds_inference.py"
N_NEW = 12
BS = 8
INT8_MIN_TOP1 = 0.85      # teacher-forced top-1 agreement of int8 TP with fp32 on tiny
INT8_MAX_REL_RMS = 0.10   # relative RMS logit error


def _launch(nprocs, args, launcher="deepspeed", **kw):
    return launch.launch_records(RECIPE, ["--max_new_tokens", str(N_NEW), "--batch_size", str(BS),
                                          *args], nprocs, launcher=launcher, timeout=240, **kw)[0]


@pytest.fixture(scope="module")
def reference(tiny_path):
    return bench.reference(tiny_path, harness.make_prompts(BS), N_NEW)[0]


def _assert_identical(ref, rec):
    cmp = quality.compare_tokens(ref, rec["tokens"])
    assert cmp["identical"] or cmp["real_mismatches"] == 0, cmp["mismatches"]
    assert cmp["identical"], f"only ties differ, but the tiny model has none: {cmp}"


@pytest.fixture(scope="module")
def tp2_records():
    return launch.launch_records(RECIPE, ["--max_new_tokens", str(N_NEW), "--batch_size", f"1,{BS}",
                                          "--compare_to", "one_process", "--benchmark", "--cycles", "1"],
                                 2, timeout=600)


@pytest.fixture(scope="module")
def tp2_record(tp2_records):
    return tp2_records[1]


def test_tp2_batch_1_is_token_identical(tiny_path, tp2_records):
    # one row, no padding: transformers then skips the alibi builder DeepSpeed shards per rank
    # unless an attention mask is passed (bloomkit.strategies.tp.keep_alibi_sharded)
    ref = bench.reference(tiny_path, harness.make_prompts(1), N_NEW)[0]
    assert tp2_records[0]["batch_size"] == 1
    _assert_identical(ref, tp2_records[0])


@pytest.mark.timeout(300)
def test_tp2_is_token_identical_and_shards_the_block(reference, tp2_record, tiny_path):
    rec = tp2_record
    _assert_identical(reference, rec)
    o = rec["options"]
    assert rec["world_size"] == 2 and o["tp_size"] == 2 and o["engine"] == "autotp"
    shapes, h = o["rank0_shapes"], 64
    assert shapes["layers.0.self_attention.query_key_value.weight"].startswith(f"[{3 * h // 2}, {h}]")
    assert shapes["layers.0.self_attention.dense.weight"].startswith(f"[{h}, {h // 2}]")
    assert shapes["layers.0.mlp.dense_h_to_4h.weight"].startswith(f"[{4 * h // 2}, {h}]")
    assert shapes["layers.0.mlp.dense_4h_to_h.weight"].startswith(f"[{h}, {4 * h // 2}]")
    types = shapes["layers.0.layer_types"]
    assert types["self_attention.dense"] == types["mlp.dense_4h_to_h"] == "LinearAllreduce"
    assert o["heads_per_rank"] == [2, 2] and o["alibi_heads"] == [[0, 1], [2, 3]]
    # the planned (config-only) table agrees with what AutoTP really did
    from bloomkit import models
    plan = autotp.planned_shapes(models.load_config(tiny_path), 2).set_index("weight")
    assert plan.loc["self_attention.dense", "rank 0 shape"] == [h, h // 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp4_is_token_identical(reference):
    rec = _launch(4, [])
    _assert_identical(reference, rec)
    assert rec["options"]["heads_per_rank"] == [1, 1, 1, 1]


def _build_bloom(out, n_head, hidden, tokenizer_from):
    """A random BLOOM with another head count, saved like a preset (local test helper)."""
    import shutil

    import torch
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=1024, hidden_size=hidden, n_layer=2, n_head=n_head,
                      initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(7)
    model = BloomForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy2(f, out / f.name)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_six_heads_tp2_is_token_identical(tmp_path, tiny_path):
    path = _build_bloom(tmp_path / "bloom6", n_head=6, hidden=96, tokenizer_from=tiny_path)
    ref = bench.reference(path, harness.make_prompts(BS), N_NEW)[0]
    rec = _launch(2, ["--name", str(path)])
    _assert_identical(ref, rec)
    assert rec["options"]["heads_per_rank"] == [3, 3]
    assert rec["options"]["rank0_shapes"]["layers.0.self_attention.query_key_value.weight"].startswith("[144, 96]")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2_bf16_on_cpu(tp2_record):
    """bf16 under TP on CPU ranks: bf16 slices (half the fp32 bytes), close to fp32."""
    rec = _launch(2, ["--dtype", "bf16", "--verify"])
    o = rec["options"]
    assert o["rank0_shapes"]["layers.0.self_attention.query_key_value.weight"].endswith("bfloat16")
    assert [2 * b for b in o["linear_bytes_per_rank"]] == tp2_record["options"]["linear_bytes_per_rank"]
    q = rec["quality"]
    assert q["teacher_forced_top1"] >= 0.9 and q["logit_rel_rms_err"] <= 0.05, q  # tiny: 0.97, 0.019


@pytest.mark.timeout(300)
def test_int8_under_tp_really_stores_int8_shards(tp2_record):
    rec = _launch(2, ["--dtype", "int8", "--verify"])
    o = rec["options"]
    assert o["int8_layers"] == 4 * 2 and o["int8_all_int8"]
    for name in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h"):
        assert o["rank0_shapes"][f"layers.0.{name}.weight_int8"].endswith("int8"), name
        assert f"layers.0.{name}.weight" not in o["rank0_shapes"], name  # no float copy left
        assert o["rank0_shapes"]["layers.0.layer_types"][name] == "Int8TPLinear"
    # block linears per rank: int8 (+ bf16 scales) ~ half of bf16 = a quarter of fp32
    fp32 = tp2_record["options"]["linear_bytes_per_rank"]
    for i8, f32 in zip(o["linear_bytes_per_rank"], fp32):
        assert 0.5 <= i8 / (f32 / 2) <= 0.53, (i8, f32)
    q = rec["quality"]
    assert q["teacher_forced_top1"] >= INT8_MIN_TOP1, q
    assert q["logit_rel_rms_err"] <= INT8_MAX_REL_RMS, q


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,needles", [
    (["--tp_size", "3"], ["4 attention heads", "not divisible", "tp_size 3"]),
    (["--tp_size", "2"], ["only 1 rank", "--num_accelerators 2"]),
    (["--device", "cuda"], ["no cuda gpu", "--device cpu"]),
    (["--dtype", "fp16"], ["fp16", "--dtype bf16"]),
    (["--dtype", "nf4"], ["nf4", "Accelerate", "--dtype int8"]),
    (["--kernel_inject", "on"], ["transformers<=4.43.4", "make setup-legacy", "--kernel_inject off"]),
    (["--kernel_inject", "on", "--dtype", "int8"], ["deepspeed<0.15.2", "--kernel_inject off",
                                                    "--ds_checkpoint", "--save_shards"]),    (["--compare_to", "eager"], ["--compare_to eager", "add --compile"]),
    (["--compare_to", "one_process", "--dtype", "int8"], ["--compare_to one_process", "int8", "--dtype fp32"]),
])
def test_bad_input_is_one_line(args, needles, capsys):
    proc = run_recipe_inprocess(RECIPE, ["--max_new_tokens", "2", *args], capsys)
    assert_one_line_error(proc, *needles)


@pytest.mark.timeout(300)
def test_compare_to_one_process_times_pairs_in_turns(tp2_records):
    """--compare_to one_process: TP=2 and plain generate in rank 0 alone (with both ranks'
    threads), timed in turns inside the launch; the same tokens in fp32; the waiting rank sleeps."""
    for rec in tp2_records:
        _check_comparison(rec)


def test_every_ranks_peak_is_recorded(tp2_records):
    """Each rank measures its own peak (load and timed generation); rank 0 writes them all."""
    for rec in tp2_records:
        gen, load = rec["peak_rss_bytes_per_rank"], rec["options"]["load_peak_rss_bytes_per_rank"]
        assert len(gen) == len(load) == 2 and min(gen) > 0 and min(load) > 0, (gen, load)
        assert gen[0] == rec["peak_rss_bytes"]


def _check_comparison(rec):
    c = rec["comparison"]
    assert c["against"] == "one_process" and c["a_label"] == "TP=2" and c["pairs"] == 5
    assert len(c["a"]) == len(c["b"]) == 5 and min(c["a"] + c["b"]) > 0
    assert c["same_tokens"] is True and c["max_new_tokens"] == min(N_NEW, 8)
    assert len(c["waiting_ranks_cpu_s"]) == 1 and c["waiting_ranks_cpu_s"][0] < sum(c["b"])
    assert rec["process_start_to_ready_s"] >= rec["load_seconds"] > 0 and rec["ready_unix_time"] > 0


def test_int8_without_a_backend_is_one_line(capsys, monkeypatch):
    # a torch older than 2.3 has no weight-only int8 matmul: hide it to stand for one
    import torch

    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    proc = run_recipe_inprocess(RECIPE, ["--max_new_tokens", "2", "--dtype", "int8"], capsys)
    assert_one_line_error(proc, "torch._weight_int8pack_mm", "torch>=2.3", "--dtype bf16")


def test_kernel_inject_choice():
    assert bloom.choose_engine("auto", "cpu", "fp32") == "autotp"
    assert bloom.choose_engine("off", "cpu", "int8") == "autotp"
    with pytest.raises(Exception, match="make setup-legacy"):
        bloom.choose_engine("on", "cpu", "bf16")


def test_recipes_take_the_deepspeed_launchers_local_rank():
    """`deepspeed recipes/x.py` (the README's command) appends --local_rank=K to each rank; the
    launches in these tests use that exact form (no --no_local_rank), so they cover it. Found on
    the H200: DeepSpeed 0.15.1's launcher does the same and the recipes refused the flag."""
    from bloomkit import cli

    assert cli.common_parser("x").parse_args(["--local_rank=1"]).local_rank == 1
    assert "--no_local_rank" not in launch.launcher_command(RECIPE, [], 2)
    assert "--no_local_rank" not in launch.deepspeed_node_command(RECIPE, [], hostfile="h", node_rank=0)


def test_kernel_block_accounting():
    """What the record says of DeepSpeed's fused block (kernel injection runs only on CUDA in
    the legacy stack): a DeepSpeedBloomInference skeleton with the parameter names DeepSpeed
    0.15 gives it (built without its CUDA kernels; the GPU test runs the real one)."""
    import torch
    from deepspeed.model_implementations.transformers.ds_bloom import DeepSpeedBloomInference

    h, per_rank_heads = 8, 2

    class Part(torch.nn.Module):
        def __init__(self, **params):
            super().__init__()
            for k, v in params.items():
                setattr(self, k, torch.nn.Parameter(v, requires_grad=False))

    class FusedBlock(DeepSpeedBloomInference):
        def __init__(self, dtype):
            torch.nn.Module.__init__(self)  # skeleton: DeepSpeed's __init__ builds CUDA kernels
            w = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
            self.attention = Part(attn_qkvw=w(3 * h // 2, h), attn_ow=w(h, h // 2))
            self.attention.num_attention_heads_per_partition = per_rank_heads
            self.mlp = Part(inter_w=w(4 * h // 2, h), output_w=w(h, 4 * h // 2))
            if dtype == torch.int8:
                for part, name in ((self.attention, "attn_qkvw"), (self.mlp, "inter_w")):
                    getattr(part, name).scale = torch.ones(4, dtype=torch.float32)

    for dtype, per_byte in ((torch.float16, 2), (torch.int8, 1)):
        block = FusedBlock(dtype)
        assert bloom.is_kernel_block(block) and autotp.heads_on_rank(block) == per_rank_heads
        assert [n for n, _ in bloom.kernel_block_weights(block)] == [f".{w}" for w in bloom.KERNEL_BLOCK_WEIGHTS]
        scales = 2 * 4 * 4 if dtype == torch.int8 else 0
        assert autotp.tp_linear_bytes(block) == (3 * h * h // 2 + h * h // 2 + 2 * h * h + 2 * h * h) * per_byte + scales


@pytest.mark.timeout(120)
def test_bad_input_on_two_ranks_fails_all_ranks(tmp_path):
    out = tmp_path / "r.json"
    proc = launch.launch(RECIPE, ["--dtype", "fp16", "--json_out", str(out)], 2, check=False,
                         timeout=100)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert errors and all("fp16" in e for e in errors), proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher", ["deepspeed", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_killed_rank_ends_the_launch(tmp_path, launcher):
    """Rank 1 SIGKILLs itself before generating (as the kernel's OOM killer would): the launch
    ends at once, instead of rank 0 waiting in its next all-reduce for the process group's
    timeout. About 15 s alone, 30 s beside another test file on 2 cores: 100 s is the bound."""
    out = tmp_path / "r.json"
    t0 = time.perf_counter()
    proc = launch.launch(RECIPE, ["--max_new_tokens", "50", "--json_out", str(out)], 2, check=False,
                         timeout=180, env={dist.KILL_HOOK_ENV: "1"}, launcher=launcher)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert elapsed < 100, elapsed
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback(tmp_path, reference, launcher):
    # torchrun --nnodes 2 / deepspeed --hostfile --no_ssh: one agent per "node", one rank each
    out = tmp_path / "r.json"
    procs = launch.launch_nodes(RECIPE, ["--max_new_tokens", str(N_NEW), "--batch_size", str(BS),
                                         "--json_out", str(out)], nnodes=2, launcher=launcher, timeout=180)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-1500:] for p in procs]
    printed = [[ln for ln in p.stdout.splitlines() if ln.startswith("ds-inference")] for p in procs]
    assert len(printed[0]) == 1 and printed[1] == [], printed  # only rank 0 prints
    rec = json.loads(out.read_text())
    assert rec["world_size"] == 2
    _assert_identical(reference, rec)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_tp1_bf16_kernel_inject_auto(tmp_path):
    rec = launch.launch_records(RECIPE, ["--device", "cuda", "--dtype", "bf16", "--kernel_inject",
                                         "auto", "--batch_size", "1,8", "--max_new_tokens", "20",
                                         "--benchmark", "--cycles", "2", "--verify"], 1,
                                device="cuda", timeout=500)
    assert [r["status"] for r in rec] == ["ok", "ok"]
    o = rec[0]["options"]
    assert o["engine"] in ("autotp", "kernel-inject")
    assert rec[0]["cuda_max_allocated_bytes"] > 0
    assert rec[0]["quality"]["teacher_forced_top1"] >= 0.85, rec[0]["quality"]  # bf16 vs fp32 (H200: 0.90)


@pytest.mark.gpu
@pytest.mark.timeout(200)
def test_gpu_more_ranks_than_gpus_is_one_line(tmp_path):
    import torch

    n = torch.cuda.device_count() + 1
    out = tmp_path / "r.json"
    # deepspeed --num_gpus n: the launcher starts n ranks anyway (torchrun would too, but adds
    # a traceback of its own when a rank fails)
    proc = launch.launch(RECIPE, ["--device", "cuda", "--json_out", str(out)], n, device="cuda",
                         check=False, timeout=180)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert errors and all(f"{n} ranks on this node but only {n - 1} GPU" in e and "--num_gpus" in e
                          for e in errors), proc.stderr[-2000:]
    assert not out.exists()

