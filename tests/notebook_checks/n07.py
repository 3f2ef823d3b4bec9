"""Notebook 07 (speculative decoding): every proposer gives plain greedy generate's tokens for every
prompt; plain decoding makes exactly one token per forward of the model and a proposer at least one;
the records hold the same tokens for plain and speculative runs.  With odd-llama (another
vocabulary) there is no draft, and the lesson says so."""
from nbtools import ODD

PARAMS = {"trained": None, ODD: {"MAX_NEW_TOKENS": 8}}
BUILD = ()
TIMEOUT = 300
PICTURES = ('ax[0].bar(names',)   # the cells that draw (each must show its picture)
CLAIMS = {"*": ["identical_to_plain", "tokens_per_forward", "speed_prompt_lookup", "batch_vs_speculative"],
          "trained": ["speed_draft", "draft_step_cost", "draft_forwards_per_model_forward"]}


def check(run):
    same = run.value("identical_to_plain")
    assert same and all(same.values()), same
    per = run.value("tokens_per_forward")
    assert per["plain"] == 1.0 and all(v >= 1.0 for v in per.values()), per
    proposers = {"prompt lookup"} | ({"draft"} if run.model == "trained" else set())
    assert set(same) == proposers and set(per) == proposers | {"plain"}
    if run.model == "trained":
        assert 0 < run.value("draft_step_cost"), run.claim("draft_step_cost")
    else:
        assert "has another vocabulary than odd-llama: no draft" in run.text()
    assert [r["options"]["setup"] for r in run.records] == ["plain", *sorted(proposers, key=["draft", "prompt lookup"].index)]
    plain = run.records[0]
    for r in run.records:
        assert r["batch_size"] == 1 and r["ms_per_token"] > 0 and r["tokens"] == plain["tokens"], r["options"]
        if r is not plain:
            s = r["options"]["speculative"]
            assert s["method"] == r["options"]["setup"] and s["tokens_per_forward"] >= 1.0, s
    assert "assisted generate is only supported for batch_size = 1" in run.text()
