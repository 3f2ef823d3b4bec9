"""The pinned legacy stack (``make setup-legacy``: transformers 4.43.4, DeepSpeed 0.15.1, torch
2.4.1), run by ``make test-legacy`` inside ``.venv-legacy``; ``make test`` deselects it.

On CPU: AutoTP on 2 ranks (DeepSpeed's launcher and torchrun) equals plain ``generate``,
pre-sharded loads too, and kernel injection stops with one line.  On a CUDA GPU (also marked
``gpu``): the blog's path — fused kernels in fp16, then DeepSpeed's int8 from the files the
fp16 run wrote.
"""
import json
import subprocess
import sys

import pytest

from bloomkit import launch
from bloomkit.measure import bench, harness, quality
from conftest import RECIPES, assert_one_line_error

pytestmark = pytest.mark.legacy
RECIPE = "ds_inference.py"
N_NEW, BS = 12, 8


@pytest.fixture(scope="module", autouse=True)
def legacy_stack():
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.fail("run these with `make test-legacy` (the .venv-legacy interpreter)")


@pytest.fixture(scope="module")
def reference(tiny_path):
    return bench.reference(tiny_path, harness.make_prompts(BS), N_NEW)[0]


def _args(*extra):
    return ["--max_new_tokens", str(N_NEW), "--batch_size", str(BS), *extra]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_autotp_two_ranks_token_identical(reference, launcher):
    rec = launch.launch_records(RECIPE, _args(), 2, launcher=launcher, timeout=350)[0]
    assert rec["versions"]["transformers"].startswith("4.43")
    assert quality.compare_tokens(reference, rec["tokens"])["identical"]


@pytest.mark.timeout(500)
def test_preshard_round_trip_token_identical(reference, tmp_path):
    launch.launch_records(RECIPE, _args("--save_shards", str(tmp_path)), 2, timeout=350)
    rec = launch.launch_records(RECIPE, _args("--load_shards", str(tmp_path)), 2, timeout=350)[0]
    assert rec["options"]["load_from"] == "shards"
    assert quality.compare_tokens(reference, rec["tokens"])["identical"]


def test_kernel_injection_on_cpu_is_one_line():
    proc = subprocess.run([sys.executable, str(RECIPES / RECIPE), "--kernel_inject", "on",
                           "--max_new_tokens", "2"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "needs a CUDA GPU", "--kernel_inject off")


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_kernel_injection_fp16_then_int8(tmp_path):
    """The blog's path on one GPU: DeepSpeed's fused BLOOM kernels in fp16, which also write
    DeepSpeed's pre-sharded files (``--save_shards``); then DeepSpeed's int8, quantized while
    it reads those files onto a meta model (the only way its int8 kernels get int8 weights)."""
    common = ["--device", "cuda", "--kernel_inject", "on", "--name", "small", "--batch_size", "1,8",
              "--max_new_tokens", "20", "--benchmark", "--cycles", "2", "--verify"]
    saved = tmp_path / "ds-fp16"
    # the first launch also JIT-compiles DeepSpeed's inference kernels (minutes; MAX_JOBS helps)
    fp16 = launch.launch_records(RECIPE, [*common, "--dtype", "fp16", "--save_shards", str(saved)], 1,
                                 device="cuda", timeout=600)
    assert [r["status"] for r in fp16] == ["ok", "ok"]
    assert fp16[0]["options"]["engine"] == "kernel-inject"
    assert fp16[0]["quality"]["teacher_forced_top1"] >= 0.85, fp16[0]["quality"]
    js = saved / "ds_inference_config.json"
    assert json.loads(js.read_text())["parallelization"] == "tp"

    int8 = launch.launch_records(RECIPE, [*common, "--dtype", "int8", "--ds_checkpoint", str(js),
                                          "--allow_pickle"], 1, device="cuda", timeout=280)
    assert [r["status"] for r in int8] == ["ok", "ok"]
    o = int8[0]["options"]
    assert o["engine"] == "kernel-inject" and o["load_from"] == "ds_checkpoint"
    assert o["int8_layers"] > 0 and o["int8_all_int8"], o
    ratio = o["linear_bytes_per_rank"][0] / fp16[0]["options"]["linear_bytes_per_rank"][0]
    assert 0.45 <= ratio <= 0.6, ratio  # int8 (+ scales) ~ half of fp16
    assert int8[0]["quality"]["teacher_forced_top1"] >= 0.6, int8[0]["quality"]
