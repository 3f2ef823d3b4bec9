"""Speculative decoding through transformers' ``generate``: a draft model (``assistant_model=``) or
n-grams of the text so far (``prompt_lookup_num_tokens=``) propose several tokens, and the model
checks them all in one forward.  Under greedy decoding the output is exactly the model's own,
by construction; what changes is how many tokens each forward of the (big) model yields.

``recipes/accelerate_inference.py --assistant_model NAME | --prompt_lookup N`` inside the
repository comes here for its records; the recipe itself holds the library calls.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable


class Speculation:
    """The recipe's speculative flags inside the package: ``attach`` after the model is loaded
    (loads the draft through the recipe's own ``load_assistant``), then ``generate`` is the
    ``generate_fn`` of :func:`bloomkit.measure.bench.run_variant`, and ``stats`` (put in the
    records' options) says how many tokens each forward of the model gave in the last call.

    Args:
        args: the recipe's flags (``--assistant_model NAME`` or ``--prompt_lookup N``).
        load_assistant: the recipe's ``load_assistant(name, model, tokenizer)``.
    """

    def __init__(self, args, load_assistant: Callable | None = None):
        from ..errors import UserError

        self.assistant = getattr(args, "assistant_model", None)
        self.lookup = getattr(args, "prompt_lookup", None)
        self.load_assistant = load_assistant
        self.kwargs: dict = {}
        self.stats: dict = {}
        if not self.active:
            return
        if getattr(args, "compile", False):
            raise UserError("--compile does not combine with speculative decoding here; drop one of them")
        if self.assistant:
            from .. import models

            self.assistant_path = models.resolve_model(self.assistant)   # a bad name: one line, now
        self.stats["method"] = (f"draft model {self.assistant}" if self.assistant
                                else f"prompt lookup ({self.lookup} tokens)")

    @classmethod
    def of(cls, method: str, **generate_kwargs) -> "Speculation":
        """A speculation from ``generate``'s own keywords (``assistant_model=`` or
        ``prompt_lookup_num_tokens=``), as a notebook writes them.

        Example:
            >>> Speculation.of("prompt lookup", prompt_lookup_num_tokens=10).stats
            {'method': 'prompt lookup'}
        """
        spec = cls(argparse.Namespace())
        spec.kwargs, spec.stats["method"], spec.lookup = dict(generate_kwargs), method, True
        return spec

    @property
    def active(self) -> bool:
        return bool(self.assistant or self.lookup)

    def attach(self, model, tokenizer) -> None:
        if self.assistant:
            try:
                self.kwargs["assistant_model"] = self.load_assistant(str(self.assistant_path), model, tokenizer)
            except SystemExit as exc:   # the recipe's own one-line refusal
                from ..errors import UserError

                raise UserError(str(exc).removeprefix("error: ")) from None
        elif self.lookup:
            self.kwargs["prompt_lookup_num_tokens"] = self.lookup

    def generate(self, model, tokenizer, prompts, max_new_tokens):
        """The harness's greedy call with the speculation added.  "Exactly N new tokens" is asked
        as ``min_length`` (the same at batch 1): transformers passes a ``min_new_tokens`` processor
        on to the draft's own ``generate`` too, and warns."""
        from ..measure import harness

        length = tokenizer(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]
        with counting_forwards(model) as n:
            out = harness.generate(model, tokenizer, prompts, max_new_tokens, min_new_tokens=None,
                                   min_length=length + max_new_tokens, **self.kwargs)
        new = sum(len(t) for t in out.tokens)
        self.stats.update(model_forwards=n[0], tokens_per_forward=new / n[0] if n[0] else None)
        return out


@contextlib.contextmanager
def counting_forwards(model):
    """Count the forwards of ``model`` (its top module) inside the block: ``with counting_forwards(m)
    as n: ...; n[0]``."""
    n = [0]
    handle = model.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    try:
        yield n
    finally:
        handle.remove()
