"""Memory arithmetic for BLOOM-style models: parameters, weight bytes, KV cache.

Why it matters: at batch 1 a decode step reads every weight once, so weight bytes decide
both *where* a model fits and *how fast* it can possibly run; the KV cache then decides
how large a batch fits next to the weights.
"""
from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "int8": 1, "int4": 0.5}


def dtype_bytes(dtype: str) -> float:
    return DTYPE_BYTES[str(dtype).replace("torch.", "")]


def _dims(config) -> tuple[int, int, int]:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    h = get("hidden_size") or get("n_embed")
    n_layer = get("n_layer") or get("num_hidden_layers")
    return int(h), int(n_layer), int(get("vocab_size"))


def param_count(config) -> int:
    """Parameters of a BLOOM model: per block 12*h^2 + 13*h, plus embeddings (tied head)."""
    h, n_layer, vocab = _dims(config)
    per_block = 12 * h * h + 13 * h
    return vocab * h + 2 * h + n_layer * per_block + 2 * h


def weight_bytes(config, dtype: str = "bf16") -> int:
    """Bytes of all weights in ``dtype`` (int8 counts one byte per weight; scales ignored)."""
    return int(param_count(config) * dtype_bytes(dtype))


def kv_cache_bytes_per_token(config, dtype: str = "bf16") -> int:
    """Keys + values of one token across all layers: 2 * n_layer * hidden * bytes."""
    h, n_layer, _ = _dims(config)
    kv_dtype = "bf16" if dtype in ("int8", "int4") else dtype  # the cache is not quantized
    return int(2 * n_layer * h * dtype_bytes(kv_dtype))


def generate_extra_bytes(config, batch_size: int, seq_len: int, dtype: str = "bf16") -> int:
    """Memory ``generate`` needs beside the weights: the KV cache of ``seq_len`` tokens per
    row, plus the largest transient activations (the 4h MLP activation of the prompt pass,
    the ALiBi-biased attention scores, and the fp32 logits of one step)."""
    h, n_layer, vocab = _dims(config)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    heads = int(get("n_head") or get("num_attention_heads"))
    act = dtype_bytes("bf16" if dtype in ("int8", "int4") else dtype)
    kv = kv_cache_bytes_per_token(config, dtype) * batch_size * seq_len
    mlp = 4 * h * batch_size * seq_len * act
    scores = heads * batch_size * seq_len * seq_len * 4
    logits = vocab * batch_size * 4 * 2
    return int(kv + max(mlp, scores) + logits)
