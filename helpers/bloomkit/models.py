"""The embedded models, and how any model name becomes a local directory.

Nothing can be downloaded at run time on the machines this project is built on, so the
project *generates* its own models: a deterministic random causal LM of a chosen family plus
a byte-level BPE tokenizer trained locally, saved exactly like a hub checkpoint (config,
sharded safetensors, ``tokenizer.json``).  Real models take the same code path: every
strategy calls :func:`resolve_model` and then loads the directory it returns.

Presets: BLOOM (``tiny`` for tests, ``small`` for offload experiments, ``bench`` for
timing), a Llama-style twin of each size (``tiny-llama``, ``small-llama``, ``bench-llama``:
grouped-query attention, RoPE, SwiGLU MLP, untied head), and a tiny model of each other
family the recipes are tested on (``tiny-mistral``, ``tiny-qwen2``, ``tiny-falcon``,
``tiny-gpt-neox``, ``tiny-opt``, ``tiny-gpt2``).  Head counts divide by 2 so tensor
parallelism works at TP=2.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

# Bump when the way models are generated changes: cached models are rebuilt.
BUILD_VERSION = "3"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM


@dataclass(frozen=True)
class Preset:
    """Shape of a generated model.  ``init_std`` is larger than real models' 0.02 on purpose:
    random models with tiny weights have near-flat logits, so greedy decoding would
    break ties on rounding noise and no two strategies could be compared token for token."""

    hidden_size: int
    n_layer: int
    n_head: int
    vocab_size: int
    init_std: float
    max_shard_size: str
    seed: int = 1234
    family: str = "bloom"
    kv_heads: int | None = None       # grouped-query attention (None: one per query head)
    intermediate_size: int | None = None  # MLP width (None: the family's default)


def _llama_twin(p: Preset, kv_heads: int, intermediate: int) -> Preset:
    return Preset(p.hidden_size, p.n_layer, p.n_head, p.vocab_size, p.init_std, p.max_shard_size,
                  family="llama", kv_heads=kv_heads, intermediate_size=intermediate)


_TINY = Preset(hidden_size=64, n_layer=2, n_head=4, vocab_size=1024, init_std=0.25,
               max_shard_size="200KB")
_SMALL = Preset(hidden_size=512, n_layer=8, n_head=8, vocab_size=4096, init_std=0.1,
                max_shard_size="20MB")
_BENCH = Preset(hidden_size=1024, n_layer=24, n_head=16, vocab_size=8192, init_std=0.06,
                max_shard_size="200MB")


def _tiny(family: str, **kw) -> Preset:
    return Preset(**{**asdict(_TINY), "family": family, **kw})


PRESETS: dict[str, Preset] = {
    # ~0.2 M parameters: builds in about a second; every test uses it.
    "tiny": _TINY,
    # ~30 M parameters: 4 MiB matrices, so ZeRO-3 NVMe offload really swaps to disk.
    "small": _SMALL,
    # ~300 M parameters (1.2 GB in fp32): large enough that decode is memory-bound.
    "bench": _BENCH,
    # Llama-style twins: 2 query heads per KV head (GQA), SwiGLU MLP of ~2.7 h, untied head
    "tiny-llama": _llama_twin(_TINY, kv_heads=2, intermediate=176),
    "small-llama": _llama_twin(_SMALL, kv_heads=4, intermediate=1408),
    "bench-llama": _llama_twin(_BENCH, kv_heads=8, intermediate=2816),
    # odd sizes (hidden 96, 6 heads, 3 KV heads): TP=2 gives uneven KV shards, 64 divides nothing
    "odd-llama": Preset(hidden_size=96, n_layer=2, n_head=6, vocab_size=1024, init_std=0.2,
                        max_shard_size="200KB", family="llama", kv_heads=3, intermediate_size=256),
    # one tiny model per other family the recipes are tested on
    "tiny-mistral": _tiny("mistral", kv_heads=2, intermediate_size=176),
    "tiny-qwen2": _tiny("qwen2", kv_heads=2, intermediate_size=176),
    "tiny-falcon": _tiny("falcon", kv_heads=2),
    "tiny-gpt-neox": _tiny("gpt_neox"),
    "tiny-opt": _tiny("opt"),
    "tiny-gpt2": _tiny("gpt2"),
}
FAMILIES = ("bloom", "llama", "mistral", "qwen2", "falcon", "gpt_neox", "opt", "gpt2")


def family_config(family: str, *, hidden_size: int, n_layer: int, n_head: int, vocab_size: int,
                  kv_heads: int | None = None, intermediate_size: int | None = None,
                  init_std: float = 0.02, max_positions: int = 2048, **_):
    """A transformers config of ``family`` with these sizes, token ids as the embedded
    tokenizer numbers them (``<s>`` 1, ``</s>`` 2, ``<pad>`` 3)."""
    import transformers as tf

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kv = kv_heads or n_head
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layer,
                  num_attention_heads=n_head, initializer_range=init_std, **ids)
    if family == "bloom":
        return tf.BloomConfig(vocab_size=vocab_size, hidden_size=hidden_size, n_layer=n_layer,
                              n_head=n_head, initializer_range=init_std, **ids)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(**common, num_key_value_heads=kv, tie_word_embeddings=False,
                   intermediate_size=intermediate_size or 4 * hidden_size,
                   max_position_embeddings=max_positions)
    if family == "falcon":  # Falcon-40B's layout: grouped KV heads, parallel attention + MLP
        return tf.FalconConfig(**common, num_kv_heads=kv, new_decoder_architecture=True,
                               max_position_embeddings=max_positions)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, intermediate_size=intermediate_size or 4 * hidden_size,
                                max_position_embeddings=max_positions, tie_word_embeddings=False)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layer,
                            num_attention_heads=n_head, ffn_dim=intermediate_size or 4 * hidden_size,
                            word_embed_proj_dim=hidden_size, init_std=init_std,
                            max_position_embeddings=max_positions, **ids)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=n_layer,
                             n_head=n_head, n_positions=max_positions,
                             initializer_range=init_std, **ids)
    raise UserError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")


HUB_ALIASES = {"bloom": "bigscience/bloom"}

# Real BLOOM shapes (from the published configs), for memory math without any download.
BLOOM_DIMS = {
    "bloom-560m": dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880),
    "bloom-1b1": dict(hidden_size=1536, n_layer=24, n_head=16, vocab_size=250880),
    "bloom-1b7": dict(hidden_size=2048, n_layer=24, n_head=16, vocab_size=250880),
    "bloom-3b": dict(hidden_size=2560, n_layer=30, n_head=32, vocab_size=250880),
    "bloom-7b1": dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880),
    "bloom": dict(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880),  # 176B
}


def bloom_config(name: str = "bloom"):
    """A ``BloomConfig`` with the real shapes of ``name`` (see :data:`BLOOM_DIMS`): enough to
    plan memory or build the model on the meta device; no weights involved."""
    from transformers import BloomConfig

    return BloomConfig(**BLOOM_DIMS[name])


def cache_root() -> Path:
    """Where generated models live: ``$BLOOMKIT_CACHE`` or ``~/.cache/bloomkit``."""
    return Path(os.environ.get("BLOOMKIT_CACHE", Path.home() / ".cache" / "bloomkit"))


def _recipe(preset: Preset) -> dict:
    import tokenizers
    return {"build": BUILD_VERSION, "tokenizers": tokenizers.__version__.split(".")[1],
            **asdict(preset)}


def preset_path(name: str) -> Path:
    preset = PRESETS[name]
    digest = hashlib.sha256(json.dumps(_recipe(preset), sort_keys=True).encode()).hexdigest()[:12]
    prefix = "" if preset.family != "bloom" or name.startswith("bloom") else "bloom-"
    return cache_root() / "models" / f"{prefix}{name}-{digest}"


# ---------------------------------------------------------------------------- tokenizer

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "in", "or",
              "ul", "ba", "de", "fi", "go", "hu", "pe", "qu", "sti", "tra", "ble", "ing"]


def _corpus(n_words: int, seed: int) -> list[str]:
    """A deterministic text: the blog's prompts plus pseudo-words, for BPE training."""
    from .prompts import STANDARD_PROMPTS

    rng = random.Random(seed)
    lines = list(STANDARD_PROMPTS) * 50
    words = []
    for _ in range(n_words):
        words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        if rng.random() < 0.1:
            lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
            words = []
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0, texts=None):
    """Train a byte-level BPE tokenizer (BLOOM's kind) with exactly ``vocab_size`` tokens, on
    ``texts`` (any iterable of strings) or, by default, the presets' pseudo-word corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts if texts is not None else _corpus(2000 + 40 * vocab_size, seed),
                            trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # corpus too small for the asked size
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def _save_tokenizer(tok, out: Path, bloom: bool = True) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left")
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    if not bloom:
        return
    cfg = json.loads(cfg_path.read_text())
    # BLOOM's checkpoints name this class; transformers 4.x loads it directly and 5.x maps
    # it to its fast tokenizer backend, so both stacks read the same directory.
    cfg["tokenizer_class"] = "BloomTokenizerFast"
    cfg["padding_side"] = "left"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------- model

def spread_norms(model) -> None:
    """Norm layers start at weight 1 (and bias 0); give them some spread too, so a random
    model's layers differ the way a trained model's do (any family: LayerNorm, RMSNorm)."""
    import torch

    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
                if isinstance(w, torch.nn.Parameter) and w.dim() == 1:
                    w.normal_(1.0, 0.1)
                if isinstance(b, torch.nn.Parameter) and b.dim() == 1:
                    b.normal_(0.0, 0.1)


def build_model(name: str, out: Path) -> Path:
    """Generate preset ``name`` into directory ``out`` (config, safetensors shards, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    preset = PRESETS[name]
    tok = build_tokenizer(preset.vocab_size, seed=preset.seed)
    config = family_config(**asdict(preset))
    torch.manual_seed(preset.seed)
    # On the CPU whatever default device the caller is under (``with torch.device("meta")``
    # to count parameters, ``torch.set_default_device("cuda")``): the saved weights are real.
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config).eval()
    _require_real_weights(model, name)
    spread_norms(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=preset.max_shard_size, safe_serialization=True)
    _save_tokenizer(tok, out, bloom=preset.family == "bloom")
    (out / "bloomkit_recipe.json").write_text(json.dumps(_recipe(preset), indent=2) + "\n")
    return out


def _require_real_weights(model, name: str) -> None:
    """One line instead of "Cannot copy out of meta tensor" when something the ``torch.device``
    context cannot override (accelerate's ``init_empty_weights``) left parameters empty."""
    if any(p.is_meta for p in model.parameters()):
        raise UserError(f"cannot generate {name!r} here: its weights came out empty (meta), as under "
                        "accelerate's init_empty_weights(); call bloomkit.models.resolve_model"
                        f"({name!r}) before entering that block")


def _ensure(path: Path, build) -> Path:
    """Build into ``path`` once (``build(tmp_dir)``), atomically, under a file lock: several
    ranks may ask at the same time; one builds, the others wait and reuse it."""
    from filelock import FileLock

    if (path / "bloomkit_recipe.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "bloomkit_recipe.json").exists():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_preset(name: str) -> Path:
    """The cached directory of preset ``name``, built on first use."""
    return _ensure(preset_path(name), lambda tmp: build_model(name, tmp))


# ------------------------------------------------------- random weights of a real BLOOM's shape

RANDOM_TOKENIZER_VOCAB = 8192


def random_path(name: str) -> Path:
    recipe = {"build": BUILD_VERSION, "random": name, "tokenizer_vocab": RANDOM_TOKENIZER_VOCAB,
              **BLOOM_DIMS[name]}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-random-{digest}"


def build_random_bloom(name: str, out: Path, dtype: str = "bf16", init_std: float = 0.02,
                       seed: int = 1234) -> Path:
    """Random weights with the exact shapes of ``name`` (e.g. ``bloom-7b1``), in ``dtype``:
    timings mean the same as with the real checkpoint, the text does not.  Built on the GPU
    when there is one (seconds for 7B), else on the CPU."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from .dtypes import torch_dtype

    tok = build_tokenizer(RANDOM_TOKENIZER_VOCAB, seed=seed)
    config = BloomConfig(**BLOOM_DIMS[name], initializer_range=init_std, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = BloomForCausalLM._from_config(config, dtype=torch_dtype(dtype)).eval()
    _require_real_weights(model, name)
    with torch.no_grad():  # ids the tokenizer lacks get zero embeddings: greedy never picks them
        model.transformer.word_embeddings.weight[RANDOM_TOKENIZER_VOCAB:] = 0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="2GB", safe_serialization=True)
    _save_tokenizer(tok, out)
    (out / "bloomkit_recipe.json").write_text(json.dumps(
        {"random": name, "dtype": dtype, "init_std": init_std}) + "\n")
    return out


def ensure_random(name: str) -> Path:
    return _ensure(random_path(name), lambda tmp: build_random_bloom(name, tmp))


# The one trained (not random) model: a small BLOOM trained on the Python standard library by
# ``python -m bloomkit.train`` and shipped in the repository (other Python versions have
# another stdlib, so it is not rebuilt on the fly).
TRAINED_NAME = "trained"
TRAINED_DIR = Path(__file__).resolve().parents[2] / "models" / "trained"


# Its draft for speculative decoding: a smaller BLOOM trained the same way on the same corpus,
# with ``trained``'s very tokenizer (``python -m bloomkit.train --tokenizer models/trained``).
TRAINED_DRAFT_NAME = "trained-draft"


def trained_path(name: str = TRAINED_NAME) -> Path:
    """The shipped ``trained`` (or ``trained-draft``) model's directory; a one-line error when it
    is not there."""
    where = TRAINED_DIR if name == TRAINED_NAME else TRAINED_DIR.parent / name
    if not (where / "config.json").exists():
        raise UserError(f"the {name} model is not at {where} (it ships with the repository, "
                        "not the package); build one with `python -m bloomkit.train --out DIR` "
                        "and pass `--name DIR`")
    return where


def resolve_model(name: str) -> Path:
    """Turn a model name into a local directory that ``from_pretrained`` can read.

    ``name`` is a preset (``tiny``, ``small``, ``bench`` and the other generated, random
    ones), ``trained`` (the small BLOOM trained on Python's standard library that ships in
    ``models/trained/``: the only embedded model whose text means something), a real
    BLOOM's name such as ``bloom-7b1`` (its cached checkpoint, else random weights of its
    shape), a local directory holding a Hugging Face checkpoint, or a hub id such as
    ``bigscience/bloom`` that must already be in the local Hugging Face cache (nothing is
    downloaded here).
    """
    if name in PRESETS:
        return ensure_preset(name)
    if name in (TRAINED_NAME, TRAINED_DRAFT_NAME):
        return trained_path(name)
    if name in BLOOM_DIMS and name != "bloom":
        # the real checkpoint when it is cached, else random weights of the same shape
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(f"bigscience/{name}", local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached
            return ensure_random(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(f"{name} is not a model directory (no config.json); pass a directory "
                            "saved with save_pretrained, or a preset: " + ", ".join(PRESETS))
        if not any(path.glob("*.safetensors")) and not (path / "ds_inference_config.json").exists():
            raise UserError(f"{name} has no *.safetensors weights; re-save it with "
                            "save_pretrained(..., safe_serialization=True) (pickled .bin files "
                            "are not loaded)")
        return path
    repo = HUB_ALIASES.get(name, name)
    if repo.count("/") == 1 and not repo.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            raise UserError(f"model {repo} is not in the local Hugging Face cache and downloads "
                            f"are off; run `huggingface-cli download {repo}` on a machine with "
                            "access (or set HF_HOME to where it is), or pass a local directory") from None
    raise UserError(f"model {name!r} not found: pass a preset ({', '.join(PRESETS)}, "
                    f"{TRAINED_NAME}), an existing "
                    "local directory, or a hub id like bigscience/bloom")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, left-padded (decoder-only models generate on the right)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))
