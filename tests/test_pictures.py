"""The pictures: every benchmark script's ``--plot`` draws a PNG from its recorded file in
benchmarks/results/ (redrawn without running anything), the ms-per-token chart carries the spread
of the timed cycles as error bars, and the decode step's breakdown draws eager beside compiled.
Fast: no benchmark runs, only the recorded numbers."""
import importlib.util
import json
import subprocess
import sys

import pytest
from matplotlib.container import ErrorbarContainer
from PIL import Image

from bloomkit import results
from bloomkit.measure.report import ms_spread
from conftest import ROOT

RECORDED = {"foundation": "foundation-cpu.json", "strategies": "strategies-cpu.json",
            "speculative": "speculative-cpu.json"}


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_plot", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_png(path, min_side: int = 300) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (im.format, im.size)
        assert len(im.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 8, "an empty picture"
    assert path.stat().st_size > 10_000, path.stat().st_size


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_each_benchmark_plot_draws_its_recorded_file(name, tmp_path):
    out = json.loads((ROOT / "benchmarks" / "results" / RECORDED[name]).read_text())
    png = script(name).plot(out, tmp_path / "sub" / f"{name}.png")
    assert png == tmp_path / "sub" / f"{name}.png"
    assert_png(png)


def test_plot_flag_redraws_a_recorded_file_without_running(tmp_path):
    recorded = ROOT / "benchmarks" / "results" / RECORDED["speculative"]
    before = recorded.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "benchmarks/speculative.py", "--plot", str(tmp_path / "s.png"),
                           "--from", str(recorded)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"saved {tmp_path / 's.png'}" in proc.stdout
    assert_png(tmp_path / "s.png")
    assert recorded.stat().st_mtime_ns == before


@pytest.mark.parametrize("argv, says", [
    (["--from", "benchmarks/results/foundation-cpu.json"], "add --plot"),
    (["--plot", "{tmp}/p.png", "--from", "{tmp}/missing.json"], "no such file"),
    (["--plot", "{tmp}/p.png", "--from", "{tmp}/bad.json"], "not a readable JSON"),
    (["--plot", "{tmp}/p.png", "--from", "{tmp}/other.json"], "nothing to draw"),
    (["--plot", "{tmp}", "--from", "benchmarks/results/foundation-cpu.json"], "is a directory"),
])
def test_bad_plot_flags_are_one_line(argv, says, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"rows": []}')
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "benchmarks/foundation.py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "p.png").exists()


def record(bs: int, ms: float, cycles: list[float], label: str = "eager") -> dict:
    return {"strategy": "accelerate", "batch_size": bs, "status": "ok", "ms_per_token": ms,
            "cycle_seconds": cycles, "options": {"variant": label}}


def test_ms_per_token_chart_draws_the_cycles_spread_as_error_bars(tmp_path):
    recs = [record(1, 2.0, [0.9, 1.0, 1.2]), record(8, 0.5, [1.9, 2.0, 2.6]),
            record(1, 1.5, [0.7, 0.75, 0.8], "compiled"), record(8, 0.4, [1.6], "compiled"),
            {**record(32, "oom", None), "status": "oom"}]
    fig, (ax,) = results.figure(1)
    results.plot_ms_per_token(recs, ax=ax, label_key="variant")
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2                                       # one per line; the oom point left out
    (line, _caps, (segments,)) = bars[0]
    assert list(line.get_xdata()) == [1, 8] and list(line.get_ydata()) == [2.0, 0.5]
    spans = [tuple(seg[:, 1]) for seg in segments.get_segments()]
    assert spans == [pytest.approx(ms_spread(r)) for r in recs[:2]]   # the range the tables print
    assert spans[0] == pytest.approx((1.8, 2.4))
    assert_png(results.save_png(fig, tmp_path / "ms.png"), min_side=250)


def test_ms_per_token_chart_of_a_recorded_run_has_error_bars():
    runs = json.loads((ROOT / "benchmarks" / "results" / "gpu-h200-bench.json").read_text())["runs"]
    assert any(len(r.get("cycle_seconds") or []) > 1 for r in runs)
    fig, (ax,) = results.figure(1)
    results.plot_ms_per_token(runs, ax=ax, label_key="label")
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)


def test_step_breakdown_stacks_linears_and_the_rest_eager_beside_compiled(tmp_path):
    rows = json.loads((ROOT / "benchmarks" / "results" / "foundation-cpu.json").read_text())["compile_speedup"]
    rows[0] = {**rows[0], "eager_step_samples_ms": [97.0, 98.7, 104.0]}
    fig, (ax,) = results.figure(1)
    results.plot_step_breakdown(rows, ax=ax)
    heights = [float(p.get_height()) for p in ax.patches]
    assert len(heights) == 4 * len(rows)                       # linears + rest, eager and compiled
    for i, r in enumerate(rows):
        lin, rest_e, lin_c, rest_c = heights[4 * i:4 * i + 4]
        assert lin == lin_c == pytest.approx(min(r["linears_ms"], r["eager_step_ms"], r["compiled_step_ms"]))
        assert lin + rest_e == pytest.approx(r["eager_step_ms"])
        assert lin_c + rest_c == pytest.approx(r["compiled_step_ms"])
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 1   # where samples are kept
    assert_png(results.save_png(fig, tmp_path / "step.png"))
