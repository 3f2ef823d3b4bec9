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

DeepSpeed's own checkpoint json (BLOOM's published pre-sharded repos) is parsed by
:mod:`bloomkit.strategies.bloom`; :func:`load_ds_checkpoint` here loads what it describes.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .. import dist
from ..errors import UserError
from . import autotp, bloom, tp_int8

FORMAT = "bloomkit-tp-shards"
FORMAT_VERSION = 1
INDEX = "bloomkit_tp_shards.json"


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
    from ..results import write_json

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

    from ..models import load_config

    d = Path(shard_dir).expanduser()
    check_shards(d, tp_size=tp_size, dtype=dtype, engine=engine, rank=dist.rank())
    f = d / shard_name(dist.rank(), tp_size)
    with safe_open(str(f), "pt") as h:
        meta = h.metadata() or {}
    if meta.get("rank") != str(dist.rank()) or meta.get("tp_size") != str(tp_size):
        raise UserError(f"{f.name} says rank {meta.get('rank')} of {meta.get('tp_size')}, "
                        f"expected rank {dist.rank()} of {tp_size}; re-run --save_shards")
    steps, t = {}, time.perf_counter()

    def step(name):  # where "start to ready" goes, kept in the record (options.load_steps_s)
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 4)
        t = now

    model = autotp.meta_model(load_config(d), dtype)
    step("meta_skeleton")
    model = autotp.init_engine(model, tp_size=tp_size, dtype=dtype, engine=engine).module
    if dtype == "int8":
        tp_int8.quantize_tp_linears(model, empty=True)
    step("init_inference")
    dev = "cpu" if device == "cpu" else f"cuda:{dist.local_rank()}"
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


def _read_state_dict(path: Path) -> dict:
    """One checkpoint file as a state dict.  safetensors as is; pickled files (only reached
    after ``--allow_pickle``) with ``weights_only=True``, which refuses code objects."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


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
    bloom.check_ds_checkpoint(info, tp_size=tp_size, engine=engine)
    if engine == "kernel-inject":
        model = autotp.meta_model(config, dtype, engine)
        return autotp.init_engine(model, tp_size=tp_size, dtype=dtype, engine=engine,
                              checkpoint=str(info["path"]), base_dir=info["base_dir"]).module
    model = autotp.meta_model(config, dtype)
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
    model = autotp.init_engine(model, tp_size=tp_size, dtype=dtype, engine=engine).module
    if dtype == "int8":
        tp_int8.quantize_tp_linears(model)
    return model




