"""The run report: real records of the tiny model -> report.md / .png / .html, and the HTML
opened in headless Chromium (Debian's ``chromium`` package) showing the table and the plot."""
import shutil
import subprocess

import pytest

from bloomkit import memory, models, results
from bloomkit.measure import bench, report
from bloomkit.strategies import accel


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is missing: run `apt-get install -y chromium` (Debian), "
                "which `make setup` does as root")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path):
    """A runs/<profile>/ directory as `make run` leaves it, from a real (tiny) run."""
    out = tmp_path_factory.mktemp("runs") / "cpu-tiny"
    cfg = models.load_config(tiny_path)
    need = lambda bs: memory.weight_bytes(cfg, "fp32") + memory.generate_extra_bytes(cfg, bs, 64 + 4, "fp32")  # noqa: E731
    recs = bench.run_variant(strategy="accelerate", name="tiny", path=tiny_path, batch_sizes=[1, 2, 4],
                             max_new_tokens=4, cycles=1, verify=True, budget=(need(2) + need(4)) // 2,
                             load=lambda p, dt, dev: accel.load_model(p, dt, device=dev))
    assert [r["status"] for r in recs] == ["ok", "ok", "oom"]
    results.append_jsonl(out / "04_comparison.jsonl", recs)
    results.append_jsonl(out / "results.jsonl", recs)
    results.write_json(out / "summary.json", {"profile": "cpu-tiny", "notebooks": [
        {"notebook": "04_comparison.ipynb", "seconds": 1.0, "records": len(recs)}]})
    return out, recs


def test_report_files(run_dir):
    out, recs = run_dir
    paths = report.write_report(out)
    md = paths["markdown"].read_text()
    assert "# Run report: `cpu-tiny`" in md
    # the blog table keeps 3 decimals, then the cell shows 3 significant digits: the same here
    ms = [report.fmt(round(r["ms_per_token"], 3)) for r in recs if r["status"] == "ok"]
    assert f"| accelerate fp32 | {ms[0]} | {ms[1]} | oom |" in md, md   # the blog-style row (1 cycle: no range)
    assert "fastest and slowest cycle" in md and "start_to_ready_s" in md
    assert "## Roofline" in md and "| accelerate fp32 | 1 |" in md, md
    assert "published, not measured here" in md and "| ds-inference fp16 | 44.02 |" in md
    assert "![ms per token](report.png)" in md
    from PIL import Image

    img = Image.open(paths["png"]).convert("L")
    lo, hi = img.getextrema()
    assert img.size[0] >= 800 and hi - lo > 100   # a real figure, not a blank canvas


def test_each_ms_per_token_shows_the_range_of_its_cycles():
    """A cell is the median and, in brackets, the fastest and slowest timed cycle."""
    rec = {"strategy": "accelerate", "model": "tiny", "dtype": "fp32", "world_size": 1, "batch_size": 1,
           "status": "ok", "ms_per_token": 2.0, "cycle_seconds": [0.09, 0.1, 0.12], "options": {}}
    assert [round(x, 9) for x in report.ms_spread(rec)] == [1.8, 2.4]
    assert report.comparison_table([rec]).loc["accelerate fp32", 1] == "2 (1.8-2.4)"
    assert report.with_spread(rec) == "2.00 (1.80-2.40 over 3 cycles)"


def test_table_cells_have_one_format():
    """3 significant digits; from 100 up whole numbers with separators, never 1e+03."""
    cases = [(0.01234, "0.0123"), (9.87, "9.87"), (99.94, "99.9"), (999.6, "1,000"),
             (12345.6, "12,346"), (None, ""), (float("nan"), ""), ("a|b", "a\\|b"), (8, "8")]
    assert [report.fmt(v) for v, _ in cases] == [out for _, out in cases]


def test_empty_run_dir_still_reports(tmp_path):
    paths = report.write_report(tmp_path)
    assert "No result records" in paths["markdown"].read_text()
    assert paths["html"].exists()


@pytest.mark.timeout(120)
def test_html_report_in_headless_chromium(run_dir, tmp_path):
    out, recs = run_dir
    html = report.write_report(out)["html"]
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000"]
    dom = subprocess.run([*cmd, "--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=60).stdout
    assert "<table>" in dom and "<td>accelerate fp32</td>" in dom
    assert dom.count("<tr>") >= 10                       # comparison, roofline, blog tables
    assert "<td>oom</td>" in dom
    # the embedded PNG was decoded by the browser: its onload handler recorded its width
    assert 'id="plot"' in dom and 'data-width="1200"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd, "--window-size=1280,1600", f"--screenshot={shot}", html.as_uri()],
                   capture_output=True, timeout=60)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.getextrema()[1] - img.getextrema()[0] > 100   # something drawn, not blank


@pytest.mark.notebooks
@pytest.mark.timeout(300)
def test_comparison_notebook_and_report_end_to_end(tmp_path):
    """`make run` restricted to notebook 04 on the CI profile, then the report of that run:
    every strategy through the same harness, each identical to plain generate in fp32."""
    from bloomkit import notebooks

    notebooks.run_profile("cpu-tiny", tmp_path, only=["04"])
    recs = results.read_records(tmp_path / "results.jsonl")
    assert {r["strategy"] for r in recs} == {"accelerate", "ds-inference", "ds-zero"}
    assert sorted(r["batch_size"] for r in recs) == [1] * 4 + [8] * 4   # 3 strategies, Accelerate compiled too
    assert all(r["status"] == "ok" and r["quality"]["identical"] for r in recs)
    assert {r["world_size"] for r in recs if r["strategy"] == "ds-inference"} == {2}
    compiled = [r for r in recs if r["options"].get("compile")]
    assert {r["strategy"] for r in compiled} == {"accelerate"}     # the profile's COMPILE
    assert all(r["recompiles"] == 0 for r in compiled)
    assert (tmp_path / "04_comparison.html").stat().st_size > 10_000
    md = report.write_report(tmp_path)["markdown"].read_text()
    for setup in ("accelerate fp32", "accelerate fp32 compiled", "ds-inference tp=2 fp32", "ds-zero fp32 cpu"):
        assert f"| {setup} | " in md
    assert md.count("| memory |") + md.count("| compute |") + md.count("| link |") == 8  # roofline rows
