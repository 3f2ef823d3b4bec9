"""The shared harness: prompts, exact-N greedy generation, timing, records, tie-aware checks."""
import json
import threading
import time

import pytest
import torch

from bloomkit import results
from bloomkit.measure import harness, quality
from bloomkit.errors import UserError


def test_make_prompts_repeats_the_blog_prompts():
    p = harness.make_prompts(10)
    assert p[:8] == harness.STANDARD_PROMPTS and p[8:] == harness.STANDARD_PROMPTS[:2]
    assert harness.make_prompts(3, ["x", "y"]) == ["x", "y", "x"]
    with pytest.raises(UserError):
        harness.make_prompts(0)


def test_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\n second \n")
    assert harness.read_prompts_file(f) == ["first", "second"]
    f.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        harness.read_prompts_file(f)
    with pytest.raises(UserError, match="does not exist"):
        harness.read_prompts_file(tmp_path / "missing.txt")


def test_exactly_n_new_tokens_even_when_eos_wins(tiny_model, tiny_tokenizer):
    # Make EOS the argmax everywhere: generate must still produce exactly N tokens.
    model = tiny_model
    bias = torch.zeros(model.config.vocab_size)
    bias[tiny_tokenizer.eos_token_id] = 1e4
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        gen = harness.generate(model, tiny_tokenizer, harness.make_prompts(3), 7)
    finally:
        handle.remove()
    assert [len(t) for t in gen.tokens] == [7, 7, 7]


def test_batch_rows_equal_single_rows(tiny_model, tiny_tokenizer):
    """Left padding must not change any row's output."""
    prompts = harness.make_prompts(8)
    batch = harness.generate(tiny_model, tiny_tokenizer, prompts, 12)
    for i in (0, 1, 6):
        single = harness.generate(tiny_model, tiny_tokenizer, [prompts[i]], 12)
        assert single.tokens[0] == batch.tokens[i]


def test_time_generation_method(tiny_model, tiny_tokenizer):
    calls = []

    def run():
        calls.append(1)
        return harness.generate(tiny_model, tiny_tokenizer, harness.make_prompts(2), 5)

    t = harness.time_generation(run, batch_size=2, max_new_tokens=5, cycles=3)
    assert len(calls) == 4  # one warm-up + 3 timed
    assert len(t.cycle_seconds) == 3
    med = sorted(t.cycle_seconds)[1]
    assert t.ms_per_token == pytest.approx(med * 1000 / 10)
    assert t.peak_rss_bytes > 0


def test_compare_tokens_tells_ties_from_mismatches():
    scores = [torch.tensor([[5.0, 4.0, 0.0]]), torch.tensor([[3.0, 3.00001, 0.0]]),
              torch.tensor([[1.0, 0.0, 0.0]])]
    ref = harness.Generation(prompts=["p"], tokens=[[0, 1, 0]], texts=[""], scores=scores)
    tie = quality.compare_tokens(ref, [[0, 0, 0]])
    assert tie["ties"] == 1 and tie["real_mismatches"] == 0 and not tie["identical"]
    real = quality.compare_tokens(ref, [[1, 1, 0]])
    assert real["real_mismatches"] == 1 and real["mismatches"][0]["step"] == 0
    same = quality.compare_tokens(ref, [[0, 1, 0]])
    assert same["identical"] and same["token_match"] == 1.0


def test_record_roundtrip_and_atomic_write(tmp_path, tiny_model, tiny_tokenizer):
    gen = harness.generate(tiny_model, tiny_tokenizer, ["He has a"], 3)
    rec = results.make_record(strategy="x", model="tiny", dtype="fp32", batch_size=1,
                              max_new_tokens=3, load_seconds=0.1, generation=gen)
    out = results.write_json(tmp_path / "r.json", rec)
    back = json.loads(out.read_text())
    assert back["tokens"] == gen.tokens and back["prompts"] == ["He has a"]
    assert back["versions"]["torch"] and back["hardware"]["cpu_cores"]
    assert not list(tmp_path.glob("*.tmp"))

    with pytest.raises(TypeError):
        results.write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and not list(tmp_path.glob("*.tmp"))


def test_blog_table_marks_oom():
    recs = [results.make_record(strategy="a", model="m", dtype="fp32", batch_size=b,
                                max_new_tokens=1, load_seconds=1.0, status="ok" if b < 8 else "oom")
            for b in (1, 8)]
    recs[0]["ms_per_token"] = 2.0
    table = results.blog_table(recs)
    assert table.loc["a", 1] == 2.0 and table.loc["a", 8] == "oom"


def test_peak_rss_sees_a_transient_allocation():
    """200 MiB of fresh pages (an anonymous mapping, touched page by page: memory the process did
    not hold before, whatever its allocator kept from earlier tests) are seen while they live."""
    import mmap

    n = 200 * 2**20
    with harness.PeakRSS(interval=0.001) as rss:
        base = rss.peak
        buf = mmap.mmap(-1, n)
        for i in range(0, n, mmap.PAGESIZE):
            buf[i] = 1
        # until the sampler has run once while the pages live (its thread may wait on a loaded machine)
        deadline = time.monotonic() + 30
        while rss.peak - base <= 150 * 2**20 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        buf.close()
    assert rss.peak - base > 150 * 2**20
