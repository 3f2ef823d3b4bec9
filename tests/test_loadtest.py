"""The load-test client measures by the field's definitions (vLLM's ``bench serve``).

Pure functions on known samples: percentiles equal numpy's default rule, goodput counts a
constructed run.  Real servers on loopback: against ours (tiny) every per-request sample obeys the
definitions (TPOT = (E2E - TTFT) / (output tokens - 1), ITL the gaps between chunks), lengths are
held with ``ignore_eos`` as before, and the JSON names its definitions; against ``transformers
serve`` (tiny-llama, marked slow: two server starts), which refuses unknown fields with 422, the
client sends standard OpenAI fields only, measures with 0 errors and greedy texts equal to ours on
the same checkpoint, and an explicitly asked ``ignore_eos`` is refused, recorded, and the run still
measured.
"""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from bloomkit import models
from bloomkit.serve import loadtest
from bloomkit.serve.proc import Server, free_ports
from conftest import assert_one_line_error

# ---------------------------------------------------------------------------- pure functions

SAMPLES = {
    "odd": [12.5, 3.0, 7.25, 100.0, 0.5, 42.0, 8.0, 9.5, 1.0],            # n = 9
    "even": [float(x) for x in range(1, 11)],                             # n = 10: q*n/100 whole
    "even_unsorted": [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 100.0, 0.0, 11.0],   # n = 12
    "one": [4.2],
    "two": [1.0, 2.0],
}


@pytest.mark.parametrize("name", list(SAMPLES))
@pytest.mark.parametrize("q", [50, 90, 99])
def test_percentiles_equal_numpys_default_rule(name, q):
    vals = SAMPLES[name]
    assert loadtest.percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)), abs=0, rel=1e-12)


def test_percentiles_on_ten_values_are_not_one_rank_high():
    """The old nearest-rank rule gave the 6th value as p50 and the maximum as p90 of 1..10."""
    vals = SAMPLES["even"]
    assert loadtest.percentile(vals, 50) == 5.5
    assert loadtest.percentile(vals, 90) == pytest.approx(9.1)
    assert loadtest.percentile(vals, 99) == pytest.approx(9.91)
    assert loadtest.percentile([], 50) is None
    assert not hasattr(loadtest, "pct")


def _req(ttft, tpot, e2e, error=None, tokens=8, itl=()):
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "error": error, "tokens": tokens, "max_tokens": 8,
            "prompt_tokens": 5, "itl": list(itl), "start": 0.0, "prompt": "x", "text": "a",
            "length_control": "ignore_eos"}


def test_goodput_counts_a_constructed_run():
    run = [_req(0.100, 0.020, 0.240),             # good on everything
           _req(0.600, 0.020, 0.740),             # TTFT over 500 ms
           _req(0.200, 0.080, 0.760),             # TPOT over 50 ms
           _req(0.300, None, 0.300, tokens=1),    # one token: no TPOT, 0 against a TPOT SLO (vLLM)
           _req(0.500, 0.050, 0.850),             # exactly at both SLOs: good (metric <= SLO)
           _req(0.010, 0.001, 0.020, error="HTTP 500: boom")]   # failed: never good
    g = loadtest.goodput(run, {"ttft": 500, "tpot": 50}, duration_s=2.0)
    assert (g["good_requests"], g["completed"]) == (3, 5)
    assert g["goodput_requests_per_s"] == pytest.approx(1.5)
    assert loadtest.goodput(run, {"ttft": 500}, 2.0)["good_requests"] == 4
    assert loadtest.goodput(run, {"tpot": 50}, 2.0)["good_requests"] == 4
    assert loadtest.goodput(run, {"e2el": 750}, 2.0)["good_requests"] == 3
    assert loadtest.goodput(run, {"ttft": 500, "tpot": 50, "e2el": 300}, 2.0)["good_requests"] == 2
    assert loadtest.goodput(run, {}, 2.0)["good_requests"] == 5    # no SLO: every completed request
    assert loadtest.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    # summarize: the same count, with the run's own duration
    row = loadtest.summarize(run, None, {"arrivals": "fixed", "concurrency": 2}, goodput_slos={"ttft": 500, "tpot": 50})
    assert row["goodput"]["good_requests"] == 3 and row["wall_s"] == pytest.approx(0.85)
    assert row["goodput"]["goodput_requests_per_s"] == pytest.approx(3 / 0.85)


def test_summarize_reports_the_vllm_metrics():
    run = [_req(0.1, 0.02, 0.24, itl=[0.02] * 7), _req(0.2, 0.03, 0.41, itl=[0.01, 0.05] + [0.03] * 5),
           _req(0.3, None, 0.3, tokens=1)]
    run[2]["max_tokens"] = 1
    row = loadtest.summarize(run, None, {"arrivals": "fixed", "concurrency": 3})
    assert row["completed"] == 3 and row["output_tokens"] == 17 and row["prompt_tokens"] == 15
    assert row["requests_per_s"] == pytest.approx(3 / 0.41)
    assert row["output_tokens_per_s"] == pytest.approx(17 / 0.41)
    assert row["total_tokens_per_s"] == pytest.approx(32 / 0.41)
    itl = [x * 1e3 for r in run for x in r["itl"]]
    assert row["itl_n"] == 14 and row["itl_p90_ms"] == pytest.approx(np.percentile(itl, 90))
    assert row["tpot_n"] == 2 and row["tpot_mean_ms"] == pytest.approx(25.0)
    assert row["ttft_std_ms"] == pytest.approx(np.std([100, 200, 300]))
    assert row["ttft_median_ms"] == pytest.approx(200.0) and row["e2e_p99_ms"] == pytest.approx(np.percentile([240, 410, 300], 99))
    assert row["length_control"] == "ignore_eos" and row["lengths_held"] is True
    assert [s["output_tokens"] for s in row["samples"]] == [8, 8, 1] and len(row["samples"][1]["itl_ms"]) == 7
    assert set(loadtest.LATENCIES) < set(loadtest.METRIC_DEFINITIONS)


# ---------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("argv,needle", [
    (["--goodput", "ttft"], "KEY:MS"),
    (["--goodput", "queue:5"], "ttft, tpot, e2el"),
    (["--goodput", "ttft:-1"], "positive"),
    (["--goodput", "ttft:5", "ttft:6"], "twice"),
    (["--extensions", "ignore_eos,top_k"], "top_k"),
    (["--url", "http://example.com:8000"], "loopback"),
    (["--concurrency", "0"], "positive"),
    (["--max_tokens", "9-3"], "LO <= HI"),
    (["--requests", "0"], "positive"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "no such file"),
])
def test_bad_flags_are_one_line_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        loadtest.main(argv)
    err = capsys.readouterr().err
    proc = subprocess.CompletedProcess(argv, exc.value.code, "", err)
    assert_one_line_error(proc, needle)
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def test_help_gives_every_default():
    text = " ".join(loadtest.parser().format_help().split())
    for flag, default in [("--url", "http://127.0.0.1:8000"), ("--concurrency", "[1, 4, 16]"), ("--rate", "[]"),
                          ("--requests", "32"), ("--duration", "120.0"), ("--max_tokens", "32"),
                          ("--prompts_file", "None"), ("--extensions", "auto"), ("--goodput", "None"),
                          ("--no_check", "False"), ("--json_out", "None")]:
        assert flag in text and f"(default: {default})" in text, flag


# ---------------------------------------------------------------------------- real servers

def _check_samples(row):
    """Every completed request's sample obeys the definitions."""
    for s in row["samples"]:
        assert s["error"] is None, s
        assert s["ttft_ms"] <= s["e2e_ms"]
        assert sum(s["itl_ms"]) == pytest.approx(s["e2e_ms"] - s["ttft_ms"], abs=0.01)
        if s["output_tokens"] > 1:
            assert s["tpot_ms"] == pytest.approx((s["e2e_ms"] - s["ttft_ms"]) / (s["output_tokens"] - 1), abs=0.01)
        else:
            assert s["tpot_ms"] is None


def test_against_our_server_lengths_held_with_ignore_eos(tmp_path):
    out = tmp_path / "load.json"
    with Server(["--name", "tiny"]) as srv:
        rc = loadtest.main(["--url", srv.url, "--concurrency", "1,3", "--requests", "6", "--max_tokens", "5",
                            "--goodput", "ttft:600000", "tpot:600000", "--json_out", str(out)])
        assert rc == 0
        explicit = loadtest.sweep(srv.url, concurrencies=[2], max_tokens=3, requests=4,
                                  extensions=("ignore_eos", "min_tokens"))
    res = json.loads(out.read_text())
    assert res["metric_definitions"] == loadtest.METRIC_DEFINITIONS
    assert res["length_control"]["how"] == "ignore_eos" and "'bloomkit'" in res["length_control"]["decided_by"]
    for row in res["runs"]:
        assert row["errors"] == 0 and row["mismatches"] == 0 and row["lengths_held"] is True
        assert row["goodput"]["good_requests"] == row["completed"] == 6 == len(row["samples"])
        assert all(s["output_tokens"] == 5 and s["prompt_tokens"] > 0 and len(s["itl_ms"]) == 4 for s in row["samples"])
        assert row["total_tokens_per_s"] > row["output_tokens_per_s"] > 0
        _check_samples(row)
    # our server accepts min_tokens but does not read it: asked for both, both are sent (neither
    # refused), and ignore_eos holds the lengths
    assert explicit["length_control"]["sent"] == ["ignore_eos", "min_tokens"]
    assert explicit["runs"][0]["lengths_held"] and explicit["runs"][0]["errors"] == 0


class TransformersServe:
    """``transformers serve MODEL`` (no continuous batching) on a free loopback port, in its own
    process group, stopped on exit."""

    def __init__(self, path):
        self.path, self.port = str(path), free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        exe = os.path.join(os.path.dirname(sys.executable), "transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([exe, "serve", self.path, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--device", "cpu", "--dtype", "float32"], env=env, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 240:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited {self.proc.returncode}: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("transformers serve was not ready after 240 s")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.mark.slow   # two server starts (~15 s each on a busy 2-core machine)
@pytest.mark.timeout(600)
def test_transformers_serve_gets_standard_fields_only_and_equals_ours():
    """transformers serve answers unknown fields with 422: ``auto`` sends standard fields only and
    measures with 0 errors; an explicit ``ignore_eos`` is refused, recorded and dropped.  Both
    servers, standard fields only, give the same greedy texts on the same checkpoint."""
    path = models.resolve_model("tiny-llama")
    prompts = loadtest.DEFAULT_PROMPTS[:4]
    with TransformersServe(path) as ts:
        body = {"prompt": prompts[0], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        assert httpx.post(ts.url + "/v1/completions", json=body, timeout=120).status_code == 422
        res = loadtest.sweep(ts.url, concurrencies=[1, 2], prompts=prompts, max_tokens=6, requests=4)
        asked = asyncio.run(loadtest.length_control(ts.url, "ignore_eos"))
        theirs = asyncio.run(loadtest.reference(ts.url, prompts, 6, "none"))
    assert res["length_control"]["how"] == loadtest.NOT_HELD and res["length_control"]["sent"] == []
    for row in res["runs"]:
        assert row["errors"] == 0 and row["mismatches"] == 0 and row["completed"] == 4
        assert row["length_control"] == loadtest.NOT_HELD
        assert all(1 <= s["output_tokens"] <= 6 for s in row["samples"])
        _check_samples(row)
    assert asked.sent == () and "422" in asked.refused["ignore_eos"]
    with Server(["--name", "tiny-llama"]) as srv:
        ours = asyncio.run(loadtest.reference(srv.url, prompts, 6, "none"))
    # the same tokens: ours streams a character cut in half at the end as U+FFFD, transformers
    # holds it back (the comparison rule of loadtest.matches)
    assert {p: t.rstrip("\ufffd") for p, t in ours.items()} == theirs


def test_median_rows_take_the_rounds_median_range_and_tokens_per_event():
    def row(c, tps, ttft, out, itl_n, done, busy):
        return {"concurrency": c, "output_tokens_per_s": tps, "ttft_p50_ms": ttft, "output_tokens": out,
                "itl_n": itl_n, "completed": done, "cores_busy": busy}
    rounds = [[row(1, 10.0, 5.0, 40, 36, 4, 1.0), row(8, 50.0, 9.0, 80, 60, 10, 1.8)],
              [row(1, 14.0, 7.0, 40, 36, 4, 1.2), row(8, 40.0, 8.0, 80, 50, 10, 1.6)],
              [row(1, 12.0, 6.0, 40, 36, 4, 1.1), row(8, 60.0, 7.0, 80, 60, 10, 2.0)]]
    one, many = loadtest.median_rows(rounds)
    assert (one["concurrency"], one["rounds"], many["concurrency"]) == (1, 3, 8)
    assert one["output_tokens_per_s"] == 12.0 and one["output_tokens_per_s_range"] == (10.0, 14.0)
    assert one["ttft_p50_ms"] == 6.0 and one["ttft_p50_ms_range"] == (5.0, 7.0)
    assert one["cores_busy"] == pytest.approx(1.1) and many["cores_busy"] == pytest.approx(1.8)
    assert one["tokens_per_event"] == 1.0                        # one token per chunk
    assert many["tokens_per_event"] == pytest.approx(240 / 200)   # 240 tokens in 3 * 10 first chunks + 170 gaps
    assert loadtest.per_round(rounds, 8, "output_tokens_per_s") == [50.0, 40.0, 60.0]


def test_a_round_of_servers_taking_turns_reads_their_cores():
    """``peers.measure_round``: each server in turn at each client count, its rows checked against
    its own answers, with the CPU seconds its process tree used and the cores it kept busy."""
    from bloomkit.serve import peers

    prompts = loadtest.DEFAULT_PROMPTS[:3]
    with Server(["--name", "tiny"]) as srv:
        alone = asyncio.run(loadtest.reference(srv.url, prompts, 4, extensions="none"))
        rounds = [asyncio.run(peers.measure_round({"a": srv, "b": srv}, prompts=prompts, max_tokens=4,
                                                  runs={1: 3, 3: 6}, expected={"a": alone, "b": alone}))
                  for _ in range(2)]
    for got in rounds:
        assert list(got) == ["a", "b"]
        for rows in got.values():
            assert [r["concurrency"] for r in rows] == [1, 3]
            for r in rows:
                assert r["errors"] == 0 and r["mismatches"] == 0 and "samples" not in r
                assert r["cpu_s"] > 0 and 0 < r["cores_busy"] <= os.cpu_count() + 0.5
    med = loadtest.median_rows([got["a"] for got in rounds])
    assert [r["concurrency"] for r in med] == [1, 3] and all(r["rounds"] == 2 for r in med)
    assert all(r["tokens_per_event"] >= 1 and r["cores_busy"] > 0 for r in med)
