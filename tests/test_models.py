"""The embedded default model: deterministic, cached, loadable, with clear greedy margins."""
import json

import pytest

from bloomkit import models
from bloomkit.measure import harness, quality
from bloomkit.errors import UserError


def test_tiny_preset_files(tiny_path):
    names = {p.name for p in tiny_path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    assert len(list(tiny_path.glob("model-*.safetensors"))) >= 2, "checkpoint must be sharded"
    assert not list(tiny_path.glob("*.bin")), "no pickled weights"
    cfg = json.loads((tiny_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "BloomTokenizerFast"
    assert cfg["padding_side"] == "left"
    conf = json.loads((tiny_path / "config.json").read_text())
    for tp in (2, 4):
        assert conf["n_head"] % tp == 0


def test_special_tokens_and_left_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in models.SPECIAL_TOKENS] == [0, 1, 2, 3]
    enc = tok(["a", "DeepSpeed is a machine learning framework"], padding=True)
    assert enc["input_ids"][0][0] == tok.pad_token_id == 3
    assert enc["attention_mask"][0][0] == 0


def test_build_is_deterministic(tmp_path, tiny_path):
    from safetensors.torch import load_file

    out = models.build_model("tiny", tmp_path / "again")
    for shard in sorted(tiny_path.glob("model-*.safetensors")):
        a, b = load_file(shard), load_file(out / shard.name)
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a)
    assert (out / "tokenizer.json").read_text() == (tiny_path / "tokenizer.json").read_text()


def test_cache_rebuilds_when_recipe_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOOMKIT_CACHE", str(tmp_path))
    first = models.preset_path("tiny")
    monkeypatch.setattr(models, "BUILD_VERSION", models.BUILD_VERSION + "-changed")
    assert models.preset_path("tiny") != first


def test_an_unbuilt_preset_asked_for_under_the_meta_device_is_built_real(monkeypatch, tmp_path):
    """A fresh cache: ``resolve_model`` called inside ``with torch.device("meta")`` (how one counts
    parameters) builds real weights; under accelerate's ``init_empty_weights``, which no device
    context overrides, it refuses in one line and leaves nothing half-built in the cache."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    monkeypatch.setenv("BLOOMKIT_CACHE", str(tmp_path))
    with torch.device("meta"):
        path = models.resolve_model("tiny-llama")
    tensors = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    assert tensors and all(v.device.type == "cpu" and v.abs().sum() > 0 for v in tensors.values())

    with init_empty_weights(), pytest.raises(UserError, match="init_empty_weights") as err:
        models.resolve_model("tiny")
    assert "\n" not in str(err.value)
    assert not models.preset_path("tiny").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] \
        == [path.name]


def test_greedy_margins_are_clear(tiny_model, tiny_tokenizer):
    """Random models have near-flat logits; ours are initialised so greedy is not a coin toss."""
    gen = harness.generate(tiny_model, tiny_tokenizer, harness.make_prompts(8), 20, return_scores=True)
    assert min(min(r) for r in quality.margins(gen.scores)) > 1e-3
    assert len({tuple(t) for t in gen.tokens}) > 4, "different prompts should continue differently"


@pytest.mark.parametrize("name", ["/no/such/dir", "nosuchpreset", "someone/not-cached-model"])
def test_resolve_model_errors(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError):
        models.resolve_model(name)


def test_resolve_local_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        models.resolve_model(str(tmp_path))


def test_bloom_176b_shapes():
    from bloomkit import memory

    cfg = models.bloom_config("bloom")
    assert round(memory.param_count(cfg) / 1e9, 1) == 176.2
    assert round(memory.weight_bytes(cfg, "bf16") / 1e9) == 352  # the blog's 352 GB
    assert round(memory.param_count(models.bloom_config("bloom-560m")) / 1e6) == 559
