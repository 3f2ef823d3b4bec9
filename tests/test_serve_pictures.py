"""Serving's picture: latency against throughput, one line per server, points named by their load
(the way vLLM's and DeepSpeed-FastGen's serving results are shown).  Drawn from constructed load-test
rows, from the recorded benchmarks/results/serve-cpu.json (old rows without every key: no bars where
they lack them), by ``benchmarks/serve.py --plot --from`` without running anything, and the load test's
``--plot`` refuses a path it cannot write before it sends a request and draws a real run against the
``tiny`` server (the one test that starts a server: seconds)."""
import json
import subprocess
import sys

import pytest
from matplotlib.container import ErrorbarContainer

from bloomkit import results
from bloomkit.serve import loadtest
from bloomkit.serve.proc import Server
from conftest import ROOT
from test_pictures import assert_png, script

RECORDED = ROOT / "benchmarks" / "results" / "serve-cpu.json"


def request(i: int, start: float, ttft: float, step: float, tokens: int = 8) -> dict:
    """One completed request as ``loadtest.one`` records it (seconds)."""
    itl = [step] * (tokens - 1)
    e2e = ttft + sum(itl)
    return {"prompt": f"p{i}", "text": "x", "tokens": tokens, "prompt_tokens": 4, "error": None, "start": start,
            "max_tokens": tokens, "length_control": "ignore_eos", "ttft": ttft, "e2e": e2e, "itl": itl,
            "chunks": tokens, "tpot": (e2e - ttft) / (tokens - 1)}


def run_rows(c: int, n: int) -> dict:
    """A summarized closed-loop run of ``n`` requests at ``c`` clients: more clients, more latency."""
    reqs = [request(i, start=0.1 * (i // c), ttft=0.02 * c ** 0.5 + 0.001 * i, step=0.01 + 0.002 * c) for i in range(n)]
    return loadtest.summarize(reqs, label={"arrivals": "fixed", "concurrency": c})


def bars_of(ax):
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_latency_against_throughput_from_load_test_rows(tmp_path):
    ours = [run_rows(1, 8), run_rows(16, 32), run_rows(4, 12)]          # out of order: drawn in order of load
    peer = [{**r, **{k: r[k] * 2 for k in r if k.startswith("ttft_") and k.endswith("_ms")}} for r in ours]
    fig, axes = results.figure(2)
    loadtest.plot_latency_throughput({"ours": ours, "peer": peer}, axes)
    for ax, key in zip(axes, ("ttft", "tpot")):
        lines = bars_of(ax)
        assert [ln.get_label() for ln in lines] == ["ours", "peer"]      # one line per server
        xs = list(lines[0].lines[0].get_xdata())
        by_c = {r["concurrency"]: r for r in ours}
        assert xs == [by_c[c]["output_tokens_per_s"] for c in (1, 4, 16)]
        assert list(lines[0].lines[0].get_ydata()) == [by_c[c][f"{key}_p50_ms"] for c in (1, 4, 16)]
        assert [t.get_text() for t in ax.texts][:3] == ["C=1", "C=4", "C=16"]
        assert ax.get_xlabel().startswith("output tokens / s")
        # 8 requests: fastest to slowest; 12 and 32: p50 to p90 (as the load table prints them)
        segs = [tuple(s[:, 1]) for s in lines[0].lines[2][0].get_segments()]
        assert segs[0] == pytest.approx((by_c[1][f"{key}_min_ms"], by_c[1][f"{key}_max_ms"]))
        assert segs[2] == pytest.approx((by_c[16][f"{key}_p50_ms"], by_c[16][f"{key}_p90_ms"]))
        assert "p50 to p90" in ax.get_ylabel() and "fastest to slowest" in ax.get_ylabel()
    assert_png(results.save_png(fig, tmp_path / "lt.png"))


def test_load_test_result_draws_closed_loop_and_poisson_lines(tmp_path):
    rate = {**run_rows(2, 10), "arrivals": "poisson", "rate": 2.0}
    rate.pop("concurrency")
    result = {"url": "http://127.0.0.1:8000", "max_tokens": [16, 48], "requests_per_run": 8,
              "length_control": {"how": "ignore_eos"}, "runs": [run_rows(1, 8), run_rows(4, 12), rate]}
    png = loadtest.plot_result(result, tmp_path / "sub" / "load.png")
    assert png == tmp_path / "sub" / "load.png"
    assert_png(png)
    assert loadtest.point_tag(rate) == "2/s"


def test_rows_without_spread_keys_draw_without_bars():
    rows = [{"arrivals": "fixed", "concurrency": c, "output_tokens_per_s": t, "ttft_p50_ms": l, "tpot_p50_ms": l}
            for c, t, l in ((1, 40.0, 30.0), (16, 200.0, 90.0))]
    rows.append({"arrivals": "fixed", "concurrency": 32, "output_tokens_per_s": None, "ttft_p50_ms": None})  # all failed
    fig, axes = results.figure(2)
    loadtest.plot_latency_throughput({"old": rows}, axes)
    (line,) = bars_of(axes[0])
    assert list(line.lines[0].get_xdata()) == [40.0, 200.0] and not line.has_yerr
    assert "bars" not in axes[0].get_ylabel()


def test_recorded_serving_file_draws_every_server_with_the_rounds_range(tmp_path):
    out = json.loads(RECORDED.read_text())
    mod = script("serve")
    parts = mod.series(out)
    assert set(parts) == {"lengths 16-48 (mixed)", "32 tokens each (one length)"}
    assert set(parts["32 tokens each (one length)"]) == {"accelerate/overlap", "accelerate/prefill_first", "tp2"}
    rounds = out["accelerate"]["overlap"]["mixed"]["rounds"]
    row16 = next(r for r in parts["lengths 16-48 (mixed)"]["accelerate/overlap"] if r["concurrency"] == 16)
    p50s = [next(r for r in rows if r["concurrency"] == 16)["ttft_p50_ms"] for rows in rounds]
    assert row16["ttft_p50_ms"] == pytest.approx(sorted(p50s)[1]) and row16["rounds"] == 3
    assert row16["ttft_p50_ms_range"] == pytest.approx((min(p50s), max(p50s)))
    fig, axes = results.figure(2)
    loadtest.plot_latency_throughput(parts["32 tokens each (one length)"], axes)
    assert len(bars_of(axes[0])) == 3 and all(b.has_yerr for b in bars_of(axes[0]))
    png = mod.plot(out, tmp_path / "serve.png")
    assert_png(png)


def test_serve_benchmark_redraws_a_recorded_file_without_running(tmp_path):
    before = RECORDED.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "benchmarks/serve.py", "--plot", str(tmp_path / "s.png"),
                           "--from", str(RECORDED)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"saved {tmp_path / 's.png'}" in proc.stdout
    assert_png(tmp_path / "s.png")
    assert RECORDED.stat().st_mtime_ns == before


def one_line_error(proc, says: str) -> None:
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("argv, says", [
    (["--from", "benchmarks/results/serve-cpu.json"], "add --plot"),
    (["--plot", "{tmp}/p.png", "--from", "{tmp}/other.json"], "nothing to draw"),
    (["--plot", "{tmp}", "--from", "benchmarks/results/serve-cpu.json"], "is a directory"),
    (["--only", "peers", "--tp", "0", "--out", "{tmp}/o.json"], "pass --tp 1 or more"),
    (["--only", "tp2", "--tp", "2", "--out", "{tmp}/o.json"], "with --only peers"),
    (["--only", "accelerate", "--peer_args=--compile", "--out", "{tmp}/o.json"], "pass them with --only peers"),
    (["--only", "lever", "--out", "{tmp}/o.json"], "--lever_args"),
    (["--lever_args=--freezing", "--out", "{tmp}/o.json"], "--only lever"),
])
def test_serve_benchmark_bad_plot_flags_are_one_line(argv, says, tmp_path):
    (tmp_path / "other.json").write_text('{"model": "small", "burst": {"ratio": 2.0}}')
    proc = subprocess.run([sys.executable, "benchmarks/serve.py", *[a.format(tmp=tmp_path) for a in argv]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_line_error(proc, says)
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("plot, says", [("{tmp}", "is a directory"), ("{tmp}/file.txt/x.png", "is a file")])
def test_load_test_plot_to_a_bad_path_is_one_line_before_any_request(plot, says, tmp_path):
    (tmp_path / "file.txt").write_text("")
    # port 9 (discard) on loopback: nothing answers; the path is refused before the client tries
    proc = subprocess.run([sys.executable, "-m", "bloomkit.serve.loadtest", "--url", "http://127.0.0.1:9",
                           "--plot", plot.format(tmp=tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_line_error(proc, says)
    assert "--plot" in proc.stderr and "no server answers" not in proc.stderr


def test_load_test_help_names_the_plot_flag():
    text = " ".join(loadtest.parser().format_help().split())
    assert "--plot PNG" in text and "latency against throughput" in text and "(default: None)" in text


def test_load_test_plot_draws_a_real_run(tmp_path, capsys):
    with Server(["--name", "tiny"]) as srv:
        rc = loadtest.main(["--url", srv.url, "--concurrency", "1,2", "--requests", "4", "--max_tokens", "3",
                            "--plot", str(tmp_path / "load.png"), "--json_out", str(tmp_path / "load.json")])
    assert rc == 0
    assert f"saved {tmp_path / 'load.png'}" in capsys.readouterr().out
    assert_png(tmp_path / "load.png")
    runs = json.loads((tmp_path / "load.json").read_text())["runs"]
    fig, axes = results.figure(2)
    loadtest.plot_latency_throughput({"tiny": runs}, axes)          # the JSON it wrote draws the same way
    assert [t.get_text() for t in axes[0].texts] == ["C=1", "C=2"]
