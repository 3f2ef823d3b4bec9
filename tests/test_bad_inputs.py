"""Bad *files* are one line on every recipe and every rank, before anything is loaded.

Each case copies the tiny preset, breaks one file (a truncated or corrupt shard, a missing
shard, a config or tokenizer that does not parse, ...) and runs a recipe on it: exit code 2,
exactly one ``error: ...`` line on stderr naming the fix, no traceback, no hang, and no
``--json_out`` written.  Most cases go through the accelerate recipe (the fastest to
start); two model-file cases through ZeRO-Inference and one through the TP recipe on two
ranks, where each rank must say it once.  The recipe runs are started together, two at a
time (each spends seconds importing torch), so the file takes about a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bloomkit import checkpoint, launch, models, results
from bloomkit.errors import UserError
from conftest import ROOT

ACCEL = "recipes/accelerate_inference.py"
ZERO = "recipes/ds_zero_inference.py"
TP = "ds_inference.py"
SHARD = "model-00002-of-00004.safetensors"
TIMEOUT = 150  # seconds per run: a hang fails the test instead of blocking the suite


# ---------------------------------------------------------------------------- ways to break a model

def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def truncated_shard(d, tmp):
    f = d / SHARD
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # an interrupted download


def corrupt_shard(d, tmp):
    f = d / SHARD
    data = f.read_bytes()
    f.write_bytes(b"\xde\xad\xbe\xef" * 4 + data[16:])  # garbage where the header starts


def missing_shard(d, tmp):
    (d / "model-00003-of-00004.safetensors").unlink()


def index_not_json(d, tmp):
    (d / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 12')


def config_not_json(d, tmp):
    (d / "config.json").write_text('{"model_type": "bloom", "n_layer": ')


def unknown_model_type(d, tmp):
    _edit_config(d, model_type="nosuchmodel", architectures=["NoSuchForCausalLM"])


def no_model_type(d, tmp):
    _edit_config(d, model_type=None)


def no_tokenizer(d, tmp):
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()


def corrupt_tokenizer(d, tmp):
    (d / "tokenizer.json").write_bytes(b'{"version": "1.0", "model": \x00\xff\xfe garbage')


def latin1_prompts(d, tmp):
    f = tmp / "prompts.txt"
    f.write_bytes(b"caf\xe9\n")
    return ["--prompts_file", str(f)]


def unwritable_json_out(d, tmp):
    return {"json_out": "/proc/bloomkit/out.json"}


def cache_too_large(d, tmp):
    # 10^8 tokens x 4096 rows of the tiny BLOOM's KV cache: ~380 TiB, more than any machine
    return ["--max_new_tokens", "100000000", "--batch_size", "4096"]


def beyond_context(d, tmp):
    _edit_config(d, max_position_embeddings=16)  # BLOOM has no such limit (ALiBi): give it one
    return ["--max_new_tokens", "20"]


# case -> (how to break the copy, words the error line must contain, needs its own copy)
CASES = {
    "truncated_shard": (truncated_shard, [SHARD, "truncated", "re-download"], True),
    "corrupt_shard": (corrupt_shard, [SHARD, "not a valid safetensors", "re-save"], True),
    "missing_shard": (missing_shard, ["model-00003-of-00004.safetensors", "missing",
                                      "re-download"], True),
    "index_not_json": (index_not_json, ["model.safetensors.index.json", "not valid JSON"], True),
    "config_not_json": (config_not_json, ["config.json", "not valid JSON"], True),
    "unknown_model_type": (unknown_model_type, ["nosuchmodel", "does not know"], True),
    "no_model_type": (no_model_type, ["model_type", "save_pretrained"], True),
    "no_tokenizer": (no_tokenizer, ["tokenizer.json", "tokenizer.save_pretrained"], True),
    "corrupt_tokenizer": (corrupt_tokenizer, ["tokenizer.json", "copy the tokenizer files"], True),
    "latin1_prompts": (latin1_prompts, ["not UTF-8", "0xe9", "iconv"], False),
    "unwritable_json_out": (unwritable_json_out, ["/proc", "--json_out"], False),
    "cache_too_large": (cache_too_large, ["KV cache", "largest --max_new_tokens that fits is"],
                        False),
    "beyond_context": (beyond_context, ["context of 16 tokens", "--max_new_tokens"], True),
}
ZERO_CASES = ["corrupt_shard", "missing_shard"]
TP_CASE = "truncated_shard"
# test function -> recipe key, for starting only the runs the selected tests need
TESTS = {"test_accelerate_refuses_bad_file": "accelerate", "test_ds_zero_refuses_bad_file": "zero",
         "test_tp_ranks_refuse_bad_file": "tp2"}


# ---------------------------------------------------------------------------- running them


def _run(recipe: str, name: str, out: str, extra: list[str]) -> subprocess.CompletedProcess:
    args = ["--name", name, "--json_out", out, "--max_new_tokens", "4", *extra]
    if recipe == "tp2":
        return launch.launch(TP, args, nprocs=2, timeout=TIMEOUT, check=False)
    script = ACCEL if recipe == "accelerate" else ZERO
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if recipe == "zero":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=str(ROOT))


def _wanted(request) -> list[tuple[str, str]]:
    keys = []
    for item in request.session.items:
        recipe = TESTS.get(getattr(item, "originalname", None))
        if recipe is None or item.module is not request.module:
            continue
        case = item.callspec.params["case"] if hasattr(item, "callspec") else TP_CASE
        keys.append((recipe, case))
    keys.sort(key=lambda k: k[0] != "tp2")  # the longest run first
    return keys


class Runs:
    """The started runs; :meth:`result` waits for one."""

    def __init__(self, jobs: dict):
        self.jobs = jobs

    def result(self, recipe: str, case: str) -> tuple[subprocess.CompletedProcess, Path]:
        fut, out = self.jobs[(recipe, case)]
        return fut.result(), out


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start every selected recipe run at once, two at a time (the tests then wait for
    theirs): ``runs.result(recipe, case)`` is ``(completed process, json_out path)``."""
    src = models.ensure_preset("tiny")
    jobs = {}
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        for recipe, case in _wanted(request):
            tmp = tmp_path_factory.mktemp(f"{recipe}-{case}")
            brk, _, own_copy = CASES[case]
            d = tmp / "model" if own_copy else Path(src)
            if own_copy:
                shutil.copytree(src, d)
            extra = brk(d, tmp) or []
            out = str(tmp / "out.json")
            if isinstance(extra, dict):
                out, extra = extra["json_out"], []
            jobs[(recipe, case)] = (pool.submit(_run, recipe, str(d), out, extra), Path(out))
        yield Runs(jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stderr_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def _check_refused(proc, out: Path, needles) -> str:
    lines = _stderr_lines(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    return lines[0]


# ---------------------------------------------------------------------------- the tests


@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.parametrize("case", list(CASES))
def test_accelerate_refuses_bad_file(runs, case):
    proc, out = runs.result("accelerate", case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _check_refused(proc, out, CASES[case][1])
    if case == "cache_too_large":  # the largest value that fits, as a number to pass on
        assert re.search(r"fits is \d+ \(or lower --batch_size\)", line), line


@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.parametrize("case", ZERO_CASES)
def test_ds_zero_refuses_bad_file(runs, case):
    proc, out = runs.result("zero", case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _check_refused(proc, out, CASES[case][1])


@pytest.mark.timeout(4 * TIMEOUT)
def test_tp_ranks_refuse_bad_file(runs):
    """Both TP ranks check the model before the process group starts, so the launch ends
    (nothing hangs waiting for a peer) with rank 0's one line. Rank 1 prints its own, tagged
    line only if it gets there before the launcher, seeing rank 0 exit, stops it: both
    orders happen, so either is right."""
    proc, out = runs.result("tp2", TP_CASE)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = _stderr_lines(proc)
    prefixes = sorted(ln.split(":", 1)[0] for ln in lines)
    assert prefixes in (["error"], ["error", "error (rank 1)"]), proc.stderr[-3000:]
    for ln in lines:
        for n in CASES[TP_CASE][1]:
            assert n.lower() in ln.lower(), ln
    assert not out.exists()


# ------------------------------------------------------------------------ the checks, in process


@pytest.fixture(scope="module")
def tiny():
    return models.ensure_preset("tiny")


def _model_files(src: Path, d: Path):
    d.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != checkpoint.INDEX:
            shutil.copy2(f, d / f.name)


def test_valid_checkpoints_pass(tiny, tmp_path):
    """The preset (sharded, with index), one model.safetensors, bloomkit TP shards (no
    index) and a DeepSpeed checkpoint folder (no safetensors) all pass."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(tiny.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    assert len(checkpoint.check_model_dir(tiny).weight_files) == 4

    single = tmp_path / "single"
    _model_files(tiny, single)
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    files = checkpoint.check_model_dir(single).weight_files
    assert [f.name for f in files] == ["model.safetensors"]

    shards = tmp_path / "shards"  # the layout of bloomkit.strategies.tp_shards
    _model_files(tiny, shards)
    names = sorted(tensors)
    for r in range(2):
        save_file({k: tensors[k] for k in names[r::2]},
                  str(shards / f"tp-rank{r:02d}-of-02.safetensors"), metadata={"rank": str(r)})
    (shards / "bloomkit_tp_shards.json").write_text(json.dumps({"format": "bloomkit-tp-shards"}))
    assert len(checkpoint.check_model_dir(shards).weight_files) == 2

    ds = tmp_path / "ds"
    _model_files(tiny, ds)
    (ds / "ds_inference_config.json").write_text(json.dumps(
        {"type": "ds_model", "checkpoints": ["tp_00_00.pt"], "tp_size": 1}))
    assert models.resolve_model(str(ds)) == ds
    assert checkpoint.check_model_dir(ds).weight_files == []


def test_header_check_reads_no_tensor_data(tiny, tmp_path):
    """Only the header is read: a shard whose data bytes are all wrong (same length) passes
    this check, and one byte too many or too few does not."""
    f = tmp_path / "m.safetensors"
    data = (tiny / SHARD).read_bytes()
    n = 8 + int.from_bytes(data[:8], "little")
    f.write_bytes(data[:n] + b"\x00" * (len(data) - n))
    assert checkpoint.read_safetensors_header(f)
    for bad in (data[:-1], data + b"\x00"):
        f.write_bytes(bad)
        with pytest.raises(UserError, match="truncated|beyond"):
            checkpoint.read_safetensors_header(f)


def test_largest_max_new_tokens_that_fits_is_exact(tiny):
    from bloomkit import memory

    config = checkpoint.check_model_dir(tiny).config
    per_token = memory.kv_cache_bytes_per_token(config, "fp32")
    weights = memory.weight_bytes(config, "fp32")
    total = weights + per_token * 4 * 1000  # room for 4 rows of 1000 tokens
    kw = dict(dtype="fp32", device="cpu", batch_size=4, prompt_len=10, total_bytes=total)
    with pytest.raises(UserError) as e:
        checkpoint.check_generation(config, max_new_tokens=5000, **kw)
    fits = int(re.search(r"fits is (\d+)", str(e.value)).group(1))
    assert fits == 990
    checkpoint.check_generation(config, max_new_tokens=fits, **kw)
    with pytest.raises(UserError):
        checkpoint.check_generation(config, max_new_tokens=fits + 1, **kw)
    # BLOOM has no context limit (ALiBi); a config with one is held to it
    assert checkpoint.context_limit(config) is None
    assert checkpoint.context_limit({"n_positions": 1024}) == 1024


def test_check_writable_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "r.json"
    results.check_writable(target)
    assert list(tmp_path.iterdir()) == []  # probed, not created: write_json makes the folders
    with pytest.raises(UserError, match="is a directory"):
        results.check_writable(tmp_path)
    with pytest.raises(UserError) as e:
        results.check_writable("/proc/bloomkit/out.json")
    assert "\n" not in str(e.value) and "--json_out" in str(e.value)
