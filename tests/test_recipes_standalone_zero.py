"""The ZeRO-Inference recipe copied alone runs with torch, transformers and deepspeed only.

``recipes/ds_zero_inference.py`` copied into an empty folder, ``bloomkit`` blocked in every
rank, fp32 with CPU offload, on a generated BLOOM and a Llama-style model: on one rank (plain
``python``, a one-rank process group of its own) and on two CPU ranks under the ``deepspeed``
launcher, each rank generating its own prompts.  Rank 0 prints every rank's rows in rank order;
each stream's completions equal plain fp32 ``generate`` of that stream's prompts as one batch.
The recipe's hand-written ZeRO config equals the package's (:func:`zero.ds_config`) for every
offload and quantization, and its load gives the package load's tokens.
"""
import pytest

from bloomkit import models
from bloomkit.measure import harness
from bloomkit.prompts import STANDARD_PROMPTS
from bloomkit.strategies import zero
from conftest import printed_completions, run_standalone
from test_recipes_standalone import plain_generate, recipe_module

RECIPE = "recipes/ds_zero_inference.py"
N_NEW = 6


def check_streams(proc, path, batch_sizes, world):
    """Rank 0 printed ``world`` streams per batch size, rank by rank; each equals plain
    ``generate`` of its own prompts (the package's unique-stream rule picks them)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.blocked_processes >= world, proc.blocked_processes   # bloomkit blocked in every rank
    got = printed_completions(proc.stdout)
    assert len(got) == world * sum(batch_sizes), proc.stdout[-2000:]
    start = 0
    for bs in batch_sizes:
        for rank in range(world):
            rows, start = got[start:start + bs], start + bs
            prompts = zero.rank_prompts(bs, STANDARD_PROMPTS, rank, world)
            assert [p for p, _ in rows] == prompts, (bs, rank)
            assert [t for _, t in rows] == plain_generate(path, prompts, N_NEW), (bs, rank)
    assert proc.stdout.count("*** Start to ready to generate") == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,benchmark", [("tiny", True), ("tiny-llama", False)])
def test_zero_recipe_alone_one_rank_equals_generate(name, benchmark, tmp_path):
    path = models.resolve_model(name)
    bench = ["--benchmark", "--cycles", "1"] if benchmark else []
    proc = run_standalone(tmp_path, RECIPE, ["--name", str(path), "--cpu_offload", "--batch_size",
                                             "1,3", "--max_new_tokens", str(N_NEW), *bench])
    check_streams(proc, path, [1, 3], world=1)
    stats = [ln for ln in proc.stdout.splitlines() if ln.startswith("*** Performance stats")]
    assert len(stats) == (2 if benchmark else 0), proc.stdout[-2000:]
    assert all("msecs" in ln and "on 1 rank(s)" in ln for ln in stats)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_zero_recipe_alone_two_cpu_ranks_unique_streams(name, tmp_path):
    path = models.resolve_model(name)
    proc = run_standalone(tmp_path, RECIPE, ["--name", str(path), "--cpu_offload", "--batch_size",
                                             "1,3", "--max_new_tokens", str(N_NEW)],
                          nprocs=2, launcher="deepspeed", timeout=380)
    check_streams(proc, path, [1, 3], world=2)
    assert not proc.leftover_shm, proc.leftover_shm   # the recipe unlinks DeepSpeed's segments


def test_zero_recipe_alone_without_name_is_argparse_error(tmp_path):
    proc = run_standalone(tmp_path, RECIPE, ["--cpu_offload"])
    assert proc.returncode == 2 and "--name" in proc.stderr


# ---------------------------------------------------------------------------- the recipe = the package

@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "odd-llama", "small"])
def test_zero_recipe_config_equals_the_package_config(name, tmp_path):
    """The dict written out in the recipe is :func:`zero.ds_config`'s, for every offload,
    4/8-bit weights, and the NVMe buffers both size from the model (on 1 and 8 ranks); the
    recipe's default quantization group is :func:`zero.quant_group_size`'s."""
    recipe = recipe_module(RECIPE)
    config = models.load_config(models.resolve_model(name))
    h = config.hidden_size
    largest, rows = recipe.weight_shapes(config)
    group = zero.quant_group_size(config)
    assert next(g for g in (64, 32, 16, 8, 4, 2, 1) if rows % g == 0) == group
    for world in (1, 8):
        for dtype in ("fp32", "bf16"):
            for offload in ("none", "cpu", "nvme"):
                for bits in (None, 4, 8):
                    nvme = str(tmp_path) if offload == "nvme" else None
                    plan = zero.plan_nvme_buffers(config, dtype, world, check_limit=False)
                    size = recipe.nvme_buffer_size(largest, dtype, world) if nvme else None
                    ours = recipe.ds_config(h, dtype, offload, nvme, world, bits, group,
                                            buffer_size=size)
                    theirs = zero.ds_config(h, dtype=dtype, offload=offload, nvme_path=nvme,
                                            world_size=world, buffers=plan if nvme else None,
                                            quant_bits=bits, quant_group_size=group)
                    assert ours == theirs, (world, dtype, offload, bits)
    assert recipe.PROMPTS == STANDARD_PROMPTS
    for bs, world in [(1, 1), (3, 1), (9, 1), (3, 2), (5, 3), (1, 8)]:
        for rank in range(world):
            assert recipe.rank_prompts(STANDARD_PROMPTS, bs, rank, world) == \
                zero.rank_prompts(bs, STANDARD_PROMPTS, rank, world)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,dtype,bits", [("tiny-llama", "fp32", None), ("tiny", "bf16", 4)])
def test_zero_recipe_load_equals_the_package_load(name, dtype, bits):
    """In this process (one rank): the recipe's ``load_model`` and :func:`zero.load_model` on the
    same :func:`zero.prepare` config give the same greedy tokens, also for 4-bit weights from an
    fp32 checkpoint loaded as bf16 (DeepSpeed 0.19's dtype bug, worked around in both); and
    ``zero.load`` through the recipe's function leaves no ZeRO config behind."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    path = models.resolve_model(name)
    setup = zero.prepare(zero.ZeroOptions(offload="cpu", quant_bits=bits, dtype=dtype), path)
    recipe = recipe_module(RECIPE)
    tok = models.load_tokenizer(path)
    prompts = harness.make_prompts(3)
    ours = zero.load(setup, recipe.load_model)
    assert not is_deepspeed_zero3_enabled() and setup.info["partition_bytes"] > 0
    theirs = zero.load_model(path, dtype, setup.ds_config)
    assert recipe.generate(ours, tok, prompts, N_NEW) == harness.generate(theirs, tok, prompts, N_NEW).texts
