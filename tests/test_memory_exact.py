"""Exact memory: the kernel's high-water mark for peaks, accelerate's module sizes per device,
parameter counts from the meta-device model, out-of-memory recognised by type first."""
import mmap
import os
import sys
import threading
from dataclasses import asdict

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoModelForCausalLM

from bloomkit import arch, errors, memory, models, results
from bloomkit.errors import UserError
from bloomkit.measure import harness
from bloomkit.strategies import accel, zero

MiB = 2**20
# the kernel folds its per-CPU page counts into the mark in batches: it can read a few hundred
# KiB low (measured here: up to 0.3 MiB on 2 cores), so each spike is 1 MiB larger than what it
# must be reported as
SLACK = MiB


def spike(nbytes: int) -> None:
    """Fresh pages (an anonymous mapping: memory the allocator did not hold before), touched
    one by one, released at once: gone long before a 20 ms sampler looks again."""
    buf = mmap.mmap(-1, nbytes)
    for i in range(0, nbytes, mmap.PAGESIZE):
        buf[i] = 1
    buf.close()


def test_a_short_spike_of_100_mib_is_reported_whole():
    for _ in range(3):
        with harness.PeakRSS() as rss:
            base = rss.peak
            spike(100 * MiB + SLACK)
        assert rss.method == "kernel"
        assert rss.peak - base >= 100 * MiB, (rss.peak - base) / MiB


def test_nested_blocks_keep_the_outer_peak():
    """A load measured inside a run: the inner block's reset must not hide what the outer block
    saw before it, nor the inner's own peak from the outer."""
    with harness.PeakRSS() as outer:
        base = outer.peak
        spike(150 * MiB + SLACK)                 # before the inner block
        with harness.PeakRSS() as inner:
            inner_base = inner.peak
            spike(60 * MiB + SLACK)
            with harness.PeakRSS() as innermost:
                pass
        after_inner = outer.peak
        spike(20 * MiB)                          # after it: smaller than what was seen
    assert outer.method == inner.method == innermost.method == "kernel"
    assert inner.peak - inner_base >= 60 * MiB
    assert inner.peak - inner_base < 140 * MiB   # the outer's spike came before it
    assert after_inner - base >= 150 * MiB and outer.peak - base >= 150 * MiB
    assert not harness._OPEN                     # every block closed itself


def test_a_spike_in_another_thread_counts():
    """``VmHWM`` belongs to the process: a worker thread's allocation is in the peak."""
    with harness.PeakRSS() as rss:
        base = rss.peak
        t = threading.Thread(target=spike, args=(80 * MiB + SLACK,))
        t.start()
        t.join()
    assert rss.peak - base >= 80 * MiB


def test_an_unprivileged_process_resets_its_own_mark():
    """``/proc/self/clear_refs`` belongs to the process's own user: no root needed (as root,
    the check runs as ``nobody`` through util-linux's ``setpriv``)."""
    import subprocess

    code = ("import mmap, os\n"
            "from bloomkit.measure import harness\n"
            "with harness.PeakRSS() as r:\n"
            "    b = r.peak; m = mmap.mmap(-1, 65 * 2**20)\n"
            "    for i in range(0, len(m), mmap.PAGESIZE): m[i] = 1\n"
            "    m.close()\n"
            "print(os.geteuid(), r.method, r.peak - b)\n")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    uid, method, grew = proc.stdout.split()
    assert int(uid) != 0 and method == "kernel" and int(grew) >= 64 * MiB, proc.stdout


def test_the_sampler_is_the_fallback(monkeypatch, tmp_path):
    """Where the mark cannot be reset, a thread samples RSS and says so."""
    monkeypatch.setattr(harness, "CLEAR_REFS", str(tmp_path / "no-such-dir" / "clear_refs"))
    monkeypatch.setattr(harness, "_KERNEL_OK", None)
    assert harness.reset_peak_rss() is False
    n = 200 * MiB
    with harness.PeakRSS(interval=0.001) as rss:
        base = rss.peak
        buf = mmap.mmap(-1, n)
        for i in range(0, n, mmap.PAGESIZE):
            buf[i] = 1
        threading.Event().wait(0.2)              # held long enough for the sampler
        buf.close()
    assert rss.method == "sampled" and rss.peak - base > 150 * MiB
    with harness.PeakRSS(kernel=False) as forced:
        pass
    assert forced.method == "sampled"


def test_a_record_says_how_its_peak_was_measured(tiny_model, tiny_tokenizer):
    rows = harness.make_prompts(2)
    t = harness.time_generation(lambda: harness.generate(tiny_model, tiny_tokenizer, rows, 3),
                                batch_size=2, max_new_tokens=3, cycles=1)
    rec = results.make_record(strategy="x", model="tiny", dtype="fp32", batch_size=2,
                              max_new_tokens=3, load_seconds=None, timing=t)
    assert rec["peak_rss_method"] == t.peak_rss_method == ("kernel" if sys.platform == "linux" else "sampled")
    assert rec["peak_rss_bytes"] == t.peak_rss_bytes > 0


# ---------------------------------------------------------------------------- device maps

def preset_config(name: str):
    return models.family_config(**asdict(models.PRESETS[name]))


def sizes_by_device(config, device_map: dict, dtype=torch.float32) -> dict[str, int]:
    """What the summary must say, straight from accelerate: the meta model's module sizes
    summed over each device's entries."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    sizes = compute_module_sizes(model, dtype=dtype)
    out: dict[str, int] = {}
    for key, dev in device_map.items():
        out[str(dev)] = out.get(str(dev), 0) + sizes.get(key, 0)
    return out, sizes[""]


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_device_map_summary_is_accelerates_module_sizes(name):
    config = preset_config(name)
    total = accel.module_sizes(config, "fp32")[0][""]
    # caps of half the model on each of two GPUs and the CPU, the rest on disk: a split plan
    dmap = accel.plan_device_map(config, {0: total // 2, 1: total // 2, "cpu": total // 2, "disk": 10**9},
                                 "fp32", "sequential")
    assert len(set(dmap.values())) >= 2, dmap
    summary = accel.device_map_summary(dmap, config, "fp32")
    want, whole = sizes_by_device(config, dmap)
    assert summary["weight_bytes"].to_dict() == want and sum(want.values()) == whole
    assert (summary["weights_GB"] == (summary["weight_bytes"] / 1e9).round(3)).all()
    assert summary["blocks"].sum() == arch.layers_of(config)
    assert summary["modules"].sum() == len(dmap)
    # the whole model in one entry, and the same model in bf16 and int8 (one byte per weight)
    assert accel.device_map_summary({"": "cpu"}, config, "fp32").loc["cpu", "weight_bytes"] == whole
    bf16 = accel.device_map_summary(dmap, config, "bf16")["weight_bytes"].to_dict()
    assert bf16 == sizes_by_device(config, dmap, torch.bfloat16)[0]
    int8 = accel.device_map_summary({"": "cpu"}, config, "int8").loc["cpu", "weight_bytes"]
    assert int8 == sizes_by_device(config, {"": "cpu"}, torch.int8)[1]


def test_device_map_summary_takes_a_family_without_formulas():
    config = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
            "model.layers.2": "disk", "model.norm": "disk", "model.rotary_emb": "disk", "lm_head": "disk"}
    summary = accel.device_map_summary(dmap, config, "fp32")
    assert summary["weight_bytes"].to_dict() == sizes_by_device(config, dmap)[0]
    assert summary["blocks"].to_dict() == {"0": 1, "cpu": 1, "disk": 1}
    # without a config: blocks from the map's names, no bytes
    bare = accel.device_map_summary(dmap)
    assert "weight_bytes" not in bare and bare["blocks"].to_dict() == {"0": 1, "cpu": 1, "disk": 1}


# ---------------------------------------------------------------------------- parameter counts

def meta_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", models.FAMILIES)
def test_the_formulas_equal_the_meta_count_for_every_preset_family(family):
    name = next(n for n, p in models.PRESETS.items() if p.family == family)
    config = preset_config(name)
    assert memory.has_formula(config)
    formula = sum(arch.params_by_module(config).values())
    assert formula == memory.param_count(config) == memory.meta_param_count(config) == meta_count(config)


UNKNOWN = {  # families bloomkit.arch has no formulas for
    "qwen3": lambda: transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
    "gemma": lambda: transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                              vocab_size=100),
    "phi": lambda: transformers.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=100),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                         n_positions=32),
}


@pytest.mark.parametrize("name", list(UNKNOWN))
def test_a_family_outside_the_table_is_counted_not_refused(name):
    config = UNKNOWN[name]()
    assert not memory.has_formula(config)
    with pytest.raises(UserError):
        arch.params_by_module(config)       # the formulas still know only their families
    assert memory.param_count(config) == meta_count(config)
    assert memory.weight_bytes(config, "bf16") == 2 * meta_count(config)
    # the same as a plain dict naming its model_type
    d = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    assert memory.param_count(d) == meta_count(config)


def test_what_cannot_be_counted_is_one_line():
    with pytest.raises(UserError, match="not a model type of transformers"):
        memory.param_count({"model_type": "no-such-family", "hidden_size": 64})
    with pytest.raises(UserError, match="no causal LM"):
        memory.param_count({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "intermediate_size": 64})


# ---------------------------------------------------------------------------- OOM, disk reads

def test_out_of_memory_is_recognised_by_type_first():
    assert harness.is_oom is errors.is_oom
    assert errors.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert errors.is_oom(MemoryError())
    try:   # the CPU allocator refuses: a plain RuntimeError, recognised by torch's own text
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        cpu = exc
    assert errors.is_oom(cpu)
    # DeepSpeed's inference kernels, and a CUDA kernel outside torch's allocator (bitsandbytes)
    assert errors.is_oom(RuntimeError("Workspace can't be allocated, no enough memory."))
    assert errors.is_oom(torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors ..."))
    assert errors.is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtCreate(&handle)`"))
    # other failures are not an "oom" cell of a sweep, whatever their words
    assert not errors.is_oom(ValueError("index out of range"))
    assert not errors.is_oom(RuntimeError("my cache ran out of memory slots"))
    one = errors.translate(torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB"))
    assert isinstance(one, UserError) and "\n" not in str(one) and "--batch_size" in str(one)
    assert "CPU memory" in str(errors.translate(MemoryError()))
    assert errors.translate(ValueError("x")) is None


def test_disk_read_bytes_comes_from_psutil():
    import psutil

    got = zero.disk_read_bytes()
    assert got is not None and got <= psutil.Process().io_counters().read_bytes
    child = __import__("subprocess").Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert zero.disk_read_bytes(child.pid) is None    # a process that is gone
