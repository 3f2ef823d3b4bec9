"""Serving: the continuous-batching engine and the OpenAI-compatible server, on every strategy.

In-process: the engine's greedy output equals plain ``generate`` for BLOOM and a Llama, whatever
rows run beside it.  Over HTTP (a server subprocess per strategy, tiny model, few tokens):
completions equal ``generate``, streaming equals non-streaming, concurrent requests each get
their own answer, every bad input gets its 4xx, a full queue 429, a slow request 504, a client
that leaves frees its row; TP=2 and ZeRO on CPU ranks answer the same tokens; a killed rank ends
the server within 60 s and leaves no process or /dev/shm segment behind.
"""
import asyncio
import json
import os
import re
import threading
import time

import httpx
import pytest

from bloomkit import dsops, models
from bloomkit.errors import UserError
from bloomkit.measure import harness
from bloomkit.serve import loadtest
from bloomkit.serve.app import read_metrics
from bloomkit.serve.proc import Server
from bloomkit.serve.scheduler import BadRequest, Engine, Params, Request
from conftest import assert_one_line_error, run_script

PROMPTS = harness.make_prompts(4)
N_NEW = 8


def _reference(model, tok, prompts, n):
    return [harness.generate(model, tok, [p], n).texts[0] for p in prompts]


@pytest.fixture(scope="module")
def expected(tiny_model, tiny_tokenizer):
    return _reference(tiny_model, tiny_tokenizer, PROMPTS, N_NEW)


def _complete(url, prompt, n=N_NEW, **kw):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


# ---------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("name,overlap", [("tiny", False), ("tiny-llama", False), ("tiny", True),
                                           ("tiny-llama", True)])
def test_engine_rows_joining_and_leaving_equal_generate(name, overlap):
    """Staggered arrivals, different lengths, at most 3 rows: rows join and leave between steps,
    and every row's greedy tokens equal plain ``generate`` on that prompt alone — prefilled
    before the step (prefill first) or in the prefill thread beside it (``overlap_prefill``)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = models.resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = models.load_tokenizer(path)
    prompts, lengths = harness.make_prompts(6), [9, 3, 7, 1, 9, 5]
    ref = [harness.generate(model, tok, [p], n).tokens[0] for p, n in zip(prompts, lengths)]
    eng = Engine(model, tok, max_batch=3, overlap_prefill=overlap)
    got, done, widest = {}, [threading.Event() for _ in prompts], [0]

    def sink(ev, i):
        got.setdefault(i, []).append(ev)
        widest[0] = max(widest[0], eng.batch.rows)
        if ev[3] is not None:
            done[i].set()

    reqs = [Request([tok(p)["input_ids"]], Params(max_tokens=n, temperature=0, ignore_eos=True),
                    sink=lambda ev, i=i: sink(ev, i)) for i, (p, n) in enumerate(zip(prompts, lengths))]
    if overlap:   # the model thread and the prefill thread run; requests arrive 20 ms apart
        worker = threading.Thread(target=eng.run, daemon=True)
        worker.start()
        for req in reqs:
            eng.submit(req)
            time.sleep(0.02)
        assert all(d.wait(60) for d in done), eng.failed
        t0 = time.perf_counter()
        while (eng.rows or eng.batch.rows) and time.perf_counter() - t0 < 10:
            time.sleep(0.01)   # the finished rows leave at the next step
        eng.stopping.set()
        worker.join(30)
    else:         # stepped by hand: one arrival per step
        for req in reqs:
            eng.submit(req)
            eng._collect(0)
            eng.step()
        while eng.rows or eng.waiting:
            eng._collect(0)
            eng.step()
    assert widest[0] <= 3
    for i, r in enumerate(ref):
        text = "".join(ev[2] for ev in got[i])
        assert text == tok.decode(r, skip_special_tokens=True), (i, text)
        assert got[i][-1][3] == "length" and got[i][-1][5] == lengths[i]
    assert eng.batch.rows == 0 and eng.batch.cache is None   # every row left, its cache freed


@pytest.mark.parametrize("name,packed", [("tiny", False), ("tiny-llama", False), ("tiny-llama", True)])
def test_slot_reuse_gives_the_logits_of_compaction(name, packed):
    """``slot_hold``: a row that leaves keeps its place for joining rows, which write their prefill
    into it instead of the cache being copied; the same plans give the same logits as freeing
    every place at once, the cache never holds more places than rows ran at once, and a place
    that waited longer than ``slot_hold`` steps is freed."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from bloomkit.serve.scheduler import KVBatch

    path = models.resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    pad = models.load_tokenizer(path).pad_token_id
    batches = [KVBatch(model, pad, slot_hold=h) for h in (0, 3)]
    if packed:
        for b in batches:
            b.enable_packed()
    rng, rows, reused, most, leaves = random.Random(0), 0, 0, 0, []
    for step in range(40):   # rows leave and join nearly every step (prompts of 1-6 tokens), then only leave
        keep = sorted(rng.sample(range(rows), rows - rng.randint(0, min(rows, 2)))) if rows else []
        admit = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 6))]
                 for _ in range(rng.randint(0 if keep else 1, 2) if step < 30 else 0)]
        feed = [rng.randrange(3, 200) for _ in keep]
        before, first = batches[1].places, []
        out = [b.apply({"keep": keep, "feed": feed, "admit": admit}, early=first.append) for b in batches]
        for a, b in zip(first[::2], first[1::2]):   # the joining prompts' logits, then the running rows'
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        if out[0] is not None:
            torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)
        reused += bool(admit) and batches[1].places <= before   # joined without the cache growing
        leaves.append(rows - len(keep))
        rows = len(keep) + len(admit)
        most = max(most, rows)
        assert [b.rows for b in batches] == [rows, rows] and batches[0].places == rows
        free = batches[1]._free
        assert batches[1].places == rows + len(free) <= most and len(free) <= sum(leaves[-4:])
    assert reused >= 5
    for b in batches:
        b.keep([])
        assert b.places == 0 and b.cache is None


def test_overlap_prefill_only_where_it_can_run(tiny_model, tiny_tokenizer):
    """One process on the CPU, eager, weights in place: anything else says why, and the engine
    refuses to overlap across ranks or beside a compiled forward."""
    from bloomkit.serve.scheduler import overlap_refusal

    assert overlap_refusal(tiny_model, device="cpu", ranks=1, compile=False) is None
    assert "collectives" in overlap_refusal(tiny_model, device="cpu", ranks=2, compile=False)
    assert "--compile" in overlap_refusal(tiny_model, device="cpu", ranks=1, compile=True)
    assert "CUDA stream" in overlap_refusal(tiny_model, device="cuda", ranks=1, compile=False)
    for kw in ({"sync": object()}, {"compile": True}):
        with pytest.raises(ValueError):
            Engine(tiny_model, tiny_tokenizer, overlap_prefill=True, **kw)


def _packed_run(model, tok, **kw):
    """Six requests of different lengths submitted one step apart into 3 places, through the
    packed step (compiled: after ``warm_up``, where any recompilation raises): returns (how many
    steps were packed, the texts, generate's texts)."""
    import contextlib

    import torch

    prompts, lengths = harness.make_prompts(6), [9, 3, 7, 1, 9, 5]
    ref = [harness.generate(model, tok, [p], n).texts[0] for p, n in zip(prompts, lengths)]
    eng = Engine(model, tok, max_batch=3, packed_prefill=True, **kw)
    if kw.get("compile"):
        eng.batch.warm_up()
    packed, step = [], eng.batch.packed_step
    eng.batch.packed_step = lambda *a: packed.append(1) or step(*a)
    got = {}
    strict = torch._dynamo.config.patch(error_on_recompile=True) if kw.get("compile") else contextlib.nullcontext()
    with strict:
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            eng.submit(Request([tok(p)["input_ids"]], Params(max_tokens=n, temperature=0, ignore_eos=True),
                               sink=lambda ev, i=i: got.setdefault(i, []).append(ev)))
            eng._collect(0)
            eng.step()
        while eng.rows or eng.waiting:
            eng._collect(0)
            eng.step()
    return len(packed), ["".join(ev[2] for ev in got[i]) for i in range(len(prompts))], ref


def _llama():
    import torch
    from transformers import AutoModelForCausalLM

    path = models.resolve_model("tiny-llama")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), models.load_tokenizer(path)


def test_packed_prefill_equals_generate_and_runs_only_on_llama(tiny_model, tiny_tokenizer):
    """``packed_prefill``: a step that admits prompts decodes the running rows and prefills the
    prompts in one forward; rows joining and leaving one step apart still get ``generate``'s
    greedy tokens (tiny-llama), and other models are refused with the reason."""
    from bloomkit.serve.scheduler import packed_refusal

    assert "llama" in packed_refusal(tiny_model, ranks=1, compile=False)   # BLOOM: its own attention
    with pytest.raises(ValueError):
        Engine(tiny_model, tiny_tokenizer, packed_prefill=True)
    model, tok = _llama()
    assert packed_refusal(model, ranks=1, compile=False) is None
    assert packed_refusal(model, ranks=2, compile=False) and packed_refusal(model, ranks=1, compile=True) is None
    packed, texts, ref = _packed_run(model, tok)
    assert packed >= 3   # admissions rode on decode steps
    assert texts == ref
    prompts = harness.make_prompts(6)
    # the swapped attention implementation is sdpa for every ordinary forward
    assert harness.generate(model, tok, [prompts[0]], 9).texts[0] == ref[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_packed_prefill_equals_generate_and_never_recompiles():
    """``compile`` with ``packed_prefill``: the packed step is compiled beside the forward, its
    graphs built by ``warm_up`` (a joining width of 1 rides as 2, with a pad column; a single
    running row takes the unpacked path), so rows joining and leaving build nothing more, and the
    tokens are ``generate``'s."""
    model, tok = _llama()
    packed, texts, ref = _packed_run(model, tok, compile=True)
    assert packed >= 2 and texts == ref


def test_engine_refuses_beyond_context_and_memory(tiny_model, tiny_tokenizer):
    eng = Engine(tiny_model, tiny_tokenizer, context_limit=64, kv_bytes_per_token=1024,
                 kv_budget_bytes=32 * 1024)
    with pytest.raises(BadRequest, match="context of 64"):
        eng.check([1] * 10, 60)
    with pytest.raises(BadRequest, match="KV cache") as e:
        eng.check([1] * 10, 30)
    assert e.value.param == "max_tokens" and "max_tokens 22 or less" in e.value.message
    eng.check([1] * 10, 22)


def test_chat_completions_use_the_chat_template(tiny_model, tiny_path):
    """In-process app (FastAPI's test client): with a chat template, chat messages become a prompt
    and the answer is the completion of that prompt; streaming chunks carry ``delta``."""
    import threading

    from fastapi.testclient import TestClient

    from bloomkit.serve.app import create_app

    tok = models.load_tokenizer(tiny_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    eng = Engine(tiny_model, tok, max_batch=4)
    threading.Thread(target=eng.run, daemon=True).start()
    try:
        client = TestClient(create_app(eng, tok, "tiny"))
        msgs = [{"role": "user", "content": "He is working on"}]
        r = client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 5,
                                                      "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        want = harness.generate(tiny_model, tok, ["user: He is working on\nassistant:"], 5).texts[0]
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}
        assert r.json()["object"] == "chat.completion"
        with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 5,
                                                                "temperature": 0, "ignore_eos": True,
                                                                "stream": True}) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
        bad = client.post("/v1/chat/completions", json={"messages": "hi"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    finally:
        eng.stopping.set()


# ---------------------------------------------------------------------------- Accelerate server

@pytest.fixture(scope="module")
def server():
    with Server(["--name", "tiny"]) as srv:
        yield srv


def test_greedy_completions_equal_generate(server, expected):
    r = _complete(server.url, PROMPTS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == expected
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"]["completion_tokens"] == N_NEW * len(PROMPTS)
    assert body["object"] == "text_completion" and body["model"] == "tiny"


def test_streaming_equals_non_streaming(server, expected):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[1], "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == expected[1]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == N_NEW


def test_concurrent_requests_each_get_their_own_answer(server, tiny_model, tiny_tokenizer):
    prompts = harness.make_prompts(8)
    lengths = [3, 12, 5, 9, 2, 12, 7, 4] * 2
    ref = {(p, n): t for p, n in set(zip(prompts * 2, lengths))
           for t in _reference(tiny_model, tiny_tokenizer, [p], n)}

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(server.url + "/v1/completions", json={
                "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True})
                for p, n in zip(prompts * 2, lengths)))

    answers = asyncio.run(go())
    for p, n, a in zip(prompts * 2, lengths, answers):
        assert a.status_code == 200, a.text
        assert a.json()["choices"][0]["text"] == ref[(p, n)]
    m = read_metrics(httpx.get(server.url + "/metrics").text)
    assert m["bloomkit_waiting_rows"] == 0 and m["bloomkit_time_to_first_token_seconds_count"] >= len(answers)


def test_metrics_read_while_the_server_is_under_load(server):
    """``/metrics`` polled as fast as it answers while 8 clients stream requests: every scrape is
    a 200 with consistent counts (the scheduler and prefill threads write the metrics the HTTP
    loop reads; an unlocked read of their deques fails with 'deque mutated during iteration')."""
    stop, scrapes, failures = threading.Event(), [], []

    def scrape():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.get(server.url + "/metrics")
                (scrapes if r.status_code == 200 else failures).append(r.text)

    poller = threading.Thread(target=scrape)
    poller.start()
    try:
        res = loadtest.sweep(server.url, concurrencies=[8], max_tokens=(2, 8), requests=32)
    finally:
        stop.set()
        poller.join()
    assert res["runs"][0]["errors"] == 0 and res["runs"][0]["mismatches"] == 0
    assert not failures and len(scrapes) > 10, (len(scrapes), failures[:1])
    counts = [read_metrics(text)["bloomkit_time_to_first_token_seconds_count"] for text in scrapes]
    assert counts == sorted(counts)


BAD = [  # (body, status, param)
    ('{"prompt": "x", ', 400, None),                                    # malformed JSON
    ('["x"]', 400, None),                                              # not an object
    ({"max_tokens": 4}, 400, "prompt"),                                # missing
    ({"prompt": 42}, 400, "prompt"),                                   # wrong type
    ({"prompt": ""}, 400, "prompt"),                                   # empty
    ({"prompt": ["ok", ""]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),        # beyond the KV budget
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


def test_bad_inputs_get_4xx_naming_the_field(server):
    for body, status, param in BAD:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"], (body, err)
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(server.url + "/health").status_code == 200   # still serving
    assert _complete(server.url, "x", 2).status_code == 200


def test_loadtest_client_checks_answers(server):
    res = loadtest.sweep(server.url, concurrencies=[1, 4], max_tokens=4, requests=8)
    for run in res["runs"]:
        assert run["errors"] == 0 and run["mismatches"] == 0 and run["requests"] == 8
        assert run["output_tokens_per_s"] > 0 and run["ttft_p50_ms"] <= run["e2e_p50_ms"]
    with pytest.raises(UserError, match="loopback"):
        loadtest.check_url("http://example.com:8000")
    # mixed lengths: each request draws its own, the same sequence every run; a shorter answer is
    # the reference's beginning, and still checked
    mixed = loadtest.sweep(server.url, concurrencies=[4], max_tokens=(2, 6), requests=8)
    assert mixed["runs"][0]["errors"] == 0 and mixed["runs"][0]["mismatches"] == 0
    n = loadtest.lengths((2, 6), 8)
    assert n == loadtest.lengths((2, 6), 8) and len(set(n)) > 1 and all(2 <= k <= 6 for k in n)
    ref = {"text": "abc", "max_tokens": 6}
    assert loadtest.matches("abcdef", {"text": "abc", "max_tokens": 3}, 6)       # asked for fewer
    assert not loadtest.matches("abcdef", ref, 6) and not loadtest.matches("abcdef", {"text": "abc", "max_tokens": 3})
    assert not loadtest.matches("abcdef", {"text": "abx", "max_tokens": 3}, 6)
    with pytest.raises(SystemExit):
        loadtest.main(["--max_tokens", "9-3"])


def test_queue_full_timeout_and_disconnect():
    """One row at a time, two may wait, 3 s per request: a long request holds the batch, two
    wait, the next is refused (429); the waiting ones time out (504); a streaming client that
    leaves frees its row for the next request."""
    with Server(["--name", "tiny", "--batch_size", "1", "--max_queue", "2", "--request_timeout", "3"]) as srv:
        long = {"prompt": "x", "max_tokens": 100000, "temperature": 0, "ignore_eos": True}

        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                first = asyncio.create_task(c.post(srv.url + "/v1/completions", json=long))
                await asyncio.sleep(0.5)
                waiting = [asyncio.create_task(c.post(srv.url + "/v1/completions", json=long)) for _ in range(2)]
                await asyncio.sleep(0.5)
                refused = await c.post(srv.url + "/v1/completions", json=long)
                return refused, await first, await asyncio.gather(*waiting)

        refused, first, waiting = asyncio.run(go())
        assert refused.status_code == 429, refused.text
        assert first.status_code == 504 and "request_timeout" in first.json()["error"]["message"]
        assert [w.status_code for w in waiting] == [504, 504]
        with httpx.stream("POST", srv.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
            next(r.iter_lines())   # generating; now leave
        t0 = time.perf_counter()
        assert _complete(srv.url, "y", 2).status_code == 200   # the single row was freed
        assert time.perf_counter() - t0 < 2.5
        m = read_metrics(httpx.get(srv.url + "/metrics").text)
        assert m["bloomkit_running_rows"] == 0 and m['bloomkit_requests_total{outcome="cancelled"}'] == 1
        assert m['bloomkit_requests_total{outcome="rejected"}'] == 1
        assert m['bloomkit_requests_total{outcome="timeout"}'] == 3


def test_recipe_refuses_bad_flags_in_one_line():
    proc = run_script(["recipes/serve.py", "--strategy", "accelerate", "--tp_size", "2"], timeout=120)
    assert_one_line_error(proc, "--tp_size", "ds-inference")
    proc = run_script(["recipes/serve.py", "--strategy", "ds-zero", "--compile"], timeout=120)
    assert_one_line_error(proc, "--compile", "ZeRO")
    proc = run_script(["recipes/serve.py", "--strategy", "ds-inference", "--overlap_prefill"], timeout=120)
    assert_one_line_error(proc, "--overlap_prefill", "collectives")
    proc = run_script(["recipes/serve.py", "--strategy", "ds-inference", "--packed_prefill"], timeout=120)
    assert_one_line_error(proc, "--packed_prefill", "one process")
    proc = run_script(["recipes/serve.py", "--name", "tiny", "--packed_prefill"], timeout=120)
    assert_one_line_error(proc, "--packed_prefill", "llama-family", "not bloom")   # from the config, before the load
    proc = run_script(["recipes/serve.py", "--name", "tiny", "--slot_hold", "-1"], timeout=120)
    assert_one_line_error(proc, "--slot_hold")
    proc = run_script(["recipes/serve.py", "--name", "tiny", "--freezing"], timeout=120)
    assert_one_line_error(proc, "--freezing", "--compile")
    proc = run_script(["recipes/serve.py", "--strategy", "ds-inference", "--compile", "--freezing"], timeout=120)
    assert_one_line_error(proc, "--freezing", "one process")


def test_freezing_refused_where_its_copies_would_not_fit(tiny_model, tiny_tokenizer):
    """--freezing: each compiled graph holds a packed copy of the weights, so the check counts the
    warm-up's graphs against free memory before any is built; CPU and one process only."""
    from bloomkit.serve.scheduler import freezing_refusal

    weights = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert freezing_refusal(tiny_model, device="cpu", ranks=1, graphs=10, available=100 * weights) is None
    why = freezing_refusal(tiny_model, device="cpu", ranks=1, graphs=10, available=10 * weights)
    assert "10 compiled graphs" in why and "free" in why
    assert "CPU" in freezing_refusal(tiny_model, device="cuda", ranks=1, graphs=10, available=100 * weights)
    assert "one process" in freezing_refusal(tiny_model, device="cpu", ranks=2, graphs=10, available=100 * weights)
    with pytest.raises(ValueError, match="compile"):
        Engine(tiny_model, tiny_tokenizer, freezing=True)
    # the recipe's check: the copies against the memory free, one line naming the flag
    import importlib.util

    from bloomkit.launch import ROOT

    spec = importlib.util.spec_from_file_location("serve_recipe", ROOT / "recipes" / "serve.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = recipe.parser().parse_args(["--compile", "--freezing", "--packed_prefill"])
    assert recipe.frozen_copies(args, tiny_model, "cpu", 1, available=100 * weights) == 10 * weights
    with pytest.raises(UserError, match="--freezing: each of the 10 compiled graphs.*; drop it"):
        recipe.frozen_copies(args, tiny_model, "cpu", 1, available=10 * weights)


def _graphs(url: str) -> int:
    return int(read_metrics(httpx.get(url + "/metrics").text)["bloomkit_compiled_graphs"])


@pytest.mark.slow
@pytest.mark.timeout(600)   # the compilation happens before /health answers
@pytest.mark.parametrize("flags", [["--name", "tiny"], ["--name", "tiny-llama", "--packed_prefill"],
                                   ["--name", "tiny-llama", "--packed_prefill", "--freezing"]],
                         ids=["bloom", "llama-packed", "llama-packed-frozen"])
def test_compiled_server_equals_generate_and_never_recompiles(flags, tiny_model, tiny_tokenizer):
    """--compile: the forward compiled with dynamic shapes, every graph built before the first
    request; rows joining and leaving in any number then reuse them (fp32: the same tokens), and
    dynamo never reaches its recompile limit (past it a kind of step would run eagerly, unseen).
    It prefills first (no prefill thread beside a compiled forward); Llama packs the prefill into
    the decode step, compiled too; --freezing makes the weights constants of those graphs (as
    many as the memory check counted)."""
    from bloomkit.serve.scheduler import WARM_UP_GRAPHS

    model, tok = (tiny_model, tiny_tokenizer) if flags[1] == "tiny" else _llama()
    expected = _reference(model, tok, PROMPTS, N_NEW)
    with Server([*flags, "--compile"], ready_timeout=540) as srv:
        built = _graphs(srv.url)
        assert 0 < built <= WARM_UP_GRAPHS["packed" if "--packed_prefill" in flags else "plain"]
        assert "prefill overlapped" not in srv.log()
        assert ("weights frozen" in srv.log()) == ("--freezing" in flags)
        if "--freezing" in flags:   # the weights were constants of the graphs, not inputs
            assert int(re.search(r"(\d+) linear weights pre-packed", srv.log())[1]) > 0, srv.log()
        r = _complete(srv.url, PROMPTS)
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == expected
        res = asyncio.run(loadtest.run_load(srv.url, prompts=PROMPTS, max_tokens=(2, N_NEW), requests=12,
                                            concurrency=4))
        want = dict(zip(PROMPTS, expected))
        assert all(r["error"] is None and loadtest.matches(want[r["prompt"]], r, N_NEW) for r in res)
        for p in PROMPTS:   # one client: one row decoding at every cache width
            assert _complete(srv.url, p).json()["choices"][0]["text"] == want[p]
        assert _graphs(srv.url) == built   # nothing compiled after start-up
        assert "recompile_limit" not in srv.log()


def test_lever_benchmark_measures_one_flag_by_itself():
    """``benchmarks/serve.py --only lever``: two of our servers, one with the lever's flags, the same
    answers, taking turns; each client count gets both medians and a comparison (one round: too few
    pairs for a verdict), and the plot draws both servers."""
    import importlib.util

    from bloomkit.launch import ROOT
    from bloomkit.measure import compare

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.lever("tiny", ["--max_queue", "64"], ["--slot_hold", "0"], rounds=1, runs={2: 4})
    assert out["servers"]["with"]["args"] == ["--max_queue", "64", "--slot_hold", "0"]
    part = out["traffic"]["mixed"]
    for k in ("with", "without"):
        assert all(r["errors"] == 0 and r["mismatches"] == 0 for r in part[k]["rounds"][0]), part[k]
    [row] = out["with_vs_without"]
    assert row["concurrency"] == 2 and row["throughput"]["verdict"] == compare.TOO_FEW
    assert set(row["output_tokens_per_s"]) == {"with", "without"}
    assert "with --slot_hold 0" in row["throughput"]["sentence"]
    assert set(bench.series({"levers": {"tiny + --slot_hold 0": out}})["lengths 16-48 (mixed)"]) == \
        {"levers/tiny + --slot_hold 0/traffic/with", "levers/tiny + --slot_hold 0/traffic/without"}


# ---------------------------------------------------------------------------- several ranks

def _no_leftovers(srv, pids, wait=10.0):
    import psutil

    def alive():
        out = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    t0 = time.perf_counter()
    while alive() and time.perf_counter() - t0 < wait:
        time.sleep(0.2)
    assert not alive(), [(p, psutil.Process(p).cmdline()) for p in alive()]
    assert not dsops.shm_buffers(srv.master_port)


@pytest.fixture(scope="module")
def tp2_server():
    with Server(["--name", "tiny", "--strategy", "ds-inference"], nprocs=2, ready_timeout=420) as srv:
        yield srv


@pytest.mark.timeout(600)   # the fixture's start counts: on a busy 2-core machine ranks load slowly
def test_tp2_server_equals_generate(tp2_server, expected):
    r = _complete(tp2_server.url, PROMPTS)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == expected
    assert httpx.get(tp2_server.url + "/health").status_code == 200
    m = read_metrics(httpx.get(tp2_server.url + "/metrics").text)   # rank 0 serves the metrics
    assert m['bloomkit_requests_total{outcome="ok"}'] == 1 and m["bloomkit_time_to_first_token_seconds_count"] == 1


@pytest.mark.timeout(600)
def test_zero_two_ranks_each_serve_their_own(expected):
    """ZeRO-3 on two CPU ranks (torchrun): each rank serves its own port, in lockstep."""
    with Server(["--name", "tiny", "--strategy", "ds-zero"], nprocs=2, launcher="torchrun",
                ready_timeout=420) as srv:
        async def go():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"prompt": PROMPTS, "max_tokens": N_NEW, "temperature": 0, "ignore_eos": True}
                # rank 0 busy with 4 rows while rank 1 gets one request later: lockstep + dummy steps
                a = asyncio.create_task(c.post(srv.url + "/v1/completions", json=body))
                b = asyncio.create_task(c.post(f"http://127.0.0.1:{srv.port + 1}/v1/completions",
                                               json={**body, "prompt": PROMPTS[2], "max_tokens": 3}))
                return await a, await b

        a, b = asyncio.run(go())
        assert [c["text"] for c in a.json()["choices"]] == expected
        assert expected[2].startswith(b.json()["choices"][0]["text"])
        pids = srv.pids()
        assert srv.stop() is not None   # both ranks shut down on SIGTERM
        _no_leftovers(srv, pids)


@pytest.mark.timeout(600)
def test_killed_rank_ends_the_server(tp2_server):
    pids = tp2_server.pids()
    victim = tp2_server.rank_pid(1)
    assert victim is not None
    t0 = time.perf_counter()
    os.kill(victim, 9)
    code = tp2_server.proc.wait(timeout=60)
    assert time.perf_counter() - t0 < 60
    assert code != 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(tp2_server.url + "/health", timeout=2)
    time.sleep(1)
    _no_leftovers(tp2_server, pids)


def test_latency_spread_shows_percentiles_only_with_enough_requests():
    def reqs(n):
        return [{"ttft": 0.01 * (i + 1), "tpot": 0.002, "e2e": 0.05, "error": None, "tokens": 4, "start": 0.0,
                 "prompt": "x", "text": "a"} for i in range(n)]
    few = loadtest.summarize(reqs(5), None, {"arrivals": "fixed", "concurrency": 1})
    many = loadtest.summarize(reqs(12), None, {"arrivals": "fixed", "concurrency": 4})
    assert (few["ttft_min_ms"], few["ttft_median_ms"], few["ttft_max_ms"], few["ttft_n"]) == (10.0, 30.0, 50.0, 5)
    assert loadtest.spread(few, "ttft") == "30.0 (10.0-50.0)"
    assert loadtest.spread(many, "ttft") == f"p50 {many['ttft_p50_ms']:.1f} / p90 {many['ttft_p90_ms']:.0f}"
    table = loadtest.spread_table([few, many])
    assert "p90" not in table.splitlines()[1] and "p50" in table.splitlines()[2]
