"""``/metrics`` through prometheus-client: a real server on loopback under a small load, scraped
while the load runs and parsed with prometheus-client's own parser; the TTFT histogram counts
the requests served, the token counters equal the clients' ``usage``, the gauges return to 0.
In-process: every engine has its own registry, concurrent writers and readers add up, and a
model that fails counts its requests as ``error``."""
import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bloomkit.measure import harness
from bloomkit.serve.app import metrics_text, read_metrics
from bloomkit.serve.proc import Server
from bloomkit.serve.scheduler import LATENCY_BUCKETS_S, OUTCOMES, Engine, Metrics, Params, Request

HISTOGRAMS = ("bloomkit_time_to_first_token_seconds", "bloomkit_request_time_per_output_token_seconds",
              "bloomkit_e2e_request_latency_seconds", "bloomkit_request_queue_time_seconds")
GAUGES = ("bloomkit_running_rows", "bloomkit_waiting_rows", "bloomkit_kv_cache_tokens")
COUNTERS = ("bloomkit_prompt_tokens_total", "bloomkit_generation_tokens_total", "bloomkit_steps_total")


def _check_histograms(families: dict) -> None:
    """Each histogram: the shared bucket bounds, cumulative counts, ``+Inf`` == ``_count``."""
    for name in HISTOGRAMS:
        fam = families[name]
        assert fam.type == "histogram", name
        buckets = [(s.labels["le"], s.value) for s in fam.samples if s.name == name + "_bucket"]
        assert [le for le, _ in buckets] == [str(float(b)) for b in LATENCY_BUCKETS_S] + ["+Inf"], name
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), name
        count = next(s.value for s in fam.samples if s.name == name + "_count")
        assert counts[-1] == count, name


@pytest.fixture(scope="module")
def server():
    with Server(["--name", "tiny"]) as srv:
        yield srv


def test_metrics_parse_under_load_and_add_up(server):
    """12 requests from 4 clients (half streaming, lengths 1-8, standard OpenAI fields only) while
    a poller scrapes ``/metrics``: every scrape parses and its histograms are well formed; after
    the load, TTFT, end-to-end and queue-time counts equal the requests served, TPOT counts those
    of 2 tokens or more, the token counters equal the sum of the answers' ``usage``, and the
    gauges return to 0."""
    url = server.url
    first = httpx.get(url + "/metrics")
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    m0 = read_metrics(first.text)
    assert all(m0[g] == 0 for g in GAUGES) and all(m0[c] == 0 for c in COUNTERS)
    assert all(m0[f'bloomkit_requests_total{{outcome="{o}"}}'] == 0 for o in OUTCOMES)

    stop, scrapes, failures = threading.Event(), [], []

    def scrape():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.get(url + "/metrics")
                if r.status_code != 200:
                    failures.append(r.status_code)
                    continue
                families = {f.name: f for f in text_string_to_metric_families(r.text)}
                _check_histograms(families)
                scrapes.append(read_metrics(r.text))
                time.sleep(0.02)

    prompts = harness.make_prompts(6)
    jobs = [(prompts[i % len(prompts)], 1 + (i * 5) % 8, i % 2 == 1) for i in range(12)]

    async def ask(c, sem, prompt, n, stream):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        async with sem:
            if not stream:
                r = await c.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["usage"]
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with c.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: {")]
            return json.loads(lines[-1][6:])["usage"]

    async def load():
        sem = asyncio.Semaphore(4)
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(ask(c, sem, *job) for job in jobs))

    poller = threading.Thread(target=scrape)
    poller.start()
    try:
        usage = asyncio.run(load())
        deadline = time.perf_counter() + 30   # a quick load may end before the third scrape: it comes after
        while len(scrapes) < 3 and not failures and time.perf_counter() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        poller.join()
    assert not failures and len(scrapes) >= 3, (len(scrapes), failures[:1])
    ttft_counts = [s["bloomkit_time_to_first_token_seconds_count"] for s in scrapes]
    assert ttft_counts == sorted(ttft_counts)   # counters only grow, scrape after scrape

    t0 = time.perf_counter()
    while True:   # finished rows leave at the next step
        m = read_metrics(httpx.get(url + "/metrics").text)
        if all(m[g] == 0 for g in GAUGES) or time.perf_counter() - t0 > 10:
            break
        time.sleep(0.05)
    assert {g: m[g] for g in GAUGES} == dict.fromkeys(GAUGES, 0.0)
    served = len(jobs)
    for name in ("bloomkit_time_to_first_token_seconds", "bloomkit_e2e_request_latency_seconds",
                 "bloomkit_request_queue_time_seconds"):
        assert m[name + "_count"] == served, name
    tpot_count = m["bloomkit_request_time_per_output_token_seconds_count"]
    assert tpot_count == sum(u["completion_tokens"] > 1 for u in usage)
    assert m['bloomkit_requests_total{outcome="ok"}'] == served
    assert all(m[f'bloomkit_requests_total{{outcome="{o}"}}'] == 0 for o in OUTCOMES if o != "ok")
    assert m["bloomkit_generation_tokens_total"] == sum(u["completion_tokens"] for u in usage)
    assert m["bloomkit_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usage)
    assert 0 < m["bloomkit_time_to_first_token_seconds_sum"] < m["bloomkit_e2e_request_latency_seconds_sum"]
    assert m["bloomkit_steps_total"] >= max(u["completion_tokens"] for u in usage)


def test_every_engine_has_its_own_registry(tiny_model, tiny_tokenizer):
    """Two engines in one process: each counts only its own work, and nothing goes to
    prometheus-client's global default registry."""
    from prometheus_client import REGISTRY

    a, b = Engine(tiny_model, tiny_tokenizer), Engine(tiny_model, tiny_tokenizer)
    req = Request([tiny_tokenizer("He is working on")["input_ids"]],
                  Params(max_tokens=3, temperature=0, ignore_eos=True))
    a.submit(req)
    a._collect(0)
    a.step()
    while a.rows or a.waiting:
        a._collect(0)
        a.step()
    ma, mb = read_metrics(metrics_text(a)), read_metrics(metrics_text(b))
    assert ma["bloomkit_generation_tokens_total"] == 3 and ma["bloomkit_time_to_first_token_seconds_count"] == 1
    assert mb["bloomkit_generation_tokens_total"] == 0 and mb["bloomkit_time_to_first_token_seconds_count"] == 0
    assert not any(n.startswith("bloomkit_") for n in REGISTRY._names_to_collectors)
    # an EOS that ends a row is not returned, so not counted (as in usage): b's EOS is the token
    # a's answer starts with, so b's request ends at once with no token
    b.eos = harness.generate(tiny_model, tiny_tokenizer, ["He is working on"], 1).tokens[0][0]
    b.submit(Request([tiny_tokenizer("He is working on")["input_ids"]], Params(max_tokens=3, temperature=0)))
    b._collect(0)
    b.step()
    mb = read_metrics(metrics_text(b))
    assert mb["bloomkit_generation_tokens_total"] == 0 and mb["bloomkit_steps_total"] == 1
    assert mb["bloomkit_time_to_first_token_seconds_count"] == 1


def test_metrics_under_concurrent_writers_and_readers():
    """Two writer threads (like the scheduler and the prefill thread) and a reader rendering and
    parsing the exposition meanwhile: no read fails and the final counts add up."""
    m, n, errors = Metrics(), 5000, []

    def write(kind):
        for i in range(n):
            if kind:
                m.first_token(0.001 * (i % 7))
            else:
                m.step(2)
            m.count("ok")

    def read():
        try:
            while any(t.is_alive() for t in writers):
                got = read_metrics(generate_latest(m.registry).decode())
                assert got["bloomkit_generation_tokens_total"] >= 0
        except Exception as e:  # noqa: BLE001 - collected for the assert below
            errors.append(repr(e))

    writers = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in writers:
        t.start()
    reader = threading.Thread(target=read)
    reader.start()
    for t in writers + [reader]:
        t.join()
    req = Request([[1]], Params(max_tokens=5))
    req.first_token_at = req.created + 0.01
    m.finished(req, 5, at=req.created + 0.05)
    got = read_metrics(generate_latest(m.registry).decode())
    assert not errors, errors[:1]
    assert got["bloomkit_steps_total"] == n and got["bloomkit_generation_tokens_total"] == 2 * n
    assert got["bloomkit_time_to_first_token_seconds_count"] == n
    assert got['bloomkit_requests_total{outcome="ok"}'] == 2 * n + 1
    assert got["bloomkit_e2e_request_latency_seconds_count"] == 1
    assert got["bloomkit_e2e_request_latency_seconds_sum"] == pytest.approx(0.05)
    assert got["bloomkit_request_time_per_output_token_seconds_sum"] == pytest.approx(0.01)   # (0.05 - 0.01) / 4


def test_a_failed_model_counts_its_requests_as_errors(tiny_model, tiny_tokenizer):
    """A token id beyond the vocabulary makes the real forward fail: the engine goes down, the
    request gets a 503 event, and ``/metrics`` counts it under ``error``."""
    eng = Engine(tiny_model, tiny_tokenizer)
    events, got = [], threading.Event()
    req = Request([[tiny_model.config.vocab_size + 5]], Params(max_tokens=2, temperature=0),
                  sink=lambda ev: (events.append(ev), got.set()))
    eng.submit(req)
    worker = threading.Thread(target=eng.run, daemon=True)
    worker.start()
    assert got.wait(60) and worker.join(60) is None and not worker.is_alive()
    assert events[0][:2] == ("error", 503) and eng.failed
    m = read_metrics(metrics_text(eng))
    assert m['bloomkit_requests_total{outcome="error"}'] == 1
    assert m['bloomkit_requests_total{outcome="ok"}'] == 0 and m["bloomkit_waiting_rows"] == 0
