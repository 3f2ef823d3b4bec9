"""Strategy 1: Hugging Face Accelerate big-model inference (pipeline placement).

Accelerate never builds the whole model in memory.  ``from_pretrained(device_map=...)``:

1. instantiates the model *with empty weights* (on the ``meta`` device: shapes, no bytes);
2. computes a **device map** — which module goes to which GPU, to CPU RAM, or to disk —
   from the per-module sizes and ``max_memory`` (:func:`plan_device_map` shows this step
   on its own);
3. loads each checkpoint shard and puts every tensor straight where the map says.

At run time the layers execute one device after the other (a pipeline with one stage
busy at a time), so N GPUs give N times the memory, not N times the speed.  Modules
mapped to ``cpu`` or ``disk`` are *offloaded*: hooks copy their weights to the GPU just
before they run, so every step pays the transfer — the measured slowdown is the price
of fitting.
"""
from __future__ import annotations

import logging
from collections import Counter
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import progress
from ..errors import UserError
from ..memory import empty_model  # noqa: F401 (the skeleton accelerate plans on; notebook 01 calls it here)

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "none")


def parse_max_memory(spec: str | None) -> dict | None:
    """``"0=30GiB,1=70GiB,cpu=100GiB"`` -> ``{0: "30GiB", 1: "70GiB", "cpu": "100GiB"}``.

    Keys are GPU indices, ``cpu`` or ``disk``; sizes use accelerate's units (GiB, MB, ...).
    ``max_memory`` caps what the device map may put on each device — on GPUs leave room for
    activations and the KV cache, which the map does not count.
    """
    if spec is None or spec == "":
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in spec.split(","):
        key, sep, size = part.strip().partition("=")
        if not sep or not key or not size:
            raise UserError(f"bad --max_memory entry {part!r}; write device=size pairs like "
                            "0=30GiB,1=70GiB,cpu=100GiB")
        key = key.strip()
        if key.isdigit():
            key = int(key)
        elif key not in ("cpu", "disk", "mps"):
            raise UserError(f"unknown device {key!r} in --max_memory; use GPU indices, cpu or disk")
        try:
            convert_file_size_to_int(size.strip())
        except ValueError:
            raise UserError(f"bad size {size!r} in --max_memory; use units like 512MiB or 30GiB") from None
        out[key] = size.strip()
    return out


def check_offload_folder(folder: str | Path | None) -> Path | None:
    """The offload folder must be a writable directory (created if missing)."""
    if folder is None:
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".bloomkit-write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"offload folder {folder} is not writable ({exc.strerror}); pass "
                        "--offload_folder to a writable directory with room for the offloaded "
                        "weights") from None
    return path


def check_int8_backend(device: str) -> None:
    """LLM.int8() needs bitsandbytes with a backend for ``device`` (CPU since 0.48)."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - broken installs raise many kinds of errors
        raise UserError(f"int8 needs bitsandbytes ({type(exc).__name__}: {exc}); "
                        "pip install 'bitsandbytes>=0.48', or use --dtype bf16") from None
    from packaging.version import Version

    if Version(bnb.__version__) < Version("0.48") and device == "cpu":
        raise UserError(f"bitsandbytes {bnb.__version__} has no CPU int8 backend; "
                        "pip install 'bitsandbytes>=0.48', or use --dtype bf16")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("int8 on cuda but no CUDA device; run on a GPU or on cpu")


def _quiet():
    """Silence accelerate/bitsandbytes chatter that repeats per layer or per call; loading
    progress only where a person watches (:func:`bloomkit.progress.library_bars`)."""
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    warnings.filterwarnings("ignore", message=".*weights are not tied.*")
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    # "Some parameters are on the meta device because they were offloaded": that is what offload
    # means (a hook loads them back before each forward), said once per load
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers' own "Loading weights" bar: on a terminal (rank 0) a checkpoint that takes
    # minutes shows it moving; off in logs, CI and notebooks (no "\r" debris there)
    progress.library_bars()


def plan_device_map(config, max_memory: dict, dtype: str = "bf16", device_map: str = "auto"):
    """Compute (without loading anything) the device map ``from_pretrained`` would use.

    * ``auto`` / ``balanced``: spread the blocks evenly over the GPUs in ``max_memory``;
    * ``balanced_low_0``: the same, but keep GPU 0 nearly empty — ``generate`` runs its
      sampling, the logits (batch x vocab, 250880 wide for BLOOM) and the inputs on the
      first device, so a light GPU 0 lets the batch grow;
    * ``sequential``: fill GPU 0, then GPU 1, ... (fewest devices, uneven load).

    GPU indices in ``max_memory`` need not exist on this machine: the plan is pure
    arithmetic over module sizes, so you can plan BLOOM-176B on 8x80GB from a laptop.

    Args:
        config: the model's config (``AutoConfig.from_pretrained``, or
            :func:`bloomkit.models.bloom_config`): shapes only, no weights are read.
        max_memory: per-device caps, ``{0: "80GiB", ..., "cpu": "500GiB"}``; what fits on
            no GPU goes to ``cpu``, then ``disk``. Leave room on each GPU for the KV cache and
            activations, which the map does not count.
        dtype: the weights' dtype: bf16 halves every module's size against fp32.
        device_map: ``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``.

    Returns:
        ``{module name: device}``, the form ``from_pretrained(device_map=...)`` takes.

    Example:
        >>> from collections import Counter
        >>> from bloomkit import models
        >>> plan = plan_device_map(models.bloom_config("bloom"), {i: "80GiB" for i in range(8)},
        ...                        "bf16", "balanced_low_0")
        >>> 0 in Counter(plan.values())     # GPU 0 kept free for generate's logits and inputs
        False
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    from ..dtypes import torch_dtype

    _quiet()
    model = empty_model(config, dtype)
    mm = dict(max_memory)
    # a decoder block is never cut across two devices: transformers lists each family's
    # block class (BLOOM's, LlamaDecoderLayer, ...) in ``_no_split_modules``
    no_split = model._no_split_modules or []
    if device_map in ("auto", "balanced", "balanced_low_0"):
        mm = get_balanced_memory(model, max_memory=mm, no_split_module_classes=no_split,
                                 dtype=torch_dtype(dtype), low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=mm, no_split_module_classes=no_split,
                                 dtype=torch_dtype(dtype))


def _size_dtype(dtype: str):
    """What accelerate sizes each weight as for ``dtype``: one byte under ``int8``, half a byte
    under ``nf4`` / ``int4`` (scales left out, as in :func:`bloomkit.memory.weight_bytes`)."""
    import torch
    from accelerate.utils import CustomDtype

    from ..dtypes import torch_dtype

    name = str(dtype).replace("torch.", "")
    if name == "int8":
        return torch.int8
    if name in ("int4", "nf4"):
        return CustomDtype.INT4
    return torch_dtype(name)


_SKELETONS: dict[tuple[str, str], tuple[dict, str | None, int]] = {}


def module_sizes(config, dtype: str = "bf16") -> tuple[dict[str, int], str | None, int]:
    """``(sizes, blocks_prefix, n_blocks)`` of ``config``'s model, from its meta skeleton
    (:func:`empty_model`): ``sizes`` maps every module and parameter name (``""``: the whole
    model) to its bytes in ``dtype`` by :func:`accelerate.utils.compute_module_sizes` (the
    numbers ``infer_auto_device_map`` places modules by; a tied weight counted once, buffers
    included); the decoder-block list is found by :func:`bloomkit.arch.decoder_blocks`.
    Kept per config and dtype: the skeleton of BLOOM-176B took 0.4 to 8 s to build here.

    Example:
        >>> from bloomkit import models
        >>> sizes, prefix, n = module_sizes(models.bloom_config("bloom"), "bf16")
        >>> sizes[""], prefix, n
        (352494542848, 'transformer.h', 70)
    """
    from accelerate.utils import compute_module_sizes

    from .. import arch
    from ..memory import transformers_config

    cfg = transformers_config(config)
    key = (cfg.to_json_string(use_diff=False), str(dtype))
    if key not in _SKELETONS:
        model = empty_model(cfg, "fp32")
        prefix, blocks = arch.decoder_blocks(model)
        sizes = compute_module_sizes(model, dtype=_size_dtype(dtype))
        _SKELETONS[key] = ({k: int(v) for k, v in sizes.items()}, prefix, len(blocks))
    sizes, prefix, n = _SKELETONS[key]
    return dict(sizes), prefix, n


def _block_sets(device_map: dict, prefix: str | None, n: int | None) -> dict[str, set[int]]:
    """Per device of ``device_map``, the indices of the blocks under ``prefix`` it holds: an
    entry that names a block or lies inside one counts for that block, an entry above the
    list (``""``, ``model``, ``model.layers``) for all ``n`` of them."""
    from .. import arch

    out: dict[str, set[int]] = {str(dev): set() for dev in device_map.values()}
    if prefix is None:
        return out
    for key, dev in device_map.items():
        i = arch.block_index(key, prefix)
        if i is not None:
            out[str(dev)].add(i)
        elif key == "" or key == prefix or prefix.startswith(key + "."):
            out[str(dev)].update(range(n or 0))
    return out


def device_map_summary(device_map: dict, config=None, dtype: str = "bf16"):
    """A table, one row per device of ``device_map``: its entries (``modules``), the decoder
    blocks it holds (``blocks``) and, with ``config``, the bytes of its weights in ``dtype``
    (``weight_bytes``; ``weights_GB`` rounded to the MB).

    The bytes are accelerate's :func:`accelerate.utils.compute_module_sizes` of the model's
    meta skeleton summed over each device's entries (:func:`module_sizes`): exact for any
    family, with no formula or guess about module names.  Blocks are counted by layer index
    under the skeleton's list of decoder blocks (from the map's names alone without
    ``config``); an entry above the list (``""``, ``model``) holds every block.

    Args:
        device_map: module name -> device, as ``infer_auto_device_map`` or a loaded model's
            ``hf_device_map`` gives it.
        config: the model's config (a transformers config or a plain dict), or ``None`` to
            count blocks only.
        dtype: the weights' dtype (``fp32``, ``bf16``, ``fp16``, ``int8``, ``nf4``).

    Example:
        >>> from bloomkit import models
        >>> cfg = models.bloom_config("bloom")
        >>> dmap = plan_device_map(cfg, {i: "80GiB" for i in range(8)}, "bf16", "balanced_low_0")
        >>> s = device_map_summary(dmap, cfg, "bf16")
        >>> int(s["blocks"].sum()), int(s["weight_bytes"].sum()) == module_sizes(cfg, "bf16")[0][""]
        (70, True)
    """
    import pandas as pd

    from .. import arch

    sizes = None
    if config is not None:
        sizes, prefix, n_layers = module_sizes(config, dtype)
    else:
        prefix, n_layers = arch.block_prefix(device_map), None
    blocks = _block_sets(device_map, prefix, n_layers)
    rows = []
    for dev, n in Counter(device_map.values()).items():
        row = {"device": str(dev), "modules": n, "blocks": len(blocks[str(dev)])}
        if sizes is not None:
            row["weight_bytes"] = sum(sizes.get(k, 0) for k, v in device_map.items() if v == dev)
            row["weights_GB"] = round(row["weight_bytes"] / 1e9, 3)
        rows.append(row)
    return pd.DataFrame(rows).set_index("device")


def blocks_by_device(device_map: dict, config) -> dict[str, list[int]]:
    """The decoder-block indices each device of ``device_map`` holds, in layer order: an entry
    that names a block (``model.layers.3``) or lies inside one counts for that block, an entry
    above the block list (``""``, ``model``, ``model.layers``) for all of them.  A block listed
    under two devices was cut across them (``no_split_module_classes`` prevents that).

    Example:
        >>> from bloomkit import models
        >>> from transformers import AutoConfig
        >>> llama = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
        >>> blocks_by_device({"model.embed_tokens": 0, "model.layers.0": 0,
        ...                   "model.layers.1": "disk", "lm_head": 0}, llama)
        {'0': [0], 'disk': [1]}
    """
    from .. import arch

    prefix = arch.block_prefix(device_map, config) or arch.family_of(config).blocks
    sets = _block_sets(device_map, prefix, arch.layers_of(config))
    return {dev: sorted(blocks) for dev, blocks in sets.items() if blocks}


def unfused_4bit_layers(model) -> list[str]:
    """Keep 4-bit layers whose input width is not a multiple of the quantization block (64)
    off bitsandbytes' fused CPU kernel, and return their names.

    On CPUs with AVX-512 bf16, bitsandbytes (0.48-0.50) repacks each ``Linear4bit`` at its first
    forward for a fused kernel; the repacking assumes ``in_features`` divides into blocks and
    fails with "shape ... is invalid" otherwise (a Llama of hidden 96, say).  Those layers
    take bitsandbytes' other path instead: unpack the weight, then an ordinary matmul (same
    result, no fused kernel)."""
    names = []
    for name, module in model.named_modules():
        blocksize = getattr(getattr(module, "weight", None), "blocksize", None)
        if (getattr(module, "support_avx512bf16_for_cpu", False) and blocksize
                and module.in_features % blocksize):
            module.support_avx512bf16_for_cpu = False
            names.append(name)
    return names


def load_model(path: str | Path, dtype: str = "fp32", *, device_map: str = "auto",
               max_memory: dict | None = None, offload_folder: str | Path | None = None,
               device: str = "cpu", load: Callable | None = None):
    """Load a checkpoint for inference with accelerate's big-model placement.

    Args:
        path: a model directory (``from_pretrained`` form).
        dtype: ``fp32``/``bf16``/``fp16`` weights, or ``int8`` — LLM.int8() through
            ``BitsAndBytesConfig(load_in_8bit=True)``: linear weights stored in int8 (half of
            bf16), outlier features kept in 16-bit, compute in fp16/bf16 — or ``nf4`` — QLoRA's
            4-bit NormalFloat through ``BitsAndBytesConfig(load_in_4bit=True,
            bnb_4bit_quant_type="nf4")``: a quarter of bf16 (plus one scale per 64 weights),
            dequantized to the compute dtype (bf16 on GPU, fp32 on CPU) inside every matmul.
        device_map: see :func:`plan_device_map`; ``none`` puts the whole model on ``device``.
        max_memory: per-device caps, e.g. ``{0: "30GiB", "cpu": "100GiB"}``; whatever does not
            fit goes to the next device, then to CPU, then to ``offload_folder`` on disk.
        offload_folder: where disk-offloaded weights live (safetensors checkpoints are read in
            place, other formats are written there as numpy memmaps).
        device: ``cpu`` or ``cuda``: where compute happens (and the compute dtype of int8/nf4).
        load: ``load(path, dtype, device_map, max_memory, offload_folder, device)`` that makes
            the ``from_pretrained`` call itself (``recipes/accelerate_inference.py`` passes its
            own); default :func:`from_pretrained_kwargs` — the same call, tested equal.

    Example:
        >>> import tempfile
        >>> from bloomkit import models
        >>> model = load_model(models.resolve_model("tiny"), "fp32", max_memory={"cpu": "490KiB"},
        ...                    offload_folder=tempfile.mkdtemp())   # what does not fit goes to disk
        >>> sorted(set(model.hf_device_map.values()))
        ['cpu', 'disk']
    """
    from transformers import AutoModelForCausalLM

    _quiet()
    if device_map not in DEVICE_MAPS:
        raise UserError(f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    if dtype in ("int8", "nf4"):
        check_int8_backend(device)
    if max_memory:
        import torch

        gpus = [k for k in max_memory if isinstance(k, int)]
        if gpus and max(gpus) >= torch.cuda.device_count():
            raise UserError(f"--max_memory names GPU {max(gpus)} but {torch.cuda.device_count()} "
                            "GPU(s) are visible; name only visible GPUs (0..N-1) or only cpu")
    folder = check_offload_folder(offload_folder)
    folder = str(folder) if folder is not None else None
    try:
        if load is not None:
            model = load(str(path), dtype, device_map, max_memory, folder, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_kwargs(
                dtype, device_map, max_memory, folder, device))
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        if "offload" in msg.lower() or "disk" in msg.lower():
            raise UserError(f"the model does not fit in --max_memory and no --offload_folder was "
                            f"given; raise --max_memory or pass --offload_folder DIR ({msg[:120]})") from None
        raise
    if dtype == "nf4" and device == "cpu":
        unfused_4bit_layers(model)
    return model.eval()


def from_pretrained_kwargs(dtype: str = "fp32", device_map: str = "auto", max_memory: dict | None = None,
                           offload_folder: str | None = None, device: str = "cpu") -> dict:
    """The keyword arguments of ``from_pretrained`` for :func:`load_model` (no checks)."""
    import torch
    from transformers import BitsAndBytesConfig

    from ..dtypes import torch_dtype

    kwargs: dict = {"device_map": device_map, "max_memory": max_memory,
                    "offload_folder": offload_folder}
    if device_map == "none":
        kwargs["device_map"] = {"": "cpu" if device == "cpu" else 0}
    elif device_map != "auto" and device == "cpu" and max_memory and not any(
            isinstance(k, int) for k in max_memory):
        # Without GPUs, 'balanced' maps have nothing to balance: place sequentially over cpu,
        # then disk.
        kwargs["device_map"] = "sequential"
    if dtype == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float16 if device == "cuda" else torch.float32
    elif dtype == "nf4":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
    else:
        kwargs["dtype"] = torch_dtype(dtype)
    return kwargs


@dataclass(frozen=True)
class AccelSetup:
    """What :func:`prepare` checked and resolved: everything :func:`load` needs."""

    path: Path                       # the model directory
    device: str                      # cpu / cuda: where compute happens
    dtype: str                       # fp32 / bf16 / fp16 / int8 / nf4
    device_map: str = "auto"
    max_memory: dict | None = None   # parsed: {0: "30GiB", "cpu": "100GiB"}
    offload_folder: str | None = None
    base_prompts: list | None = None  # --prompts_file, or the model's own prompts
    budget: int | None = None        # --memory_budget in bytes


def add_flags(parser) -> None:
    """Accelerate's own flags (the server's ``--strategy accelerate``; the recipe declares the
    same three itself, so that it runs without the package)."""
    g = parser.add_argument_group("accelerate")
    g.add_argument("--device_map", choices=DEVICE_MAPS, default="auto",
                   help="how modules are placed on GPUs, CPU and disk; balanced_low_0 keeps GPU 0 "
                        "light for generate; none puts the whole model on one device")
    g.add_argument("--max_memory", default=None,
                   help="per-device caps as device=size pairs, e.g. 0=30GiB,1=70GiB,cpu=100GiB")
    g.add_argument("--offload_folder", default=None,
                   help="directory for weights that fit neither the GPUs nor --max_memory cpu")


def prepare(args) -> AccelSetup:
    """Check the flags and the model's files, in the order a user should fix them, before
    anything is loaded.

    Args:
        args: parsed flags: the shared ones (:func:`bloomkit.cli.common_parser`) and
            :func:`add_flags`' (``device_map``, ``max_memory``, ``offload_folder``).

    Example:
        >>> from bloomkit import cli
        >>> p = cli.common_parser("x"); add_flags(p)
        >>> setup = prepare(p.parse_args(["--name", "tiny", "--max_memory", "cpu=1GiB"]))
        >>> setup.max_memory, setup.dtype
        ({'cpu': '1GiB'}, 'fp32')
    """
    from ..cli import prepare as prepare_shared

    if getattr(args, "compile", False) and (args.offload_folder or args.max_memory
                                            or args.dtype in ("int8", "nf4")):
        raise UserError("--compile needs the whole model in one device's memory with plain weights; "
                        "drop --compile, or --max_memory/--offload_folder and int8")
    max_memory = parse_max_memory(args.max_memory)
    check_offload_folder(args.offload_folder)
    s = prepare_shared(args)
    return AccelSetup(path=Path(s["path"]), device=s["device"], dtype=s["dtype"],
                      device_map=args.device_map, max_memory=max_memory,
                      offload_folder=args.offload_folder, base_prompts=s["base_prompts"],
                      budget=s["budget"])


def load(setup: AccelSetup, load_fn: Callable | None = None):
    """The model :func:`prepare` planned, through :func:`load_model` (``load_fn``: a recipe's
    own ``from_pretrained`` call, see there)."""
    return load_model(setup.path, setup.dtype, device_map=setup.device_map,
                      max_memory=setup.max_memory, offload_folder=setup.offload_folder,
                      device=setup.device, load=load_fn)


def run(args, load_fn: Callable | None = None, load_assistant: Callable | None = None) -> list[dict]:
    """``recipes/accelerate_inference.py`` inside the repository: :func:`prepare`, then
    :func:`bloomkit.measure.bench.run_recipe` (records, ``--verify``, sweeps, ``--compile``)
    loading through the recipe's own ``load_fn`` wrapped in the package's checks; with
    ``--assistant_model`` / ``--prompt_lookup``, speculative decoding
    (:class:`bloomkit.strategies.speculative.Speculation`, the draft loaded by the recipe's
    ``load_assistant``)."""
    from .. import models
    from ..measure import bench
    from .speculative import Speculation

    setup = prepare(args)
    spec = Speculation(args, load_assistant)
    options = {"device_map": args.device_map, "max_memory": args.max_memory,
               "offload_folder": args.offload_folder}
    if spec.active:
        options["speculative"] = spec.stats

    def loaded(path, dtype, device):
        model = load(setup, load_fn)
        spec.attach(model, models.load_tokenizer(path))
        return model

    return bench.run_recipe(args, strategy="accelerate", options=options, load=loaded,
                            generate_fn=spec.generate if spec.active else None)
