"""The peers beside our server (bloomkit.serve.peers): vLLM and ``transformers serve``.

vLLM (marked ``vllm``: ``make test-vllm``, which builds ``.venv-vllm`` with ``make setup-vllm``;
skipped, saying so, where ``.venv-vllm`` is absent): its greedy answers equal plain ``generate``'s
for the trained model's own prompts, through its offline API (``LLM.generate``) and through its
OpenAI server, which leaves no process behind; a head_dim-16 model is refused in one line before
anything starts.  vLLM's first start compiles its model (about 2 minutes on 2 cores).

``transformers serve --continuous-batching`` (marked ``slow``, from ``.venv``): on a Llama its
greedy completions equal ``generate``'s; on BLOOM (no sdpa attention; eager becomes paged|eager)
its first request fails the way its paged cache does today (``'PagedAttentionCache' object has
no attribute 'get_seq_length'``), and the test says so: when transformers fixes it, this test
fails and asks for BLOOM to be measured too.
"""
from __future__ import annotations

import json
import subprocess

import psutil
import pytest

from bloomkit import models
from bloomkit.errors import UserError
from bloomkit.measure import harness
from bloomkit.serve import peers

N_NEW = 16
needs_vllm = pytest.mark.skipif(not peers.available("vllm"),
                                reason="needs .venv-vllm: run `make setup-vllm` (or `make test-vllm`)")


@pytest.fixture(scope="module")
def trained():
    import torch
    from transformers import AutoModelForCausalLM

    path = models.resolve_model("trained")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = models.load_tokenizer(path)
    prompts = json.loads((path / "prompts.json").read_text())["prompts"]
    return model, tok, prompts


@pytest.fixture(scope="module")
def expected(trained):
    """Plain ``generate``'s greedy answers, exactly N_NEW tokens, one prompt at a time."""
    model, tok, prompts = trained
    gens = [harness.generate(model, tok, [p], N_NEW) for p in prompts]
    return {"tokens": [g.tokens[0] for g in gens], "texts": [g.texts[0] for g in gens]}


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


# ---------------------------------------------------------------------------- vLLM

def test_head_dim_16_is_refused_in_one_line():
    """vLLM's CPU attention has no head_dim 16: ``tiny`` is refused before anything starts, naming
    models that work (no vLLM needed to say so)."""
    with pytest.raises(UserError) as err:
        peers.check_vllm_head_dim(models.resolve_model("tiny"), "tiny", "cpu")
    msg = str(err.value)
    assert "\n" not in msg and "head_dim 16" in msg and "trained" in msg and "small-llama" in msg
    peers.check_vllm_head_dim(models.resolve_model("tiny"), "tiny", "cuda")   # its GPU kernels have no such limit
    peers.check_vllm_head_dim(models.resolve_model("trained"), "trained", "cpu")


@pytest.mark.vllm
@needs_vllm
def test_vllm_refuses_head_dim_16_and_knows_its_head_sizes():
    """The peer refuses ``tiny-llama`` in one line, and the head sizes we refuse by are the ones
    the installed vLLM's CPU attention supports."""
    if peers.vllm_flavour() == "cpu":
        with pytest.raises(UserError) as err:
            peers.Peer("vllm", "tiny-llama")
        assert "\n" not in str(err.value) and "small-llama" in str(err.value)
        code = ("from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as B; "
                "print(list(B.get_supported_head_sizes()))")
        out = subprocess.run([str(peers.vllm_python()), "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == list(peers.VLLM_CPU_HEAD_SIZES)


@pytest.mark.vllm
@needs_vllm
def test_vllm_offline_greedy_equals_generate(trained, expected):
    prompts = trained[2]
    res = peers.vllm_generate("trained", prompts, N_NEW)
    assert res.tokens == expected["tokens"]


@pytest.mark.vllm
@needs_vllm
def test_vllm_server_greedy_equals_generate_and_leaves_nothing(trained, expected, tmp_path):
    import httpx

    prompts = trained[2]
    with peers.Peer("vllm", "trained", log_path=tmp_path / "vllm.log") as peer:
        pids = peer.pids()
        assert len(pids) >= 2   # the API server and its engine process(es)
        body = {"model": peer.model_id(), "prompt": prompts, "max_tokens": N_NEW, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(peer.url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == expected["texts"]
        assert peer.complete(prompts[0], N_NEW, ignore_eos=True) == expected["texts"][0]
        info = peer.describe()
    assert info["peer"] == "vllm" and info["package"] in ("vllm-cpu", "vllm") and info["version"]
    assert info["start_s"] > 0 and info["first_request_s"] is not None
    assert "vllm.entrypoints.openai.api_server" in info["command"] and "--dtype float32" in info["command"]
    assert not _alive(pids), f"vLLM processes left running: {_alive(pids)}"
    assert (tmp_path / "vllm.log").read_text().strip()


@pytest.mark.vllm
@needs_vllm
def test_vllm_tp2_server_greedy_equals_generate(trained, expected):
    """``--tensor-parallel-size 2``: on the CPU each rank bound to its own core (vLLM's automatic
    binding wants a NUMA node per rank); eager, so no second compilation."""
    import httpx

    prompts = trained[2]
    with peers.Peer("vllm", "trained", tp=2, eager=True) as peer:
        body = {"model": peer.model_id(), "prompt": prompts, "max_tokens": N_NEW, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(peer.url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        info = peer.describe()
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == expected["texts"]
    assert "--tensor-parallel-size 2" in info["command"]


def test_cpu_bind_splits_the_cores_between_ranks():
    assert peers.cpu_bind(2, [0, 1]) == "0|1"
    assert peers.cpu_bind(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    with pytest.raises(UserError, match="tp=2 or fewer"):
        peers.cpu_bind(4, [0, 1])


# ---------------------------------------------------------------------------- transformers serve

@pytest.mark.slow
def test_transformers_serve_llama_equals_generate_and_bloom_fails():
    """``transformers serve --continuous-batching`` (paged attention over sdpa, fp32, CPU) answers
    a Llama's greedy completions as ``generate`` does; on BLOOM its first request fails."""
    import torch
    from transformers import AutoModelForCausalLM

    path = models.resolve_model("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = models.load_tokenizer(path)
    prompts = harness.make_prompts(3)
    # it stops at </s> (it accepts no ignore_eos), so the reference may stop there too
    want = [harness.generate(model, tok, [p], 8, min_new_tokens=0).texts[0] for p in prompts]
    with peers.Peer("transformers", "tiny-llama") as peer:
        pids = peer.pids()
        got = [peer.complete(p, 8) for p in prompts]
        info = peer.describe()
    assert got == want
    assert info["package"] == "transformers" and info["first_request_s"] is not None
    assert not _alive(pids)

    # BLOOM has no sdpa attention (the server exits while loading it); with eager attention,
    # which continuous batching turns into paged|eager, it loads and its first request fails
    with pytest.raises(UserError) as err:
        with peers.Peer("transformers", "tiny", attn="eager"):
            pass
    msg = str(err.value)
    assert "\n" not in msg
    assert "get_seq_length" in msg, (
        "transformers serve's continuous batching now answers on BLOOM (or fails differently): "
        f"update the docs and measure it as a peer on BLOOM too. {msg}")


@pytest.mark.vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [1, 2])
def test_benchmark_peers_part_records_both_sides(tp):
    """``benchmarks/serve.py``'s peers part, small: ours and vLLM on ``trained`` with the same client, the same
    greedy answers, 0 errors and 0 mismatches on both sides; transformers serve's refusal of BLOOM recorded, not
    hidden; every comparison of one round says it has too few pairs for a verdict.  With ``tp=2`` both servers
    split the model over two CPU ranks (ours: DeepSpeed AutoTP; vLLM: --tensor-parallel-size 2), and transformers
    serve, which has no TP, is refused."""
    import importlib.util

    from bloomkit.measure import compare

    from bloomkit.launch import ROOT

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.peers("trained", ("vllm", "transformers"), rounds=1, runs={1: 4, 4: 8}, tp=tp)
    assert set(out["servers"]) == {"ours", "vllm"} and out["servers"]["vllm"]["package"] in ("vllm-cpu", "vllm")
    assert out["tp"] == tp and out["servers"]["vllm"]["tp"] == tp
    assert ("AutoTP, 2 ranks" in out["servers"]["ours"]["engine"]) == (tp == 2)
    assert ("BloomForCausalLM" if tp == 1 else "no tensor parallelism") in out["refused"]["transformers"]
    for t, part in out["traffic"].items():
        assert part["same_answers_as_ours"] == {"vllm": True}, t
        for server in ("ours", "vllm"):
            for row in part[server]["rounds"][0]:
                assert row["errors"] == 0 and row["mismatches"] == 0 and row["output_tokens_per_s"] > 0, (t, server, row)
    rows = out["ours_vs_peers"]["vllm"]
    assert len(rows) == 2 * 2 and all(r["throughput"]["verdict"] == compare.TOO_FEW for r in rows)
