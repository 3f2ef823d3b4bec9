"""The embedded default model, and how any model name becomes a local directory.

Nothing can be downloaded at run time on the machines this project is built on, so the
project *generates* its own BLOOM: a deterministic random ``BloomForCausalLM`` plus a
byte-level BPE tokenizer trained locally, saved exactly like a hub checkpoint (config,
sharded safetensors, ``tokenizer.json``).  Real models take the same code path: every
strategy calls :func:`resolve_model` and then loads the directory it returns.

Presets (``tiny`` for tests, ``small`` for offload experiments, ``bench`` for timing)
keep head counts divisible by 2 and 4 so tensor parallelism works at TP=2 and TP=4.
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
    """Shape of a generated BLOOM.  ``init_std`` is larger than BLOOM's 0.02 on purpose:
    random models with tiny weights have near-flat logits, so greedy decoding would
    break ties on rounding noise and no two strategies could be compared token for token."""

    hidden_size: int
    n_layer: int
    n_head: int
    vocab_size: int
    init_std: float
    max_shard_size: str
    seed: int = 1234


PRESETS: dict[str, Preset] = {
    # ~0.2 M parameters: builds in about a second; every test uses it.
    "tiny": Preset(hidden_size=64, n_layer=2, n_head=4, vocab_size=1024, init_std=0.25,
                   max_shard_size="200KB"),
    # ~30 M parameters: 4 MiB matrices, so ZeRO-3 NVMe offload really swaps to disk.
    "small": Preset(hidden_size=512, n_layer=8, n_head=8, vocab_size=4096, init_std=0.1,
                    max_shard_size="20MB"),
    # ~300 M parameters (1.2 GB in fp32): large enough that decode is memory-bound.
    "bench": Preset(hidden_size=1024, n_layer=24, n_head=16, vocab_size=8192, init_std=0.06,
                    max_shard_size="200MB"),
}

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
    return cache_root() / "models" / f"bloom-{name}-{digest}"


# ---------------------------------------------------------------------------- tokenizer

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "in", "or",
              "ul", "ba", "de", "fi", "go", "hu", "pe", "qu", "sti", "tra", "ble", "ing"]


def _corpus(n_words: int, seed: int) -> list[str]:
    """A deterministic text: the blog's prompts plus pseudo-words, for BPE training."""
    from .harness import STANDARD_PROMPTS

    rng = random.Random(seed)
    lines = list(STANDARD_PROMPTS) * 50
    words = []
    for _ in range(n_words):
        words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        if rng.random() < 0.1:
            lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
            words = []
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Train a byte-level BPE tokenizer (BLOOM's kind) with exactly ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    n_words = 2000 + 40 * vocab_size
    tok.train_from_iterator(_corpus(n_words, seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # corpus too small for the asked size
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left")
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # BLOOM's checkpoints name this class; transformers 4.x loads it directly and 5.x maps
    # it to its fast tokenizer backend, so both stacks read the same directory.
    cfg["tokenizer_class"] = "BloomTokenizerFast"
    cfg["padding_side"] = "left"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------- model

def build_model(name: str, out: Path) -> Path:
    """Generate preset ``name`` into directory ``out`` (config, safetensors shards, tokenizer)."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    preset = PRESETS[name]
    tok = build_tokenizer(preset.vocab_size, seed=preset.seed)
    config = BloomConfig(vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
                         n_layer=preset.n_layer, n_head=preset.n_head,
                         initializer_range=preset.init_std, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)
    torch.manual_seed(preset.seed)
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0); give them some spread too
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.1)
                mod.bias.normal_(0.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=preset.max_shard_size, safe_serialization=True)
    _save_tokenizer(tok, out)
    (out / "bloomkit_recipe.json").write_text(json.dumps(_recipe(preset), indent=2) + "\n")
    return out


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


def resolve_model(name: str) -> Path:
    """Turn a model name into a local directory that ``from_pretrained`` can read.

    ``name`` is a preset (``tiny``, ``small``, ``bench``), a real BLOOM's name such as
    ``bloom-7b1`` (its cached checkpoint, else random weights of its shape), a local directory holding a
    Hugging Face checkpoint, or a hub id such as ``bigscience/bloom`` that must already be
    in the local Hugging Face cache (nothing is downloaded here).
    """
    if name in PRESETS:
        return ensure_preset(name)
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
    raise UserError(f"model {name!r} not found: pass a preset ({', '.join(PRESETS)}), an existing "
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
