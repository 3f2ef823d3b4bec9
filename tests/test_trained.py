"""The shipped ``trained`` model: a small BLOOM trained on Python's standard library.

Unlike every other embedded model it has learnt something, so its held-out perplexity is far
below the vocabulary size and its greedy completions are not one token repeated.  The
training script itself is tested with a few-second run on a slice of the corpus.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bloomkit import models
from bloomkit.errors import UserError

# code-like prompts with some context: this small model answers a bare keyword ("import ",
# "class ") with whitespace or the keyword repeated (a trailing space is a token it rarely saw
# there, and no </s> precedes the prompt the way one preceded each training file)
CODE_PROMPTS = ["def __init__(self, ", "import os", "    if not isinstance(", "class Foo:",
                "for i in range("]
SAMPLE_TOKENS = 4096  # what train.py measured heldout_sample_perplexity on


@pytest.fixture(scope="module")
def trained():
    from transformers import AutoModelForCausalLM

    path = models.resolve_model("trained")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = models.load_tokenizer(path)
    meta = json.loads((path / "bloomkit_trained.json").read_text())
    return path, model, tok, meta


def test_trained_resolves_to_the_shipped_directory(trained):
    path, model, tok, meta = trained
    assert path == models.TRAINED_DIR
    assert type(model).__name__ == "BloomForCausalLM"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (path / "generation_config.json").exists()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 25e6


def test_metadata_names_corpus_licence_and_python(trained):
    meta = trained[3]
    assert "PSF License" in meta["corpus_licence"]
    assert "standard library" in meta["corpus"]
    assert meta["python_version"].count(".") == 2
    for key in ("train_files", "train_tokens", "heldout_files", "heldout_tokens", "steps",
                "seconds", "final_train_loss", "heldout_perplexity"):
        assert meta[key] > 0, key


def test_heldout_perplexity_is_low_and_matches_the_record(trained):
    """The perplexity every --verify reports (quality.perplexity on the shipped held-out
    sample) is the one the training script recorded, and far below the vocabulary size."""
    from bloomkit.measure import quality
    from bloomkit.prompts import eval_texts

    path, model, tok, meta = trained
    texts = eval_texts(path)
    assert texts and len(texts) == len(json.loads((path / "heldout_sample.json").read_text())["files"])
    ppl = quality.perplexity(model, tok, texts, max_tokens=SAMPLE_TOKENS,
                             window=meta["heldout_sample_eval"]["window"])
    vocab = model.config.vocab_size
    assert ppl < vocab / 20, (ppl, vocab)
    assert ppl == pytest.approx(meta["heldout_sample_perplexity"], rel=0.02)
    # the recorded perplexity on the larger held-out slice is of the same order
    assert meta["heldout_perplexity"] < vocab / 20
    assert ppl == pytest.approx(meta["heldout_perplexity"], rel=0.5)


def test_default_prompts_are_code_and_a_bad_prompts_file_is_one_line(trained, tmp_path):
    from bloomkit.prompts import model_prompts

    path = trained[0]
    got = model_prompts(path)
    assert len(got) == 8 and got[0].startswith("def ") and model_prompts(tmp_path) is None
    (tmp_path / "prompts.json").write_text('{"prompts": []}')
    with pytest.raises(UserError, match="prompts.json is not a prompts file") as exc:
        model_prompts(tmp_path)
    assert "\n" not in str(exc.value)


def test_greedy_completions_are_not_one_repeated_token(trained):
    from bloomkit.measure.harness import generate
    from bloomkit.prompts import STANDARD_PROMPTS

    _, model, tok, _ = trained
    for prompts in (CODE_PROMPTS, STANDARD_PROMPTS):
        gen = generate(model, tok, list(prompts), 24)
        for prompt, row, text in zip(prompts, gen.tokens, gen.texts):
            assert len(row) == 24
            assert len(set(row)) > 3, (prompt, text)


def test_missing_directory_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TRAINED_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError) as exc:
        models.resolve_model("trained")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "python -m bloomkit.train --out DIR" in msg and "--name DIR" in msg


def test_train_script_writes_a_loadable_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tmp-trained"
    proc = subprocess.run(
        [sys.executable, "-m", "bloomkit.train", "--out", str(out), "--minutes", "0.05",
         "--max_files", "8", "--vocab", "512", "--hidden", "32", "--layers", "1", "--heads", "2",
         "--seq_len", "32", "--batch", "4", "--log_every", "5"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out perplexity" in proc.stdout
    meta = json.loads((out / "bloomkit_trained.json").read_text())
    assert meta["steps"] >= 1 and meta["train_files"] == 8
    assert "PSF License" in meta["corpus_licence"]
    model = AutoModelForCausalLM.from_pretrained(str(models.resolve_model(str(out))))
    assert model.config.vocab_size == meta["model"]["vocab_size"]
    assert models.load_tokenizer(out).pad_token_id == 3


@pytest.mark.parametrize("flags,needle", [
    (["--out", "/proc/bloomkit-nope/x"], "--out /proc/bloomkit-nope/x/config.json"),
    (["--out", "/tmp/bloomkit-never", "--heads", "7"], "does not divide --hidden"),
])
def test_train_bad_flags_are_one_line(flags, needle):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bloomkit.train", *flags], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
