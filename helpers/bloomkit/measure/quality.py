"""Is a strategy's output the reference output?  Token agreement and logit error.

Correctness rule of this project: in fp32 every strategy must produce exactly the token
ids of plain ``model.generate``.  Greedy decoding on a random model can still flip when the
two best logits are nearly equal (a *tie*): then tiny rounding differences pick another
token.  :func:`compare_tokens` therefore records, for each row that differs, the
reference's top-1/top-2 logit margin at the first differing step, so a test can tell a
real mismatch (large margin) from a tie (margin below ``tie_tol``).

Quantized strategies are not expected to be identical; they report ``token_match``,
teacher-forced top-1 agreement and logit error against the reference, and, when there is text
to measure it on, **held-out perplexity** beside the reference's: token agreement says how
often the quantized model picks the same word, perplexity says how much worse it predicts real
text (only meaningful for a model that has learnt something, such as the ``trained`` preset).
"""
from __future__ import annotations

import math

from ..prompts import eval_texts  # noqa: F401 (the text perplexity is measured on)
from .harness import Generation

PPL_TOKENS = 4096                     # tokens perplexity is measured on (windows of PPL_WINDOW)
PPL_WINDOW = 256


def margins(scores) -> list[list[float]]:
    """Per row, per step: top-1 minus top-2 logit of the reference's scores."""
    import torch

    out = []
    stacked = torch.stack(scores, dim=1)  # [B, steps, V]
    top = stacked.topk(2, dim=-1).values
    diff = (top[..., 0] - top[..., 1]).tolist()
    for row in diff:
        out.append(row)
    return out


def compare_tokens(reference: Generation, tokens: list[list[int]], tie_tol: float = 1e-4) -> dict:
    """Compare generated ``tokens`` with the ``reference`` generation, row by row."""
    if len(tokens) != len(reference.tokens):
        raise ValueError(f"{len(tokens)} rows vs {len(reference.tokens)} reference rows")
    marg = margins(reference.scores) if reference.scores is not None else None
    total = same = rows_same = 0
    mismatches = []
    for i, (ref, got) in enumerate(zip(reference.tokens, tokens)):
        n = min(len(ref), len(got))
        eq = [a == b for a, b in zip(ref[:n], got[:n])]
        total += len(ref)
        same += sum(eq)
        if ref == got:
            rows_same += 1
            continue
        step = eq.index(False) if False in eq else n
        margin = marg[i][step] if marg is not None and step < len(marg[i]) else None
        mismatches.append({"row": i, "step": step, "ref_margin": margin,
                           "tie": margin is not None and margin < tie_tol})
    real = [m for m in mismatches if not m["tie"]]
    return {"identical": not mismatches, "rows": len(tokens), "rows_identical": rows_same,
            "token_match": same / total if total else 1.0, "ties": len(mismatches) - len(real),
            "real_mismatches": len(real), "mismatches": mismatches,
            "min_ref_margin": min(min(r) for r in marg) if marg else None}


def sequence_logits(model, tokenizer, prompts: list[str], new_tokens: list[list[int]], device=None):
    """Logits that predict each of ``new_tokens`` given the prompt and earlier new tokens
    (teacher forcing), as a float32 CPU tensor ``[batch, n_new, vocab]``."""
    import torch

    from .harness import input_device

    device = device if device is not None else input_device(model)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    new = torch.tensor(new_tokens, dtype=enc["input_ids"].dtype)
    ids = torch.cat([enc["input_ids"], new], dim=1).to(device)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], dim=1).to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    n = new.shape[1]
    return logits[:, -n - 1:-1, :].float().cpu()


def logit_agreement(ref_logits, logits) -> dict:
    """Teacher-forced top-1 agreement and logit errors of ``logits`` against ``ref_logits``."""
    diff = (logits - ref_logits)
    return {
        "teacher_forced_top1": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        "logit_max_abs_err": diff.abs().max().item(),
        "logit_rel_rms_err": (diff.pow(2).mean().sqrt() / ref_logits.pow(2).mean().sqrt()).item(),
    }


def window_losses(model, ids: list[int], window: int, max_tokens: int | None = None,
                  device=None) -> list[float]:
    """Mean next-token loss of each consecutive non-overlapping window of ``window`` tokens
    (each window starts with no context: a slight overestimate, the same for every model).
    Every rank of a multi-rank model must call it with the same ``ids``."""
    import torch

    from .harness import input_device

    device = device if device is not None else input_device(model)
    t = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    n = (len(t) - 1) // window
    if n == 0:
        raise ValueError(f"need more than {window} tokens to measure perplexity, got {len(t)}")
    x = t[: n * window].view(n, window)
    y = t[1: n * window + 1].view(n, window)
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, n, 16):
            logits = model(input_ids=x[i:i + 16].to(device)).logits.float().cpu()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y[i:i + 16].reshape(-1), reduction="none")
            out += loss.view(-1, window).mean(dim=1).tolist()
    return out


def perplexity_of_ids(model, ids: list[int], window: int, max_tokens: int | None = None,
                      device=None) -> float:
    """exp(mean next-token loss) over the windows of :func:`window_losses` (all of one size)."""
    losses = window_losses(model, ids, window, max_tokens, device)
    return math.exp(sum(losses) / len(losses))


def perplexity(model, tokenizer, texts: list[str], *, max_tokens: int = PPL_TOKENS,
               window: int = PPL_WINDOW, device=None, windows: bool = False):
    """Held-out perplexity of ``model`` on ``texts``: each text's tokens then ``</s>`` (as
    the ``trained`` model saw its training files), the first ``max_tokens``, in windows of
    ``window`` (shortened to fit the model's context or the text).  ``windows=True`` returns
    ``(perplexity, per-window mean losses)``: what :func:`perplexity_resolution` needs."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) > max_tokens:
            break
    ids = ids[:max_tokens]
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None) or window
    window = max(8, min(window, ctx, (len(ids) - 1) // 2 or 8))
    losses = window_losses(model, ids, window, device=device)
    ppl = math.exp(sum(losses) / len(losses))
    return (ppl, losses) if windows else ppl


def perplexity_resolution(losses: list[float], reference_losses: list[float], z: float = 1.645,
                          floor: float = 0.005) -> float | None:
    """The smallest perplexity difference this evaluation resolves, from the two models' losses on
    the same windows: ``z`` standard errors of the mean per-window difference, in perplexity units
    (the reference's perplexity times that, to first order).  A difference below it lies inside the
    90 % interval (``z=1.645``) of what another sample of held-out text of this size could show:
    "the same".  Never finer than ``floor`` (half the last digit of a perplexity printed with two
    decimals: fp32 rounding differences of 1e-5 are consistent enough to pass a t-test, not to
    matter).  ``None`` with fewer than 2 windows.

    Example:
        >>> round(perplexity_resolution([4.0, 4.2, 3.9, 4.1], [4.0, 4.1, 4.0, 4.0]), 3)
        4.408
    """
    if not losses or len(losses) != len(reference_losses) or len(losses) < 2:
        return None
    import statistics

    d = [a - b for a, b in zip(losses, reference_losses)]
    ref = math.exp(sum(reference_losses) / len(reference_losses))
    return max(floor, z * statistics.stdev(d) / math.sqrt(len(d)) * ref)


def quality_report(reference: Generation, ref_logits, generation: Generation, model, tokenizer, *,
                   texts: list[str] | None = None, reference_perplexity: float | None = None,
                   perplexity_value: float | None = None, reference_windows: list[float] | None = None,
                   perplexity_windows: list[float] | None = None) -> dict:
    """Everything we say about a strategy's output quality, in one dict for the record:
    token agreement, teacher-forced top-1 and logit error, and with ``texts`` the perplexity
    (``perplexity_value`` when already measured: it does not depend on the batch) beside the
    fp32 reference's (``reference_perplexity``)."""
    rep = compare_tokens(reference, generation.tokens)
    rep.update(logit_agreement(ref_logits, sequence_logits(model, tokenizer, reference.prompts,
                                                           reference.tokens)))
    if texts:
        if perplexity_value is None:
            perplexity_value, perplexity_windows = perplexity(model, tokenizer, texts, windows=True)
        rep["perplexity"] = perplexity_value
        rep["reference_perplexity"] = reference_perplexity
        if perplexity_windows and reference_windows:   # per-window losses: the evaluation's resolution
            rep["perplexity_windows"], rep["reference_perplexity_windows"] = perplexity_windows, reference_windows
            rep["perplexity_resolution"] = perplexity_resolution(perplexity_windows, reference_windows)
    rep["reference"] = "plain fp32 model.generate"
    return rep
