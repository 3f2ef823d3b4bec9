"""Speculative decoding in recipes/accelerate_inference.py (--assistant_model, --prompt_lookup):
under greedy decoding the tokens are exactly plain ``generate``'s, for every prompt of ``trained``,
with its shipped draft (``trained-draft``: same tokenizer, same corpus) and with prompt lookup —
through the recipe's own calls, copied alone, and with the package (records say how many tokens
each forward of the model gave).  Bad input is one line."""
import json
import subprocess
import sys

import pytest

from bloomkit import models
from conftest import ROOT, run_standalone
from test_recipes_standalone import check_completions, recipe_module

ACCEL = "recipes/accelerate_inference.py"
N_NEW = 24


@pytest.fixture(scope="module")
def recipe():
    return recipe_module(ACCEL)


@pytest.fixture(scope="module")
def loaded(recipe):
    path = models.resolve_model("trained")
    tok = recipe.AutoTokenizer.from_pretrained(str(path), padding_side="left")
    model = recipe.load_model(str(path), "fp32", device_map="none")
    return path, model, tok


def test_shipped_draft_shares_the_tokenizer_and_is_smaller():
    big, draft = models.resolve_model("trained"), models.resolve_model("trained-draft")
    assert (big / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    n = lambda p: json.loads((p / "bloomkit_trained.json").read_text())["model"]["parameters"]  # noqa: E731
    assert n(draft) * 3 < n(big)


@pytest.mark.parametrize("method", ["draft", "prompt lookup"])
def test_every_prompt_gives_plain_greedy_tokens(recipe, loaded, method):
    path, model, tok = loaded
    if method == "draft":
        spec = {"assistant_model": recipe.load_assistant(str(models.resolve_model("trained-draft")), model, tok)}
    else:
        spec = {"prompt_lookup_num_tokens": 10}
    prompts = json.loads((path / "prompts.json").read_text())
    prompts = prompts["prompts"] if isinstance(prompts, dict) else prompts
    assert len(prompts) == 8
    for p in prompts:
        assert recipe.generate(model, tok, [p], N_NEW, **spec) == recipe.generate(model, tok, [p], N_NEW), p


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flag", ["--prompt_lookup", "--assistant_model"])
def test_recipe_alone_equals_generate(flag, tmp_path):
    path = models.resolve_model("trained")
    value = "10" if flag == "--prompt_lookup" else str(models.resolve_model("trained-draft"))
    proc = run_standalone(tmp_path, ACCEL, ["--name", str(path), "--max_new_tokens", "6", flag, value,
                                            "--benchmark", "--cycles", "1"])
    check_completions(proc, path, [1])
    assert "Performance stats: bs=1" in proc.stdout


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flag,value", [("--prompt_lookup", "10"), ("--assistant_model", "trained-draft")])
def test_with_the_package_records_tokens_per_forward(flag, value, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / ACCEL), "--name", "trained", "--max_new_tokens", str(N_NEW),
                           flag, value, "--verify", "--benchmark", "--cycles", "1", "--json_out", str(out)],
                          capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["quality"]["identical"], r["quality"]
    spec = r["options"]["speculative"]
    assert spec["method"] == ("draft model trained-draft" if value == "trained-draft" else "prompt lookup (10 tokens)")
    assert 1.0 <= spec["tokens_per_forward"] and spec["model_forwards"] <= N_NEW


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args,needle", [
    (["--prompt_lookup", "10", "--batch_size", "1,8"], "use --batch_size 1"),
    (["--prompt_lookup", "0"], ">= 1"),
    (["--prompt_lookup", "3", "--assistant_model", "x"], "not allowed with"),
    (["--assistant_model", "tiny"], "another vocabulary"),
])
@pytest.mark.parametrize("alone", [True, False])
def test_bad_speculation_is_one_line(args, needle, alone, tmp_path):
    name = str(models.resolve_model("trained"))
    if alone:
        args = [str(models.resolve_model(a)) if a == "tiny" else a for a in args]
        proc = run_standalone(tmp_path, ACCEL, ["--name", name, "--max_new_tokens", "4", *args])
    else:
        proc = subprocess.run([sys.executable, str(ROOT / ACCEL), "--name", "trained", "--max_new_tokens", "4", *args],
                              capture_output=True, text=True, timeout=110)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert lines and needle in lines[-1], proc.stderr[-2000:]
