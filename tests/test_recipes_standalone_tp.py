"""recipes/ds_inference.py copied alone into an empty folder runs tensor parallelism with the
public libraries only.

The copied file is launched as a user launches it (``deepspeed --num_accelerators 2`` or
``torchrun --nproc_per_node 2``, CPU ranks over gloo), with ``import bloomkit`` failing in every
rank and a local model directory as ``--name``: every completion rank 0 prints equals plain fp32
``generate`` on the same batch, for a BLOOM (ALiBi sliced per rank) and a Llama-style model
(RoPE, grouped-query attention).  The recipe's ``load_model`` and the package's
``autotp.tp_model`` build the same TP model (the same greedy tokens and logits, also bf16 and
int8 AutoTP, which the package builds on top of the recipe's load).
"""
import json

import pytest

from bloomkit import launch, models
from conftest import ROOT, run_standalone
from test_recipes_standalone import check_completions

TP = "recipes/ds_inference.py"
N_NEW = 6


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher,name,benchmark", [
    ("deepspeed", "tiny", True), ("deepspeed", "tiny-llama", False), ("torchrun", "tiny", False)])
def test_tp2_recipe_alone_equals_generate(launcher, name, benchmark, tmp_path):
    path = models.resolve_model(name)
    extra = ["--benchmark", "--cycles", "1"] if benchmark else []
    proc = run_standalone(tmp_path, TP, ["--name", str(path), "--dtype", "fp32", "--batch_size", "1,3",
                                         "--max_new_tokens", str(N_NEW), *extra],
                          nprocs=2, launcher=launcher, timeout=280)
    check_completions(proc, path, [1, 3], nprocs=2)
    assert not [ln for ln in proc.stdout.splitlines() if ln.startswith("ds-inference ")]   # no records
    assert not proc.leftover_shm, proc.leftover_shm   # the recipe unlinks DeepSpeed's segments
    assert proc.stdout.count("*** Start to ready to generate") == 1
    stats = [ln for ln in proc.stdout.splitlines() if ln.startswith("*** Performance stats")]
    if benchmark:
        assert [ln.split(",")[0] for ln in stats] == ["*** Performance stats: bs=1",
                                                      "*** Performance stats: bs=3"], stats
        assert all("msecs" in ln and f"generate {3 * N_NEW if '=3' in ln else N_NEW} tokens" in ln
                   for ln in stats), stats
    else:
        assert not stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args,needle", [(["--batch_size", "1"], "--name"),
                                         (["--name", "x", "--dtype", "int8"], "bloomkit")])
def test_tp_recipe_alone_refuses_in_argparse(args, needle, tmp_path):
    """Without bloomkit: --name is required, and int8 (DeepSpeed quantizes only while reading its
    pre-sharded files; int8 AutoTP is the package's) is refused before anything loads."""
    proc = run_standalone(tmp_path, TP, args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# Each rank loads every case twice, through the recipe's load_model and through the package's own
# from_pretrained + init_inference (autotp.tp_model without load=), and compares on every rank.
SAME_LOAD = r'''
import importlib.util, json, sys
import torch
from bloomkit import dist, models
from bloomkit.measure import harness
from bloomkit.strategies import autotp

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed's launcher adds it
spec = importlib.util.spec_from_file_location("ds_inference_copy", argv[0])
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
dist.setup_distributed("cpu")
out = {}
for case in argv[1:]:
    name, dtype = case.split(":")
    path = models.resolve_model(name)
    tok = models.load_tokenizer(path)
    prompts = harness.make_prompts(3)
    ids = tok(prompts[:1], return_tensors="pt")["input_ids"]   # one row, no attention mask
    res = []
    for load in (recipe.load_model, None):
        model = autotp.tp_model(path, dtype, tp_size=dist.world_size(), engine="autotp", load=load)
        with torch.inference_mode():
            logits = model(ids).logits.float()
        res.append((harness.generate(model, tok, prompts, 6).tokens, logits))
    (ta, la), (tb, lb) = res
    out[case] = {"same_tokens": ta == tb, "same_logits": bool(torch.equal(la, lb)),
                 "max_abs_diff": float((la - lb).abs().max())}
if dist.is_main():
    print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.mark.timeout(300)
def test_recipe_load_equals_the_package_load(tmp_path):
    """At TP=2 the recipe's load (its fix-ups in the file: RoPE buffers kept fp32, BLOOM's mask
    pre-hook) and the package's give bit-identical models: greedy tokens and the logits of an
    unpadded row without a mask; bf16 keeps RoPE's fp32 inv_freq; int8 AutoTP quantizes the
    recipe's load the same way."""
    script = tmp_path / "same_load.py"
    script.write_text(SAME_LOAD)
    cases = ["tiny:fp32", "tiny-llama:fp32", "tiny-llama:bf16", "tiny:int8"]
    proc = launch.launch(script, [str(ROOT / TP), *cases], 2, timeout=280)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads(line[0][len("RESULT "):])
    for case in cases:
        assert got[case]["same_tokens"] and got[case]["same_logits"], (case, got[case])
