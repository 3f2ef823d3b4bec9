"""The pinned legacy stack (``make setup-legacy``: transformers 4.43.4, DeepSpeed 0.15.1, torch
2.4.1), run by ``make test-legacy`` inside ``.venv-legacy``; ``make test`` deselects it.

On CPU: AutoTP on 2 ranks (DeepSpeed's launcher and torchrun) equals plain ``generate``,
pre-sharded loads too, and kernel injection stops with one line.  On a CUDA GPU (also marked
``gpu``): the blog's path — fused kernels in fp16 and DeepSpeed's int8.
"""
import subprocess
import sys

import pytest

from bloomkit import bench, harness, launch, quality
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
@pytest.mark.parametrize("dtype,min_top1", [("fp16", 0.85), ("int8", 0.6)])
def test_gpu_kernel_injection(dtype, min_top1):
    """The blog's path: DeepSpeed's fused BLOOM kernels (fp16) and its int8 on one GPU."""
    recs = launch.launch_records(RECIPE, ["--device", "cuda", "--dtype", dtype, "--kernel_inject", "on",
                                          "--name", "small", "--batch_size", "1,8", "--max_new_tokens",
                                          "20", "--benchmark", "--cycles", "2", "--verify"], 1,
                                 device="cuda", timeout=850)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert recs[0]["options"]["engine"] == "kernel-inject"
    assert recs[0]["quality"]["teacher_forced_top1"] >= min_top1, recs[0]["quality"]
