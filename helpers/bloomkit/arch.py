"""What a model's config says about its shape, for any decoder-only causal LM.

transformers names the same quantity differently per family (``n_head`` in BLOOM and GPT-2,
``num_attention_heads`` elsewhere; ``num_key_value_heads`` in Llama, Mistral and Qwen2,
``num_kv_heads`` / ``multi_query`` in Falcon).  Everything that plans memory, cuts a model
for tensor parallelism or describes a rank reads these functions instead of a family's
attribute names, so the rest of the package is architecture-agnostic.

The second half counts parameters by module from the config alone (a transformers config
or a plain dict), exactly — checked against the meta-device model in
``tests/test_memory.py`` — for BLOOM, Llama, Mistral, Qwen2, Falcon (both layouts),
GPT-NeoX, OPT and GPT-2; :data:`FAMILIES` holds what differs between them.
"""
from __future__ import annotations

from dataclasses import dataclass


def _get(config, *names, default=None):
    for n in names:
        v = config.get(n) if isinstance(config, dict) else getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_type(config) -> str:
    return str(_get(config, "model_type", default="?"))


def hidden_of(config) -> int:
    return int(_get(config, "hidden_size", "n_embd", "n_embed", "d_model"))


def layers_of(config) -> int:
    return int(_get(config, "num_hidden_layers", "n_layer", "num_layers"))


def heads_of(config) -> int:
    """Query heads per layer."""
    return int(_get(config, "num_attention_heads", "n_head"))


def kv_heads_of(config) -> int:
    """Key/value heads per layer: fewer than the query heads under grouped-query (GQA) or
    multi-query attention, which shrinks the KV cache by ``heads / kv_heads``."""
    heads = heads_of(config)
    if model_type(config) == "falcon":
        if _get(config, "new_decoder_architecture", default=False):
            return int(_get(config, "num_kv_heads", default=heads))
        return 1 if _get(config, "multi_query", default=True) else heads
    return int(_get(config, "num_key_value_heads", "num_kv_heads", default=heads))


def head_dim_of(config) -> int:
    return int(_get(config, "head_dim", default=None) or hidden_of(config) // heads_of(config))


def vocab_of(config) -> int:
    return int(_get(config, "vocab_size"))


def decoder_blocks(model):
    """``(prefix, blocks)``: the ``nn.ModuleList`` of decoder layers and its dotted name
    (``transformer.h`` in BLOOM and GPT-2, ``model.layers`` in Llama, ``gpt_neox.layers``...):
    the longest ``ModuleList`` of the model, found without knowing the family."""
    import torch

    best = max(((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)),
               key=lambda nm: len(nm[1]), default=(None, None))
    if best[1] is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return best


# ---------------------------------------------------------------------------- parameter math
#
# What differs between the families, in one table.  A bias spec is a bool (always / never) or
# ``(config attribute, its default)``.  ``ffn``: the config attribute(s) of the MLP width, else
# ``4 * hidden``.  ``positions``: the config attribute(s) of a learned position table and the
# rows it has beyond them (OPT's +2).  ``blocks``: dotted name of the decoder blocks in the
# ``*ForCausalLM`` model.  ``keys``: further config attributes the math reads (carried by
# :func:`shape_dict`).  Anything a family builds outside this table (BLOOM's embedding
# LayerNorm, Falcon's one or two LayerNorms per block, OPT's projections around the
# embedding and its optional final LayerNorm) is a branch in the functions below.

@dataclass(frozen=True)
class Family:
    norm: str                          # "layer": weight + bias per norm; "rms": weight only
    gated: bool                        # MLP gate + up + down (SwiGLU) vs up + down
    qkv_bias: object
    o_bias: object
    mlp_bias: object
    tied: bool                         # default of tie_word_embeddings
    fused_qkv: bool                    # one query|key|value matrix (what ZeRO partitions)
    blocks: str
    ffn: tuple = ()
    positions: tuple = ()
    position_offset: int = 0
    norm_affine: object = True
    keys: tuple = ()


FAMILIES = {
    "bloom": Family(norm="layer", gated=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                    tied=True, fused_qkv=True, blocks="transformer.h"),
    "llama": Family(norm="rms", gated=True, qkv_bias=("attention_bias", False),
                    o_bias=("attention_bias", False), mlp_bias=("mlp_bias", False), tied=False,
                    fused_qkv=False, blocks="model.layers", ffn=("intermediate_size",)),
    "mistral": Family(norm="rms", gated=True, qkv_bias=False, o_bias=False, mlp_bias=False,
                      tied=False, fused_qkv=False, blocks="model.layers", ffn=("intermediate_size",),
                      keys=("sliding_window",)),
    "qwen2": Family(norm="rms", gated=True, qkv_bias=True, o_bias=False, mlp_bias=False,
                    tied=False, fused_qkv=False, blocks="model.layers", ffn=("intermediate_size",)),
    "falcon": Family(norm="layer", gated=False, qkv_bias=("bias", False), o_bias=("bias", False),
                     mlp_bias=("bias", False), tied=True, fused_qkv=True, blocks="transformer.h",
                     ffn=("ffn_hidden_size",),
                     keys=("new_decoder_architecture", "multi_query", "num_kv_heads",
                           "parallel_attn", "num_ln_in_parallel_attn")),
    "gpt_neox": Family(norm="layer", gated=False, qkv_bias=("attention_bias", True),
                       o_bias=("attention_bias", True), mlp_bias=True, tied=False, fused_qkv=True,
                       blocks="gpt_neox.layers", ffn=("intermediate_size",)),
    "opt": Family(norm="layer", gated=False, qkv_bias=("enable_bias", True),
                  o_bias=("enable_bias", True), mlp_bias=("enable_bias", True), tied=True,
                  fused_qkv=False, blocks="model.decoder.layers", ffn=("ffn_dim",),
                  positions=("max_position_embeddings",), position_offset=2,
                  norm_affine=("layer_norm_elementwise_affine", True),
                  keys=("word_embed_proj_dim", "do_layer_norm_before", "_remove_final_layer_norm")),
    "gpt2": Family(norm="layer", gated=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                   tied=True, fused_qkv=True, blocks="transformer.h", ffn=("n_inner",),
                   positions=("max_position_embeddings", "n_positions")),
}
DEFAULT_FAMILY = "bloom"   # a plain dict of dimensions without a model_type: this project's BLOOM


def family_name(config) -> str:
    """The family whose layout ``config`` describes (``bloom`` when a dict names none)."""
    name = _get(config, "model_type", default=None) or DEFAULT_FAMILY
    if name not in FAMILIES:
        from .errors import UserError

        raise UserError(f"no parameter arithmetic for model_type {name!r}; known families: "
                        f"{', '.join(FAMILIES)}")
    return name


def family_of(config) -> Family:
    return FAMILIES[family_name(config)]


def _flag(config, spec) -> bool:
    if isinstance(spec, bool):
        return spec
    name, default = spec
    return bool(_get(config, name, default=default))


def ffn_of(config) -> int:
    """Width of the MLP's inner layer (``4 * hidden`` where the family has no setting)."""
    return int(_get(config, *family_of(config).ffn, default=None) or 4 * hidden_of(config))


def is_gated(config) -> bool:
    """Gated MLP (SwiGLU: gate, up and down matrices) rather than up and down."""
    return family_of(config).gated


def is_tied(config) -> bool:
    """The LM head reuses the token embedding (no weights of its own)."""
    return bool(_get(config, "tie_word_embeddings", default=family_of(config).tied))


def _embed_dim(config) -> int:
    """Width of the token embedding (and the head): OPT-350m's ``word_embed_proj_dim``."""
    if family_name(config) == "opt":
        return int(_get(config, "word_embed_proj_dim", default=None) or hidden_of(config))
    return hidden_of(config)


def _norm_size(config) -> int:
    fam = family_of(config)
    if not _flag(config, fam.norm_affine):
        return 0
    return (2 if fam.norm == "layer" else 1) * hidden_of(config)


def _norms_per_block(config) -> int:
    if family_name(config) == "falcon" and _get(config, "parallel_attn", default=True):
        n = _get(config, "num_ln_in_parallel_attn", default=None)
        if n is None:
            n = 2 if _get(config, "new_decoder_architecture", default=False) else 1
        return 2 if n == 2 else 1
    return 2


def _outer_norms(config) -> int:
    """Norms outside the blocks: the final one (absent in OPT-350m, whose LayerNorms come
    after each sub-layer), plus BLOOM's LayerNorm right after the embedding."""
    name = family_name(config)
    if name == "opt":
        final = (_get(config, "do_layer_norm_before", default=True)
                 and not _get(config, "_remove_final_layer_norm", default=False))
        return int(bool(final))
    return 2 if name == "bloom" else 1


def attention_params(config) -> int:
    """One block's attention: q ``h x heads*hd``, k and v ``h x kv*hd`` each (fewer KV heads
    under GQA / multi-query), o ``heads*hd x h``, plus the family's biases."""
    fam = family_of(config)
    h, heads, kv, hd = hidden_of(config), heads_of(config), kv_heads_of(config), head_dim_of(config)
    qkv_out = (heads + 2 * kv) * hd
    n = h * qkv_out + heads * hd * h
    n += qkv_out if _flag(config, fam.qkv_bias) else 0
    n += h if _flag(config, fam.o_bias) else 0
    return n


def mlp_params(config) -> int:
    """One block's MLP: 3 matrices ``h x ffn`` when gated (SwiGLU), else 2; plus biases."""
    fam = family_of(config)
    h, f = hidden_of(config), ffn_of(config)
    mats = 3 if fam.gated else 2
    n = mats * h * f
    if _flag(config, fam.mlp_bias):
        n += (mats - 1) * f + h
    return n


def block_params(config) -> int:
    """Parameters of one decoder block: attention, MLP and its norms."""
    return attention_params(config) + mlp_params(config) + _norms_per_block(config) * _norm_size(config)


def params_by_module(config) -> dict:
    """Parameters by kind of module, summed over the model (tied weights counted once):
    ``attention``, ``mlp`` and ``norms`` (every block's, the final one, BLOOM's embedding
    LayerNorm), ``embeddings`` (tokens, learned positions, OPT's ``project_in``) and
    ``head`` (the LM head when untied, OPT's ``project_out``)."""
    fam = family_of(config)
    h, layers, vocab, e = hidden_of(config), layers_of(config), vocab_of(config), _embed_dim(config)
    embeddings = vocab * e
    if fam.positions:
        embeddings += (int(_get(config, *fam.positions)) + fam.position_offset) * h
    proj = e * h if e != h else 0          # OPT: project_in and project_out, no bias
    return {
        "attention": layers * attention_params(config),
        "mlp": layers * mlp_params(config),
        "norms": (layers * _norms_per_block(config) + _outer_norms(config)) * _norm_size(config),
        "embeddings": embeddings + proj,
        "head": (0 if is_tied(config) else vocab * e) + proj,
    }


def cached_kv_heads_of(config) -> int:
    """Key/value heads the KV cache holds per layer: :func:`kv_heads_of`, except under
    Falcon's new decoder architecture (Falcon-40B, -180B), where transformers broadcasts every
    KV head to its group of query heads *before* caching, so the cache is as large as
    multi-head attention's (measured in ``tests/test_memory.py``)."""
    if model_type(config) == "falcon" and _get(config, "new_decoder_architecture", default=False):
        return heads_of(config)
    return kv_heads_of(config)


def kv_values_per_token(config) -> int:
    """Numbers one token leaves in the KV cache:
    ``2 (k, v) * layers * cached kv_heads * head_dim``."""
    return 2 * layers_of(config) * cached_kv_heads_of(config) * head_dim_of(config)


def weight_matrices(config) -> list[int]:
    """Element counts of the weight matrices, biases left out: the token embedding, then one
    block's matrices in the order the family builds them (fused q|k|v where it fuses them)."""
    h, heads, kv, hd, f = (hidden_of(config), heads_of(config), kv_heads_of(config),
                           head_dim_of(config), ffn_of(config))
    fam = family_of(config)
    attn = [h * (heads + 2 * kv) * hd] if fam.fused_qkv else [h * heads * hd, h * kv * hd, h * kv * hd]
    return [vocab_of(config) * _embed_dim(config), *attn, heads * hd * h,
            *([h * f] * (3 if fam.gated else 2))]


def shape_dict(config) -> dict:
    """A plain dict with every setting the arithmetic above reads: ``param_count``,
    the KV cache and the planner give the same numbers for it as for ``config``.  BLOOM (and
    a dict naming no family) keeps the four dimensions ``hidden_size, n_layer, n_head,
    vocab_size``."""
    name = family_name(config)
    out = {"hidden_size": hidden_of(config), "n_layer": layers_of(config),
           "n_head": heads_of(config), "vocab_size": vocab_of(config)}
    if name == DEFAULT_FAMILY:
        if not is_tied(config):
            out["tie_word_embeddings"] = False
        return out
    fam = FAMILIES[name]
    out = {"model_type": name, **out, "head_dim": head_dim_of(config),
           "tie_word_embeddings": is_tied(config)}
    if name != "falcon":   # Falcon's KV heads follow from its layout flags, carried below
        out["num_key_value_heads"] = kv_heads_of(config)
    keys = [*fam.ffn[:1], *fam.positions[:1], *fam.keys]
    keys += [s[0] for s in (fam.qkv_bias, fam.o_bias, fam.mlp_bias, fam.norm_affine)
             if not isinstance(s, bool)]
    for k in dict.fromkeys(keys):
        v = _get(config, *((k, "n_positions") if k == "max_position_embeddings" else (k,)))
        if v is not None:
            out[k] = v
    if fam.ffn and fam.ffn[0] not in out:
        out[fam.ffn[0]] = ffn_of(config)
    return out


def block_index(name: str, prefix: str | None = None) -> int | None:
    """The decoder block a dotted module name lies in (``model.layers.7.mlp`` -> 7), or
    ``None``; with ``prefix`` only names under it count."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and (prefix is None or ".".join(parts[:i]) == prefix):
            return int(p)
    return None


def block_prefix(names, config=None) -> str | None:
    """The dotted name of the decoder-block list among module ``names`` (a device map's keys,
    ``named_modules``): the family's (``config``), else the prefix followed by the most
    distinct layer indices."""
    names = list(names)
    if config is not None:
        p = family_of(config).blocks
        if any(n == p or n.startswith(p + ".") for n in names):
            return p
    seen: dict[str, set] = {}
    for n in names:
        parts = n.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                seen.setdefault(".".join(parts[:i]), set()).add(int(part))
                break
    return max(seen, key=lambda k: len(seen[k]), default=None)
