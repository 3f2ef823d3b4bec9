"""--compile: a static KV cache and the decode step compiled by torch.compile (inductor on the
CPU), through generate's own options.  fp32 tokens equal plain generate; the timed cycles
never recompile; the record splits prefill from decode; what cannot be compiled is one line.
TP=2 compiled (the recipe launched on 2 CPU ranks with --compile --verify) is checked by notebook 02's
test, and the server's --compile by test_serve."""
import pytest

from bloomkit import launch
from conftest import assert_one_line_error, read_json, run_script


@pytest.mark.timeout(300)
def test_accelerate_compiled_equals_plain_generate_and_never_recompiles(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script(["recipes/accelerate_inference.py", "--compile", "--batch_size", "2",
                       "--max_new_tokens", "8", "--benchmark", "--cycles", "2", "--verify",
                       "--json_out", str(out)], env=launch.cpu_env(1), timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = read_json(out)
    assert r["options"]["compile"] and r["quality"]["identical"], r["quality"]
    assert r["recompiles"] == 0                      # shapes fixed by the static cache
    assert r["warmup_seconds"] > max(r["cycle_seconds"])  # the first call paid the compile
    assert r["ttft_ms"] > 0 and 0 < r["decode_ms_per_token"] < r["ms_per_token"] * 2
    assert "compiled (first call" in proc.stdout


def test_eager_records_split_prefill_and_decode_too(tmp_path):
    out = tmp_path / "r.json"
    proc = run_script(["recipes/accelerate_inference.py", "--batch_size", "2", "--max_new_tokens",
                       "6", "--benchmark", "--cycles", "2", "--json_out", str(out)],
                      env=launch.cpu_env(1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read_json(out)
    assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["recompiles"] == 0
    assert "compile" not in r["options"]


@pytest.mark.parametrize("recipe,flags,needles", [
    ("recipes/ds_zero_inference.py", [], ["ZeRO-3 gathers", "drop --compile"]),
    ("recipes/ds_inference.py", ["--dtype", "int8"], ["int8", "drop --compile"]),
    ("recipes/accelerate_inference.py", ["--offload_folder", "/tmp/x"], ["one device's memory"]),
    ("recipes/accelerate_inference.py", ["--dtype", "int8"], ["plain weights"]),
])
def test_what_cannot_compile_is_one_line(tmp_path, recipe, flags, needles):
    out = tmp_path / "r.json"
    proc = run_script([recipe, "--compile", *flags, "--json_out", str(out)], env=launch.cpu_env(1))
    assert_one_line_error(proc, *needles)
    assert not out.exists()
