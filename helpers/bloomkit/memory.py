"""Memory arithmetic for decoder-only causal LMs: parameters, weight bytes, KV cache.

Why it matters: at batch 1 a decode step reads every weight once, so weight bytes decide
both *where* a model fits and *how fast* it can possibly run; the KV cache then decides
how large a batch fits next to the weights.

The shapes come from the config (a transformers config or a plain dict) through
:mod:`bloomkit.arch`, which knows how BLOOM, Llama, Mistral, Qwen2, Falcon, GPT-NeoX, OPT and
GPT-2 build their blocks: grouped-query attention (fewer key/value heads than query heads)
shrinks both the k/v projections and the KV cache; a gated MLP (SwiGLU) has three matrices
instead of two; an untied LM head adds ``vocab x hidden`` weights.  A dict that names no
``model_type`` is read as a BLOOM (this project's model).  Any other family's parameters are
counted on its meta-device model (:func:`meta_param_count`).
"""
from __future__ import annotations

from . import arch

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "int8": 1, "int4": 0.5, "nf4": 0.5}


def dtype_bytes(dtype: str) -> float:
    return DTYPE_BYTES[str(dtype).replace("torch.", "")]


def _activation_dtype(dtype: str) -> str:
    """Quantized weights still compute, and cache keys/values, in 16 bits."""
    return "bf16" if str(dtype) in ("int8", "int4", "nf4") else dtype


def params_by_module(config) -> dict:
    """Parameters by kind of module: ``attention``, ``mlp``, ``norms``, ``embeddings``,
    ``head`` (see :func:`bloomkit.arch.params_by_module`)."""
    return arch.params_by_module(config)


def param_count(config) -> int:
    """Parameters of the model, every weight counted once (a tied head adds nothing).

    Per block: attention ``h*(heads + 2*kv_heads)*head_dim + heads*head_dim*h`` (+ biases),
    MLP ``2*h*ffn`` or ``3*h*ffn`` when gated (+ biases), and its norms; then the token
    (and learned position) embeddings, the final norm and an untied head.  For BLOOM that is
    ``12*h^2 + 13*h`` per block plus ``vocab*h + 4*h``.  A family outside
    :data:`bloomkit.arch.FAMILIES` (the formulas above are the lessons' explanation, and
    tested equal to it) is counted on its meta-device model: :func:`meta_param_count`.

    Example:
        >>> param_count({"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1024})
        165760
    """
    if not has_formula(config):
        return meta_param_count(config)
    return sum(arch.params_by_module(config).values())


def has_formula(config) -> bool:
    """Whether :mod:`bloomkit.arch` counts ``config``'s family from its formulas (a dict that
    names no ``model_type`` is a BLOOM)."""
    name = arch.model_type(config)
    return name == "?" or name in arch.FAMILIES


def transformers_config(config):
    """``config`` as a transformers config: a plain dict (the planner's dimensions, see
    :func:`bloomkit.arch.shape_dict`) becomes the config of its ``model_type`` (BLOOM when it
    names none); a transformers config is returned as it is.

    Example:
        >>> type(transformers_config({"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 10})).__name__
        'BloomConfig'
    """
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    from .errors import UserError

    kw = dict(config)
    name = kw.pop("model_type", None) or arch.DEFAULT_FAMILY
    try:
        return AutoConfig.for_model(name, **kw)
    except (ValueError, KeyError):
        raise UserError(f"model_type {name!r} is not a model type of transformers; pass a "
                        "model's own config (its config.json), or a dict naming one of its "
                        f"model types, such as {', '.join(arch.FAMILIES)}") from None


_META_COUNTS: dict[str, int] = {}


def meta_param_count(config) -> int:
    """Parameters of ``config``'s model counted on its skeleton on the meta device
    (accelerate's ``init_empty_weights`` + ``AutoModelForCausalLM.from_config``, see
    :func:`empty_model`: every shape, no bytes, a tied weight once):
    exact for any causal LM transformers can build, whatever its layout.

    Example:
        >>> from transformers import Qwen3Config   # a family with no formulas in bloomkit.arch
        >>> meta_param_count(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        259392
    """
    from .errors import UserError

    cfg = transformers_config(config)
    key = cfg.to_json_string(use_diff=False)
    if key not in _META_COUNTS:
        try:
            model = empty_model(cfg, "fp32")
        except ValueError:   # a config transformers builds no causal LM for (ViT, T5, ...)
            raise UserError(f"model_type {getattr(cfg, 'model_type', '?')!r} has no causal LM in "
                            "transformers (AutoModelForCausalLM), so bloomkit cannot count its "
                            "parameters; pass a decoder-only causal LM's config") from None
        _META_COUNTS[key] = sum(p.numel() for p in model.parameters())
    return _META_COUNTS[key]


def weight_bytes(config, dtype: str = "bf16") -> int:
    """Bytes of all weights in ``dtype`` (int8 counts one byte per weight; scales ignored)."""
    return int(param_count(config) * dtype_bytes(dtype))


def kv_cache_bytes_per_token(config, dtype: str = "bf16") -> int:
    """Keys + values of one token across all layers:
    ``2 * layers * kv_heads * head_dim * bytes`` (the cache is not quantized).  Under
    grouped-query attention that is ``kv_heads / heads`` of BLOOM's ``2 * layers * h``
    (Llama-3-8B: a quarter).  Falcon's new decoder architecture is the exception:
    transformers caches its KV heads broadcast to every query head
    (:func:`bloomkit.arch.cached_kv_heads_of`).  Beyond a sliding window (Mistral v0.1:
    4096) transformers keeps only the window, so long-context totals are upper bounds."""
    return int(arch.kv_values_per_token(config) * dtype_bytes(_activation_dtype(dtype)))


def generate_extra_bytes(config, batch_size: int, seq_len: int, dtype: str = "bf16") -> int:
    """Memory ``generate`` needs beside the weights: the KV cache of ``seq_len`` tokens per
    row, plus the largest transient activations (the MLP's inner activation of the prompt
    pass — gate and up both, when gated — or the fp32 attention scores of every query head),
    and the fp32 logits of one step."""
    act = dtype_bytes(_activation_dtype(dtype))
    rows = batch_size * seq_len
    kv = kv_cache_bytes_per_token(config, dtype) * rows
    mlp = (2 if arch.is_gated(config) else 1) * arch.ffn_of(config) * rows * act
    scores = arch.heads_of(config) * batch_size * seq_len * seq_len * 4
    logits = arch.vocab_of(config) * batch_size * 4 * 2
    return int(kv + max(mlp, scores) + logits)


def empty_model(config, dtype: str = "bf16"):
    """The model skeleton on the ``meta`` device: every shape, zero bytes.  Takes ~1 s even
    for BLOOM-176B, which is what lets accelerate plan placement before reading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .dtypes import torch_dtype

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.tie_weights()
    return model
