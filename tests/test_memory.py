"""Memory arithmetic from the config, for every decoder-only family bloomkit plans for.

Parameter counts are checked against the real transformers model built on the meta device
(no weights allocated), KV bytes per token against what a real forward stores in its cache.
"""
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from bloomkit import arch, memory
from bloomkit.measure import planner

SMALL = dict(vocab_size=101, max_position_embeddings=32)


def _cfg(cls, **kw):
    return getattr(transformers, cls)(**{**SMALL, **kw})


# (id, config factory): small shapes, GQA where the family has it, odd sizes included
CONFIGS = {
    "bloom": lambda: _cfg("BloomConfig", hidden_size=64, n_layer=2, n_head=4),
    "bloom-96": lambda: _cfg("BloomConfig", hidden_size=96, n_layer=3, n_head=6),
    "llama-gqa": lambda: _cfg("LlamaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=176),
    "llama-96-6h-2kv": lambda: _cfg("LlamaConfig", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                    num_key_value_heads=2, intermediate_size=200),
    "llama-attn-bias": lambda: _cfg("LlamaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=176, attention_bias=True),
    "llama-mlp-bias": lambda: _cfg("LlamaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, intermediate_size=176, mlp_bias=True),
    "llama-head-dim": lambda: _cfg("LlamaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, head_dim=24),
    "llama-tied": lambda: _cfg("LlamaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=True),
    "mistral": lambda: _cfg("MistralConfig", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, intermediate_size=200),
    "mistral-head-dim": lambda: _cfg("MistralConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, head_dim=32),
    "qwen2": lambda: _cfg("Qwen2Config", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=2, intermediate_size=200),
    "falcon-new": lambda: _cfg("FalconConfig", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                               num_kv_heads=2, new_decoder_architecture=True),
    "falcon-new-bias-1ln": lambda: _cfg("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_kv_heads=2, new_decoder_architecture=True, bias=True,
                                        num_ln_in_parallel_attn=1, ffn_hidden_size=100),
    "falcon-mq": lambda: _cfg("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              multi_query=True, parallel_attn=True),
    "falcon-mha-seq-bias": lambda: _cfg("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=False, parallel_attn=False, bias=True),
    "gpt_neox": lambda: _cfg("GPTNeoXConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=160),
    "gpt_neox-seq-nobias": lambda: _cfg("GPTNeoXConfig", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                        intermediate_size=384, use_parallel_residual=False, attention_bias=False),
    "opt": lambda: _cfg("OPTConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=160),
    "opt-proj-post-ln": lambda: _cfg("OPTConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     ffn_dim=160, word_embed_proj_dim=32, do_layer_norm_before=False),
    "opt-nobias-noaffine": lambda: _cfg("OPTConfig", hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                        ffn_dim=200, enable_bias=False, layer_norm_elementwise_affine=False),
    "gpt2": lambda: _cfg("GPT2Config", n_embd=64, n_layer=2, n_head=4),
    "gpt2-n_inner-untied": lambda: _cfg("GPT2Config", n_embd=96, n_layer=2, n_head=6, n_inner=200,
                                        tie_word_embeddings=False),
}
FAMILIES = {"bloom", "llama", "mistral", "qwen2", "falcon", "gpt_neox", "opt", "gpt2"}


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_every_family_is_covered():
    assert {c().model_type for c in CONFIGS.values()} == FAMILIES == set(arch.FAMILIES)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_is_exact(name):
    config = CONFIGS[name]()
    model = meta_model(config)
    real = sum(p.numel() for p in model.parameters())
    assert memory.param_count(config) == real
    by = memory.params_by_module(config)
    assert set(by) == {"attention", "mlp", "norms", "embeddings", "head"} and sum(by.values()) == real
    # the plain dict the planner passes around gives the same numbers
    dims = arch.shape_dict(config)
    assert memory.param_count(dims) == real
    assert memory.kv_cache_bytes_per_token(dims, "bf16") == memory.kv_cache_bytes_per_token(config, "bf16")
    assert planner.model_dims(config) == dims
    # the block list and the matrices ZeRO partitions
    prefix, blocks = arch.decoder_blocks(model)
    assert prefix == arch.family_of(config).blocks and len(blocks) == arch.layers_of(config)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    assert arch.block_params(config) == per_block
    matrices = sorted(p.numel() for p in blocks[0].parameters() if p.dim() == 2)
    assert sorted(arch.weight_matrices(config)[1:]) == matrices


def kv_bytes_stored(model, tokens=5):
    ids = torch.randint(4, model.config.vocab_size, (1, tokens))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / tokens


@pytest.mark.parametrize("name", ["bloom-96", "llama-96-6h-2kv", "llama-head-dim", "mistral-head-dim", "qwen2",
                                  "falcon-new", "falcon-mq", "falcon-mha-seq-bias", "gpt_neox", "opt-proj-post-ln",
                                  "gpt2-n_inner-untied"])
def test_kv_bytes_per_token_match_a_real_forward(name):
    config = CONFIGS[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert kv_bytes_stored(model) == memory.kv_cache_bytes_per_token(config, "fp32")


def test_gqa_shrinks_the_cache_and_the_bloom_formula_stands():
    llama = CONFIGS["llama-96-6h-2kv"]()
    # 2 (k, v) * 2 layers * 2 KV heads * 16 head_dim * 2 bytes: a third of the 6-head cache
    assert memory.kv_cache_bytes_per_token(llama, "bf16") == 2 * 2 * 2 * 16 * 2
    assert memory.kv_cache_bytes_per_token(llama, "int8") == memory.kv_cache_bytes_per_token(llama, "bf16")
    h = 96
    bloom = {"hidden_size": h, "n_layer": 3, "n_head": 6, "vocab_size": 101}
    assert memory.param_count(bloom) == 3 * (12 * h * h + 13 * h) + 101 * h + 4 * h
    assert memory.kv_cache_bytes_per_token(bloom, "fp32") == 2 * 3 * h * 4


def test_generate_extra_bytes_reads_heads_and_mlp_from_arch():
    cfg = CONFIGS["llama-96-6h-2kv"]()
    seq = 10
    kv = memory.kv_cache_bytes_per_token(cfg, "bf16") * seq
    mlp = 2 * 200 * seq * 2                       # gate and up, bf16
    scores = 6 * seq * seq * 4
    logits = 101 * 4 * 2
    assert memory.generate_extra_bytes(cfg, 1, seq, "bf16") == kv + max(mlp, scores) + logits


PUBLISHED = {"Llama-3.1-8B": 8.03e9, "Llama-3.1-70B": 70.6e9, "Qwen2-72B": 72.7e9,
             "Mistral-7B": 7.24e9, "BLOOM-176B": 176.2e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_shapes_match_published_sizes(name):
    params = memory.param_count(planner.model_dims(name))
    assert params == pytest.approx(PUBLISHED[name], rel=0.01)


def test_published_kv_cache():
    # Llama-3.1-8B: 2 * 32 layers * 8 KV heads * 128 * 2 bytes = 128 KiB per token (not 512)
    assert memory.kv_cache_bytes_per_token(planner.model_dims("Llama-3.1-8B"), "bf16") == 131072
    assert memory.kv_cache_bytes_per_token(planner.model_dims("Llama-3.1-70B"), "bf16") == 327680


def test_a_family_without_formulas_is_counted_on_its_meta_model():
    """Outside :data:`bloomkit.arch.FAMILIES` the count comes from the meta-device model (more in
    ``tests/test_memory_exact.py``); only a name transformers does not know is an error."""
    from bloomkit.errors import UserError

    mamba = {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10}
    real = sum(p.numel() for p in meta_model(transformers.AutoConfig.for_model(**mamba)).parameters())
    assert memory.param_count(mamba) == real
    with pytest.raises(UserError, match="llama"):
        memory.param_count({"model_type": "no-such-family", "hidden_size": 64, "vocab_size": 10})


BIG = {  # large enough that weights_GB (rounded to MB) says something
    "llama": lambda: _cfg("LlamaConfig", hidden_size=1024, num_hidden_layers=3, num_attention_heads=8,
                          num_key_value_heads=2, intermediate_size=2816),
    "gpt_neox": lambda: _cfg("GPTNeoXConfig", hidden_size=1024, num_hidden_layers=3, num_attention_heads=8,
                             intermediate_size=4096),
    "opt": lambda: _cfg("OPTConfig", hidden_size=1024, num_hidden_layers=3, num_attention_heads=8,
                        ffn_dim=4096, word_embed_proj_dim=512, vocab_size=4000),
    "falcon": lambda: _cfg("FalconConfig", hidden_size=1024, num_hidden_layers=3, num_attention_heads=8,
                           num_kv_heads=2, new_decoder_architecture=True),
    "bloom": lambda: _cfg("BloomConfig", hidden_size=1024, n_layer=3, n_head=8, vocab_size=4000),
}


@pytest.mark.parametrize("name", list(BIG))
def test_device_map_summary_counts_any_familys_blocks(name):
    from bloomkit.strategies import accel

    config = BIG[name]()
    total = memory.weight_bytes(config, "fp32") / 1e9
    per_block = arch.block_params(config) * 4
    # room for about one block per GPU, the rest on the CPU
    dmap = accel.plan_device_map(config, {0: int(1.5 * per_block), 1: int(1.5 * per_block), "cpu": 10**10},
                                 "fp32", "sequential")
    summary = accel.device_map_summary(dmap, config, "fp32")
    assert summary["blocks"].sum() == arch.layers_of(config) and len(summary) == 3
    assert summary["weights_GB"].sum() == pytest.approx(total, abs=2e-3)
    whole = accel.device_map_summary({"": "cpu"}, config, "fp32")
    assert whole.loc["cpu", "blocks"] == arch.layers_of(config)
    assert whole.loc["cpu", "weights_GB"] == pytest.approx(total, abs=1e-3)


def test_zero_partitions_follow_the_layout():
    from bloomkit.strategies import zero

    h = 4096
    assert zero.param_numels(planner.model_dims("BLOOM-7b1")) == [250880 * h, 3 * h * h, h * h, 4 * h * h, 4 * h * h]
    llama = zero.param_numels(planner.model_dims("Llama-3.1-8B"))
    assert llama == [128256 * h, h * h, h * 1024, h * 1024, h * h, h * 14336, h * 14336, h * 14336]


@pytest.mark.parametrize("name", list(planner.PUBLISHED_CONFIGS))
def test_published_presets_are_exact_against_the_real_model(name):
    d = dict(planner.PUBLISHED_CONFIGS[name])
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    real = sum(p.numel() for p in meta_model(config).parameters())
    assert memory.param_count(planner.model_dims(name)) == memory.param_count(config) == real


def test_planner_cuts_gqa_models_by_kv_head():
    rows = planner.plan("Llama-3.1-70B", "bf16", n_gpus=8)
    tp = next(r for r in rows if r["strategy"] == "ds-inference")
    assert tp["fits"] and tp["kv_bytes_per_token_per_device"] == 327680 / 8
    # 8 KV heads: 16-way tensor parallelism would leave ranks without one
    tp16 = next(r for r in planner.plan("Llama-3.1-70B", "bf16", n_gpus=16) if r["strategy"] == "ds-inference")
    assert not tp16["fits"] and "key/value head" in tp16["note"]
    frame = planner.models_frame()
    assert frame.loc["Llama-3.1-8B", "kv_heads"] == 8 and frame.loc["Llama-3.1-8B", "params_B"] == 8.03


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "odd-llama", "tiny-falcon", "tiny-opt"])
def test_planner_config_of_a_preset_counts_its_real_model(name):
    """The planner's view of a generated preset is that preset's family, not BLOOM's."""
    import torch
    from transformers import AutoModelForCausalLM

    from bloomkit import models
    from bloomkit.measure import planner

    config = models.load_config(models.resolve_model(name))   # built (real weights) before the meta block
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert memory.param_count(planner.config_of(name)) == sum(p.numel() for p in model.parameters())

