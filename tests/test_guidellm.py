"""A third-party client against our server: GuideLLM (bloomkit.serve.guidellm).

Marked ``guidellm`` (``make test-guidellm``, which builds ``.venv-guidellm`` with ``make
setup-guidellm``; skipped, saying so, where ``.venv-guidellm`` is absent): GuideLLM 0.8's CLI, its
``openai_http`` backend on ``/v1/completions``, synthetic 32-token prompts asking for 32 tokens,
drives our server (``trained``, fp32) at 1 and at 8 streams in one run: 0 errors, the request
count it was asked for, every request the lengths it asked for, output tokens/s > 0, and (greedy)
every answer under 8 streams equal to its prompt's answer alone; a server that
is not there ends in one line with GuideLLM's last log lines.  About a minute: GuideLLM's own start
(torch, a worker process per stream) is most of it.

Unmarked (``make test``, no GuideLLM needed): an absent ``.venv-guidellm`` and a file that is not
GuideLLM's report each end in one line naming the fix.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from bloomkit.errors import UserError
from bloomkit.launch import free_port
from bloomkit.serve import guidellm, loadtest
from bloomkit.serve.proc import Server

REQUESTS = 16
needs_guidellm = pytest.mark.skipif(not guidellm.available(),
                                    reason="needs .venv-guidellm: run `make setup-guidellm` (or `make test-guidellm`)")


def test_absent_guidellm_is_one_line_naming_setup(tmp_path):
    with pytest.raises(UserError) as err:
        guidellm.run_guidellm("http://127.0.0.1:9", "tiny", streams=1, requests=1, out_dir=tmp_path,
                              venv=tmp_path / "no-venv")
    msg = str(err.value)
    assert "\n" not in msg and "make setup-guidellm" in msg


def test_not_a_report_is_one_line():
    with pytest.raises(UserError, match="not a GuideLLM JSON report"):
        guidellm.summarize_report({"accelerate": {}})


@pytest.mark.guidellm
@needs_guidellm
def test_guidellm_against_our_server_1_and_8_streams(tmp_path):
    with Server(["--name", "trained", "--dtype", "fp32"], ready_timeout=300) as srv:
        res = guidellm.run_guidellm(srv.url, "trained", streams=(1, 8), requests=REQUESTS, prompt_tokens=32,
                                    output_tokens=32, out_dir=tmp_path, timeout=300)
        sent = guidellm.answers(json.loads((tmp_path / "guidellm.json").read_text()), 1)   # the 8-stream run
        alone = asyncio.run(loadtest.reference(srv.url, [p for p, _ in sent], 32))
    # greedy (temperature 0 through GuideLLM's extras): under 8 streams each answer is its prompt's alone
    assert [t.rstrip("\ufffd") for _, t in sent] == [alone[p].rstrip("\ufffd") for p, _ in sent]
    assert res["versions"]["guidellm"] == "0.8.1" and "openai_http" in res["command"]
    assert "first token included" in res["definitions"]["tpot"].lower()
    assert [r["streams"] for r in res["runs"]] == [1, 8]
    for run in res["runs"]:
        assert run["requests"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}, run
        assert run["output_tokens"] == 32 * REQUESTS and run["output_tokens_per_request"]["p50"] == 32
        assert run["prompt_tokens"]["p50"] == 32
        assert run["output_tokens_per_s"] > 0 and run["ttft_ms"]["p50"] > 0 and run["itl_ms"]["p50"] > 0
        assert run["vllm_definitions"]["ttft_n"] == REQUESTS
    # eight in flight is more than one: GuideLLM kept the streams it was asked for
    assert res["runs"][1]["concurrency_mean"] > 4 > res["runs"][0]["concurrency_mean"]


@pytest.mark.guidellm
@needs_guidellm
def test_guidellm_failure_is_one_line_with_its_log(tmp_path):
    with pytest.raises(UserError) as err:
        guidellm.run_guidellm(f"http://127.0.0.1:{free_port()}", "tiny", streams=1, requests=1,
                              out_dir=tmp_path, timeout=180)
    msg = str(err.value)
    assert "\n" not in msg and "GuideLLM failed" in msg and "guidellm.log" in msg
