"""The report ``make run`` leaves behind: ``report.md``, ``report.png`` and ``report.html``.

:func:`write_report` reads the result records of a ``runs/<profile>/`` directory
(``results.jsonl``, and the per-notebook ``NN_*.jsonl`` files the runner keeps) and writes

* ``report.md`` — the blog-style table (ms/token by strategy × batch size, ``oom`` cells),
  load times, peak memory, agreement with plain ``generate``, the roofline (bound and
  efficiency per strategy and batch size, from speeds measured on this machine), and the
  blog's published 8×A100 numbers, labelled as *published, not measured here*;
* ``report.png`` — measured ms/token (with the roofline bound) next to the blog's curves;
* ``report.html`` — the same Markdown rendered, with the PNG embedded, readable offline.

The blog's figures below are reference data copied from the post (see
``shared/anchor-notes.md``); nothing in this project measures them.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from . import roofline

from .. import results, sysinfo
from ..results import ms_spread  # noqa: F401 (the notebooks call report.ms_spread beside with_spread)

PUBLISHED = "published, not measured here"
BLOG_SOURCE = ("HF blog 'Incredibly Fast BLOOM Inference with DeepSpeed and Accelerate' (2022), "
               "BLOOM-176B, 100 new tokens, greedy")

# ms per token on 8x80GB A100 (published, not measured here); "oom" = out of memory
BLOG_8XA100_MS_PER_TOKEN = {
    "accelerate bf16": {1: 230.38, 8: 31.78, 16: 17.84, 32: 10.89, 64: "oom"},
    "accelerate int8": {1: 286.56, 8: 40.92, 16: 22.65, 32: 13.27, 64: "oom"},
    "ds-inference fp16": {1: 44.02, 8: 5.70, 16: 3.01, 32: 1.68, 64: 1.00, 128: 0.69, 256: "oom"},
    "ds-inference int8": {1: 89.09, 8: 11.44, 16: 5.88, 32: 3.09, 64: 1.71, 128: 1.02, 256: 0.71,
                          512: "oom"},
    "ds-zero bf16": {1: 283, 8: 34.88, 16: "oom"},
}
# ms per token on 4x80GB A100, int8 (published, not measured here)
BLOG_4XA100_MS_PER_TOKEN = {
    "accelerate int8": {1: 284.15, 8: 40.14, 16: 21.97, 32: "oom"},
    "ds-inference int8": {1: 156.51, 8: 20.11, 16: 10.38, 32: 5.50, 64: 2.96, 128: "oom"},
}
# "start to ready to generate", seconds, 8x A100 (published, not measured here)
BLOG_LOAD_SECONDS = {
    "accelerate": 121, "ds-inference, pre-sharded int8": 61, "ds-inference, pre-sharded fp16": 60,
    "ds-inference, unsharded": 662, "ds-zero": 462,
}


def blog_frame(table: dict | None = None):
    """A published table as a DataFrame (set-up × batch size), for display beside ours."""
    import pandas as pd

    table = BLOG_8XA100_MS_PER_TOKEN if table is None else table
    df = pd.DataFrame(table).T
    df = df[sorted(df.columns)]
    df.index.name = f"set-up ({PUBLISHED})"
    return df.astype(object).where(df.notna(), "")


def with_spread(record: dict, digits: int = 2) -> str:
    """``"4.04 (3.90-4.21 over 5 cycles)"``: a record's ms/token with its cycles' range."""
    sp = ms_spread(record)
    if sp is None:
        return str(record.get("ms_per_token"))
    n = len(record["cycle_seconds"])
    if n == 1:
        return f"{record['ms_per_token']:.{digits}f} (1 cycle)"
    return f"{record['ms_per_token']:.{digits}f} ({sp[0]:.{digits}f}-{sp[1]:.{digits}f} over {n} cycles)"


def with_labels(records: list[dict]) -> list[dict]:
    """Copies of ``records`` whose options carry ``label`` (see :func:`roofline.label`)."""
    out = []
    for r in records:
        r = dict(r)
        r["options"] = {**(r.get("options") or {}), "label": roofline.label(r)}
        out.append(r)
    return out


def comparison_table(records, spread: bool = True):
    """ms/token by set-up (rows) × batch size (columns), ``oom`` cells — the blog's layout; with
    ``spread`` each cell is the median and the range of its timed cycles, ``"4.04 (3.90-4.21)"``."""
    import pandas as pd

    if not spread:
        return results.blog_table(with_labels(records), index="label").rename_axis("setup")
    cells: dict = {}
    for r in with_labels(records):
        row = cells.setdefault(r["options"]["label"], {})
        if r["batch_size"] in row:
            continue
        sp = ms_spread(r)
        if r["status"] != "ok" or not isinstance(r.get("ms_per_token"), (int, float)):
            row[r["batch_size"]] = str(r.get("ms_per_token") or r["status"])
        else:
            row[r["batch_size"]] = f"{fmt(round(r['ms_per_token'], 3))}" + (
                f" ({fmt(round(sp[0], 3))}-{fmt(round(sp[1], 3))})" if sp and len(r["cycle_seconds"]) > 1 else "")
    df = pd.DataFrame.from_dict(cells, orient="index")
    return df[sorted(df.columns)].rename_axis("setup")


def details_table(records):
    """Per variant: load time, peak memory, agreement with plain ``generate``."""
    import pandas as pd

    rows = {}
    for r in with_labels(records):
        lab = r["options"]["label"]
        row = rows.setdefault(lab, {"model": r["model"], "world_size": r["world_size"], "load_s": None,
                                    "start_to_ready_s": None, "peak_rss_MiB": None, "peak_gpu_MiB": None,
                                    "identical": None})
        if r.get("load_seconds") is not None:   # the load call alone, inside a running process
            row["load_s"] = round(float(r["load_seconds"]), 2)
        if r.get("process_start_to_ready_s") is not None:   # from the process's start: imports included
            row["start_to_ready_s"] = round(float(r["process_start_to_ready_s"]), 2)
        for key, col in (("peak_rss_bytes", "peak_rss_MiB"), ("cuda_max_allocated_bytes", "peak_gpu_MiB")):
            peaks = [p for p in (r.get(f"{key}_per_rank") or [r.get(key)]) if p]   # the highest rank's
            if peaks:
                row[col] = max(row[col] or 0, round(max(peaks) / 2**20, 1))
        q = r.get("quality") or {}
        if "identical" in q:
            row["identical"] = bool(q["identical"]) if row["identical"] is None else row["identical"] and q["identical"]
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("setup")


def fmt(v, floatfmt: str = "{:.3g}") -> str:
    """One table cell: 3 significant digits, whole numbers with thousands separators from 100
    up (``1,234`` rather than ``1.23e+03``), empty for missing values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        if floatfmt == "{:.3g}" and abs(v) >= 100:
            return f"{v:,.0f}"
        return floatfmt.format(v)
    return str(v).replace("|", "\\|")


def md_table(df, index: bool = True, floatfmt: str = "{:.3g}") -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    head = ([str(df.index.name or "")] if index else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        vals = ([fmt(idx, floatfmt)] if index else []) + [fmt(v, floatfmt) for v in row.tolist()]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _percent(df, cols=("efficiency", "memory_eff", "compute_eff")):
    df = df.copy()
    for c in cols:
        df[c] = df[c].map(lambda v: "" if v is None or v != v else f"{v:.1%}")
    return df


def _notebook_records(out_dir: Path) -> dict[str, list[dict]]:
    return {p.stem: results.read_records(p) for p in sorted(out_dir.glob("[0-9][0-9]_*.jsonl"))}


def _same_machine(records) -> bool:
    here = sysinfo.hardware()
    seen = {json.dumps({k: (r.get("hardware") or {}).get(k) for k in ("cpu", "gpus")}, sort_keys=True)
            for r in records}
    return seen == {json.dumps({k: here.get(k) for k in ("cpu", "gpus")}, sort_keys=True)}


def _device(records) -> str:
    return "cuda" if any(r.get("cuda_max_allocated_bytes") for r in records) else "cpu"


def plot(records, roof=None, path: str | Path | None = None):
    """Measured ms/token (with the roofline bound, dashed) beside the blog's published curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in records if r["status"] == "ok"]
    if roof is not None and len(roof):
        roofline.plot(roof, ax=ax1)
        ax1.set_title("measured here (markers) vs roofline bound (dashed)")
    elif ok:
        results.plot_ms_per_token(with_labels(ok), ax=ax1, label_key="label")
        ax1.set_title("measured here")
    else:
        ax1.text(0.5, 0.5, "no successful runs", ha="center", va="center")
    hw = (records[0].get("hardware") or {}) if records else {}
    gpus = hw.get("gpus") or []
    where = f"{len(gpus)}x {gpus[0]['name']}" if gpus else f"{hw.get('cpu', 'CPU')} ({hw.get('cpu_cores')} cores)"
    ax1.set_xlabel(f"batch size — {where}")
    for name, pts in BLOG_8XA100_MS_PER_TOKEN.items():
        xy = sorted((b, v) for b, v in pts.items() if v != "oom")
        ax2.plot([p[0] for p in xy], [p[1] for p in xy], "s:", label=name)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("batch size — BLOOM-176B on 8x80GB A100")
    ax2.set_ylabel("ms per token")
    ax2.set_title(f"the blog's numbers ({PUBLISHED})")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def _markdown(profile: str, records, per_nb, roof, machine, summary) -> str:
    main = per_nb.get("04_comparison") or records
    src = "04_comparison" if per_nb.get("04_comparison") else "all notebooks"
    lines = [f"# Run report: `{profile}`", ""]
    hw = (records[0].get("hardware") or {}) if records else {}
    ver = (records[0].get("versions") or {}) if records else {}
    if hw:
        gpus = ", ".join(g["name"] for g in hw.get("gpus") or []) or "none"
        lines += [f"Machine: {hw.get('cpu')} ({hw.get('cpu_cores')} cores, "
                  f"{(hw.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM), GPUs: {gpus}.  ",
                  "Libraries: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) + ".", ""]
    if summary:
        lines += ["Notebooks: " + ", ".join(f"{s['notebook']} {s['seconds']} s ({s['records']} records)"
                                            for s in summary.get("notebooks", [])) + ".", ""]
    if not records:
        return "\n".join(lines + ["No result records were found (results.jsonl is empty).", ""])
    lines += [f"## Comparison: ms per token (lower is better), from {src}", "",
              "Wall time of `generate` (tokenization included) ÷ (batch × new tokens), median of the "
              "timed cycles after one warm-up, and in brackets the fastest and slowest cycle; `oom` = did "
              "not fit. Set-ups were timed one after another, not in turns: where two ranges overlap, this "
              "table does not tell which is faster.", "",
              md_table(comparison_table(main)), "", "![ms per token](report.png)", "",
              "## Load time, peak memory, agreement with plain `generate`", "",
              "`load_s`: the load call alone, inside the running process; `start_to_ready_s`: from the "
              "process's start (interpreter, imports, process group, load) until the first token is possible.", "",
              md_table(details_table(main)), ""]
    if roof is not None and len(roof):
        lines += ["## Roofline: how close to the hardware limit", "",
                  f"Measured on this machine ({machine.measured}):", "", md_table(roofline.machine_table(machine)), "",
                  "Bound = the fastest a decode step can be (weights read once per step: memory; "
                  "2 × parameters FLOPs per row: compute; offload / all-reduce traffic: link), per token. "
                  "Efficiency = bound ÷ measured.", "",
                  md_table(_percent(roof[["setup", "batch_size", "measured_ms", "measured_range", "bound_ms", "limited_by",
                                          "efficiency", "memory_eff", "compute_eff"]]), index=False), ""]
    elif machine is None:
        lines += ["## Roofline", "", "Not computed: these records were measured on another machine "
                  "(the roofline needs that machine's bandwidth and matmul rate).", ""]
    if len(per_nb) > 1 or (per_nb and "04_comparison" not in per_nb):
        lines += ["## Every notebook's results", ""]
        for stem, recs in per_nb.items():
            if recs:
                lines += [f"### {stem}", "", md_table(comparison_table(recs)), ""]
    lines += [f"## Reference: the blog's numbers ({PUBLISHED})", "",
              f"Source: {BLOG_SOURCE}. BLOOM-176B on 8×80GB A100 — not this machine, not this model; "
              "shown for the shape of the curves, not for comparison of values.", "",
              md_table(blog_frame(BLOG_8XA100_MS_PER_TOKEN), floatfmt="{}"), "",
              f"4×80GB A100, int8 ({PUBLISHED}):", "", md_table(blog_frame(BLOG_4XA100_MS_PER_TOKEN), floatfmt="{}"), "",
              f"Load time to ready, seconds, 8×A100 ({PUBLISHED}): "
              + ", ".join(f"{k} {v}" for k, v in BLOG_LOAD_SECONDS.items()) + ".", ""]
    return "\n".join(lines)


def to_html(markdown_text: str, png: Path, title: str) -> str:
    """Render the report's Markdown (mistune, as nbconvert uses) with the PNG embedded."""
    import mistune

    body = mistune.create_markdown(plugins=["table"])(markdown_text)
    data = base64.b64encode(png.read_bytes()).decode()
    body = body.replace(f'src="{png.name}"',
                        f'id="plot" src="data:image/png;base64,{data}" '
                        'onload="this.setAttribute(\'data-width\', this.naturalWidth)"')
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
           "text-align:right}th{background:#eee}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n{body}\n</body></html>\n")


def write_report(out_dir: str | Path, machine: roofline.Machine | None = None,
                 measure: bool = True) -> dict:
    """Write ``report.md``, ``report.png`` and ``report.html`` into ``out_dir``.

    ``machine``: measured speeds for the roofline; by default the measurement notebook 04
    saved beside its records (``04_comparison.machine.json``), else measured now when the
    records were taken on this machine (``measure=False`` skips the roofline).
    Returns the paths written.
    """
    out_dir = Path(out_dir).resolve()
    res = out_dir / "results.jsonl"
    records = results.read_records(res) if res.exists() else []
    per_nb = _notebook_records(out_dir)
    if not records:
        records = [r for recs in per_nb.values() for r in recs]
    main = per_nb.get("04_comparison") or records
    saved = roofline.machine_path(out_dir / "04_comparison.jsonl")
    if machine is None and saved.exists():  # the measurement notebook 04 took beside its runs
        machine = roofline.load(saved)
    if machine is None and measure and main and _same_machine(main):
        dtypes = sorted({r["dtype"] for r in main})
        machine = roofline.measure(_device(main), dtypes=dtypes)
    roof = roofline.table(main, machine) if machine is not None and main else None
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    profile = (summary or {}).get("profile") or out_dir.name
    png = out_dir / "report.png"
    plot(main, roof, png)
    md = _markdown(profile, records, per_nb, roof, machine, summary)
    (out_dir / "report.md").write_text(md)
    html_path = out_dir / "report.html"
    html_path.write_text(to_html(md, png, f"bloomkit run report: {profile}"))
    return {"markdown": out_dir / "report.md", "png": png, "html": html_path}
