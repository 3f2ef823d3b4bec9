"""``bloomkit.serve.peers.refusal`` and ``tree_usage``: what notebook 06 decides and measures before and
around a peer server, without starting one (seconds; no vLLM needed)."""
import os
import subprocess
import sys
import time

import pytest

from bloomkit.errors import UserError
from bloomkit.serve import peers
from bloomkit.serve.proc import Server


def test_transformers_serve_refuses_bloom_and_takes_a_llama():
    why = peers.refusal("transformers", "trained")
    assert why and "BloomForCausalLM has no sdpa attention" in why and "\n" not in why
    assert peers.refusal("transformers", "odd-llama") is None
    assert peers.refusal("transformers", "odd-llama", tp=2).startswith("transformers serve has no tensor parallelism")


def test_vllm_refuses_head_dim_16_or_says_it_is_not_installed():
    why = peers.refusal("vllm", "odd-llama")
    if peers.available("vllm"):
        assert "head_dim 16" in why
        assert peers.refusal("vllm", "trained") is None
    else:
        assert "make setup-vllm" in why and "not installed" in why


def test_unknown_peer_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown peer 'tgi'"):
        peers.refusal("tgi", "trained")


def test_tree_usage_counts_a_process_tree_and_its_cpu_time():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    srv = Server([])
    srv.proc = subprocess.Popen([sys.executable, "-c",
                                 f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {busy!r}]).wait()"],
                                start_new_session=True)
    try:
        for _ in range(100):   # until the child has spent its 0.3 s of CPU
            got = peers.tree_usage(srv)
            if got["processes"] == 2 and got["cpu_s"] >= 0.3:
                break
            time.sleep(0.1)
        assert got["processes"] == 2 and got["threads"] >= 2 and got["cpu_s"] >= 0.3, got
    finally:
        os.killpg(srv.proc.pid, 9)
        srv.proc.wait()
        os.unlink(srv._log.name)
