"""The result record: one JSON object per run, shared by every strategy.

Fields (all strategies): ``strategy, model, dtype, world_size, batch_size, max_new_tokens,
cycles, status`` (``ok`` or ``oom``), ``load_seconds, ms_per_token, cycle_seconds,
peak_rss_bytes, peak_rss_method, cuda_max_allocated_bytes, prompts`` (input text of each row), ``tokens``
(new token ids of each row, prompt excluded), ``texts, options`` (strategy flags),
``quality`` (agreement with a reference, when measured), ``hardware, versions, created``.

Files are written atomically (temporary file + rename): an interrupted run never
leaves a half-written record behind.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from . import sysinfo
from .errors import UserError

OOM = "oom"


def make_record(*, strategy: str, model: str, dtype: str, batch_size: int, max_new_tokens: int,
                load_seconds: float | None, timing=None, generation=None, world_size: int = 1,
                cycles: int | None = None, options: dict | None = None, quality: dict | None = None,
                status: str = "ok", error: str | None = None) -> dict:
    gen = generation if generation is not None else (timing.generation if timing else None)
    rec = {
        "strategy": strategy, "model": model, "dtype": dtype, "world_size": world_size,
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "cycles": cycles,
        "status": status, "load_seconds": load_seconds,
        "ms_per_token": timing.ms_per_token if timing else (OOM if status == OOM else None),
        "cycle_seconds": timing.cycle_seconds if timing else None,
        "peak_rss_bytes": timing.peak_rss_bytes if timing else None,
        # "kernel": Linux's exact high-water mark; "sampled": RSS read every 20 ms (the fallback)
        "peak_rss_method": getattr(timing, "peak_rss_method", None) if timing else None,
        "cuda_max_allocated_bytes": timing.cuda_max_allocated_bytes if timing else None,
        # the blog's metric mixes these: prefill (time to first token) and the decode steps
        "ttft_ms": timing.ttft_ms if timing else None,
        "decode_ms_per_token": (timing.decode_ms_per_step / batch_size
                                if timing and timing.decode_ms_per_step is not None else None),
        "warmup_seconds": timing.warmup_seconds if timing else None,
        "recompiles": timing.recompiles if timing else None,
        "prompts": gen.prompts if gen else None,
        "tokens": gen.tokens if gen else None,
        "texts": gen.texts if gen else None,
        "options": options or {}, "quality": quality,
        "hardware": sysinfo.hardware(), "versions": sysinfo.versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if error:
        rec["error"] = error
    return rec


def check_writable(path: str | Path | None, flag: str = "--json_out") -> None:
    """Fail *before* the expensive work if the result file cannot be written.

    Probes by creating (and removing) a temporary file in the target's folder, or a
    temporary folder in its nearest existing ancestor when the folder does not exist yet
    (``write_json`` creates it later): nothing is left behind, and it is the truth even for
    root, for whom permission bits say little (``/proc``, read-only mounts)."""
    if path is None:
        return
    fix = f"pass {flag} a path in a writable directory"
    try:
        target = Path(path).expanduser().resolve()
        is_dir = target.is_dir()
        parent = ancestor = target.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        ancestor_is_dir = ancestor.is_dir()
    except (OSError, RuntimeError) as exc:  # e.g. a folder on the way that we may not enter
        raise UserError(f"cannot use {flag} {path} ({getattr(exc, 'strerror', None) or exc}); "
                        f"{fix}") from None
    if is_dir:
        raise UserError(f"{flag} {path} is a directory; pass a file name such as "
                        f"{Path(path) / 'result.json'}")
    if not ancestor_is_dir:
        raise UserError(f"cannot write {flag} {path}: {ancestor} is a file, not a "
                        f"directory; {fix}")
    try:
        if ancestor == parent:
            fd, tmp = tempfile.mkstemp(prefix=".bloomkit-probe.", dir=parent)
            os.close(fd)
            os.unlink(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".bloomkit-probe.", dir=ancestor))
    except OSError as exc:
        what = "write to" if ancestor == parent else f"create {parent} in"
        raise UserError(f"cannot {what} {ancestor} for {flag} {path} "
                        f"({exc.strerror or exc}); {fix}") from None


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as JSON atomically (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def append_jsonl(path: str | Path, records) -> Path:
    """Append records to a JSON-lines file (rewritten atomically)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    new = "".join(json.dumps(r) + "\n" for r in (records if isinstance(records, list) else [records]))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(old + new)
    os.replace(tmp, path)
    return path


def read_records(path: str | Path) -> list[dict]:
    """Records from a ``.json`` file (one record or a list) or a ``.jsonl`` file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    obj = json.loads(text)
    return obj if isinstance(obj, list) else [obj]


def to_frame(records):
    """A pandas table, one row per record, with the columns a reader compares."""
    import pandas as pd

    rows = []
    for r in records:
        rows.append({
            "strategy": r["strategy"], "model": r["model"], "dtype": r["dtype"],
            "world_size": r["world_size"], "batch_size": r["batch_size"],
            "new_tokens": r["max_new_tokens"], "status": r["status"],
            "load_s": r["load_seconds"], "ms_per_token": r["ms_per_token"],
            "peak_rss_MiB": None if r.get("peak_rss_bytes") is None else r["peak_rss_bytes"] / 2**20,
            **{k: v for k, v in (r.get("options") or {}).items() if isinstance(v, (str, int, float))},
        })
    return pd.DataFrame(rows)


def blog_table(records, index="strategy"):
    """The blog's layout: ms/token by strategy (rows) x batch size (columns), ``oom`` cells."""
    df = to_frame(records)
    cell = df["ms_per_token"].map(lambda v: OOM if v == OOM else (None if v is None else round(float(v), 3)))
    df = df.assign(cell=cell)
    return df.pivot_table(index=index, columns="batch_size", values="cell", aggfunc="first")


def plot_ms_per_token(records, ax=None, label_key="strategy"):
    """ms/token against batch size, one line per ``label_key``; ``oom`` points are left out.

    Each point is the median of its timed cycles, its error bar the fastest and the slowest
    cycle (:func:`ms_spread`, the range the tables print); a record
    without timed cycles gets no bar.

    Example:
        >>> rec = {"strategy": "accelerate", "batch_size": 1, "status": "ok", "ms_per_token": 2.0,
        ...        "cycle_seconds": [0.9, 1.0, 1.2], "options": {}}
        >>> fig, (ax,) = figure(1)
        >>> plot_ms_per_token([rec], ax=ax).containers[0]
        <ErrorbarContainer object of 3 artists>
    """
    import matplotlib.pyplot as plt


    ax = ax or plt.subplots(figsize=(6, 4))[1]
    groups: dict[str, list] = {}
    for r in records:
        label = r.get(label_key) if label_key in r else r["options"].get(label_key)
        groups.setdefault(str(label), []).append(r)
    for label, rs in groups.items():
        pts = sorted(((r["batch_size"], r["ms_per_token"], ms_spread(r)) for r in rs
                      if r["status"] == "ok" and isinstance(r["ms_per_token"], (int, float))),
                     key=lambda p: p[:2])
        if pts:
            ys = [p[1] for p in pts]
            spread = [[y - (p[2] or (y, y))[0] for y, p in zip(ys, pts)],
                      [(p[2] or (y, y))[1] - y for y, p in zip(ys, pts)]]
            ax.errorbar([p[0] for p in pts], ys, yerr=spread, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per token (lower is better)\nmedian; bars: fastest to slowest cycle")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return ax


def plot_step_breakdown(rows: list[dict], ax=None, title: str | None = None):
    """Where a decode step's time goes, eager beside compiled: per batch size two stacked bars,
    the linear layers alone (the matrix kernels) and the rest of the step (attention, norms,
    activations, dispatch), with the weights' memory bound as a dashed mark.

    Args:
        rows: :func:`bloomkit.microbench.compile_speedup` rows (``eager_step_ms``,
            ``compiled_step_ms``, ``linears_ms``, ``memory_bound_ms``, ``batch_size``); their
            ``*_step_samples_ms``, when kept, become error bars (fastest to slowest call).
        ax: the Axes to draw on (a new figure's when ``None``).
        title: the Axes' title.

    A step shorter than its linears' single timing (noise on a busy machine) is drawn as
    linears only, capped at the step.

    Example:
        >>> row = {"batch_size": 1, "eager_step_ms": 10.0, "compiled_step_ms": 7.0, "linears_ms": 6.0,
        ...        "memory_bound_ms": 4.0, "compiled_step_samples_ms": [6.8, 7.0, 7.5]}
        >>> fig, (ax,) = figure(1)
        >>> [float(b.get_height()) for b in plot_step_breakdown([row], ax=ax).patches]   # linears, rest; twice
        [6.0, 4.0, 6.0, 1.0]
    """
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.subplots(figsize=(7, 4))[1]
    vary = [k for k in ("model", "dtype") if len({r.get(k) for r in rows}) > 1]   # named under each bar
    ticks, names = [], []
    for i, r in enumerate(rows):
        group = " ".join([f"batch {r['batch_size']}", *(str(r.get(k)) for k in vary)])
        for j, (side, rest_color) in enumerate((("eager", "tab:orange"), ("compiled", "tab:green"))):
            x, step = 3 * i + j, r[f"{side}_step_ms"]
            lin = min(r["linears_ms"], step)
            ax.bar(x, lin, color="tab:blue", label="linears alone (matrix kernels)" if i == j == 0 else None)
            ax.bar(x, step - lin, bottom=lin, color=rest_color,
                   label=f"rest of the {side} step" if i == 0 else None)
            samples = r.get(f"{side}_step_samples_ms")
            if samples:
                ax.errorbar(x, step, yerr=[[step - min(samples)], [max(samples) - step]], color="black",
                            capsize=3, label="fastest to slowest call" if i == j == 0 else None)
            ax.annotate(f"{step:.1f}", (x, max([step, *(samples or [])])), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=8)
            ticks.append(x)
            names.append(f"{side}\n{group}")
        ax.hlines(r["memory_bound_ms"], 3 * i - 0.45, 3 * i + 1.45, colors="black", linestyles="--",
                  label="memory bound (weights / bandwidth)" if i == 0 else None)
    ax.set_xticks(ticks, names, fontsize=8)
    ax.set_ylabel("ms per decode step (median)")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def figure(panels: int, width: float = 6.0, height: float = 4.0, columns: int = 3):
    """A matplotlib figure of ``panels`` Axes (``columns`` to a row), drawn by the Agg backend
    (no display, no pyplot state: what a script saving a PNG needs).  Returns ``(fig, axes)``.

    Example:
        >>> fig, axes = figure(2)
        >>> png = save_png(fig, "out.png")
        >>> png.read_bytes()[:4]
        b'\\x89PNG'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(panels, columns))
    rows = -(-max(panels, 1) // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def plot_bars(ax, groups: list, series: dict[str, list], ylabel: str,
              spread: dict[str, list] | None = None, log: bool = False, title: str | None = None):
    """Grouped bars: one group per entry of ``groups``, one bar per ``series`` name in it.

    Args:
        ax: the Axes to draw on.
        groups: the group labels (x axis), e.g. ``["batch 1", "batch 8"]``.
        series: name -> one value per group (``None``: no bar).
        ylabel: the y axis' label.
        spread: name -> one ``(low, high)`` per group (or ``None``), drawn as error bars.
        log: a logarithmic y axis.
        title: the Axes' title.

    Example:
        >>> fig, (ax,) = figure(1)
        >>> ax = plot_bars(ax, ["batch 1", "batch 8"], {"eager": [10, 3], "compiled": [8, None]}, "ms")
        >>> len(ax.patches)
        3
    """
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.bar(xs, ys, width, label=name)
        ranges = [sp for sp, v in zip((spread or {}).get(name) or [None] * len(values), values) if v is not None]
        if any(ranges):
            err = [[y - (r or (y, y))[0] for y, r in zip(ys, ranges)], [(r or (y, y))[1] - y for y, r in zip(ys, ranges)]]
            ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def save_png(fig, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` (its folder created), written atomically like the JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def add_plot_flags(parser, default_json: str) -> None:
    """``--plot PATH`` and ``--from JSON`` for a benchmark script (see benchmarks/README.md)."""
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also draw the results as a PNG at this path, from the JSON just written "
                             "(or from --from's file without running anything) (default: no picture)")
    parser.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                        help=f"redraw a recorded result file (e.g. {default_json}) instead of running "
                             "the benchmark; needs --plot (default: run and measure now)")


def check_plot_flags(args) -> dict | None:
    """Validate ``--plot``/``--from`` before any work; returns ``--from``'s JSON (``None`` to run)."""
    if args.from_json and not args.plot:
        raise UserError(f"--from {args.from_json} only redraws a recorded file; add --plot out.png")
    check_writable(args.plot, "--plot")
    if not args.from_json:
        return None
    try:
        return json.loads(Path(args.from_json).read_text())
    except FileNotFoundError:
        raise UserError(f"--from {args.from_json}: no such file; pass a result file such as "
                        f"those in benchmarks/results/") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--from {args.from_json} is not a readable JSON result file ({exc}); "
                        f"pass one that the benchmark wrote") from None


def _label(r: dict, label_key: str) -> str:
    return str(r.get(label_key) if label_key in r else r["options"].get(label_key, r["strategy"]))


def quality_table(records, label_key: str = "variant"):
    """What each variant's output costs in quality, one row per variant (its first verified
    record): held-out perplexity beside the fp32 reference's and the change in percent (on
    real text; only a trained model gives meaningful values), token agreement with plain fp32
    ``generate``, teacher-forced top-1 agreement and the relative RMS logit error."""
    import pandas as pd

    rows, seen = [], set()
    for r in records:
        q, label = r.get("quality"), _label(r, label_key)
        if not q or label in seen or "teacher_forced_top1" not in q:
            continue
        seen.add(label)
        ppl, ref = q.get("perplexity"), q.get("reference_perplexity")
        rows.append({label_key: label, "dtype": r["dtype"], "perplexity": ppl, "fp32 perplexity": ref,
                     "perplexity change %": (ppl / ref - 1) * 100 if ppl and ref else None,
                     "perplexity resolution": q.get("perplexity_resolution"),
                     "token match": q["token_match"], "teacher-forced top-1": q["teacher_forced_top1"],
                     "logit rel. RMS error": q["logit_rel_rms_err"]})
    return pd.DataFrame(rows).set_index(label_key) if rows else pd.DataFrame()


def completions(records, label_key: str = "variant", rows: int = 1, width: int = 80):
    """Prompt -> completion, ``rows`` per variant (from its first record), one line each
    (newlines shown as ⏎, cut at ``width`` characters): what a reader would see."""
    import pandas as pd

    out, seen = [], set()
    for r in records:
        label = _label(r, label_key)
        if r["status"] != "ok" or not r.get("texts") or label in seen:
            continue
        seen.add(label)
        for prompt, text in list(zip(r["prompts"], r["texts"]))[:rows]:
            out.append({label_key: label, "prompt": prompt.replace("\n", "⏎"),
                        "completion": text.replace("\n", "⏎")[:width]})
    return pd.DataFrame(out)


def ms_spread(record: dict) -> tuple[float, float] | None:
    """The lowest and highest ms/token of a record's timed cycles (``cycle_seconds``, scaled as
    its median ``ms_per_token`` is); ``None`` without timed cycles.

    Example:
        >>> ms_spread({"ms_per_token": 2.0, "cycle_seconds": [0.9, 1.0, 1.2]})
        (1.8, 2.4)
    """
    import statistics

    cyc = record.get("cycle_seconds") or []
    if record.get("status", "ok") != "ok" or not cyc or not isinstance(record.get("ms_per_token"), (int, float)):
        return None
    scale = record["ms_per_token"] / statistics.median(cyc)
    return (min(cyc) * scale, max(cyc) * scale)
