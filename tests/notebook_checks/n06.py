"""Notebook 06 (an OpenAI-compatible server with continuous batching): the served answer equals
plain ``generate``; a static batch (``generate`` on the same N prompts at once) against the same
N requests to the server, and one client against the most clients, each from interleaved pairs
with their samples; no errors and no answer that differs from its prompt's answer alone; the
refusal of a too-large ``max_tokens`` printed whole, with the number that would fit; latency
against throughput drawn from the load runs (a picture in the executed notebook).

The notebook writes no result records: its claims carry their own samples, and the checks are
that each printed number agrees with them."""
import re
import statistics

from nbtools import ODD

PARAMS = {"trained": None,
          ODD: {"MAX_NEW_TOKENS": 8, "CYCLES": 1, "CONCURRENCIES": [1, 4], "MIXED_TOKENS": [4, 12]}}
BUILD = ()
TIMEOUT = 600
PICTURES = ("ax[0].plot(df.index", 'plot_latency_throughput({f"this server',   # the cells that draw (each must
            "plot_latency_throughput(series, ax")                                  # show its picture)
CLAIMS = {"*": ["served_tokens_identical", "static_vs_served_wall", "static_vs_served_ttft", "scaling_throughput",
                "scaling_tpot", "scaling_ttft", "mixed_vs_fixed_ttft", "prefill_thread_ttft", "peers_plan"]}


def _ms(seconds):
    return f"{statistics.median(seconds) * 1e3:.0f} ms"


def check(run):
    assert run.value("served_tokens_identical") is True
    assert "server answer equals plain generate's greedy answer" in run.output_of("served_tokens_identical")

    wall, ttft = run.claim("static_vs_served_wall"), run.claim("static_vs_served_ttft")
    assert wall["mismatches"] == 0 and wall["pairs"] >= 5 and ttft["pairs"] == wall["pairs"]
    shown = run.output_of("static_vs_served_wall")
    n, tok = wall["n"], wall["n"] * wall["max_tokens"]
    # absolute times beside the ratios, printed from the very samples of the verdicts
    assert f"static batch: {tok} tokens in {_ms(wall['b'])} (median)" in shown
    assert f"server:       {tok} tokens in {_ms(wall['a'])} (median)" in shown
    assert f"first token after {_ms(ttft['b'])} for every row" in shown
    assert f"first token after {_ms(ttft['a'])} (median request)" in shown
    assert "Answers that differed from their prompt's answer alone: 0." in shown

    tp = run.claim("scaling_throughput")
    top = tp["clients"]
    assert top == n and top > 1 and tp["pairs"] >= 5
    for side, key in ((str(top), "a"), ("1", "b")):   # tokens/s medians are 1 / the samples'
        assert abs(tp["tokens_per_s"][side] - statistics.median(1 / x for x in tp[key])) < 1e-6 * tp["tokens_per_s"][side]
    scaling = run.output_of("scaling_throughput")
    assert f"Per pair, {top}x the clients gave" in scaling
    assert "Errors and answers that differed from their prompt's answer alone: 0." in scaling
    for name in ("scaling_tpot", "scaling_ttft", "mixed_vs_fixed_ttft", "prefill_thread_ttft"):
        c = run.claim(name)
        assert c["clients"] == top and c["pairs"] >= 5 and len(c["a"]) == len(c["b"]) == c["pairs"], name
    text = run.text()
    assert text.count("Mismatches: 0.") == 2
    mixed = run.claim("mixed_vs_fixed_ttft")
    assert f"mean {mixed['mean_drawn']:.1f} tokens" in run.output_of("mixed_vs_fixed_ttft")

    # the refusal is printed whole: the number that would fit is there
    assert re.search(r"max_tokens too large: 400 max_tokens: .*use max_tokens\s+\d+ or less", text, re.S)
    # percentiles only where a run has enough requests: the load table says which it shows
    assert "'p50 / p90' from 10 requests on" in text
    # the load test sent ignore_eos (this server is known to honour it) and every length held
    assert "Output lengths: ignore_eos (every request made exactly its max_tokens: True)." in text
    assert not re.search(r"\bp99\b", text)
    assert any("image/png" in o.get("data", {}) for c in run.code_cells for o in c.get("outputs", []))

    # latency against throughput drawn from the runs of the load table, each step's ratios printed under it
    drawn = [c for c in run.code_cells if 'plot_latency_throughput({f"this server' in "".join(c["source"])]
    assert len(drawn) == 1, "notebook 06 draws latency against throughput once"
    assert any("image/png" in o.get("data", {}) for o in drawn[0].get("outputs", [])), \
        "the latency-against-throughput cell shows no picture (image/png)"
    steps = re.findall(r"(\d+) -> (\d+) clients: output tokens/s [\d.]+x, TTFT p50 [\d.]+x, TPOT p50 [\d.]+x", text)
    assert steps and steps[-1][1] == str(top), steps
    for key in ("TTFT", "TPOT"):
        assert re.search(rf"{key} p50 (first rose faster than throughput from \d+ to \d+ clients|"
                         rf"rose no faster than throughput in any step up to {top} clients)", text), key

    check_peers(run)


def check_peers(run):
    """Section 8: each peer measured in the run (its greedy answers equal ours, verdicts from 5 pairs or more,
    the printed medians from the verdicts' own samples) or shown from the record, named with file, day and
    machine; BLOOM's refusal by transformers serve and odd-llama's by vLLM said, never started."""
    plan = run.claim("peers_plan")
    measured, not_here, clients = plan["value"], plan["not_here"], plan["clients"]
    assert set(measured) | set(not_here) == {"vllm", "transformers"} and not set(measured) & set(not_here), plan
    assert clients[0] == 1 and clients[-1] == run.claim("scaling_throughput")["clients"], clients
    text = run.text()
    if run.model == "trained":
        assert "BloomForCausalLM has no sdpa attention" in not_here["transformers"]
    else:
        assert "vllm" in not_here   # head_dim 16, or no .venv-vllm
    for kind in measured:
        assert run.value(f"peer_{kind}_same_answers") is True, kind
        for c in clients:
            tok, ttft = run.claim(f"peer_{kind}_tokens_c{c}"), run.claim(f"peer_{kind}_ttft_c{c}")
            assert tok["pairs"] >= 5 and ttft["pairs"] == tok["pairs"] and tok["clients"] == c, (kind, c)
            shown = run.output_of(f"peer_{kind}_tokens_c{c}")
            medians = [statistics.median(1 / x for x in tok[k]) for k in ("a", "b")]
            assert f"{c} client{'s' if c > 1 else ''}, {kind}: {medians[0]:.0f} against {medians[1]:.0f} output tokens/s" \
                in shown, (kind, c)
            assert f"TTFT p50 {statistics.median(ttft['a']):.0f} against {statistics.median(ttft['b']):.0f} ms" in shown
            cpu = run.claim(f"peer_{kind}_cpu_per_token_c{c}")   # CPU seconds of its process tree per output token
            assert cpu["pairs"] == tok["pairs"] and all(x > 0 for x in cpu["a"] + cpu["b"]), (kind, c)
        assert re.search(rf"^{kind}: \d+ process(es)?, \d+ threads; [\d.]+ of \d+ cores busy", text, re.M), kind
    if measured:
        assert "errors and answers that differed from their server's answer alone: 0." in text
        assert re.search(r"^ours: 1 process, \d+ threads", text, re.M)   # one process: HTTP, model and prefill threads
    if not_here:   # the record stands in, named with its file, day and machine
        assert re.search(r"Recorded in benchmarks/results/serve-peers-cpu\.json on \d{4}-\d\d-\d\d, .+ CPU, \d+ cores "
                         r"\(not measured in this run\)", text), "the record is not named with its day and machine"
    # the record's runs with other flags (ours --compile, --packed_prefill, TP; a peer's own --compile), each dated
    others = re.findall(r"^(small-llama|trained)\b[^:\n]*: measured on \d{4}-\d\d-\d\d; ours ready after \d+ s$", text, re.M)
    assert len(others) >= 3, others
    assert re.search(r"small-llama --compile\s+transformers --compile\s+one_length\s+16\s+[\d.]+", text), \
        "the record of both servers compiled is not shown"
    # the path beyond: vLLM's server with tensor parallelism for this model, and the load test that measures it
    assert re.search(r"python -m vllm\.entrypoints\.openai\.api_server --model \S+ .*\n\s+--tensor-parallel-size [12] "
                     r"--dtype bfloat16", text), "the vLLM command with tensor parallelism is not printed"
    assert "bloomkit-loadtest --url http://127.0.0.1:8000" in text
