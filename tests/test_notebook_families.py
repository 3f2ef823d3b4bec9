"""Notebooks 01-03 executed by papermill for a model that is not a BLOOM, of odd sizes.

``odd-llama`` (Llama-style: hidden 96, 6 query heads sharing 3 key/value heads, RoPE, SwiGLU
MLP, untied head) shows that no cell assumes BLOOM: shapes come from ``bloomkit.arch`` and the
records, the BLOOM-only cells (ALiBi slopes per rank, kernel injection) say why they are
skipped, and what depends on the model is derived (ZeRO's quantization group: 64 does not
divide 96).  Each notebook's closing section then compares it with the tiny BLOOM
(``SECOND_MODEL`` falls back to ``tiny`` when ``MODEL_NAME`` is not a BLOOM).

The BLOOM default runs in test_notebook_01.py, test_ds_inference.py and test_ds_zero.py; the
parameters here are as small as theirs.
"""
import json
import time

import pytest

from bloomkit import memory, models, notebooks, results
from conftest import NOTEBOOKS

MODEL = "odd-llama"


@pytest.fixture(scope="module", autouse=True)
def built():
    for name in (MODEL, "tiny"):  # built once here, not inside a timed notebook
        models.ensure_preset(name)


def _execute(tmp_path, stem: str, params: dict) -> tuple[list[dict], dict]:
    res = tmp_path / "results.jsonl"
    t0 = time.perf_counter()
    out = notebooks.execute(NOTEBOOKS / f"{stem}.ipynb", tmp_path / f"{stem}.ipynb",
                            {"MODEL_NAME": MODEL, "RESULTS_PATH": str(res), **params})
    print(f"{stem} with {MODEL}: {time.perf_counter() - t0:.1f} s")
    return results.read_records(res), json.loads(out.read_text())


def _text(cell: dict) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            parts.append("".join(o["text"]))
        elif o["output_type"] in ("execute_result", "display_data"):
            parts.append("".join(o["data"].get("text/plain", "")))
    return "\n".join(parts)


def _output(nb: dict, needle: str) -> str:
    """The text output of the one code cell whose source contains ``needle``."""
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and needle in "".join(c["source"])]
    assert len(cells) == 1, (needle, len(cells))
    return _text(cells[0])


def _all_output(nb: dict) -> str:
    return "\n".join(_text(c) for c in nb["cells"] if c["cell_type"] == "code")


def _kv_lines(text: str) -> None:
    for name in (MODEL, "tiny"):
        kv = memory.kv_cache_bytes_per_token(models.load_config(models.resolve_model(name)), "fp32")
        assert f"{name}: {kv:,} B of KV cache per token in fp32" in text, name
    assert "odd-llama is a llama model: comparing it with the tiny BLOOM instead" in text


@pytest.mark.timeout(240)
def test_accelerate_notebook_on_odd_llama(tmp_path):
    recs, nb = _execute(tmp_path, "01_accelerate", {"BATCH_SIZES": [1, 8], "MAX_NEW_TOKENS": 8,
                                                    "CYCLES": 1})
    assert {r["options"]["variant"] for r in recs} == {"in-memory", "disk-offload", "int8"}
    for r in recs:
        assert r["model"] == MODEL and r["status"] == "ok" and r["ms_per_token"] > 0
        if r["options"]["variant"] != "int8":
            assert r["quality"]["identical"], r["quality"]
    plans = _output(nb, "kept whole:")
    assert "kept whole: ['LlamaDecoderLayer']" in plans and "kept whole: ['BloomBlock']" in plans
    assert "model.layers" in plans and "transformer.h" in plans
    checks = _output(nb, "def second_variant")
    assert "tiny" in checks and "True" in checks and "False" not in checks
    _kv_lines(_all_output(nb))


@pytest.mark.timeout(300)
def test_tp_notebook_on_odd_llama(tmp_path):
    recs, nb = _execute(tmp_path, "02_ds_inference_tp", {"MAX_NEW_TOKENS": 8, "CYCLES": 1,
                                                         "RUN_INT8": False})
    assert {r["world_size"] for r in recs} == {1, 2}
    assert all(r["model"] == MODEL and r["status"] == "ok" for r in recs)
    full = [r for r in recs if r["world_size"] == 2 and r["options"]["load_from"] == "full"]
    o = full[0]["options"]
    assert o["heads_per_rank"] == [4, 2] and o["kv_heads"] == 3  # 3 KV heads over 2 ranks: 2 + 1
    assert "alibi_heads" not in o
    assert o["rank0_shapes"]["layers.0.self_attn.k_proj.weight"].startswith("[32, 96]")
    assert any(r["options"]["load_from"] == "shards" for r in recs)
    tokens = {(r["world_size"], r["batch_size"], r["options"]["load_from"]): r["tokens"] for r in recs}
    for (n, bs, src), toks in tokens.items():
        assert toks == tokens[(1, bs, "full")], (n, bs, src)
    text = _all_output(nb)
    assert f"skipped: {MODEL} is a llama model, without ALiBi slopes to split" in text
    assert "skipped: the fused kernels are BLOOM's" in text
    launch2 = _output(nb, "dev2 = DEVICE")
    assert "tiny, TP=2 on cpu (autotp): query heads per rank [2, 2]" in launch2
    assert "True" in launch2 and "False" not in launch2
    alibi = _output(nb, "def rank0_block")
    assert "tiny: ALiBi heads per rank [[0, 1], [2, 3]]" in alibi
    assert f"{MODEL}: no ALiBi in the record" in alibi
    _kv_lines(text)


@pytest.mark.timeout(300)
def test_zero_notebook_on_odd_llama(tmp_path):
    recs, nb = _execute(tmp_path, "03_ds_zero_inference", {"BATCH_SIZES": [1, 4], "MAX_NEW_TOKENS": 8,
                                                           "CYCLES": 1})
    assert all(r["model"] == MODEL and r["status"] == "ok" for r in recs)
    one = [r for r in recs if r["world_size"] == 1 and not r["options"]["quant_bits"]]
    assert {r["options"]["offload"] for r in one} == {"none", "cpu", "nvme"}
    streams = [r for r in recs if r["world_size"] == 2]
    assert streams and all(r["quality"]["identical"] for r in streams)
    assert [r["options"]["quant_bits"] for r in recs if r["options"]["quant_bits"]] == [4, 4]
    text = _all_output(nb)
    assert "quantization groups of 32 weights (hidden size 96" in text  # 64 does not divide 96
    second = _output(nb, "second = run(")
    assert "tiny" in second and "True" in second and "False" not in second
    _kv_lines(text)
