"""Cheap checks that a model directory will load, before anything is loaded.

A broken checkpoint otherwise fails deep inside ``from_pretrained`` (a traceback, after
minutes of reading a 350 GB model) or, worse, on only some ranks of a launch.  These
checks read only small files and the *headers* of the weight files, never tensor data:

* ``config.json`` is JSON and names a ``model_type`` that this transformers knows as a
  causal LM;
* every shard ``model.safetensors.index.json`` lists is there;
* every ``*.safetensors`` file it uses has a readable header (8-byte little-endian length,
  then JSON) and exactly the length that header promises (a truncated download is shorter);
* the tokenizer files are there and load.

:func:`check_generation` then compares the request (batch × (prompt + ``--max_new_tokens``))
with the model's context limit and with the machine's memory.  Every failure is a
:class:`~bloomkit.errors.UserError` that names the fix.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
MAX_HEADER = 100_000_000  # safetensors refuses larger headers too
RESAVE = ("re-download the checkpoint, or re-save the model with "
          "save_pretrained(..., safe_serialization=True)")
# bytes per element of safetensors' dtype names (those a header can carry)
ST_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                  "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                  "F8_E8M0": 1}


@dataclass
class ModelInfo:
    """What the checks learned: the parsed config and, when it loaded, the tokenizer."""

    path: Path
    config: object
    tokenizer: object = None
    weight_files: list = field(default_factory=list)


def _read_json(path: Path, fix: str):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (a corrupt or binary file); {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {fix}") from None


# ---------------------------------------------------------------------------- config


def check_config(path: str | Path):
    """``config.json`` parses and names a causal LM this transformers knows; returns the
    ``AutoConfig`` it loads."""
    d = Path(path)
    cfg_file = d / CONFIG
    if not cfg_file.is_file():
        raise UserError(f"{d} has no {CONFIG}; pass a directory saved with save_pretrained")
    fix = "restore it from the original checkpoint (or re-save the model with save_pretrained)"
    raw = _read_json(cfg_file, fix)
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_file} is not a JSON object; {fix}")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    version = transformers.__version__
    model_type = raw.get("model_type")
    no_type = (f"{cfg_file} has no \"model_type\"; add the model's type (e.g. \"model_type\": "
               "\"bloom\") or re-save the model with save_pretrained")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(no_type)
    if model_type and model_type not in CONFIG_MAPPING:
        remote = " (it is custom code: auto_map; the recipes do not run remote code)" \
            if raw.get("auto_map") else ""
        raise UserError(f"{cfg_file} names model_type {model_type!r}, which transformers "
                        f"{version} does not know{remote}; fix model_type, or use a transformers "
                        "version that has this model")
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as lms
    except ImportError:  # very old transformers: skip this check
        lms = None
    if model_type and lms is not None and model_type not in lms:
        raise UserError(f"{cfg_file}: model_type {model_type!r} has no causal-LM (text generation) "
                        f"model in transformers {version}; pass a decoder-only model such as BLOOM")
    # "architectures" is not checked: AutoModelForCausalLM picks the class by model_type
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(d))
    except Exception as exc:  # noqa: BLE001 - any failure: the config cannot be used
        if not model_type:  # transformers guesses the type from the folder's name, if it can
            raise UserError(no_type) from None
        raise UserError(f"transformers {version} cannot read {cfg_file} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); {fix}") from None
    return config


# ---------------------------------------------------------------------------- weights


def read_safetensors_header(file: str | Path) -> dict:
    """The JSON header of a ``.safetensors`` file, after checking that the file is exactly as
    long as the header says (reads only the header)."""
    f = Path(file)
    try:
        size = f.stat().st_size
        with open(f, "rb") as h:
            head = h.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = h.read(n) if n is not None and 0 < n <= min(MAX_HEADER, size - 8) else None
    except OSError as exc:
        raise UserError(f"cannot read weight file {f} ({exc.strerror or exc}); check its "
                        f"permissions, or {RESAVE}") from None
    if n is None:
        raise UserError(f"{f} is truncated ({size} bytes: not even a header); {RESAVE}")
    if n == 0 or n > MAX_HEADER:
        raise UserError(f"{f} is not a valid safetensors file (corrupt header); {RESAVE}")
    if raw is None:  # the header is longer than the file: cut off inside the header
        raise UserError(f"{f} is truncated ({size} bytes; its header alone needs {8 + n}); "
                        f"{RESAVE}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{f} is not a valid safetensors file (its header is not JSON); "
                        f"{RESAVE}") from None
    if not isinstance(header, dict):
        raise UserError(f"{f} is not a valid safetensors file (corrupt header); {RESAVE}")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in t["data_offsets"])
            shape = [int(x) for x in t["shape"]]
            width = ST_DTYPE_BYTES.get(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{f} is not a valid safetensors file (bad entry for tensor "
                            f"{name!r}); {RESAVE}") from None
        if b < 0 or e < b or (width is not None and e - b != math.prod(shape) * width):
            raise UserError(f"{f} is not a valid safetensors file (tensor {name!r} has "
                            f"inconsistent offsets); {RESAVE}")
        end = max(end, e)
    need = 8 + n + end
    if size < need:
        raise UserError(f"{f} is truncated ({size} bytes of {need}: an interrupted download or "
                        f"copy?); {RESAVE}")
    if size > need:
        raise UserError(f"{f} is not a valid safetensors file ({size - need} bytes beyond what "
                        f"its header describes); {RESAVE}")
    return header


def weight_files(path: str | Path) -> list[Path]:
    """The ``*.safetensors`` files a load of ``path`` reads: those the index lists (each must
    exist), else every one in the directory (a single ``model.safetensors``, or bloomkit TP
    shards)."""
    d = Path(path)
    index = d / INDEX
    if not index.exists():
        return sorted(d.glob("*.safetensors"))
    fix = "restore it from the original checkpoint (or re-save the model with save_pretrained)"
    obj = _read_json(index, fix)
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise UserError(f"{index} has no \"weight_map\" of tensor name -> file; {fix}")
    names = sorted(set(wmap.values()))
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{index} lists {missing[0]}{more}, which is missing from {d}; copy the "
                        "missing shard(s) there or re-download the checkpoint")
    return [d / n for n in names]


def check_weights(path: str | Path) -> list[Path]:
    """Every weight file is present and has an intact header and length."""
    files = weight_files(path)
    for f in files:
        read_safetensors_header(f)
    return files


# ---------------------------------------------------------------------------- tokenizer


def check_tokenizer(path: str | Path):
    """The tokenizer files are there and load; returns the tokenizer (left-padded)."""
    d = Path(path)
    present = [n for n in TOKENIZER_FILES if (d / n).is_file()]
    if not present:
        raise UserError(f"{d} has no tokenizer (no tokenizer.json or tokenizer_config.json); copy "
                        "the tokenizer files from the original checkpoint, or save them there with "
                        "tokenizer.save_pretrained(DIR)")
    fix = ("copy the tokenizer files from the original checkpoint again (or save them with "
           "tokenizer.save_pretrained(DIR))")
    for n in ("tokenizer.json", "tokenizer_config.json"):
        if (d / n).is_file():
            _read_json(d / n, fix)
    if (d / "tokenizer.json").is_file():
        try:
            import tokenizers

            tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - the Rust parser's error names the field
            raise UserError(f"{d / 'tokenizer.json'} cannot be read by tokenizers "
                            f"{tokenizers.__version__} ({_short(exc)}); {fix}") from None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a failing load logs before it raises: keep one line
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as exc:  # noqa: BLE001 - any failure: the tokenizer cannot be used
        raise UserError(f"cannot load the tokenizer in {d} ({type(exc).__name__}: "
                        f"{_short(exc)}); {fix}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return tok


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------------------- all of it

_CHECKED: dict = {}


def _stamp(d: Path) -> tuple:
    """Changes when the directory's files do (so a cached verdict is never stale)."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                            for f in d.iterdir() if f.is_file()))
    except OSError:
        return ()


def check_model_dir(path: str | Path) -> ModelInfo:
    """All the checks above, in the order a user should fix them (cached per process: a
    recipe may validate twice)."""
    d = Path(path)
    key = (str(d.resolve()), _stamp(d))
    if key in _CHECKED:
        return _CHECKED[key]
    config = check_config(d)
    files = check_weights(d)
    tok = check_tokenizer(d)
    info = ModelInfo(path=d, config=config, tokenizer=tok, weight_files=files)
    _CHECKED[key] = info
    return info


# ---------------------------------------------------------------------------- the request

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                "n_ctx")


def context_limit(config) -> int | None:
    """The model's longest sequence (prompt + new tokens), or ``None`` when it has no fixed
    limit (BLOOM: ALiBi)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    for k in CONTEXT_KEYS:
        v = get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def prompt_tokens(tokenizer, prompts: list[str]) -> int:
    """Tokens of the longest prompt (0 when it cannot be counted)."""
    if tokenizer is None or not prompts:
        return 0
    try:
        return max(len(tokenizer(p)["input_ids"]) for p in prompts)
    except Exception:  # noqa: BLE001 - an estimate: never a reason to fail
        return 0


def device_memory(device: str, world_size: int = 1) -> tuple[int, str]:
    """Total memory one rank can use, and its name: the machine's RAM on CPU (all ranks
    share it), on CUDA one GPU per rank, or every visible GPU for a single process (device
    maps spread a model over them)."""
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if world_size > 1:
            i = int(os.environ.get("LOCAL_RANK", 0)) % max(n, 1)
            return torch.cuda.get_device_properties(i).total_memory, "this rank's GPU"
        total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(n))
        return total, f"the {n} visible GPU(s)" if n > 1 else "the GPU"
    import psutil

    return psutil.virtual_memory().total, "this machine's RAM"


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def check_generation(config, *, dtype: str, device: str, batch_size: int, max_new_tokens: int,
                     prompt_len: int = 0, world_size: int = 1, weights_elsewhere: bool = False,
                     total_bytes: int | None = None) -> None:
    """Refuse a request that clearly cannot run: longer than the model's context, or a KV
    cache (plus weights) larger than all the memory there is.

    A lower bound on the need, on purpose (only what surely fails is refused): the cache of
    ``batch_size`` rows of ``prompt_len + max_new_tokens`` tokens, plus the weights unless
    ``weights_elsewhere`` (offloaded, or possibly in CPU RAM beside the GPUs).  On CUDA with
    several ranks both are shared over the ranks (tensor parallelism splits the heads); on
    CPU all ranks share one RAM, so the whole need is compared with it."""
    limit = context_limit(config)
    if limit is not None and prompt_len + max_new_tokens > limit:
        fits = limit - prompt_len
        raise UserError(f"--max_new_tokens {max_new_tokens} plus the prompt ({prompt_len} tokens) "
                        f"is longer than the model's context of {limit} tokens; use "
                        + (f"--max_new_tokens {fits} or less" if fits > 0 else "shorter prompts"))
    from . import memory

    try:
        per_token = memory.kv_cache_bytes_per_token(config, dtype)
        weights = 0 if weights_elsewhere else memory.weight_bytes(config, dtype)
    except Exception:  # noqa: BLE001 - a config the estimate does not understand: no verdict
        return
    if per_token <= 0:
        return
    if total_bytes is None:
        try:
            total_bytes, where = device_memory(device, world_size)
        except Exception:  # noqa: BLE001 - unknown memory: no verdict
            return
    else:
        where = "the given memory"
    share = world_size if device == "cuda" and world_size > 1 else 1
    cache = per_token * batch_size * (prompt_len + max_new_tokens)
    need = (weights + cache) / share
    if need <= total_bytes:
        return
    room = total_bytes * share - weights
    fits = math.floor(room / (per_token * batch_size)) - prompt_len if room > 0 else 0
    head = (f"--max_new_tokens {max_new_tokens} at batch size {batch_size} needs about "
            f"{_gib(need)} (KV cache {_gib(cache / share)}"
            + (f" + weights {_gib(weights / share)}" if weights else "")
            + f"), more than {where} ({_gib(total_bytes)})")
    if fits >= 1:
        raise UserError(f"{head}; the largest --max_new_tokens that fits is {fits} (or lower "
                        "--batch_size)")
    raise UserError(f"{head}; not even one new token fits: lower --batch_size, use a smaller "
                    "--dtype, or offload the weights")
