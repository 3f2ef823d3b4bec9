"""Fast "start to ready" for tensor parallelism: pre-sharded checkpoints.

Without them every rank reads the *whole* checkpoint and throws away (N-1)/N of it —
the blog's 662 s for BLOOM-176B on 8 GPUs.  Written once per TP size, per-rank shards let
each rank read only its 1/N (blog: 60 s):

* :func:`save_rank_shard` — run under the launcher at the target TP size: each rank,
  after ``init_inference`` (and int8 quantization) has cut the model, writes exactly what it
  holds to ``tp-rankRR-of-NN.safetensors``; rank 0 then writes ``bloomkit_tp_shards.json``
  (format, tp_size, dtype, files) and copies config + tokenizer, so the folder is a model.
* :func:`load_rank_shard` — builds the model on the ``meta`` device (shapes, no bytes), lets
  ``init_inference`` cut the *shapes* (AutoTP keeps meta tensors meta, then allocates only
  this rank's slices), and fills them from this rank's file alone.

safetensors holds raw tensors and a JSON header: loading one cannot run code.

DeepSpeed's own format (the published ``microsoft/bloom-deepspeed-inference-{fp16,int8}``
repos, and the anchor script's ``checkpoints.json``) is a JSON file: ``type`` (``BLOOM`` or
``ds_model``), ``checkpoints`` (a list of files, or ``{"tp": [...], "non_tp": [...]}``),
``tp_size``, ``dtype``, ``version``, ``base_dir``.  DeepSpeed loads ``.pt``/``.bin`` files
listed there with ``torch.load(weights_only=False)``, i.e. **pickle: a file can run
arbitrary code when loaded** — :func:`read_ds_checkpoint_json` refuses them unless the user
passes ``--allow_pickle`` for files they trust.  Pre-sharded files (``type: ds_model``, or
``parallelization: tp`` — what ``save_mp_checkpoint_path`` writes, ``type: bloom``) are in the
layout of DeepSpeed's fused kernels and only load with kernel injection (the legacy
environment); that is also the only way DeepSpeed's int8 kernels get quantized weights.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import tp
from .errors import UserError

FORMAT = "bloomkit-tp-shards"
FORMAT_VERSION = 1
INDEX = "bloomkit_tp_shards.json"
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".pkl", ".ckpt")
PICKLE_RISK = ("DeepSpeed loads .pt/.bin checkpoint files with torch.load(weights_only=False), "
               "which unpickles them: a malicious file runs arbitrary code on every rank")


def shard_name(rank: int, tp_size: int) -> str:
    return f"tp-rank{rank:02d}-of-{tp_size:02d}.safetensors"


# ---------------------------------------------------------------------------- writing

def prepare_dir(out_dir) -> Path:
    """Create (or check) the output folder before the expensive load; refuse to mix sizes."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --save_shards folder {out_dir} ({exc.strerror}); pass "
                        "a writable directory") from None
    return out


def save_rank_shard(model, out_dir, *, tp_size: int, rank: int, dtype: str) -> Path:
    """Write exactly what this rank holds (after TP cut and quantization) as safetensors."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    path = out / shard_name(rank, tp_size)
    tmp = path.with_suffix(".tmp")
    meta = {"format": FORMAT, "tp_size": str(tp_size), "rank": str(rank), "dtype": dtype}
    save_model(model, str(tmp), metadata=meta, force_contiguous=True)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def copy_model_files(source, out_dir) -> None:
    """Config, generation config and tokenizer files of ``source`` (no weights) into
    ``out_dir``, so a shard folder is also a model folder (``--name DIR``)."""
    out = Path(out_dir)
    for f in Path(source).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "model.safetensors.index.json", INDEX) and not f.name.endswith(".lock"):
            shutil.copy2(f, out / f.name)


def write_index(out_dir, *, source, tp_size: int, dtype: str, engine: str, name: str,
                bytes_per_rank: list[int], source_path=None) -> Path:
    """Rank 0, after every rank saved: the index, plus config and tokenizer files."""
    out, source = Path(out_dir), Path(source)
    copy_model_files(source, out)
    files = [shard_name(r, tp_size) for r in range(tp_size)]
    stale = sorted(p.name for p in out.glob("tp-rank*.safetensors") if p.name not in files)
    for s in stale:  # shards of another TP size left from an earlier run would mislead
        (out / s).unlink()
    index = {"format": FORMAT, "version": FORMAT_VERSION, "tp_size": tp_size, "dtype": dtype,
             "engine": engine, "source": name,
             "source_path": str(source_path or source), "files": files, "bytes_per_rank": bytes_per_rank}
    from .results import write_json

    p = write_json(out / INDEX, index)
    p.chmod(0o644)
    return p


# ---------------------------------------------------------------------------- reading

def read_index(shard_dir) -> dict:
    d = Path(shard_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"--load_shards {shard_dir} is not a directory; write the shards first "
                        "with --save_shards DIR (launched at the same TP size)")
    idx = d / INDEX
    if not idx.exists():
        hint = ""
        if any(d.glob("*.json")) and ((d / "ds_inference_config.json").exists()
                                      or (d / "checkpoints.json").exists()):
            hint = " (this looks like DeepSpeed's format: pass --ds_checkpoint FILE.json)"
        raise UserError(f"{shard_dir} has no {INDEX}{hint}; write TP shards with "
                        "--save_shards DIR first")
    index = json.loads(idx.read_text())
    if index.get("format") != FORMAT:
        raise UserError(f"{idx} is not a {FORMAT} index; re-create it with --save_shards")
    return index


def check_shards(shard_dir, *, tp_size: int, dtype: str, engine: str, rank: int | None = None) -> dict:
    """The index, after checking it matches this launch; clear errors otherwise."""
    index = read_index(shard_dir)
    d = Path(shard_dir).expanduser()
    n = int(index["tp_size"])
    if n != tp_size:
        raise UserError(f"the shards in {shard_dir} were written for TP={n} but this launch "
                        f"runs TP={tp_size}: launch {n} ranks (--num_accelerators/--num_gpus {n}) "
                        f"or write new shards with --save_shards at TP={tp_size}")
    if index["dtype"] != dtype:
        raise UserError(f"the shards in {shard_dir} hold {index['dtype']} weights but --dtype is "
                        f"{dtype}: pass --dtype {index['dtype']} or write {dtype} shards with "
                        "--save_shards")
    if index.get("engine", "autotp") != engine:
        raise UserError(f"the shards in {shard_dir} were cut by {index.get('engine')}, not "
                        f"{engine}: pass --kernel_inject {'off' if index.get('engine') == 'autotp' else 'on'}")
    ranks = [rank] if rank is not None else range(n)
    for r in ranks:
        f = d / shard_name(r, n)
        if not f.exists():
            raise UserError(f"shard {f.name} (rank {r} of {n}) is missing in {shard_dir}; "
                            f"copy it there or re-run --save_shards at TP={n}")
    return index


def load_rank_shard(shard_dir, *, dtype: str, tp_size: int, engine: str, device: str):
    """This rank's TP model, reading only its own shard file onto a meta-built model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import load_config

    d = Path(shard_dir).expanduser()
    check_shards(d, tp_size=tp_size, dtype=dtype, engine=engine, rank=tp.rank())
    f = d / shard_name(tp.rank(), tp_size)
    with safe_open(str(f), "pt") as h:
        meta = h.metadata() or {}
    if meta.get("rank") != str(tp.rank()) or meta.get("tp_size") != str(tp_size):
        raise UserError(f"{f.name} says rank {meta.get('rank')} of {meta.get('tp_size')}, "
                        f"expected rank {tp.rank()} of {tp_size}; re-run --save_shards")
    steps, t = {}, time.perf_counter()

    def step(name):  # where "start to ready" goes, kept in the record (options.load_steps_s)
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 4)
        t = now

    model = tp.meta_model(load_config(d), dtype)
    step("meta_skeleton")
    model = tp.init_engine(model, tp_size=tp_size, dtype=dtype, engine=engine).module
    if dtype == "int8":
        tp.quantize_tp_linears(model, empty=True)
    step("init_inference")
    dev = "cpu" if device == "cpu" else f"cuda:{tp.local_rank()}"
    sd = load_file(str(f), device=dev)
    step("read_shard")
    if dev == "cpu":
        prefault(sd)
        step("prefault")
    # assign=True: the model's tensors *become* the file's (memory-mapped on CPU), instead of
    # copying every byte once more into freshly allocated memory
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    step("assign")
    model._bloomkit_load_steps = steps
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        # TP = 1: embedding and lm_head are one tensor, stored once under either name
        names = {m: n for n, m in model.named_modules() if m is emb or m is head}
        e, h = f"{names[emb]}.weight", f"{names[head]}.weight"
        if h in missing and e in sd:
            head.weight = emb.weight
        elif e in missing and h in sd:
            emb.weight = head.weight
        missing = [m for m in missing if m not in ((h, e) if (h in sd or e in sd) else ())]
    if unexpected or missing:
        raise UserError(f"{f.name} does not match the model built from {d / 'config.json'} "
                        f"(missing {list(missing)[:2]}, unexpected {list(unexpected)[:2]}); "
                        "re-run --save_shards")
    return model


def prefault(state_dict) -> None:
    """Read one value per 4 KiB page of each memory-mapped tensor, so the bytes are really
    in memory when the load is timed "ready" (not paged in by the first ``generate``).
    Mapping the pages is the cost (~35 ms per 655 MB here); ``MADV_POPULATE_READ`` measured
    the same."""
    for t in state_dict.values():
        flat = t.reshape(-1)
        step = max(1, 4096 // t.element_size())
        if flat.numel():
            flat[::step].float().sum()


def evict_page_cache(*paths) -> int:
    """Drop these files (or the files in these folders) from the OS page cache, so the next
    load reads them from disk — a "cold start" like the first start after a download, without
    root (``posix_fadvise(DONTNEED)``).  Returns the bytes evicted."""
    import os

    total = 0
    for p in paths:
        p = Path(p)
        for f in ([p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


# ---------------------------------------------------------------------------- DeepSpeed's json

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


def _read_state_dict(path: Path) -> dict:
    """One checkpoint file as a state dict.  safetensors as is; pickled files (only reached
    after ``--allow_pickle``) with ``weights_only=True``, which refuses code objects."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


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


def load_ds_checkpoint(info: dict, config, *, dtype: str, tp_size: int, engine: str):
    """This rank's TP model from DeepSpeed's checkpoint json.

    * pre-sharded (``type: ds_model`` — per-rank ``tp_RR_MM.pt`` files of the published repos
      — or ``parallelization: tp``, what ``--save_shards`` writes under kernel injection):
      DeepSpeed's kernel-injection layout — only ``init_inference(checkpoint=json,
      replace_with_kernel_inject=True)`` reads it (legacy environment, CUDA).  It quantizes
      to int8 while reading when ``dtype`` is int8.
    * ``type: BLOOM`` (a list of ordinary, unsharded files, keys with or without the
      ``transformer.`` prefix): with kernel injection DeepSpeed reads them itself, as the
      anchor script did (with ``torch.load``: pickled ``.bin``/``.pt`` files only); with
      AutoTP every rank reads every file into a meta-built model (DeepSpeed 0.19's AutoTP
      checkpoint loader leaves BLOOM's head count unsplit), and ``init_inference`` cuts it —
      correct, but not faster than the full load: write bloomkit shards (``--save_shards``)
      for fast starts.
    """
    check_ds_checkpoint(info, tp_size=tp_size, engine=engine)
    if engine == "kernel-inject":
        model = tp.meta_model(config, dtype, engine)
        return tp.init_engine(model, tp_size=tp_size, dtype=dtype, engine=engine,
                              checkpoint=str(info["path"]), base_dir=info["base_dir"]).module
    model = tp.meta_model(config, dtype)
    own = set(model.state_dict())
    for f in info["files"]:
        sd = _read_state_dict(f)
        fixed = {}
        for k, v in sd.items():
            key = k if k in own else f"transformer.{k}"
            if key not in own:
                raise UserError(f"{f.name} holds {k!r}, which a BLOOM model with this config does "
                                "not have; is config.json the checkpoint's?")
            fixed[key] = v
        model.load_state_dict(fixed, strict=False, assign=True)
        del sd, fixed
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"{info['path'].name} does not cover the model: {len(missing)} tensors "
                        f"missing, e.g. {missing[0]}")
    model = tp.init_engine(model, tp_size=tp_size, dtype=dtype, engine=engine).module
    if dtype == "int8":
        tp.quantize_tp_linears(model)
    return model


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
    from .results import write_json

    return write_json(out, {"type": "BLOOM", "checkpoints": files, "version": 1.0})
