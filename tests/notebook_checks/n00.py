"""Notebook 00 (memory planner): its numbers are arithmetic, so every claim is checked exactly
against :mod:`bloomkit.memory` and :mod:`bloomkit.measure.planner` recomputed here."""
from bloomkit import memory
from bloomkit.measure import planner
from nbtools import ODD

PARAMS = {"trained": None, ODD: {"MAX_NEW_TOKENS": 8}}
BUILD = ()
TIMEOUT = 300
PICTURES = ('curve.plot(',)   # the cells that draw (each must show its picture)
CLAIMS = {"*": ["bloom176b_params", "bloom176b_weight_bytes", "bloom176b_kv_bytes_per_token_bf16", "plan",
                "fewest_gpus", "peak_prediction", "this_machine"]}


def check(run):
    bloom = planner.config_of("BLOOM-176B")
    assert run.value("bloom176b_params") == memory.param_count(bloom)
    assert run.value("bloom176b_weight_bytes") == {dt: memory.weight_bytes(bloom, dt)
                                                    for dt in ("fp32", "bf16", "int8", "int4")}
    assert run.value("bloom176b_weight_bytes")["bf16"] // 10**9 == 352      # the blog's "352 GB"
    assert run.value("bloom176b_kv_bytes_per_token_bf16") == 2 * 70 * 14336 * 2

    c = run.claim("plan")
    plan = {r["strategy"]: r for r in planner.plan(c["model"], c["dtype"], c["gpus"], c["gpu_memory"],
                                                   max_new_tokens=100)}
    for s, got in c["value"].items():
        for k, v in got.items():
            assert plan[s][k] == v, (s, k, plan[s][k], v)
    # the lesson's text: ZeRO keeps partitioned parameters on the GPUs when they fit there
    zero = c["value"]["ds-zero"]
    shown = run.output_of("plan")
    assert zero["weights_on"] != "gpu" or "stay partitioned over the" in shown, shown

    need = run.value("fewest_gpus")
    for key, (gpu_only, offload) in need.items():
        dt, s = key.split()
        assert planner.min_gpus("BLOOM-176B", s, dt, "80GB", True, cpu_ram="512GB") == gpu_only, key
        assert planner.min_gpus("BLOOM-176B", s, dt, "80GB", False, cpu_ram="512GB") == offload, key
    assert need["bf16 ds-inference"][0] == 8 and need["int8 ds-inference"][0] == 4 and need["bf16 ds-zero"][1] == 1

    peak = run.claim("peak_prediction")
    dims, dtype = planner.config_of(run.model), peak["dtype"]
    here = run.value("this_machine")
    assert here["params"] == memory.param_count(dims)
    assert here["weight_bytes"] == memory.weight_bytes(dims, dtype)
    assert here["kv_bytes_per_token"] == memory.kv_cache_bytes_per_token(dims, dtype)
    text = run.output_of("this_machine")
    if here["devices"] == 1:   # one device: no "1 GPU(s)", no "split 1 ways"
        assert "GPU(s)" not in text and "split 1 ways" not in text and "stream(s)" not in text, text

    for (bs, terms), prompt in zip(sorted(peak["value"].items(), key=lambda kv: int(kv[0])), peak["prompt_tokens"]):
        want = planner.peak_bytes(dims, dtype, int(bs), prompt, peak["max_new_tokens"])
        assert terms["predicted_weights_bytes"] == want["weights"]
        assert terms["predicted_kv_cache_bytes"] == want["kv_cache"]
        assert terms["predicted_transient_bytes"] == want["transient"]
