"""Recipes copied alone into an empty folder run with the public libraries only.

Each recipe is run the way a user who copied it runs it: no ``bloomkit`` importable (in any
launched rank), a local model directory as ``--name``; every completion it prints equals plain
greedy ``generate``'s on the same batch, for a BLOOM and a Llama-style model.  Where a recipe
repeats the package's load calls on purpose, the two loads give the same tokens.
"""
import importlib.util

import pytest

from bloomkit import models
from bloomkit.measure import harness
from bloomkit.prompts import STANDARD_PROMPTS
from conftest import ROOT, printed_completions, run_standalone

ACCEL = "recipes/accelerate_inference.py"
N_NEW = 6


def recipe_module(recipe: str):
    spec = importlib.util.spec_from_file_location(f"{recipe.split('/')[-1][:-3]}_copy", ROOT / recipe)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plain_generate(path, prompts, n=N_NEW):
    """Plain fp32 ``generate`` on the same batch (left-padded, greedy, exactly n tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return harness.generate(model, models.load_tokenizer(path), prompts, n).texts


def check_completions(proc, path, batch_sizes, nprocs=1):
    """Exit 0, ``bloomkit`` blocked in every process, and each batch's printed rows (once each:
    one rank prints) equal plain ``generate`` on the blog's prompts."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.blocked_processes >= nprocs, proc.blocked_processes
    got = printed_completions(proc.stdout)
    assert len(got) == sum(batch_sizes), proc.stdout[-2000:]
    start = 0
    for bs in batch_sizes:
        rows = got[start:start + bs]
        start += bs
        prompts = [STANDARD_PROMPTS[i % len(STANDARD_PROMPTS)] for i in range(bs)]
        assert [p for p, _ in rows] == prompts
        assert [t for _, t in rows] == plain_generate(path, prompts)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_accelerate_recipe_alone_equals_generate(name, tmp_path):
    path = models.resolve_model(name)
    proc = run_standalone(tmp_path, ACCEL, ["--name", str(path), "--batch_size", "1,3",
                                            "--max_new_tokens", str(N_NEW), "--benchmark",
                                            "--cycles", "1"])
    check_completions(proc, path, [1, 3])
    stats = [ln for ln in proc.stdout.splitlines() if ln.startswith("*** Performance stats")]
    assert len(stats) == 2 and all("msecs" in ln for ln in stats)
    assert "*** Start to ready to generate" in proc.stdout


def test_accelerate_recipe_alone_offloads_to_disk(tmp_path):
    path = models.resolve_model("tiny")
    folder = tmp_path / "offload"
    proc = run_standalone(tmp_path, ACCEL, ["--name", str(path), "--batch_size", "2",
                                            "--max_new_tokens", str(N_NEW),
                                            "--max_memory", "cpu=490KiB", "--offload_folder", str(folder)])
    check_completions(proc, path, [2])
    placed = next(ln for ln in proc.stdout.splitlines() if ln.startswith("*** Modules per device"))
    assert "'disk'" in placed and "'cpu'" in placed, placed


def test_accelerate_recipe_alone_without_name_is_argparse_error(tmp_path):
    proc = run_standalone(tmp_path, ACCEL, ["--batch_size", "1"])
    assert proc.returncode == 2 and "--name" in proc.stderr
    bad = run_standalone(tmp_path, ACCEL, ["--name", "x", "--max_memory", "cpu"])
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --max_memory takes device=size")


@pytest.mark.parametrize("dtype,device_map,offload", [("fp32", "auto", False), ("fp32", "sequential", True),
                                                      ("int8", "auto", False), ("nf4", "auto", False)])
def test_accelerate_recipe_load_equals_the_package_load(dtype, device_map, offload, tmp_path):
    """The recipe's ``from_pretrained`` call and the package's (``accel.load_model``) build the
    same model: the same greedy tokens, also for int8 / nf4 and disk offload."""
    from bloomkit.strategies import accel

    path = models.resolve_model("tiny")
    mm = {"cpu": "490KiB"} if offload else None
    folder = str(tmp_path / "off") if offload else None
    recipe = recipe_module(ACCEL)
    tok = models.load_tokenizer(path)
    prompts = harness.make_prompts(3)
    ours = recipe.load_model(str(path), dtype, device_map, mm, folder, "cpu")
    theirs = accel.load_model(path, dtype, device_map=device_map, max_memory=mm,
                              offload_folder=folder, device="cpu")
    if offload:
        assert "disk" in ours.hf_device_map.values() and "disk" in theirs.hf_device_map.values()
    assert recipe.generate(ours, tok, prompts, N_NEW) == harness.generate(theirs, tok, prompts, N_NEW).texts
