"""Everything that only BLOOM needs: ALiBi under TP, the fused-kernel (legacy) route, its json.

The rest of the package is architecture-agnostic; these pieces run only when the model is a
``BloomForCausalLM`` (:func:`is_bloom`):

* **ALiBi per rank.**  BLOOM has no position embeddings; each attention head adds a fixed
  linear bias with its own slope.  Under AutoTP each rank computes ``heads / N`` heads, so it
  must add only *their* slopes: DeepSpeed re-binds ``BloomModel.build_alibi_tensor`` per rank,
  and :func:`keep_alibi_sharded` makes sure transformers always calls it.
* **Kernel injection** (``replace_with_kernel_inject=True``, the blog's path): DeepSpeed's
  fused CUDA inference kernels.  DeepSpeed refuses BLOOM there with transformers > 4.43.4,
  and int8 with DeepSpeed >= 0.15.2, so it needs the pinned legacy environment
  (``make setup-legacy``) and a CUDA GPU.  Its int8 quantizes the weights only while it
  reads a checkpoint json (``init_inference(checkpoint=...)`` on a ``meta`` model, as the
  blog and DeepSpeed's own sharding test do): on a model already in memory DeepSpeed 0.15
  skips the quantization (``apply_weight_quantization`` is commented out) and its int8
  kernels then read fp16 weights (DeepSpeed issues #2923, #2956).  So int8 kernels need
  ``--ds_checkpoint``: DeepSpeed's pre-sharded files, which ``--save_shards`` writes under
  kernel injection (``save_mp_checkpoint_path``) from an fp16 run.
* **DeepSpeed's checkpoint json** (the published ``microsoft/bloom-deepspeed-inference-{fp16,
  int8}`` repos, and the blog script's ``checkpoints.json``): ``type`` (``BLOOM`` or
  ``ds_model``), ``checkpoints`` (a list of files, or ``{"tp": [...], "non_tp": [...]}``),
  ``tp_size``, ``dtype``, ``version``, ``base_dir``.  DeepSpeed loads ``.pt``/``.bin`` files
  listed there with ``torch.load(weights_only=False)``, i.e. **pickle: a file can run
  arbitrary code when loaded** — :func:`read_ds_checkpoint_json` refuses them unless the user
  passes ``--allow_pickle`` for files they trust.  Pre-sharded files (``type: ds_model``, or
  ``parallelization: tp`` — what ``save_mp_checkpoint_path`` writes, ``type: bloom``) are in
  the layout of DeepSpeed's fused kernels and only load with kernel injection.
"""
from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from .. import arch
from ..errors import UserError

MODEL_TYPE = "bloom"


def is_bloom(config) -> bool:
    """Is ``config`` (a transformers config) BLOOM's?"""
    return getattr(config, "model_type", None) == MODEL_TYPE


KERNEL_INJECT = ("auto", "on", "off")

LEGACY_TRANSFORMERS_MAX = "4.43.4"   # BLOOM kernel injection raises after this

LEGACY_DEEPSPEED_INT8_BELOW = "0.15.2"  # init_inference(dtype=torch.int8) refused from here

LEGACY_HINT = ("create the pinned legacy environment with `make setup-legacy` "
               "(requirements-legacy.txt) on a CUDA machine")

# DeepSpeed's int8 kernels quantize only while reading its checkpoint json: the two runs that get there
KERNEL_INT8_ROUTE = ("--kernel_inject on --dtype fp16 --save_shards DIR, then --dtype int8 "
                     "--ds_checkpoint DIR/ds_inference_config.json --allow_pickle")

def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None

def _le(v: str | None, bound: str) -> bool:
    from packaging.version import Version

    return v is not None and Version(v) <= Version(bound)

def _lt(v: str | None, bound: str) -> bool:
    from packaging.version import Version

    return v is not None and Version(v) < Version(bound)

def stack_report(device: str) -> dict:
    """What the installed stack can do for BLOOM kernel injection (no GPU work, no imports of
    deepspeed): the versions and the reasons it cannot, if any."""
    tf, ds = _version("transformers"), _version("deepspeed")
    cuda = False
    if device == "cuda":
        import torch

        cuda = torch.cuda.is_available()
    blockers = []
    if not _le(tf, LEGACY_TRANSFORMERS_MAX):
        blockers.append(f"transformers<={LEGACY_TRANSFORMERS_MAX} (installed {tf})")
    if device != "cuda" or not cuda:
        blockers.append("a CUDA GPU (the fused kernels are CUDA-only; this run is on "
                        f"{'cpu' if device != 'cuda' else 'cuda without a visible GPU'})")
    return {"transformers": tf, "deepspeed": ds, "cuda": cuda, "kernel_inject_blockers": blockers,
            "ds_int8_ok": _lt(ds, LEGACY_DEEPSPEED_INT8_BELOW)}

def choose_engine(kernel_inject: str, device: str, dtype: str, ds_checkpoint: dict | None = None,
                  model_type: str = MODEL_TYPE) -> str:
    """``"autotp"`` or ``"kernel-inject"`` for ``--kernel_inject {auto,on,off}``.

    Kernel injection here means DeepSpeed's fused BLOOM kernels: any other ``model_type``
    runs AutoTP (``auto``), and ``on`` is a one-line error.

    ``auto`` takes kernel injection only where it works (legacy stack + CUDA GPU; for int8 a
    DeepSpeed checkpoint json to quantize while loading; ``ds_checkpoint``, the parsed
    ``--ds_checkpoint``, listing files DeepSpeed's kernel loader can read), else AutoTP;
    ``on`` where it cannot work is a one-line error naming what to install or which flag to use.
    """
    if kernel_inject not in KERNEL_INJECT:
        raise UserError(f"unknown --kernel_inject {kernel_inject!r}; use one of {', '.join(KERNEL_INJECT)}")
    if model_type != MODEL_TYPE:
        if kernel_inject == "on":
            raise UserError(f"--kernel_inject on runs DeepSpeed's fused BLOOM kernels, and this model "
                            f"is {model_type!r}; use --kernel_inject off (AutoTP, any architecture "
                            "DeepSpeed knows)")
        return "autotp"
    rep = stack_report(device)
    works = not rep["kernel_inject_blockers"]
    int8_blockers = []
    if dtype == "int8" and not rep["ds_int8_ok"]:
        int8_blockers.append(f"deepspeed<{LEGACY_DEEPSPEED_INT8_BELOW} for int8 kernels "
                             f"(installed {rep['deepspeed']})")
    if ds_checkpoint is not None:
        unreadable = kernel_unreadable(ds_checkpoint)
        if unreadable:
            int8_blockers.append(f"--ds_checkpoint files it can torch.load (pickled .pt/.bin, not "
                                 f"{unreadable[0]}; or drop --ds_checkpoint: the model folder loads "
                                 "directly)")
    if dtype == "int8" and ds_checkpoint is None:
        int8_blockers.append(f"a DeepSpeed checkpoint json to quantize while loading ({KERNEL_INT8_ROUTE})")
    if kernel_inject == "off":
        return "autotp"
    if kernel_inject == "auto":
        return "kernel-inject" if works and not int8_blockers else "autotp"
    blockers = rep["kernel_inject_blockers"] + int8_blockers
    if blockers:
        raise UserError("--kernel_inject on: DeepSpeed's BLOOM kernel injection needs "
                        + " and ".join(blockers) + f"; {LEGACY_HINT}, or use --kernel_inject off "
                        "(AutoTP, works on this stack" + (" with int8 weights)" if dtype == "int8" else ")"))
    return "kernel-inject"

def keep_alibi_sharded(model) -> None:
    """Always hand BLOOM an attention mask under AutoTP.

    DeepSpeed re-binds ``BloomModel.build_alibi_tensor`` so each rank gets its own heads'
    slopes, but transformers 5 skips that builder when ``attention_mask`` is ``None`` (one row,
    no padding) and builds the slopes of *all* heads inline — a shape error at TP > 1.  A
    pre-hook passes an all-ones mask instead, so DeepSpeed's per-rank builder always runs.
    Its length is the key length transformers itself would use (``cache.get_mask_sizes``): the
    tokens so far for a dynamic cache, the whole preallocated length for a static one
    (``--compile``), whose unfilled columns the causal mask hides.
    """
    import torch

    def hook(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            x = kwargs.get("input_ids")
            if x is None:
                x = args[0] if args else kwargs.get("inputs_embeds")
            cache = kwargs.get("past_key_values") or kwargs.get("cache")  # renamed in transformers 5
            if cache is not None and hasattr(cache, "get_mask_sizes"):
                keys = cache.get_mask_sizes(x.shape[1], 0)[0]
            else:
                past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
                keys = past + x.shape[1]
            kwargs["attention_mask"] = torch.ones(x.shape[0], keys, dtype=torch.long, device=x.device)
        return args, kwargs

    model.transformer.register_forward_pre_hook(hook, with_kwargs=True)

# DeepSpeed's fused block (kernel injection) replaces a BloomBlock's four linears with these
# parameters of ``DeepSpeedBloomInference`` (int8: each carries its scales as ``.scale``)
KERNEL_BLOCK_WEIGHTS = ("attention.attn_qkvw", "attention.attn_ow", "mlp.inter_w", "mlp.output_w")

def is_kernel_block(module) -> bool:
    """A block replaced by DeepSpeed's fused kernels (``DeepSpeedTransformerInference``)."""
    return any(c.__name__ == "DeepSpeedTransformerInference" for c in type(module).__mro__)

def kernel_block_weights(model) -> list[tuple[str, object]]:
    """``(name, tensor)`` of the fused blocks' linear weights (empty under AutoTP)."""
    out = []
    for n, m in model.named_modules():
        if is_kernel_block(m):
            for w in KERNEL_BLOCK_WEIGHTS:
                mod_name, attr = w.rsplit(".", 1)
                t = getattr(m.get_submodule(mod_name), attr, None)
                if t is not None:
                    out.append((f"{n}.{w}", t))
    return out

def alibi_heads(config, tp_size: int) -> list[list[int]]:
    """Which attention heads (and so which ALiBi slopes) each rank owns: contiguous blocks."""
    heads = arch.heads_of(config)
    per = heads // tp_size
    return [list(range(r * per, (r + 1) * per)) for r in range(tp_size)]

def alibi_slopes(n_heads: int) -> list[float]:
    """BLOOM's ALiBi slopes (as transformers' ``build_alibi_tensor`` computes them)."""
    import math

    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (i + 1) for i in range(0, 2 * (n_heads - closest), 2)]
    return slopes


# ---------------------------------------------------------------------------- DeepSpeed's json

PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".pkl", ".ckpt")

PICKLE_RISK = ("DeepSpeed loads .pt/.bin checkpoint files with torch.load(weights_only=False), "
               "which unpickles them: a malicious file runs arbitrary code on every rank")

def read_ds_checkpoint_json(path, *, allow_pickle: bool = False) -> dict:
    """Parse DeepSpeed's ``checkpoints.json`` / ``ds_inference_config.json``.

    Returns ``{"type", "kernel_layout", "files" (all, absolute), "tp_files", "non_tp_files",
    "tp_size", "dtype", "base_dir", "pickled", "data"}``; refuses pickled files without ``allow_pickle``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--ds_checkpoint {path} does not exist; pass DeepSpeed's "
                        "checkpoints.json or ds_inference_config.json")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    missing = [k for k in ("type", "checkpoints") if k not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; DeepSpeed's checkpoint json has "
                        "type, checkpoints, version (and tp_size, dtype for pre-sharded repos)")
    ckpt = data["checkpoints"]
    base = Path(data.get("base_dir") or p.parent)
    if not base.is_absolute():
        base = p.parent / base
    if isinstance(ckpt, dict):
        tp_files, non_tp = list(ckpt.get("tp", [])), list(ckpt.get("non_tp", []))
    elif isinstance(ckpt, list):
        tp_files, non_tp = [], list(ckpt)
    else:
        raise UserError(f"{path}: 'checkpoints' must be a list of files or a dict with tp/non_tp")
    files = [base / f for f in non_tp + tp_files]
    absent = [str(f) for f in files if not f.exists()]
    if absent:
        raise UserError(f"{path} lists {len(absent)} missing file(s), e.g. {absent[0]}; download "
                        "the whole checkpoint next to the json (or fix base_dir)")
    pickled = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickled and not allow_pickle:
        raise UserError(f"{path} lists pickled files ({pickled[0]}, {len(pickled)} in all): "
                        f"{PICKLE_RISK}; pass --allow_pickle only if you trust them, or convert "
                        "them to safetensors")
    kind = str(data["type"])
    if kind.lower() not in ("bloom", "ds_model"):
        raise UserError(f"{path}: type {kind!r} is not a BLOOM checkpoint; expected BLOOM or ds_model")
    kernel_layout = kind.lower() == "ds_model" or data.get("parallelization") == "tp"
    return {"type": kind, "kernel_layout": kernel_layout, "files": files, "tp_files": tp_files,
            "non_tp_files": non_tp,
            "tp_size": data.get("tp_size"), "dtype": data.get("dtype"), "base_dir": base,
            "pickled": pickled, "data": data, "path": p}

def check_ds_checkpoint(info: dict, *, tp_size: int, engine: str) -> None:
    """Can this launch load DeepSpeed's json ``info``?  Checked on every rank before the
    process group starts, so a mismatch is one line, not a hang."""
    if info["kernel_layout"]:
        if engine != "kernel-inject":
            raise UserError(f"{info['path'].name} is DeepSpeed's pre-sharded kernel-injection "
                            f"format (type {info['type']}): it loads only with --kernel_inject on, in "
                            "the legacy environment on CUDA (make setup-legacy); on this stack load "
                            "the unsharded model and write shards with --save_shards")
        n = int(info["tp_size"] or 0)
        # DeepSpeed merges (fewer ranks) or splits (more ranks) its shards while loading, as
        # the blog's int8 run did (the 8-way int8 repo on 4 GPUs), when one size divides the other
        if n and tp_size % n and n % tp_size:
            raise UserError(f"{info['path'].name} was sharded for tp_size {n} but this launch runs "
                            f"TP={tp_size}; launch a divisor or multiple of {n} ranks")
    unreadable = kernel_unreadable(info) if engine == "kernel-inject" else []
    if unreadable:
        raise UserError(f"DeepSpeed's kernel injection reads the files of {info['path'].name} "
                        f"with torch.load, which cannot read {unreadable[0]}; drop --ds_checkpoint "
                        "(the model folder loads directly) or use --kernel_inject off")

def kernel_unreadable(info: dict) -> list[str]:
    """Files of DeepSpeed's json that its kernel-injection loader (``torch.load`` on each
    listed file, DeepSpeed 0.15) cannot read: everything but pickled checkpoints."""
    return [f.name for f in info["files"] if f.suffix not in PICKLE_SUFFIXES]

def export_bloom_layout(model_dir, out_dir) -> Path:
    """Re-save a local HF model the way bigscience/bloom's files are laid out (keys without
    the ``transformer.`` prefix) plus the ``checkpoints.json`` (type BLOOM) the anchor script
    passed to ``init_inference`` — safetensors, so no pickle.  Returns the json's path."""
    from safetensors.torch import load_file, save_file

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for f in sorted(src.glob("*.safetensors")):
        sd = {k.removeprefix("transformer."): v.contiguous() for k, v in load_file(str(f)).items()}
        if "lm_head.weight" in sd:  # tied to word_embeddings in BLOOM
            del sd["lm_head.weight"]
        save_file(sd, str(out / f.name), metadata={"format": "pt"})
        files.append(f.name)
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    return write_ds_checkpoint_json(out, out / "checkpoints.json", files=files)

def write_ds_checkpoint_json(model_dir, out_json=None, files=None) -> Path:
    """``checkpoints.json`` (type BLOOM) listing a local model's safetensors files — what the
    anchor script wrote for ``init_inference(checkpoint=...)``; no pickle involved."""
    d = Path(model_dir)
    files = files or sorted(f.name for f in d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors files to list")
    out = Path(out_json) if out_json else d / "checkpoints.json"
    from ..results import write_json

    return write_json(out, {"type": "BLOOM", "checkpoints": files, "version": 1.0})

