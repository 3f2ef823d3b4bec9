"""The one benchmark harness every strategy goes through (the blog's method).

* Prompts: the blog's 8 fixed prompts, repeated until there are ``batch_size`` of them.
* Decoding: greedy, KV cache on, exactly ``max_new_tokens`` new tokens per row (EOS is
  suppressed with ``min_new_tokens`` so every row does the same work).
* Throughput: wall time of the whole ``generate`` call *including tokenization*, divided
  by ``batch_size * max_new_tokens``, after one warm-up call, over ``cycles`` calls.
* Load: "start to ready" seconds, measured by the caller around its load step.
* Memory: the process's peak resident memory while generating (the kernel's high-water mark,
  see :class:`PeakRSS`), plus CUDA max allocated on GPUs.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import errors
from ..errors import UserError
from ..prompts import STANDARD_PROMPTS, make_prompts, read_prompts_file  # noqa: F401 (the harness's prompts)

def greedy_kwargs(max_new_tokens: int, tokenizer=None) -> dict:
    """``generate`` arguments for the blog's decoding: greedy, exactly N new tokens."""
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}; "
                        "pass --max_new_tokens 1 or more")
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              num_beams=1, use_cache=True)
    if tokenizer is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    return kw


@dataclass
class Generation:
    prompts: list[str]
    tokens: list[list[int]]          # new token ids per row, prompt excluded
    texts: list[str]                 # decoded new tokens per row
    scores: list | None = None       # per-step logits (only when asked for)
    step_times: list[float] | None = None  # seconds from the call's start to each new token


def _step_clock():
    """A ``generate`` streamer that only notes the time each new token arrives: the first
    ``put`` is the prompt, each later one a decode step.  The blog's metric (whole call ÷
    tokens) mixes the prompt pass (prefill, time to first token) with the decode steps; this
    keeps them apart at the cost of one clock read per step."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self):
            self.start, self.times, self._prompt = time.perf_counter(), [], True

        def put(self, value):
            if self._prompt:
                self._prompt = False
                return
            self.times.append(time.perf_counter() - self.start)

        def end(self):
            pass

    return StepClock()


def compile_kwargs(device: str = "cpu") -> dict:
    """``generate`` arguments that compile the decode step, the library's own way: a static
    KV cache (fixed shapes, allocated once for prompt + new tokens) and a ``CompileConfig``
    (``fullgraph``, no dynamic shapes; on CUDA ``reduce-overhead``, i.e. CUDA graphs that
    replay a whole step's kernel launches at once).  transformers compiles by itself only on
    CUDA; ``_compile_all_devices`` asks it to on the CPU too (inductor's C++ kernels)."""
    from transformers.generation.configuration_utils import CompileConfig

    cfg = CompileConfig(fullgraph=True, dynamic=False,
                        mode="reduce-overhead" if device == "cuda" else "default")
    cfg._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": cfg}


def check_compilable(model) -> None:
    """Refuse, in one line, a model the compiled decode step cannot take: weights that
    Accelerate streams in from CPU RAM or disk during ``forward`` (its hooks move tensors
    between devices, which a captured graph cannot replay), bitsandbytes-quantized weights
    (transformers skips compilation for them), or an architecture transformers does not
    compile full-graph."""
    from ..errors import UserError

    places = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in places or ("cpu" in places and len(places) > 1):
        raise UserError("--compile needs every weight in one device's memory, and this model is "
                        f"offloaded ({', '.join(sorted(places))}); drop --compile, or --max_memory/"
                        "--offload_folder so the model loads whole")
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise UserError("--compile cannot take bitsandbytes-quantized weights (transformers runs "
                        "them eagerly); drop --compile, or use --dtype bf16/fp32")
    if not getattr(model, "_can_compile_fullgraph", False):
        raise UserError(f"--compile: transformers cannot compile {type(model).__name__} full-graph "
                        "with a static cache; drop --compile for this model")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far: a timed cycle that raises it
    recompiled (a new shape or a guard that failed)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def input_device(model):
    """Where the inputs must go: the device of the embedding (first module of a device map)."""
    import torch

    dev = getattr(model, "device", None)
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map:
        first = next(iter(hf_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if first in ("cpu", "disk"):
            return torch.device("cpu")
        return torch.device(first)
    return dev if dev is not None else torch.device("cpu")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, device=None,
             return_scores: bool = False, **extra) -> Generation:
    """Tokenize (left-padded), greedy-generate exactly ``max_new_tokens``, detokenize."""
    import torch

    device = device if device is not None else input_device(model)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    kw = greedy_kwargs(max_new_tokens, tokenizer)
    kw.update(extra)
    if return_scores:
        kw.update(output_scores=True, return_dict_in_generate=True)
    clock = None
    if "streamer" not in kw:
        kw["streamer"] = clock = _step_clock()
    with torch.inference_mode():
        out = model.generate(**inputs, **kw)
    seqs = out.sequences if return_scores else out
    new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    scores = [s.float().cpu() for s in out.scores] if return_scores else None
    return Generation(prompts=list(prompts), tokens=new, texts=texts, scores=scores,
                      step_times=clock.times if clock else None)


# ---------------------------------------------------------------------------- peak memory
#
# Linux keeps, per process (all its threads share one address space), the high-water mark of
# its resident memory: ``VmHWM`` in /proc/self/status.  Writing ``5`` to /proc/self/clear_refs
# (Linux >= 4.0; the file belongs to the process's own user, no privilege needed, unless the
# process made itself non-dumpable, e.g. by changing its user) sets that mark back to what the
# process holds now, so "reset, run, read" gives the peak of the run, however short a spike
# was.  The kernel keeps its page counts per CPU and folds them in batches, so the mark can
# read a few hundred KiB low (up to 0.3 MiB measured on 2 cores); never a whole spike.  Where
# the mark cannot be reset, a thread samples RSS instead.

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
_OPEN: list[PeakRSS] = []   # kernel-measured blocks open in this process, from any thread
_OPEN_LOCK = threading.Lock()
_KERNEL_OK: bool | None = None   # None: not tried yet


def _status_bytes(key: str) -> int | None:
    """``key`` (``VmHWM``, ``VmRSS``) of ``/proc/self/status`` in bytes; ``None`` off Linux."""
    try:
        with open(STATUS, "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1]) * 1024   # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Set the kernel's high-water mark of this process's resident memory (``VmHWM``) to what
    the process holds now; ``False`` where the kernel does not allow it (not Linux, Linux
    before 4.0, a ``/proc`` that refuses the write; then it is not tried again).  Every
    :class:`PeakRSS` block still open keeps the mark it had seen (:class:`PeakRSS` explains
    why that matters).

    Example:
        >>> if reset_peak_rss():                        # Linux: VmHWM = VmRSS from here
        ...     buf = b"x" * (64 * 2**20); del buf      # a spike, gone at once
        ...     assert _status_bytes("VmHWM") >= _status_bytes("VmRSS") + 63 * 2**20
    """
    with _OPEN_LOCK:
        return _reset_locked()


def _reset_locked() -> bool:
    global _KERNEL_OK
    if _KERNEL_OK is False:
        return False
    hwm = _status_bytes("VmHWM")
    if hwm is None:
        _KERNEL_OK = False
        return False
    for block in _OPEN:        # what the open blocks have seen so far, before it is forgotten
        block._peak = max(block._peak, hwm)
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        _KERNEL_OK = False
        return False
    _KERNEL_OK = True
    return True


class PeakRSS:
    """Context manager: the peak resident memory of this process (all its threads) inside the
    block, ``.peak`` in bytes, and ``.method``, how it was measured:

    * ``"kernel"`` (Linux): the kernel's high-water mark, reset on entry
      (:func:`reset_peak_rss`) and read from ``VmHWM`` on exit: exact, a spike of a
      microsecond included;
    * ``"sampled"`` (the fallback where the mark cannot be reset, or ``kernel=False``): a
      thread reads RSS every ``interval`` seconds, so a spike shorter than that reads low or
      not at all (a 100 MiB buffer touched and freed at once read as 74-98 MiB at 20 ms).

    Blocks nest (a load measured inside a whole run) and overlap across threads: each reset
    first folds the mark into every block still open, and a block's peak is the largest of
    what was folded into it and its own reading on exit, so an inner block never hides the
    outer block's peak.  In a multi-process run each rank measures its own process.

    Args:
        interval: seconds between two samples of the fallback.
        kernel: use the kernel's mark where it can be reset (``False``: always sample).

    Example:
        >>> with PeakRSS() as rss:
        ...     buf = b"x" * (50 * 2**20)   # every page written
        ...     del buf
        >>> rss.peak >= 50 * 2**20, rss.method in ("kernel", "sampled")
        (True, True)
    """

    def __init__(self, interval: float = 0.02, kernel: bool = True):
        self.interval = interval
        self.kernel = kernel
        self.method: str | None = None
        self._peak = 0
        self._open = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak(self) -> int:
        """Bytes: the largest resident size so far (read live while the block runs)."""
        if self._open and self.method == "kernel":
            return max(self._peak, _status_bytes("VmHWM") or 0)
        return self._peak

    def _run(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak = max(self._peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        with _OPEN_LOCK:
            if self.kernel and _reset_locked():
                self.method = "kernel"
                self._peak = _status_bytes("VmHWM") or 0
                _OPEN.append(self)
                self._open = True
                return self
        import psutil

        self.method = "sampled"
        self._peak = psutil.Process().memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._open = True
        return self

    def __exit__(self, *exc):
        if self.method == "kernel":
            with _OPEN_LOCK:
                self._peak = max(self._peak, _status_bytes("VmHWM") or 0)
                _OPEN.remove(self)
                for block in _OPEN:   # the enclosing blocks lived through this one
                    block._peak = max(block._peak, self._peak)
        else:
            self._stop.set()
            self._thread.join()
            with _OPEN_LOCK:
                for block in _OPEN:
                    block._peak = max(block._peak, self._peak)
        self._open = False
        return False


def cuda_sync():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class Timing:
    cycle_seconds: list[float]
    ms_per_token: float
    peak_rss_bytes: int
    cuda_max_allocated_bytes: int | None
    generation: Generation = field(repr=False)
    warmup_seconds: float | None = None      # the untimed first call (compilation happens here)
    ttft_ms: float | None = None             # time to first token: tokenize + prefill (median)
    decode_ms_per_step: float | None = None  # one decode step for the whole batch (median)
    recompiles: int = 0                      # graphs compiled during the timed cycles
    peak_rss_method: str | None = None       # "kernel" (exact high-water mark) or "sampled"


def _split(gens: list, batch_size: int) -> tuple[float | None, float | None]:
    """Median time to first token (ms) and median decode step (ms) over the cycles."""
    ttft, steps = [], []
    for g in gens:
        t = getattr(g, "step_times", None) or []
        if t:
            ttft.append(t[0] * 1e3)
        if len(t) > 1:
            steps.append((t[-1] - t[0]) * 1e3 / (len(t) - 1))
    return (statistics.median(ttft) if ttft else None, statistics.median(steps) if steps else None)


def time_generation(run: Callable[[], Generation], *, batch_size: int, max_new_tokens: int,
                    cycles: int = 5, warmup: int = 1, progress: bool = False) -> Timing:
    """The blog's timing: ``warmup`` untimed calls, then ``cycles`` timed calls.

    ``run`` must do the whole request (tokenize, generate, detokenize).  The result's
    ``ms_per_token`` is the *median* cycle time / (batch * new tokens); all cycle times
    are kept so a reader can see the spread.
    """
    import torch

    if cycles <= 0:
        raise UserError(f"cycles must be positive, got {cycles}; pass --cycles 1 or more")
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = None
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for _ in range(warmup):
            gen = run()
        cuda_sync()
        warm = time.perf_counter() - t0 if warmup else None
        graphs = compiled_graphs()
        times, gens = [], []
        it = range(cycles)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"bs={batch_size}", leave=False)
        for _ in it:
            cuda_sync()
            t0 = time.perf_counter()
            gen = run()
            cuda_sync()
            times.append(time.perf_counter() - t0)
            gens.append(gen)
    per_token = statistics.median(times) * 1000.0 / (batch_size * max_new_tokens)
    ttft, step = _split(gens, batch_size)
    return Timing(cycle_seconds=times, ms_per_token=per_token, peak_rss_bytes=rss.peak,
                  peak_rss_method=rss.method,
                  cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                  generation=gen, warmup_seconds=warm, ttft_ms=ttft, decode_ms_per_step=step,
                  recompiles=compiled_graphs() - graphs)


class LoadTimer:
    """``with LoadTimer() as t: model = load(...)`` -> ``t.seconds`` ("start to ready")."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        cuda_sync()
        self.seconds = time.perf_counter() - self._t0
        return False


is_oom = errors.is_oom   # a batch size that ran out of memory (bench records it as "oom")
