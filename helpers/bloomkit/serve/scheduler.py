"""The continuous-batching engine: one thread owns the model and steps a batch that changes.

**Why continuous (iteration-level) batching.**  ``generate`` on a fixed batch holds every row
until the longest one is done, and a request that arrives meanwhile waits for the whole batch.
Here the batch is re-formed *between decode steps*: finished rows leave at once (their KV cache
is freed by a batch index-select), waiting requests join (their prompt is prefilled, then its
cache is merged into the batch's).  A short request never waits for a long one, and the decode
step — which on big models costs about the same for 1 row as for 16, since it is bound by
reading the weights — is shared by every running request: that is where the throughput comes
from.  The price is paid by the rows already running: each admission adds a prefill pass to
their step (``--max_prefill_tokens`` bounds that stall).

**The batched cache** is a transformers ``DynamicCache`` with *left padding*: all rows end at the
same column, so one decode step appends one column.  A joining group is prefilled on its own
(left-padded among itself) and both caches are padded on the left to the common width, then
concatenated on the batch axis; the attention mask marks pads, explicit ``position_ids`` =
``cumsum(mask) - 1`` keep RoPE models' positions right, and BLOOM derives its ALiBi positions
from the mask itself.  When rows leave, columns that are padding for every remaining row are
trimmed.  The arithmetic is exactly ``generate``'s with left padding, so greedy fp32 output is
the same token for token, alone or in any batch.

**Prefill beside the decode step** (``overlap_prefill``, single process).  A request that
arrives while a decode step runs would wait for that whole step before its prompt is even
looked at: with closed-loop clients, whose next request lands just after a step began, that
is one full step of the batch every time.  With ``overlap_prefill`` a second thread owns the
queue: it takes a request the moment it arrives, prefills it (and sends its first token)
*while* the running rows decode, and hands the group to the model thread, which merges it at
the next step boundary.  The two forwards share the cores for that step (each runs slower
than alone), but the new request starts at once.  A burst — at least as many rows prefilling
as running — is waited for instead: sharing the cores with it would only delay every one of
its first tokens.  Only in one process, on the CPU: under tensor parallelism or ZeRO-3 every
rank must run the same collectives in the same order, and on a GPU both threads would queue
on one CUDA stream.  (GPU servers get the same effect from *chunked prefill*: vLLM puts the
new prompts' tokens into the running batch's step, which its paged, packed attention allows.)

**The plan.**  Every step is a pure function of a small plan — rows to keep, the tokens to feed
the running rows, the prompts (token ids) to admit — so under tensor parallelism rank 0 decides
it, broadcasts it, and every rank applies identical cache operations (:mod:`.ranks`); rank 0
samples and sends the chosen tokens with the next plan.

transformers 5.24 has its own continuous batching (``generate_batch`` /
``init_continuous_batching``), built on a *paged* cache and the attention-interface registry
(``paged|sdpa``); BLOOM computes its ALiBi attention itself and does not go through that
registry, and DeepSpeed's AutoTP replaces the layers that manager drives.  So this module keeps
the plain ``DynamicCache`` path that BLOOM, Llama and AutoTP all run.  One idea is taken from it
for Llama-family models in one process (``packed_prefill``): the tokens of joining prompts are
packed beside the running rows' tokens into one forward, so the linear layers — nearly all of a
small model's step on a CPU — read their weights once for both; only attention is split
(:func:`_packed_attention`, registered in transformers' attention registry).
"""
from __future__ import annotations

import inspect
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class BadRequest(Exception):
    """A request the server answers with ``status`` and a JSON error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


# ---------------------------------------------------------------------------- the batched cache

# The attention implementation a packed step runs (:meth:`KVBatch.packed_step`): transformers' own
# sdpa for every ordinary call, the packed split only when the step passes its plan
PACKED_ATTENTION = "bloomkit_packed"
PACKED_FAMILIES = ("llama",)   # RoPE from position_ids, attention through the registry, plain lm_head


class _Pack:
    """One packed step's layout: ``rows`` running rows (one token each, first), then ``lengths``
    prompts' tokens back to back, the first ``pads[j]`` of prompt j being left padding; ``width``
    the longest prompt; the joining group's keys and values per layer are left here by the
    attention function."""

    def __init__(self, cache, rows: int, lengths: list[int], dec_mask, torch, device=None,
                 pads: list[int] | None = None):
        self.cache, self.rows, self.lengths = cache, rows, lengths
        self.width = max(lengths)
        self.dec_mask = dec_mask
        w, pads = self.width, pads or [0] * len(lengths)
        self.idx = torch.tensor([j * w + w - n + t for j, n in enumerate(lengths) for t in range(n)], device=device)
        self.group_mask = torch.tensor([[0] * (w - n + k) + [1] * (n - k) for n, k in zip(lengths, pads)],
                                       device=device)
        causal = torch.ones(w, w, dtype=torch.bool, device=device).tril()
        self.pre_mask = causal[None, None] & self.group_mask.bool()[:, None, None, :]
        self.keys: dict[int, object] = {}
        self.values: dict[int, object] = {}


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      bloomkit_pack: _Pack | None = None, **kwargs):
    """transformers' sdpa attention, except in a packed step: there the running rows' queries
    attend to the batched cache (their new key appended, as :meth:`KVBatch.decode` does) and the
    joining prompts' queries to their own left-padded prompt (as :meth:`KVBatch.prefill` does);
    the linears before and after ran once for all of them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if bloomkit_pack is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    import torch

    p, i = bloomkit_pack, module.layer_idx
    r = 0 if p.dec_mask is None else p.dec_mask.shape[0]   # from tensor shapes: symbolic when compiled
    outs = []
    if p.dec_mask is not None:
        layer = p.cache.layers[i]
        k, v = (x[0, :, :r].transpose(0, 1).unsqueeze(2) for x in (key, value))
        layer.keys, layer.values = torch.cat([layer.keys, k], -2), torch.cat([layer.values, v], -2)
        q = query[0, :, :r].transpose(0, 1).unsqueeze(2)
        out, _ = sdpa_attention_forward(module, q, layer.keys, layer.values, p.dec_mask, scaling=scaling)
        outs.append(out.reshape(1, r, *out.shape[2:]))
    a, w = p.group_mask.shape

    def grid(x):   # packed [1, heads, tokens, dim] -> left-padded [prompts, heads, width, dim]
        g = x.new_zeros(x.shape[1], a * w, x.shape[-1])
        g[:, p.idx] = x[0, :, r:]
        return g.view(x.shape[1], a, w, x.shape[-1]).transpose(0, 1)

    q, k, v = grid(query), grid(key), grid(value)
    out, _ = sdpa_attention_forward(module, q, k, v, p.pre_mask, scaling=scaling)
    outs.append(out.reshape(a * w, *out.shape[2:])[p.idx].unsqueeze(0))
    p.keys[i], p.values[i] = k.contiguous(), v.contiguous()
    return torch.cat(outs, 1), None


def packed_config_refusal(config, *, ranks: int, compile: bool) -> str | None:
    """What :func:`packed_refusal` can say from the config alone, before a model is loaded: the
    family and one process (a big checkpoint is refused in a second, not after its load).

    Example:
        >>> from transformers import BloomConfig, LlamaConfig
        >>> packed_config_refusal(BloomConfig(), ranks=1, compile=False)
        "it needs a llama-family model (its attention through transformers' registry), not bloom"
        >>> packed_config_refusal(LlamaConfig(), ranks=1, compile=False) is None
        True
    """
    if ranks > 1:
        return "it runs in one process"
    if getattr(config, "model_type", None) not in PACKED_FAMILIES:
        return (f"it needs a {'/'.join(PACKED_FAMILIES)}-family model (its attention through transformers' "
                f"registry), not {getattr(config, 'model_type', type(config).__name__)}")
    return None


def prepacked_weights() -> int:
    """Linear weights inductor has pre-packed for oneDNN in this process, counted once per graph
    that holds one (0 without ``freezing``, or where dynamo traced the weights as inputs)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"])


def frozen_copies_bytes(model, graphs: int) -> int:
    """Bytes ``freezing`` adds: one copy of the model's weights in each of ``graphs`` graphs."""
    return graphs * sum(p.numel() * p.element_size() for p in model.parameters())


def freezing_refusal(model, *, device: str, ranks: int, graphs: int, available: int) -> str | None:
    """Why inductor's ``freezing`` cannot serve this model here, or None when it can.  Freezing
    makes the weights constants of each compiled graph, and on the CPU pre-packs every linear's
    weight for oneDNN's matrix multiply (the faster step), but each graph then holds its own
    packed copy of the weights, beside the model's own: ``graphs`` copies.

    Args:
        model: the loaded model (its parameters are what each graph copies).
        device: where it runs; freezing is offered on the CPU only, where it was measured.
        ranks: processes stepping together (it is measured in one process only).
        graphs: the graphs the warm-up builds (:data:`WARM_UP_GRAPHS`).
        available: bytes of memory free now; the copies may take at most 80 % of it.

    Example:
        >>> freezing_refusal(model, device="cpu", ranks=1, graphs=10, available=2**30)   # doctest: +SKIP
        'each of the 10 compiled graphs would hold its own packed copy of the weights (10 x 0.10 GiB) ...'
    """
    if device != "cpu":
        return f"it pre-packs the weights for the CPU's matrix multiply, and was measured there only, not on {device}"
    if ranks > 1:
        return "it was measured in one process only"
    copies = frozen_copies_bytes(model, graphs)
    if copies > 0.8 * available:
        return (f"each of the {graphs} compiled graphs would hold its own packed copy of the weights "
                f"({graphs} x {copies / graphs / 2**30:.2f} GiB) and {available / 2**30:.1f} GiB is free")
    return None


def packed_refusal(model, *, ranks: int, compile: bool) -> str | None:
    """Why the packed step cannot run here, or None when it can: a Llama-family model in one
    process (:func:`packed_config_refusal`), its attention through transformers' registry
    with sdpa, neither offloaded nor quantized.

    Args:
        model: the loaded model.
        ranks: processes stepping together (tensor parallelism, ZeRO-3).
        compile: whether the forward is compiled (the packed step is then compiled too).

    Example:
        >>> packed_refusal(bloom, ranks=1, compile=False)   # doctest: +SKIP
        "it needs a llama-family model (its attention through transformers' registry), not bloom"
    """
    config = getattr(model, "config", None)
    why = packed_config_refusal(config, ranks=ranks, compile=compile)
    if why:
        return why
    if getattr(config, "_attn_implementation", None) not in ("sdpa", PACKED_ATTENTION):
        return f"it builds on sdpa attention, not {config._attn_implementation}"
    places = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(places) > 1 or getattr(model, "hf_quantizer", None) is not None:
        return "the model is offloaded or quantized"
    return None


# Steps a finished row's place in the KV cache waits for a joining row (KVBatch.keep): under load a
# client's next request arrives one or two steps after its last answer
SLOT_HOLD = 4


# Graphs KVBatch.warm_up builds with compile (the forward's kinds of step; packed: the packed
# step's too); tests/test_serve.py holds the servers to them
WARM_UP_GRAPHS = {"plain": 8, "packed": 10}


def _compile_dynamic(fn, *, duck: bool = True, freezing: bool = False):
    """``torch.compile(fn, dynamic=True)``, called under the configuration its tracing needs.

    Args:
        duck: dynamo's *duck sizing* (sizes equal at trace time share one symbol).  The packed
            step traces without it: its sizes (rows, tokens, cache width, prompts) tie to each
            other and to constants such as the KV heads by chance, so its graph would hold for
            that one step only.
        freezing: inductor's freezing.  Set around every call, not only passed to inductor:
            dynamo reads it while tracing to make the weights attributes of the graph (constants
            inductor can fold and pre-pack) instead of inputs.
    """
    import contextlib

    import torch
    from torch._inductor import config as inductor_config
    from torch.fx.experimental import _config as fx_config

    compiled = torch.compile(fn, dynamic=True)
    if duck and not freezing:
        return compiled

    def call(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            if not duck:
                stack.enter_context(fx_config.patch(use_duck_shape=False))
            if freezing:
                stack.enter_context(inductor_config.patch(freezing=True))
            return compiled(*args, **kwargs)
    return call


class KVBatch:
    """The running batch's KV cache and attention mask, and the three operations a plan makes:
    :meth:`keep` (rows leave), :meth:`decode` (one new token per row) and :meth:`admit`
    (prefill a group and merge it in).  Only tensors, no requests: identical on every rank."""

    def __init__(self, model, pad_token_id: int, device=None, compile: bool = False,
                 slot_hold: int = SLOT_HOLD, freezing: bool = False):
        import torch

        if freezing and not compile:
            raise ValueError("freezing is an option of the compiled forward: it needs compile")
        self.model, self.pad = model, int(pad_token_id)
        # compiled: the forward traced with *dynamic* shapes (rows and cache width change every step,
        # which a static cache could not follow); one graph per kind of step, built by warm_up().
        # freezing: inductor takes the weights as constants of each graph (see freezing_refusal)
        self._freezing = freezing
        self._call = _compile_dynamic(model, freezing=freezing) if compile else model
        self.device = device or next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        self.positions = "position_ids" in params
        self.keep_logits = "logits_to_keep" in params
        self.cache = None
        self.mask = None                      # [rows, width] long: 1 real token, 0 left pad
        self._torch = torch
        self.packed = False                   # enable_packed(): admissions ride on the decode step
        self.pack_rows = 1                    # the fewest running rows a packed step carries
        self._compile = compile
        # slot reuse (slot_hold > 0): a row that leaves keeps its place in the cache for up to
        # slot_hold steps, fed a pad token, and a joining row takes it (its prefill written into
        # that row's last columns) instead of the whole cache being copied twice (keep, merge)
        self.hold = int(slot_hold)
        self.slots: list[int] = []            # the cache row of each running row, in the engine's order
        self._free: dict[int, int] = {}       # cache rows no running row holds -> steps they have waited

    def enable_packed(self) -> None:
        """Run a step that admits prompts as *one* forward (:meth:`packed_step`): the model's
        attention becomes :data:`PACKED_ATTENTION` (transformers' sdpa for every other call)."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        self.model.set_attn_implementation(PACKED_ATTENTION)
        self.packed = True
        # compiled: a graph of its own, dynamic like the forward's; sizes 0 and 1 are specialised, so
        # a packed step needs >= 2 running rows (pack_rows) and a joining width >= 2 (a pad column)
        self.pack_rows = 2 if self._compile else 1
        self._pack_call = _compile_dynamic(self._packed_forward, duck=False, freezing=self._freezing) \
            if self._compile else self._packed_forward

    @property
    def rows(self) -> int:
        """Running rows (the engine's); the cache may hold more (:attr:`places`)."""
        return len(self.slots)

    @property
    def places(self) -> int:
        """Rows of the cache: the running rows and the free places kept for joining rows."""
        return 0 if self.mask is None else self.mask.shape[0]

    def _places_of(self, tokens: list[int]) -> list[int]:
        """The running rows' tokens laid out by cache row; a free place is fed a pad token."""
        if self.slots == list(range(self.places)):
            return list(tokens)
        out = [self.pad] * self.places
        for s, t in zip(self.slots, tokens):
            out[s] = t
        return out

    def _rows_of(self, logits):
        """Logits by cache row -> the running rows' logits, in the engine's order."""
        if self.slots == list(range(self.places)):
            return logits
        return logits.index_select(0, self._torch.tensor(self.slots, device=logits.device))

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def _forward(self, ids, mask, cache):
        torch = self._torch
        kw = {self.cache_kw: cache, "use_cache": True, "attention_mask": mask}
        if self.positions:   # generate's rule: cumsum of the mask, pads at 1; a copy with fresh strides:
            # a compiled forward guards on strides, and the slice's row stride is the cache width (which
            # .contiguous() keeps for one row), so one row's decode would match one width only
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
            kw["position_ids"] = pos.clone(memory_format=torch.contiguous_format)
        if self.keep_logits:
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            out = self._call(input_ids=ids, **kw)
        return out.logits[:, -1, :].float()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the running rows, in order).  Without slot reuse the
        others' cache is freed now; with it their places wait ``slot_hold`` steps for a joining
        row (:meth:`merge`), and only places that waited longer are freed.  Freeing copies the
        cache once, and trims the left columns that are padding for every running row (with
        nothing freed, only once a quarter of the columns are such padding)."""
        if not rows:
            self.cache = self.mask = None
            self.slots, self._free = [], {}
            return
        torch = self._torch
        kept = set(rows)
        left = [s for i, s in enumerate(self.slots) if i not in kept]
        self.slots = [self.slots[i] for i in rows]
        for s in self._free:
            self._free[s] += 1
        drop = [s for s, waited in self._free.items() if waited > self.hold]
        if self.hold:
            for s in left:
                self._free[s] = 0
            if left:   # a free place attends to nothing before its own pad tokens
                self.mask[torch.tensor(left, device=self.mask.device)] = 0
        else:
            drop += left
        for s in drop:
            self._free.pop(s, None)
        occupied = self.mask.index_select(0, torch.tensor(self.slots, device=self.mask.device))
        start = int((occupied.sum(0) > 0).nonzero()[0])
        if not drop and start * 4 < self.width:
            return
        places = sorted(self.slots + list(self._free))
        at = {s: j for j, s in enumerate(places)}
        self.slots = [at[s] for s in self.slots]
        self._free = {at[s]: waited for s, waited in self._free.items()}
        idx = torch.tensor(places, device=self.mask.device)
        self.mask = self.mask.index_select(0, idx)[:, start:]
        # contiguous inference tensors, like the forward's own: a compiled forward guards on strides
        # and on how a tensor was made, and would recompile for a sliced view or a normal tensor
        with torch.inference_mode():
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))[..., start:, :].contiguous()
                layer.values = layer.values.index_select(0, idx.to(layer.values.device))[..., start:, :].contiguous()

    def decode(self, tokens: list[int]):
        """One step for every running row: feed its last token, return next-token logits [rows, V]."""
        torch = self._torch
        ids = torch.tensor(self._places_of(tokens), dtype=torch.long, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.places, 1)], dim=1)
        return self._rows_of(self._forward(ids, self.mask, self.cache))

    def prefill(self, prompts: list[list[int]]):
        """Prefill ``prompts`` (token ids) as one left-padded group in a cache of their own;
        returns (their next-token logits [len(prompts), V], the group's (cache, mask))."""
        torch = self._torch
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = DynamicCache()
        return self._forward(ids, mask, cache), (cache, mask)

    def _packed_forward(self, ids, pos, last, pack):
        torch = self._torch
        hidden = self.model.model(
            input_ids=ids, position_ids=pos,
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ids.device), use_cache=False,
            bloomkit_pack=pack).last_hidden_state
        return self.model.lm_head(hidden[0, last]).float()

    def packed_step(self, tokens: list[int], prompts: list[list[int]]):
        """The running rows decode ``tokens`` and ``prompts`` are prefilled in one forward: their
        tokens packed into one sequence, so every linear layer reads its weights once for both
        (on a CPU a prefill of a few tokens otherwise costs about a whole decode step).  Attention
        stays per part (:func:`_packed_attention`).  Returns (the running rows' logits or None,
        the prompts' logits, their group for :meth:`merge`)."""
        torch = self._torch
        from transformers import DynamicCache

        tokens = self._places_of(tokens) if tokens else []
        r = len(tokens)
        pos = []
        if r:
            self.mask = torch.cat([self.mask, self.mask.new_ones(r, 1)], dim=1)
            pos = (self.mask.sum(-1) - 1).tolist()
        pads = [0] * len(prompts)
        if self._compile and max(map(len, prompts)) == 1:   # width 1 would need a graph of its own:
            prompts, pads[0] = [[self.pad, *prompts[0]], *prompts[1:]], 1   # a masked pad column instead
        pack = _Pack(self.cache, r, [len(p) for p in prompts], self.mask.bool()[:, None, None, :] if r else None,
                     torch, self.device, pads)
        ids = list(tokens) + [t for p in prompts for t in p]
        pos += [t for p, k in zip(prompts, pads) for t in [1] * k + list(range(len(p) - k))]   # pads at 1, as generate
        last = list(range(r)) + list(itertools.accumulate(len(p) for p in prompts))
        last[r:] = [r + n - 1 for n in last[r:]]
        with torch.inference_mode():
            logits = self._pack_call(torch.tensor([ids], device=self.device), torch.tensor([pos], device=self.device),
                                     torch.tensor(last, device=self.device), pack)
        cache = DynamicCache()
        for i in sorted(pack.keys):
            cache.update(pack.keys[i], pack.values[i], i)
        return (self._rows_of(logits[:r]) if r else None), logits[r:], (cache, pack.group_mask)

    def merge(self, group) -> None:
        """Append a prefilled group's rows.  A row takes a free place when there is one and the
        prompt fits in the cache's width: its keys and values are written into that row's last
        columns, the columns before masked.  The others join as new rows: both caches padded on
        the left to the common width, then concatenated on the batch axis (one copy of the
        cache: the price of joining)."""
        torch = self._torch
        cache, mask = group
        if self.mask is None:
            with torch.inference_mode():   # the prefill's keys may be a transposed view: same layout always
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
            self.cache, self.mask = cache, mask
            self.slots, self._free = list(range(mask.shape[0])), {}
            return
        a, width = mask.shape
        w = self.width
        reuse = sorted(self._free)[:a] if width <= w else []
        k = len(reuse)
        if k:
            idx = torch.tensor(reuse, device=self.mask.device)
            self.mask[idx] = 0
            self.mask[idx, w - width:] = mask[:k]
            with torch.inference_mode():
                for old, new in zip(self.cache.layers, cache.layers):
                    old.keys[idx.to(old.keys.device), :, w - width:] = new.keys[:k]
                    old.values[idx.to(old.values.device), :, w - width:] = new.values[:k]
            for s in reuse:
                del self._free[s]
            self.slots += reuse
        if k == a:
            return
        places = self.places
        self.slots += list(range(places, places + a - k))
        w = max(w, width)
        pad = torch.nn.functional.pad
        self.mask = torch.cat([pad(self.mask, (w - self.width, 0)), pad(mask[k:], (w - width, 0))])
        with torch.inference_mode():
            for old, new in zip(self.cache.layers, cache.layers):
                ow, nw = old.keys.shape[-2], new.keys.shape[-2]
                old.keys = torch.cat([pad(old.keys, (0, 0, w - ow, 0)), pad(new.keys[k:], (0, 0, w - nw, 0))])
                old.values = torch.cat([pad(old.values, (0, 0, w - ow, 0)), pad(new.values[k:], (0, 0, w - nw, 0))])

    def warm_up(self) -> None:
        """Run each kind of step once on pad tokens — a prefill of one row and of two (of one token
        and of several), a decode of one row and of several (on a cache of one column and of
        several), rows leaving, packed steps (:meth:`enable_packed`) — then empty the batch.  With
        ``compile`` this builds every graph before the first request (sizes 0 and 1 are
        specialised, larger ones are symbolic), so no request pays a compilation.  Every rank runs
        the same sequence."""
        x = self.pad
        for one_token in ([[x]], [[x], [x]]):   # one-token prompts: a prefill and a cache of length 1
            self.merge(self.prefill(one_token)[1])
            self.decode([x] * len(one_token))
            self.keep([])
        self.merge(self.prefill([[x, x, x]])[1])
        self.decode([x])
        self.merge(self.prefill([[x, x], [x, x, x, x, x]])[1])
        self.decode([x, x, x])
        self.keep([0, 2])
        self.decode([x, x])
        if self.packed:   # packed steps: one prompt and several joining, of one token and of several
            for prompts in ([[x]], [[x], [x]], [[x, x, x]], [[x, x], [x, x, x]]):
                self.keep([0, 1])
                self.merge(self.packed_step([x] * self.rows, prompts)[2])
        self.keep([])

    def dummy(self) -> None:
        """A one-token forward on no cache: ZeRO-3 ranks without rows still join the step."""
        torch = self._torch
        self._forward(torch.tensor([[self.pad]], device=self.device),
                      torch.ones(1, 1, dtype=torch.long, device=self.device), None)

    def apply(self, plan: dict, early=None):
        """Apply a plan (``keep``, ``feed``, ``admit``): rows leave, the admitted prompts are
        prefilled, the running rows decode one token, the new rows join the batch.  Prefill goes
        first and ``early(logits)`` sees the new rows' logits before the decode step runs, so
        their first token is out one step sooner (time to first token).  Returns the running
        rows' logits (or ``None``)."""
        self.keep(plan["keep"])
        if self.packed and plan["admit"] and plan["feed"] and self.places >= self.pack_rows:
            out, logits, group = self.packed_step(plan["feed"], plan["admit"])
            if early is not None:
                early(logits)
            self.merge(group)
            return out
        group = None
        if plan["admit"]:
            logits, group = self.prefill(plan["admit"])
            if early is not None:
                early(logits)
        out = self.decode(plan["feed"]) if plan["feed"] else None
        if group is not None:
            self.merge(group)
        return out


# ---------------------------------------------------------------------------- requests

@dataclass
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None


_ids = itertools.count()


class Request:
    """One HTTP request: one or more prompts (one row each), and a thread-safe way to hand
    events back to the asyncio side (``emit`` -> ``loop.call_soon_threadsafe``)."""

    def __init__(self, prompts_ids: list[list[int]], params: Params, loop=None, sink=None,
                 timeout_s: float = 300.0):
        self.id = next(_ids)
        self.prompts_ids, self.params = prompts_ids, params
        self.loop, self.sink = loop, sink
        self.created = time.perf_counter()
        self.deadline = self.created + timeout_s
        self.cancelled = False
        self.scheduled_at: float | None = None     # first admitted to a prefill (queue time)
        self.first_token_at: float | None = None

    def emit(self, event: tuple) -> None:
        if self.sink is None:
            return
        if self.loop is None:
            self.sink(event)
        else:
            try:
                self.loop.call_soon_threadsafe(self.sink, event)
            except RuntimeError:  # the loop is closed: the server is going down
                pass


class Row:
    """One prompt of a request in the running batch: its tokens, text and sampling state."""

    def __init__(self, req: Request, index: int, prompt_ids: list[int]):
        import torch

        self.req, self.index, self.prompt_ids = req, index, prompt_ids
        self.tokens: list[int] = []
        self.next: int | None = None    # sampled, not yet fed: the next decode step's input
        self.text, self.sent = "", 0
        self.finish: str | None = None
        p = req.params
        self.gen = None
        if p.temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(p.seed + index if p.seed is not None else torch.seed())

    @property
    def need_tokens(self) -> int:
        return len(self.prompt_ids) + self.req.params.max_tokens


def sample(logits, row: Row) -> int:
    """Greedy (``temperature`` 0: argmax, as ``generate``) or temperature + nucleus (``top_p``)."""
    import torch

    p = row.req.params
    if p.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        cut = (sp.cumsum(-1) - sp) >= p.top_p   # drop tokens once the mass before them reaches top_p
        sp[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs, 1, generator=row.gen))


# ---------------------------------------------------------------------------- the engine

class QueueFull(Exception):
    pass


# Latency buckets (seconds) shared by every histogram below, named once so that servers and ranks
# aggregate: 0.5 ms to 640 s, dense where a small model on a CPU (a few ms
# per token, tens of ms to a first token) and a big one on a GPU (tens of ms per token, up to
# seconds to a first token or in a queue) both land.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                     0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)

# How a request ends: ``ok`` (every row finished), ``rejected`` (429, the queue was full),
# ``cancelled`` (the client went away), ``timeout`` (504, past --request_timeout), ``error`` (the
# model failed: 503)
OUTCOMES = ("ok", "rejected", "cancelled", "timeout", "error")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (``registry``: several servers
    or engines in one process never share one), exposed by ``/metrics`` through prometheus_client.

    * histograms (:data:`LATENCY_BUCKETS_S`), one observation per request:
      ``bloomkit_time_to_first_token_seconds`` (arrival to the first generated token),
      ``bloomkit_request_time_per_output_token_seconds`` (TPOT, vLLM's definition: (end-to-end
      - TTFT) / (output tokens - 1), for requests of at least 2 tokens; a request of several
      prompts counts its longest row), ``bloomkit_e2e_request_latency_seconds`` (arrival to the
      last token, requests that ended ``ok``) and ``bloomkit_request_queue_time_seconds``
      (arrival to the step that first admits one of its rows to a prefill);
    * counters: ``bloomkit_requests_total{outcome}`` (:data:`OUTCOMES`),
      ``bloomkit_prompt_tokens_total`` (prompt tokens prefilled), ``bloomkit_generation_tokens_total``
      (tokens returned to clients: an EOS that ends a row is not counted, as in ``usage``),
      ``bloomkit_steps_total`` (sampling steps: prefills and decode steps);
    * gauges, read when scraped from the callables the engine passes: ``bloomkit_running_rows``,
      ``bloomkit_waiting_rows``, ``bloomkit_kv_cache_tokens`` (see :meth:`Engine.kv_cache_tokens`)
      and ``bloomkit_compiled_graphs``.

    Rows, not requests, in the gauges: a request with a list of N prompts is N rows.  Cost on the
    scheduler thread: per step two counter increments (a lock each, about 2 us together), per
    request a few observations, nothing per token; end-to-end latency and TPOT are observed on
    the HTTP side (:meth:`finished`).  prometheus_client's values carry their own locks, so the
    scheduler thread, the prefill thread and the HTTP loop write while ``/metrics`` reads.

    Args:
        running: rows in the running batch (or prefilling), read at each scrape.
        waiting: rows queued for a place in the batch.
        kv_cache_tokens: KV-cache positions the running batch holds.

    Example:
        >>> from prometheus_client import generate_latest
        >>> m = Metrics()
        >>> m.step(3); m.count("ok")
        >>> b"bloomkit_generation_tokens_total 3.0" in generate_latest(m.registry)
        True
    """

    def __init__(self, running: Callable[[], float] | None = None, waiting: Callable[[], float] | None = None,
                 kv_cache_tokens: Callable[[], float] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        from ..measure.harness import compiled_graphs

        disable_created_metrics()   # no *_created series beside every counter and histogram
        self.registry = r = CollectorRegistry()

        def histogram(name: str, help_: str):
            return Histogram(name, help_, buckets=LATENCY_BUCKETS_S, registry=r)

        def gauge(name: str, help_: str, read) -> None:
            Gauge(name, help_, registry=r).set_function(read or (lambda: 0))

        self.ttft = histogram("bloomkit_time_to_first_token_seconds",
                              "Arrival to the first generated token, per request")
        self.tpot = histogram("bloomkit_request_time_per_output_token_seconds",
                              "(end-to-end - TTFT) / (output tokens - 1), per request of 2 tokens or more")
        self.e2e = histogram("bloomkit_e2e_request_latency_seconds",
                             "Arrival to the last generated token, per request that ended ok")
        self.queue_time = histogram("bloomkit_request_queue_time_seconds",
                                    "Arrival to the first prefill of the request's rows")
        requests = Counter("bloomkit_requests", "Requests by outcome (" + ", ".join(OUTCOMES) + ")",
                           ["outcome"], registry=r)
        self._outcome = {o: requests.labels(o) for o in OUTCOMES}   # every outcome shown, from 0
        self.prompt_tokens = Counter("bloomkit_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("bloomkit_generation_tokens",
                                         "Generated tokens returned to clients (as usage counts them)",
                                         registry=r)
        self.steps = Counter("bloomkit_steps", "Sampling steps (prefills and decode steps)", registry=r)
        gauge("bloomkit_running_rows", "Rows (prompts) in the running batch or prefilling", running)
        gauge("bloomkit_waiting_rows", "Rows (prompts) waiting for a place in the running batch", waiting)
        gauge("bloomkit_kv_cache_tokens", "KV-cache positions the running batch holds (rows x width, "
              "left padding and places kept for joining rows included), per layer", kv_cache_tokens)
        gauge("bloomkit_compiled_graphs", "Graphs torch.compile built in this process (--compile: all "
              "before the first request; a rise under load is a recompile)", compiled_graphs)

    def step(self, tokens: int) -> None:
        """One sampling step that returned ``tokens`` tokens (scheduler or prefill thread)."""
        self.generation_tokens.inc(tokens)
        self.steps.inc()

    def count(self, outcome: str) -> None:
        """One more request that ended with ``outcome`` (one of :data:`OUTCOMES`)."""
        self._outcome[outcome].inc()

    def admitted(self, rows: list[Row]) -> None:
        """Rows admitted to a prefill: their prompt tokens, and the queue time of each request
        not admitted before (a request's first row admitted ends its wait)."""
        now = time.perf_counter()
        self.prompt_tokens.inc(sum(len(r.prompt_ids) for r in rows))
        for r in rows:
            if r.req.scheduled_at is None:
                r.req.scheduled_at = now
                self.queue_time.observe(now - r.req.created)

    def first_token(self, seconds: float) -> None:
        """A request's time to first token."""
        self.ttft.observe(seconds)

    def finished(self, req: "Request", output_tokens: int, at: float | None = None) -> None:
        """A request that ended ``ok`` at ``at`` (perf_counter; default now) with ``output_tokens``
        tokens in its longest row: counted, its end-to-end latency and TPOT observed."""
        at = time.perf_counter() if at is None else at
        self.count("ok")
        self.e2e.observe(at - req.created)
        if output_tokens > 1 and req.first_token_at is not None:
            self.tpot.observe((at - req.first_token_at) / (output_tokens - 1))


class Engine:
    """The scheduler: owns the model in one thread (:meth:`run`), admits waiting requests
    between steps, samples, detokenizes, and hands each request its events.

    ``max_batch`` bounds the running rows (activation memory, and the step time every running
    request feels); ``max_queue`` the waiting ones (beyond it: 429, load shedding instead of
    unbounded latency); ``kv_budget_bytes`` the KV cache of the padded batch, counted for every
    row at its full length (prompt + ``max_tokens``), so an admitted request never runs out of
    memory halfway; ``max_prefill_tokens`` the prompt tokens prefilled in one step; ``max_decode_skips`` how many
    steps in a row may prefill joining requests *instead of* decoding the running rows (prefill
    first lowers time to first token under load; the bound keeps running rows moving).
    ``sync`` (:mod:`.ranks`) makes the steps collective when there are several ranks.
    ``compile``: the forward compiled with dynamic shapes (:class:`KVBatch`); call
    ``batch.warm_up()`` on every rank before serving.  ``overlap_prefill``: joining requests
    are prefilled in a second thread while the running rows decode (one process only; see
    :func:`overlap_refusal`); ``max_decode_skips`` then does not apply, the running rows
    decode every step; the prefill thread starts with :meth:`run`.  ``packed_prefill`` (a
    Llama-family model in one process, eager, without ``overlap_prefill``; see
    :func:`packed_refusal`): a step that admits prompts decodes the running rows *and* prefills
    them in one forward (:meth:`KVBatch.packed_step`), so a few-token prefill no longer costs a
    forward of its own; ``max_decode_skips`` then does not apply.  ``slot_hold``: steps a
    finished row's place in the KV cache waits for a joining row, which then takes it without
    the cache being copied (:meth:`KVBatch.keep`); the places waiting are memory beside the
    running rows that the KV budget does not count (at most the rows that left in those steps).
    ``freezing`` (with ``compile``, on the CPU; see :func:`freezing_refusal`): inductor takes the
    weights as constants and pre-packs them for the CPU's matrix multiply, one copy per graph."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int = 256,
                 request_timeout: float = 300.0, kv_bytes_per_token: int = 0,
                 kv_budget_bytes: int | None = None, context_limit: int | None = None,
                 max_prefill_tokens: int = 4096, max_decode_skips: int = 1, sync=None, device=None,
                 compile: bool = False, overlap_prefill: bool = False, packed_prefill: bool = False,
                 slot_hold: int = SLOT_HOLD, freezing: bool = False):
        self.tok = tokenizer
        self.batch = KVBatch(model, tokenizer.pad_token_id, device, compile=compile, slot_hold=slot_hold,
                             freezing=freezing)
        if packed_prefill:
            why = packed_refusal(model, ranks=1 if sync is None else 2, compile=compile) or \
                ("the prefill thread runs its own forward" if overlap_prefill else None)
            if why:
                raise ValueError(f"packed_prefill: {why}")
            self.batch.enable_packed()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.request_timeout = request_timeout
        self.kv_per_token, self.kv_budget = kv_bytes_per_token, kv_budget_bytes
        self.context_limit, self.max_prefill_tokens = context_limit, max_prefill_tokens
        self.max_decode_skips, self._skips = max_decode_skips, 0
        self.sync = sync
        self.eos = tokenizer.eos_token_id
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque = deque()
        self.rows: list[Row] = []
        self.metrics = Metrics(running=lambda: len(self.rows) + len(self._inflight),
                               waiting=lambda: self._queued, kv_cache_tokens=self.kv_cache_tokens)
        self._lock = threading.Lock()
        self._queued = 0
        self.stopping = threading.Event()
        self.failed: str | None = None
        self.peer_stopped = False
        self.ready = threading.Event()
        self.last_step = time.monotonic()
        if overlap_prefill and (sync is not None or compile):
            raise ValueError("overlap_prefill runs in one process, uncompiled (see overlap_refusal)")
        self.overlap = overlap_prefill
        # overlap_prefill: the prefill thread owns the inbox and the waiting rows; the rows it took
        # are in _inflight until the model thread merges their group (from _ready) into the batch
        self._rows_lock = threading.Lock()
        self._inflight: list[Row] = []
        self._ready: queue.Queue = queue.Queue()
        self._room = threading.Event()

    # ------------------------------------------------------------------ the HTTP side

    def check(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Refuse what can never run — longer than the context, or a KV cache larger than the
        whole budget — as a 400 naming ``max_tokens`` and what would fit (no silent cap)."""
        n = len(prompt_ids)
        if self.context_limit is not None and n + max_tokens > self.context_limit:
            raise BadRequest(f"max_tokens {max_tokens} plus the prompt ({n} tokens) exceeds the "
                             f"model's context of {self.context_limit} tokens; use max_tokens "
                             f"{max(self.context_limit - n, 0)} or less", "max_tokens")
        if self.kv_budget and self.kv_per_token and (n + max_tokens) * self.kv_per_token > self.kv_budget:
            fits = self.kv_budget // self.kv_per_token - n
            raise BadRequest(f"max_tokens {max_tokens} plus the prompt ({n} tokens) needs "
                             f"{(n + max_tokens) * self.kv_per_token / 2**20:.1f} MiB of KV cache, more "
                             f"than the server's {self.kv_budget / 2**20:.1f} MiB; use max_tokens "
                             f"{max(fits, 0)} or less", "max_tokens")

    def submit(self, req: Request) -> None:
        """Queue a request (any thread); raises :class:`QueueFull` beyond ``max_queue``."""
        with self._lock:
            if self._queued + len(req.prompts_ids) > self.max_queue:
                self.metrics.count("rejected")
                raise QueueFull(f"the queue is full ({self.max_queue} waiting rows); retry later")
            self._queued += len(req.prompts_ids)
        self.inbox.put(req)

    @property
    def queued(self) -> int:
        return self._queued

    def kv_cache_tokens(self) -> int:
        """KV-cache positions the running batch holds: rows x width of the left-padded batched
        cache (pads and places kept for joining rows included: they take memory too), the same in
        every layer; times the bytes per token (``kv_bytes_per_token``) it is the cache's memory.
        A group still prefilling beside the step (``overlap_prefill``) is not counted until it
        joins.  Any thread may call it."""
        mask = self.batch.mask   # one read: the model thread replaces the mask to change its shape
        return 0 if mask is None else mask.shape[0] * mask.shape[1]

    # ------------------------------------------------------------------ the model thread

    def _padded_kv(self, rows: list[Row]) -> int:
        return len(rows) * max(r.need_tokens for r in rows) * self.kv_per_token if rows else 0

    def _collect(self, wait: float) -> None:
        try:
            req = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            for i, ids in enumerate(req.prompts_ids):
                self.waiting.append(Row(req, i, ids))
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _unqueue(self, n: int) -> None:
        with self._lock:
            self._queued -= n

    def _running(self) -> tuple[list[int], list[int], list[Row]]:
        """The running rows that stay (cancelled and timed-out ones leave): batch indices to keep,
        the tokens to feed them, the rows."""
        now = time.perf_counter()
        keep, feed, stay = [], [], []
        for i, r in enumerate(self.rows):
            if r.finish is None and r.req.cancelled:
                r.finish = "cancelled"
                self._count_cancelled(r.req)
            elif r.finish is None and now > r.req.deadline:
                self._timeout(r)
            if r.finish is None:
                keep.append(i)
                feed.append(r.next)
                stay.append(r)
        return keep, feed, stay

    def _admission(self, occupied: list[Row]) -> list[Row]:
        """Waiting rows whose request was cancelled or timed out leave the queue; then the waiting
        rows that fit beside ``occupied`` (``max_batch``, ``max_prefill_tokens``, the KV budget)
        are taken, in arrival order."""
        now = time.perf_counter()
        for r in [r for r in self.waiting if r.req.cancelled or now > r.req.deadline]:
            self.waiting.remove(r)
            self._unqueue(1)
            if r.req.cancelled:
                self._count_cancelled(r.req)
            else:
                self._timeout(r)
        admit, tokens = [], 0
        while self.waiting and len(occupied) + len(admit) < self.max_batch:
            r = self.waiting[0]
            if admit and tokens + len(r.prompt_ids) > self.max_prefill_tokens:
                break
            if self.kv_budget and self.kv_per_token and (occupied or admit) and \
                    self._padded_kv(occupied + admit + [r]) > self.kv_budget:
                break   # waits until running rows leave and free their cache
            admit.append(self.waiting.popleft())
            tokens += len(r.prompt_ids)
        if admit:
            self._unqueue(len(admit))
        return admit

    def plan(self) -> dict:
        """Decide this step: which rows stay, which tokens feed them, which prompts join."""
        keep, feed, stay = self._running()
        admit = self._admission(stay)
        if admit:
            self.metrics.admitted(admit)
        # Prefill first (max_decode_skips > 0): a step that admits skips the running rows' decode,
        # so a request arriving meanwhile waits for a prefill, not prefill + decode; at most
        # `max_decode_skips` steps in a row, so running rows still move every other step.  Measured
        # here (small, 16 clients, benchmarks/serve.py): with lengths drawn from 16-48 tokens, TTFT
        # p50 at 16 clients went from 4.1-4.2x one client's (0) to 3.1-3.5x (1) at the same
        # throughput; with one length for all (clients in lock-step) it changed nothing measurable.
        if admit and stay and self._skips < self.max_decode_skips and not self.batch.packed:
            feed = []
            self._skips += 1
        else:
            self._skips = 0
        self.rows = stay + admit
        self._stay, self._admit = (stay if feed else []), admit
        return {"keep": keep, "feed": feed, "admit": [r.prompt_ids for r in admit]}

    def _count_cancelled(self, req: Request) -> None:
        if not getattr(req, "_counted", False):
            req._counted = True
            self.metrics.count("cancelled")

    def _timeout(self, r: Row) -> None:
        r.finish = "timeout"
        if not getattr(r.req, "_timed_out", False):
            r.req._timed_out = True
            self.metrics.count("timeout")
            r.req.emit(("error", 504, f"the request took longer than the server's "
                                      f"--request_timeout of {self.request_timeout:g} s"))

    def _visible(self, r: Row) -> str:
        """Text that is safe to send: no half-decoded character, nothing that might become a
        stop string."""
        text = r.text
        if r.finish is None:
            text = text.rstrip("\ufffd")
            hold = max((len(s) for s in r.req.params.stop), default=1) - 1
            if hold:
                text = text[:max(len(text) - hold, r.sent)]
        return text

    def finish_step(self, rows: list[Row], logits) -> None:
        """Sample each row's next token, detokenize, check stop conditions, emit events."""
        now = time.perf_counter()
        returned = len(rows)   # tokens handed to clients this step (an EOS that ends a row is not)
        for r, lg in zip(rows, logits):
            t = sample(lg, r)
            r.next = t
            r.tokens.append(t)
            p = r.req.params
            if r.req.first_token_at is None:
                r.req.first_token_at = now
                self.metrics.first_token(now - r.req.created)
            if t == self.eos and not p.ignore_eos:
                r.finish = "stop"
                r.tokens.pop()
                returned -= 1
            r.text = self.tok.decode(r.tokens, skip_special_tokens=True)
            for s in p.stop:
                at = r.text.find(s)
                if at >= 0:
                    r.text, r.finish = r.text[:at], "stop"
            if r.finish is None and len(r.tokens) >= p.max_tokens:
                r.finish = "length"
            # one event per token, even when it adds no printable text yet (half a UTF-8
            # character, a possible stop string): the client sees every step, and its time to
            # first token is the first token's, not the first printable character's
            text = self._visible(r)
            r.req.emit(("delta", r.index, text[r.sent:], r.finish, len(r.prompt_ids), len(r.tokens)))
            r.sent = max(r.sent, len(text))
        self.metrics.step(returned)

    def step(self) -> bool:
        """One iteration: plan, apply (collectively), sample. False when there was nothing to do."""
        plan = self.plan()
        stay, admit = self._stay, self._admit
        early = (lambda lg: self.finish_step(admit, lg)) if admit else None
        if self.sync is not None:
            logits = self.sync.step(self.batch, plan, early)
        else:
            logits = self.batch.apply(plan, early)
        self.last_step = time.monotonic()
        if logits is not None:
            self.finish_step(stay, logits)
        return bool(stay or admit)

    def _step_overlapped(self, idle_wait: float = 0.5) -> bool:
        """The model thread's step with ``overlap_prefill``: the groups the prefill thread has
        finished join the batch (with no running rows: wait for one), rows leave, the running
        rows decode one token."""
        self._join(idle_wait if not self.rows else 0)
        # A burst (at least as many rows prefilling as running): the running rows wait for it
        # instead of sharing the cores with it, so the burst's first tokens come sooner, and
        # then everyone decodes together.  Measured here (small, 16 clients in lock-step, all
        # arriving at once): TTFT p50 at 16 clients went from 7.7x one client's (decoding beside
        # the burst) to 5.7x, as prefill first (5.5x in the same run).
        while self.rows and not self.stopping.is_set() and self._burst():
            self._join(0.5)
        with self._rows_lock:
            keep, feed, stay = self._running()
            left, self.rows = len(self.rows) > len(stay), stay
        self.batch.keep(keep)
        if left:
            self._room.set()   # the prefill thread may admit again
        if feed:
            self.finish_step(stay, self.batch.decode(feed))
            self.last_step = time.monotonic()
        return bool(stay)

    def _burst(self) -> bool:
        with self._rows_lock:
            return len(self._inflight) >= len(self.rows)

    def _join(self, wait: float) -> None:
        """Merge every prefilled group into the batch (``wait``: seconds to wait for one when none
        is ready); their rows decode from the next step on.  A failed prefill raises here."""
        try:
            item = self._ready.get(timeout=wait) if wait > 0 else self._ready.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, BaseException):
                raise item
            group, rows = item
            self.batch.merge(group)
            with self._rows_lock:
                self.rows = self.rows + rows
                self._inflight = [r for r in self._inflight if r not in rows]
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                return

    def _prefill_loop(self) -> None:
        """The prefill thread: take arrivals as they come, prefill them as one group beside the
        running decode, send their first tokens, hand the group to the model thread."""
        try:
            while not self.stopping.is_set():
                self._collect(0.0 if self.waiting else 0.05)
                with self._rows_lock:
                    admit = self._admission(self.rows + self._inflight)
                    self._inflight += admit
                if admit:
                    self.metrics.admitted(admit)
                if not admit:
                    if self.waiting:   # no room: until rows leave (or a waiting request expires)
                        self._room.wait(0.05)
                        self._room.clear()
                    continue
                logits, group = self.batch.prefill([r.prompt_ids for r in admit])
                self.finish_step(admit, logits)
                self._ready.put((group, admit))
        except BaseException as exc:  # noqa: BLE001 - the model thread raises it and goes down
            self._ready.put(exc)

    def run(self) -> None:
        """The model thread: step while there is work; idle, wait for requests (and, with
        several ranks, send a heartbeat every second so a dead rank is noticed)."""
        self.ready.set()
        busy = False
        prefill = None
        if self.overlap:
            prefill = threading.Thread(target=self._prefill_loop, name="prefill", daemon=True)
            prefill.start()
        try:
            while self.overlap and not self.stopping.is_set():
                self._step_overlapped()
            while not self.stopping.is_set():
                idle = not self.rows and not self.waiting
                self._collect((self.sync.idle_wait if self.sync else 0.5) if idle and not busy else 0)
                busy = self.step()
        except BaseException as exc:  # noqa: BLE001 - a failed collective: the server must go down
            if getattr(exc, "clean_stop", False):
                self.peer_stopped = True
                self.stopping.set()
                return
            self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self.stopping.set()
            failed = {}
            for r in self.rows + self._inflight + list(self.waiting):
                r.req.emit(("error", 503, f"the model failed: {self.failed}"))
                if r.finish is None:
                    failed[r.req.id] = r.req
            for _ in failed:
                self.metrics.count("error")
        finally:
            if prefill is not None:
                self.stopping.set()
                prefill.join(timeout=60)
            if self.sync is not None and self.failed is None and not self.peer_stopped:
                self.sync.close()

    def healthy(self) -> tuple[bool, str]:
        if self.failed:
            return False, self.failed
        if not self.ready.is_set():
            return False, "loading"
        return True, "ok"


def overlap_refusal(model, *, device: str, ranks: int, compile: bool) -> str | None:
    """Why ``overlap_prefill`` cannot run here, or None when it can: it needs one process (ranks
    run the same collectives in the same order), the CPU (on a GPU both threads would queue
    kernels on one CUDA stream: no overlap, only a second thread), the weights in place
    (Accelerate's offload hooks move weights in and out around each module, and bitsandbytes
    layers are not run from two threads here), and no ``compile``: one compiled module is not run
    from two threads, and an eager prefill beside the compiled decode step measured slower here
    than the compiled server prefilling first (``small``, mixed lengths, 16 clients: TTFT p50
    92, 92 and 94 ms against 75, 83 and 88 ms in three alternating rounds; one client 41, 38 and
    35 ms against 25, 26 and 26 ms)."""
    if ranks > 1:
        return "it runs in one process; with several ranks each step's collectives must stay in order"
    if compile:
        return ("with --compile the prefill would run eagerly beside the compiled step, measured slower than "
                "the compiled server prefilling first")
    if device != "cpu":
        return "it overlaps two forwards on the CPU's cores; on a GPU both would queue on one CUDA stream"
    places = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in places or len(places) > 1:
        return "the model is offloaded, and the offload hooks move weights in and out around each module"
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return "bitsandbytes-quantized layers are not run from two threads here"
    return None
