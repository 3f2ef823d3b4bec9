"""The planner's AutoTP shapes (``autotp.planned_shapes``, from the config alone) equal what a
real TP=2 launch of DeepSpeed holds, for every family AutoTP supports and for odd widths.

One ``deepspeed`` launch on two CPU ranks runs the TP recipe for each model
(``family_runs.py``); each record carries rank 0's block-0 shapes and every rank's bytes of
block linears, so rank 1's plan is checked through its bytes.  The widths that made a plan of
"exact halves" wrong are here: ``tiny-llama``'s MLP of 176 (DeepSpeed cuts MLPs in grains of
64: 64 + 112) and ``odd-llama``'s 3 key/value heads (2 + 1)."""
import json
import math

import pytest

from bloomkit import arch, launch, models
from bloomkit.strategies import autotp
from conftest import ROOT

MODELS = ["tiny", "tiny-llama", "odd-llama", "tiny-mistral", "tiny-qwen2", "tiny-falcon",
          "tiny-gpt-neox", "tiny-opt"]


def _plan(config, rank, tp=2):
    p = autotp.planned_shapes(config, tp, rank)
    return {w: list(s) for w, s in zip(p.weight, p[f"rank {rank} shape"]) if w != "norms"}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    for name in MODELS:
        models.ensure_preset(name)
    out = tmp_path_factory.mktemp("tp2-shapes")
    launch.launch(ROOT / "tests" / "family_runs.py",
                  [str(out), "recipes/ds_inference.py", *MODELS, "--", "--max_new_tokens", "2",
                   "--batch_size", "1"], 2, timeout=380)
    errs = {p.stem: p.read_text() for p in out.glob("*.err")}
    assert not errs, errs
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", MODELS)
def test_planned_shapes_equal_a_real_tp2_launch(launched, name):
    o = launched[name]["options"]
    config = models.load_config(models.resolve_model(name))
    real = o["rank0_shapes"]
    for weight, shape in _plan(config, 0).items():
        held = real[f"layers.0.{weight}.weight"].rsplit(" ", 1)[0]
        assert held == str(shape), (name, weight, held, shape)
    # rank 1 (and rank 0 again): every block's linears, in fp32 bytes, as the ranks reported them
    planned = [arch.layers_of(config) * 4 * sum(math.prod(s) for s in _plan(config, r).values())
               for r in (0, 1)]
    assert planned == o["linear_bytes_per_rank"], (name, planned, o["linear_bytes_per_rank"])
    plan = autotp.planned_shapes(config, 2, 0)
    assert o["heads_per_rank"][0] == plan.attrs["heads_per_rank"], name


def test_llama_mlp_is_cut_in_grains_not_halves():
    config = models.load_config(models.resolve_model("tiny-llama"))   # intermediate 176, grain 64
    assert autotp.tp_grain_size() == 64
    p0, p1 = _plan(config, 0), _plan(config, 1)
    assert p0["mlp.gate_proj"] == [64, 64] and p0["mlp.down_proj"] == [64, 64]
    assert p1["mlp.gate_proj"] == [112, 64] and p1["mlp.down_proj"] == [64, 112]
    assert p0["self_attn.k_proj"] == p1["self_attn.k_proj"] == [16, 64]   # whole KV heads, 1 + 1


# TP=3 only where the key/value heads allow 3 ranks (tiny-llama and tiny-falcon have 2: refused before loading)
@pytest.mark.parametrize("name,tp", [(n, 2) for n in ("tiny", "tiny-llama", "odd-llama", "tiny-falcon", "tiny-opt")]
                         + [(n, 3) for n in ("tiny", "odd-llama", "tiny-opt")])
def test_plans_of_all_ranks_tile_every_weight(name, tp):
    """Whatever the widths, the ranks' slices add up to the whole weight (DeepSpeed's own
    assertion in ``get_shard_size_list``) — on the axis each layer is cut along."""
    config = models.load_config(models.resolve_model(name))
    assert arch.kv_heads_of(config) >= tp, (name, tp)
    p = autotp.planned_shapes(config, tp, 0)
    plans = [_plan(config, r, tp) for r in range(tp)]
    for weight, split, full in zip(p.weight, p.split, p["full shape"]):
        if split == "replicated":
            continue
        axis = 1 if split == "row" else 0
        assert sum(pl[weight][axis] for pl in plans) == full[axis], (name, tp, weight)
