"""Pre-sharded TP checkpoints: written once per TP size, each rank reads only its own file.

Same tokens as the full load; wrong TP size / missing shard / wrong dtype are one-line
errors; DeepSpeed's checkpoint json is read (type BLOOM loads, ds_model needs the legacy
kernels, pickled files need --allow_pickle because they can run code)."""
import json

import pytest

from bloomkit import launch
from bloomkit.measure import bench, harness, quality
from bloomkit.strategies import autotp, bloom, tp_shards
from bloomkit.errors import UserError
from conftest import assert_one_line_error, run_script

RECIPE = "recipes/ds_inference.py"
N_NEW = 12
BS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One TP=2 launch: full load, write the shards, then generate as usual."""
    out = tmp_path_factory.mktemp("tp2")
    rec = tmp_path_factory.mktemp("rec") / "r.json"
    proc = launch.launch(RECIPE, ["--save_shards", str(out), "--max_new_tokens", str(N_NEW),
                                  "--batch_size", str(BS), "--json_out", str(rec)], 2, timeout=200)
    assert "wrote 2 TP shard(s)" in proc.stdout
    return out, json.loads(rec.read_text())


@pytest.fixture(scope="module")
def shards(saved):
    return saved[0]


@pytest.fixture(scope="module")
def reference(tiny_path):
    return bench.reference(tiny_path, harness.make_prompts(BS), N_NEW)[0]


def test_shard_folder_is_self_describing(shards):
    index = json.loads((shards / tp_shards.INDEX).read_text())
    assert index["tp_size"] == 2 and index["dtype"] == "fp32" and index["engine"] == "autotp"
    assert index["files"] == ["tp-rank00-of-02.safetensors", "tp-rank01-of-02.safetensors"]
    assert (shards / "config.json").exists() and (shards / "tokenizer.json").exists()
    from safetensors import safe_open

    with safe_open(str(shards / index["files"][1]), "pt") as f:
        assert f.metadata()["rank"] == "1"
        qkv = f.get_slice("transformer.h.0.self_attention.query_key_value.weight").get_shape()
    assert qkv == [96, 64]  # rank 1's half of the fused q,k,v rows: only its slice is stored


@pytest.mark.timeout(200)
def test_presharded_load_gives_the_same_tokens(saved, shards, reference):
    full = saved[1]
    assert full["options"]["load_from"] == "full" and full["options"]["shards"] == str(shards)
    rec = launch.launch_records(RECIPE, ["--load_shards", str(shards), "--max_new_tokens",
                                         str(N_NEW), "--batch_size", str(BS)], 2, timeout=180)[0]
    assert rec["options"]["load_from"] == "shards" and rec["model"] == "tiny"
    cmp = quality.compare_tokens(reference, rec["tokens"])
    assert cmp["identical"], cmp["mismatches"]
    assert rec["tokens"] == full["tokens"]
    assert rec["options"]["weight_bytes_per_rank"] == full["options"]["weight_bytes_per_rank"]
    steps = rec["options"]["load_steps_s"]  # where start-to-ready went, per step
    assert list(steps) == ["meta_skeleton", "init_inference", "read_shard", "prefault", "assign"]
    assert sum(steps.values()) <= rec["load_seconds"]


def test_wrong_tp_size_is_a_clear_error(shards):
    proc = run_script([RECIPE, "--load_shards", str(shards), "--max_new_tokens", "2"])
    assert_one_line_error(proc, "written for TP=2", "TP=1", "--save_shards")


def test_wrong_dtype_is_a_clear_error(shards):
    proc = run_script([RECIPE, "--load_shards", str(shards), "--dtype", "bf16", "--tp_size", "2"])
    # the TP check comes first here (one rank launched); the dtype check is unit-tested below
    assert_one_line_error(proc, "only 1 rank")
    with pytest.raises(UserError, match="--dtype fp32"):
        tp_shards.check_shards(shards, tp_size=2, dtype="bf16", engine="autotp")


def test_missing_shard_is_a_clear_error(shards, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "tp-rank01-of-02.safetensors").unlink()
    with pytest.raises(UserError, match=r"tp-rank01-of-02.safetensors \(rank 1 of 2\) is missing"):
        tp_shards.check_shards(broken, tp_size=2, dtype="fp32", engine="autotp")
    proc = run_script([RECIPE, "--load_shards", str(tmp_path / "nowhere")])
    assert_one_line_error(proc, "not a directory", "--save_shards")


# ---------------------------------------------------------------------------- DeepSpeed's json

@pytest.mark.timeout(200)
def test_deepspeed_checkpoint_json_loads_under_torchrun(tiny_path, tmp_path, reference):
    js = bloom.export_bloom_layout(tiny_path, tmp_path / "bloom-layout")
    rec = launch.launch_records(RECIPE, ["--name", str(tiny_path), "--ds_checkpoint", str(js),
                                         "--max_new_tokens", str(N_NEW), "--batch_size", str(BS)],
                                2, launcher="torchrun", timeout=180)[0]
    assert rec["options"]["load_from"] == "ds_checkpoint"
    cmp = quality.compare_tokens(reference, rec["tokens"])
    assert cmp["identical"], cmp["mismatches"]


def _ds_model_json(d, files, tp_size=2, kind="ds_model"):
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        (d / f).write_bytes(b"not a real checkpoint")
    cfg = {"type": kind, "base_dir": "", "version": 1.0, "parallelization": "tp",
           "tp_size": tp_size, "dtype": "float16",
           "checkpoints": {"non_tp": [f for f in files if "non" in f],
                           "tp": [f for f in files if f.startswith("tp_")]}}
    (d / "ds_inference_config.json").write_text(json.dumps(cfg))
    return d / "ds_inference_config.json"


def test_pickled_checkpoint_needs_allow_pickle(tmp_path, tiny_path):
    js = _ds_model_json(tmp_path / "ds", ["non-tp.pt", "tp_00_00.pt"], tp_size=1)
    proc = run_script([RECIPE, "--name", str(tiny_path), "--ds_checkpoint", str(js)])
    assert_one_line_error(proc, "pickle", "arbitrary code", "--allow_pickle")


# ds_model: the published microsoft/bloom-deepspeed-inference-* repos; bloom: what DeepSpeed's
# save_mp_checkpoint_path (our --save_shards under kernel injection) writes for a BLOOM model
@pytest.mark.parametrize("kind", ["ds_model", "bloom"])
def test_ds_model_format_needs_the_legacy_kernels(tmp_path, tiny_path, kind):
    js = _ds_model_json(tmp_path / "ds", ["non-tp.pt", "tp_00_00.pt"], tp_size=1, kind=kind)
    proc = run_script([RECIPE, "--name", str(tiny_path), "--ds_checkpoint", str(js), "--allow_pickle"])
    assert_one_line_error(proc, kind, "--kernel_inject on", "make setup-legacy", "--save_shards")


def test_ds_checkpoint_checks_for_kernel_injection(tmp_path, tiny_path):
    """What kernel injection (legacy stack, CUDA) would refuse, checked before any rank starts."""
    info = bloom.read_ds_checkpoint_json(
        _ds_model_json(tmp_path / "ds", ["non-tp.pt", "tp_00_00.pt", "tp_01_00.pt"], tp_size=2),
        allow_pickle=True)
    assert info["kernel_layout"]
    for n in (1, 2, 4):  # DeepSpeed merges or splits its shards where one size divides the other
        bloom.check_ds_checkpoint(info, tp_size=n, engine="kernel-inject")
    with pytest.raises(UserError, match="sharded for tp_size 2 but this launch runs TP=3"):
        bloom.check_ds_checkpoint(info, tp_size=3, engine="kernel-inject")
    # DeepSpeed 0.15's kernel loader reads every listed file with torch.load: no safetensors
    js = bloom.export_bloom_layout(tiny_path, tmp_path / "bloom-layout")
    flat = bloom.read_ds_checkpoint_json(js)
    assert not flat["kernel_layout"]
    bloom.check_ds_checkpoint(flat, tp_size=2, engine="autotp")
    with pytest.raises(UserError, match="torch.load.*--kernel_inject off"):
        bloom.check_ds_checkpoint(flat, tp_size=2, engine="kernel-inject")

    assert bloom.choose_engine("auto", "cpu", "fp32", flat) == "autotp"
    with pytest.raises(UserError, match="can torch.load .*not model"):
        bloom.choose_engine("on", "cpu", "fp32", flat)


def test_ds_json_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        bloom.read_ds_checkpoint_json(tmp_path / "none.json")
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"type": "BLOOM", "checkpoints": ["missing.safetensors"], "version": 1}))
    with pytest.raises(UserError, match="missing file"):
        bloom.read_ds_checkpoint_json(bad)
    bad.write_text(json.dumps({"checkpoints": []}))
    with pytest.raises(UserError, match="lacks type"):
        bloom.read_ds_checkpoint_json(bad)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tp1_shards_keep_tied_embeddings(tmp_path):
    """TP=1 (no AutoTP): the embedding and lm_head are one tensor, stored once."""
    d, a, b = tmp_path / "tp1", tmp_path / "a.json", tmp_path / "b.json"
    run = lambda *x: run_script([RECIPE, "--max_new_tokens", str(N_NEW), "--batch_size", "2", *x])  # noqa: E731
    p = run("--save_shards", str(d), "--json_out", str(a))
    assert p.returncode == 0, p.stderr[-1500:]
    p = run("--load_shards", str(d), "--json_out", str(b))
    assert p.returncode == 0, p.stderr[-1500:]
    assert json.loads(a.read_text())["tokens"] == json.loads(b.read_text())["tokens"]


def test_plain_tensor_attributes_join_the_state_dict():
    """DeepSpeed 0.15's AutoTP keeps the fused-qkv bias as a plain tensor (not a Parameter):
    registered as a buffer it is saved in the shard and loaded back (it was NaN before)."""
    import torch


    class Legacy(torch.nn.Module):  # the shape of DeepSpeed 0.15's LinearLayer(weight, bias=tensor)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 2))
            self.bias = torch.randn(3)

        def forward(self, x):
            return x @ self.weight.T + self.bias

    m = torch.nn.Sequential(Legacy())
    x = torch.randn(4, 2)
    before = m(x)
    assert "0.bias" not in m.state_dict()
    assert autotp.register_plain_tensors(m) == ["0.bias"]
    assert "0.bias" in m.state_dict() and torch.equal(m(x), before)
    assert autotp.register_plain_tensors(m) == []
