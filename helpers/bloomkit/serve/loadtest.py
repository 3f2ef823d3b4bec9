"""A load-test client that speaks only the OpenAI API and measures by the definitions of vLLM's bench serve.

``python -m bloomkit.serve.loadtest --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 48``

Arrivals are either a *fixed concurrency* (C clients, each sending its next request as soon as
the last one is answered: a closed loop, the server's throughput at C in flight) or *Poisson*
(``--rate`` requests/s with exponential gaps, an open loop: latency under a given offered load,
which keeps climbing once the rate passes what the server can do).  Runs are bounded in count
and in time, and the URL must be on loopback.

**What is measured, and how.**  Every request streams (``stream: true``), which is how the
latencies are seen from the outside.  The metrics are vLLM's ``vllm bench serve`` metrics, by its
definitions (:data:`METRIC_DEFINITIONS`, written into every JSON record): time to first token
(TTFT), time per output token (TPOT = (E2E - TTFT) / (output tokens - 1), per request), inter-token
latency (ITL: the gaps between a request's streamed chunks), end-to-end latency (E2E), request,
output-token and total-token throughput, and *goodput*: requests per second that met every given
SLO (``--goodput ttft:MS tpot:MS``).  Percentiles follow numpy's default rule
(:func:`percentile`).  Each run keeps its per-request samples.

**Fields sent.**  Requests are greedy (``temperature: 0``) and carry only standard OpenAI fields,
unless the server is known to accept an extension that holds output lengths equal
(:func:`resolve_extensions`): vLLM's ``ignore_eos`` (and ``min_tokens``).  ``--extensions auto``
(the default) takes them from the ``owned_by`` of the server's ``/v1/models``: this project's
server (``bloomkit``) and vLLM (``vllm``) honour ``ignore_eos``; any other server, such as
``transformers serve``, which answers unknown fields with 422, gets standard fields only, and its
record says ``"not held: max_tokens only, output lengths as produced"`` beside the lengths each
request actually got.  ``--extensions ignore_eos,min_tokens`` names them instead (each is tried
once; one the server refuses is dropped and the refusal recorded); ``--extensions none`` sends
standard fields to any server.

**Answers are checked.**  A reference pass first asks every distinct prompt alone: under load,
each answer must equal the answer its own prompt got alone — a response that went to the wrong
request, or a batch that changed the arithmetic, shows up as a mismatch.

**Output lengths.**  ``max_tokens`` is one number, or a range ``(lo, hi)`` from which each request
draws its own length (seeded by its index, so every run asks the same sequence).  With one
length, closed-loop clients fall into *lock-step*: requests that start together end together,
so all C of them come back, arrive again at once and are prefilled as one group; every request
then waits for the whole group's prefill.  Real traffic has mixed lengths, which spreads the
arrivals out so that each new request joins a running batch on its own.  Both are worth
measuring: the single length is the worst case for time to first token.  An answer shorter than
the reference must be its prefix.

**The picture.**  ``--plot out.png`` draws the run as vLLM's and DeepSpeed-FastGen's serving results
are shown: latency (TTFT and TPOT p50) against output tokens/s, one point per concurrency or rate
(:func:`plot_latency_throughput`, which ``benchmarks/serve.py --plot`` draws several servers with).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import urlparse

from ..cli import Parser, positive_int
from ..errors import UserError, cli_entry
from ..prompts import STANDARD_PROMPTS

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

DEFAULT_PROMPTS = list(STANDARD_PROMPTS)  # the blog's 8

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
SLO_METRICS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}   # --goodput key -> per-request key

EXTENSIONS = ("ignore_eos", "min_tokens")
# Servers known (from their source or documentation) to honour an extension that holds output
# lengths equal, by the ``owned_by`` of their /v1/models.  Ours also accepts ``min_tokens`` but
# ignores it (app.parse_params reads ignore_eos only), so it is not listed.
KNOWN_EXTENSIONS = {"bloomkit": ("ignore_eos",), "vllm": ("ignore_eos",)}
NOT_HELD = "not held: max_tokens only, output lengths as produced"

METRIC_DEFINITIONS = {
    "source": "vLLM `vllm bench serve` (vllm/benchmarks/serve.py and lib/endpoint_request_func.py): "
              "streamed /v1/completions, per-request samples, numpy percentiles",
    "ttft": "request sent -> first streamed chunk that carries choices (its text may be empty)",
    "tpot": "per request (e2e - ttft) / (output_tokens - 1); no sample for 1 output token "
            "(counted as 0 against a tpot SLO, as vLLM does)",
    "itl": "gaps between consecutive streamed chunks of one request (a chunk may carry several "
           "tokens), pooled over the run's requests",
    "e2e": "request sent -> last streamed chunk that carries choices (vLLM's E2EL)",
    "output_tokens": "usage.completion_tokens of the stream (stream_options.include_usage), "
                     "else one per chunk",
    "prompt_tokens": "usage.prompt_tokens of the stream (None when the server sends no usage)",
    "duration": "first request sent -> last request's last chunk",
    "request_throughput": "completed requests / duration",
    "output_throughput": "output tokens of the completed requests / duration",
    "total_token_throughput": "(prompt + output tokens of the completed requests) / duration",
    "goodput": "completed requests meeting every given SLO (ttft, tpot, e2el in ms: metric <= SLO) "
               "/ duration",
    "percentiles": "numpy.percentile(values, q): linear interpolation between the closest ranks",
    "std": "numpy.std (population)",
    "failed": "a request with a non-200 status, an error event, or no chunk: counted in errors, "
              "in no metric",
}


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if its host is on loopback.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.

    Example:
        >>> check_url("http://127.0.0.1:8000/")
        'http://127.0.0.1:8000'
    """
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and host.strip("[]") not in LOOPBACK:
        raise UserError(f"--url {url} is not on loopback; this client only loads a local server "
                        "(127.0.0.1, localhost, ::1)")
    return url.rstrip("/")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` by numpy's default rule (linear interpolation
    between the closest ranks, ``numpy.percentile(values, q)``), or None when empty.

    Args:
        values: the samples, in any order.
        q: the percentile, 0 to 100.

    Example:
        >>> percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90)
        9.1
    """
    import numpy as np

    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _std(values: Sequence[float]) -> float | None:
    import numpy as np

    return float(np.std(np.asarray(values, dtype=float))) if len(values) else None


# ---------------------------------------------------------------------------- which fields to send

@dataclass(frozen=True)
class LengthControl:
    """How a run holds output lengths equal: the extensions every request carries.

    ``sent`` are the extension fields each request carries, ``refused`` maps an extension the
    server refused to its answer, and ``decided_by`` says how the choice was made."""

    sent: tuple[str, ...] = ()
    refused: dict = field(default_factory=dict)
    decided_by: str = "none asked for"

    @property
    def how(self) -> str:
        """``"ignore_eos"``, ``"min_tokens"``, ``"ignore_eos+min_tokens"`` or :data:`NOT_HELD`."""
        return "+".join(self.sent) if self.sent else NOT_HELD

    def body(self, max_tokens: int) -> dict:
        """The extension fields of one request asking for ``max_tokens`` tokens."""
        out = {}
        if "ignore_eos" in self.sent:
            out["ignore_eos"] = True
        if "min_tokens" in self.sent:
            out["min_tokens"] = max_tokens
        return out

    def record(self) -> dict:
        return {"how": self.how, "sent": list(self.sent), "refused": dict(self.refused),
                "decided_by": self.decided_by}


def parse_extensions(text: str) -> str | tuple[str, ...]:
    """``auto``, ``none`` or a comma-separated list of :data:`EXTENSIONS`.

    Example:
        >>> parse_extensions("ignore_eos,min_tokens")
        ('ignore_eos', 'min_tokens')
    """
    text = text.strip()
    if text in ("auto", "none"):
        return text
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in EXTENSIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown extension {', '.join(bad) or repr(text)}; use auto, none, "
                                         f"or a list of {', '.join(EXTENSIONS)}")
    return names


async def resolve_extensions(client, url: str, wanted="auto", model: str | None = None,
                             owned_by: str | None = None) -> LengthControl:
    """Which extensions the requests of a run may carry.

    ``auto``: those :data:`KNOWN_EXTENSIONS` lists for the server's ``owned_by`` (no request is
    sent: a probe would count in the server's metrics, and a server that ignores unknown fields
    would look as if it honoured them); ``none`` or ``()``: standard OpenAI fields only; a list:
    each is tried once on a one-token request, and one the server answers with a 4xx is dropped
    (the run is still measured, without it).

    Args:
        client: an ``httpx.AsyncClient``.
        url: the server (checked to be on loopback).
        wanted: ``"auto"``, ``"none"``, a sequence of extension names, or a :class:`LengthControl`
            (returned as it is).
        model: the model to name in a trial request (default: the first of ``/v1/models``).
        owned_by: the server's ``owned_by`` if already read from ``/v1/models``.

    Example:
        >>> async with httpx.AsyncClient() as c:                        # doctest: +SKIP
        ...     (await resolve_extensions(c, "http://127.0.0.1:8000")).how
        'ignore_eos'
    """
    if isinstance(wanted, LengthControl):
        return wanted
    if wanted in (None, "none") or (not isinstance(wanted, str) and not wanted):
        return LengthControl((), {}, "standard OpenAI fields only (--extensions none)")
    if model is None or (wanted == "auto" and owned_by is None):
        card = (await client.get(url + "/v1/models")).json()["data"][0]
        model, owned_by = model or card["id"], card.get("owned_by")
    if wanted == "auto":
        known = KNOWN_EXTENSIONS.get(owned_by or "", ())
        why = (f"auto: /v1/models owned_by {owned_by!r} is known to honour {', '.join(known)}" if known else
               f"auto: /v1/models owned_by {owned_by!r} is not known to accept extensions; standard "
               "OpenAI fields only")
        return LengthControl(tuple(known), {}, why)
    try:
        names = parse_extensions(wanted if isinstance(wanted, str) else ",".join(wanted))
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"extensions: {exc}") from None
    sent, refused = [], {}
    for name in names:
        body = {"model": model, "prompt": DEFAULT_PROMPTS[0], "max_tokens": 1, "temperature": 0,
                **LengthControl((name,)).body(1)}
        r = await client.post(url + "/v1/completions", json=body)
        if 400 <= r.status_code < 500:
            refused[name] = f"HTTP {r.status_code}: {' '.join(r.text.split())[:200]}"
        else:
            sent.append(name)
    return LengthControl(tuple(sent), refused, f"--extensions {','.join(names)}, each tried on one request")


# ---------------------------------------------------------------------------- one request, one run

async def one(client, url: str, model: str, prompt: str, max_tokens: int,
              control: LengthControl = LengthControl()) -> dict:
    """One streamed greedy completion: its timings (seconds), text and token counts.

    The timings follow vLLM's client: TTFT at the first chunk that carries ``choices``, every
    later such chunk adds its gap to ``itl``, E2E ends at the last one.

    Args:
        client: an ``httpx.AsyncClient``.
        url: the server.
        model: the model id the request names.
        prompt: the prompt.
        max_tokens: the most tokens to generate (exactly this many where ``control`` holds it).
        control: the extensions the request carries (:func:`resolve_extensions`).
    """
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **control.body(max_tokens)}
    t0 = time.perf_counter()
    first = last = None
    text, itl, chunks = [], [], 0
    tokens = prompt_tokens = error = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
            else:
                async for line in resp.aiter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        error = str(ev["error"])
                        break
                    choices = ev.get("choices") or []
                    if choices:   # a chunk (its text may be empty: part of a character, a special token)
                        if first is None:
                            first = now
                        else:
                            itl.append(now - last)
                        last = now
                        chunks += 1
                        text.append(choices[0].get("text") or "")
                    usage = ev.get("usage")
                    if usage:
                        tokens = usage.get("completion_tokens", tokens)
                        prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    if error is None and first is None:
        error = "the stream ended without a chunk"
    tokens = tokens if tokens is not None else chunks   # without usage: one chunk per token
    ttft = (first or end) - t0
    e2e = (last or end) - t0
    return {"prompt": prompt, "text": "".join(text), "tokens": tokens, "prompt_tokens": prompt_tokens,
            "error": error, "start": t0, "max_tokens": max_tokens, "length_control": control.how,
            "ttft": ttft, "e2e": e2e, "itl": itl, "chunks": chunks,
            "tpot": (e2e - ttft) / (tokens - 1) if tokens and tokens > 1 else None}


def lengths(max_tokens, requests: int, seed: int = 0) -> list[int]:
    """Each request's ``max_tokens``: the number itself, or one drawn from the range ``(lo, hi)``."""
    if isinstance(max_tokens, int):
        return [max_tokens] * requests
    lo, hi = max_tokens
    return [random.Random(seed * 1_000_003 + i).randint(lo, hi) for i in range(requests)]


def longest(max_tokens) -> int:
    return max_tokens if isinstance(max_tokens, int) else max_tokens[1]


async def run_load(url: str, *, prompts: list[str], max_tokens, requests: int,
                   concurrency: int | None = None, rate: float | None = None,
                   duration: float = 120.0, model: str | None = None, seed: int = 0,
                   extensions="auto") -> list[dict]:
    """Send ``requests`` requests (at most ``duration`` s of arrivals): ``concurrency`` closed-loop
    clients, or Poisson arrivals at ``rate``/s.  Request i asks ``prompts[i % len(prompts)]`` for
    ``lengths(max_tokens, ...)[i]`` tokens, with the extensions :func:`resolve_extensions` allows
    for ``extensions``; returns one record per request (:func:`one`)."""
    import httpx

    url = check_url(url)
    n_tokens = lengths(max_tokens, requests, seed)
    limits = httpx.Limits(max_connections=max(concurrency or 0, 64) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        owned_by = None
        if model is None or extensions == "auto":
            card = (await client.get(url + "/v1/models")).json()["data"][0]
            model, owned_by = model or card["id"], card.get("owned_by")
        control = await resolve_extensions(client, url, extensions, model, owned_by)
        deadline = time.perf_counter() + duration
        out: list[dict] = []
        if rate:
            rng = random.Random(seed)
            tasks = []
            for i in range(requests):
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(
                    one(client, url, model, prompts[i % len(prompts)], n_tokens[i], control)))
                await asyncio.sleep(rng.expovariate(rate))
            out = list(await asyncio.gather(*tasks))
        else:
            counter = iter(range(requests))

            async def worker():
                for i in counter:
                    if time.perf_counter() > deadline:
                        return
                    out.append(await one(client, url, model, prompts[i % len(prompts)], n_tokens[i], control))

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        return out


# ---------------------------------------------------------------------------- the metrics

def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (SLOs in ms; keys ttft,
    tpot, e2el, as vLLM's ``--goodput``).

    Example:
        >>> parse_goodput(["ttft:500", "e2el:2000"])
        {'ttft': 500.0, 'e2el': 2000.0}
    """
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = str(item).partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = None
        if not sep or key not in SLO_METRICS or ms is None or not ms > 0:
            raise UserError(f"--goodput {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_METRICS)} and "
                            "MS a positive number, e.g. --goodput ttft:500 tpot:50")
        if key in out:
            raise UserError(f"--goodput names {key} twice; give each SLO once")
        out[key] = ms
    return out


def goodput(samples: Sequence[dict], slos_ms: dict[str, float], duration_s: float) -> dict:
    """Requests that met every given SLO, and their rate (vLLM's goodput).

    A completed request (``error`` None) is good when each metric named in ``slos_ms`` is at most
    its SLO; a one-token request has no TPOT and counts as 0 against a ``tpot`` SLO, as in vLLM.
    Failed requests are never good.

    Args:
        samples: per-request records with ``ttft``, ``tpot`` and ``e2e`` in seconds and ``error``.
        slos_ms: ``{"ttft": ms, "tpot": ms, "e2el": ms}``, any subset (:func:`parse_goodput`).
        duration_s: the run's duration, the rate's denominator.

    Example:
        >>> reqs = [{"ttft": 0.1, "tpot": 0.02, "e2e": 0.5, "error": None},
        ...         {"ttft": 0.9, "tpot": 0.02, "e2e": 1.3, "error": None}]
        >>> goodput(reqs, {"ttft": 500}, 2.0)["good_requests"]
        1
    """
    unknown = set(slos_ms) - set(SLO_METRICS)
    if unknown:
        raise UserError(f"unknown SLO {', '.join(sorted(unknown))}; use {', '.join(SLO_METRICS)}")
    done = [s for s in samples if s.get("error") is None]

    def good(s):
        return all(((s[SLO_METRICS[k]] or 0.0) * 1e3) <= ms for k, ms in slos_ms.items())
    n = sum(1 for s in done if good(s))
    return {"slos_ms": dict(slos_ms), "good_requests": n, "completed": len(done),
            "goodput_requests_per_s": n / duration_s if duration_s else None}


def _ms(v):
    return None if v is None else round(v * 1e3, 3)


def sample(r: dict, expected: dict | None = None, reference_tokens: int | None = None) -> dict:
    """One request's record as the JSON keeps it: latencies in ms, token counts, its error."""
    out = {"prompt": r.get("prompt"), "max_tokens": r.get("max_tokens"), "prompt_tokens": r.get("prompt_tokens"),
           "output_tokens": r.get("tokens"), "ttft_ms": _ms(r.get("ttft")), "tpot_ms": _ms(r.get("tpot")),
           "e2e_ms": _ms(r.get("e2e")), "itl_ms": [_ms(x) for x in r.get("itl") or []], "error": r.get("error")}
    if expected is not None and r.get("error") is None:
        out["matches"] = matches(expected.get(r["prompt"]), r, reference_tokens)
    return out


def summarize(results: list[dict], expected: dict | None = None, label: dict | None = None,
              reference_tokens: int | None = None, *, goodput_slos: dict[str, float] | None = None,
              samples: bool = True) -> dict:
    """One run's metrics by :data:`METRIC_DEFINITIONS`.

    Keys: ``requests``, ``errors``, ``completed``, ``wall_s`` (the duration), ``requests_per_s``,
    ``output_tokens_per_s``, ``total_tokens_per_s`` (None without the server's usage counts),
    ``prompt_tokens`` / ``output_tokens`` (sums), for each of ttft, tpot, itl, e2e:
    ``{key}_p50_ms`` / ``_p90_ms`` / ``_p99_ms`` / ``_mean_ms`` / ``_std_ms`` / ``_min_ms`` /
    ``_median_ms`` / ``_max_ms`` / ``_n``; ``length_control`` and ``lengths_held`` (every completed
    request made exactly its ``max_tokens``); ``goodput`` with ``goodput_slos``; ``mismatches``
    against ``expected`` (answers of ``reference_tokens`` tokens: :func:`matches`);
    ``first_error``; and ``samples``, one per request (:func:`sample`).

    Args:
        results: the records of :func:`run_load`.
        expected: prompt -> its answer alone (:func:`reference`), or None for no check.
        label: keys put first in the row (``arrivals``, ``concurrency`` or ``rate``).
        reference_tokens: the reference answers' length, when requests asked for fewer.
        goodput_slos: SLOs in ms for :func:`goodput`, or None.
        samples: keep the per-request samples in the row.
    """
    ok = [r for r in results if r["error"] is None]
    if results:
        t0 = min(r["start"] for r in results)
        wall = max(r["start"] + r["e2e"] for r in results) - t0
    else:
        wall = 0.0
    out_tokens = sum(r["tokens"] for r in ok)
    prompt_counts = [r.get("prompt_tokens") for r in ok]
    prompt_tokens = sum(prompt_counts) if ok and None not in prompt_counts else None
    row = dict(label or {})
    row.update(requests=len(results), errors=len(results) - len(ok), completed=len(ok), wall_s=round(wall, 3),
               requests_per_s=len(ok) / wall if wall else None,
               output_tokens_per_s=out_tokens / wall if wall else None,
               total_tokens_per_s=(prompt_tokens + out_tokens) / wall if wall and prompt_tokens is not None else None,
               prompt_tokens=prompt_tokens, output_tokens=out_tokens)
    for key in LATENCIES:
        if key == "itl":
            vals = [x * 1e3 for r in ok for x in r.get("itl") or []]
        else:
            vals = [r[key] * 1e3 for r in ok if r.get(key) is not None]
        for q in PERCENTILES:
            row[f"{key}_p{q}_ms"] = percentile(vals, q)
        row[f"{key}_mean_ms"] = sum(vals) / len(vals) if vals else None
        row[f"{key}_std_ms"] = _std(vals)
        row[f"{key}_min_ms"] = min(vals) if vals else None
        row[f"{key}_median_ms"] = percentile(vals, 50)
        row[f"{key}_max_ms"] = max(vals) if vals else None
        row[f"{key}_n"] = len(vals)
    controls = sorted({r.get("length_control") or NOT_HELD for r in results})
    row["length_control"] = controls[0] if len(controls) == 1 else (controls or None)
    row["lengths_held"] = bool(ok) and all(r["tokens"] == r.get("max_tokens") for r in ok)
    if goodput_slos:
        row["goodput"] = goodput(results, goodput_slos, wall)
    if expected is not None:
        row["mismatches"] = sum(1 for r in ok if not matches(expected.get(r["prompt"]), r, reference_tokens))
    row["first_error"] = next((r["error"] for r in results if r["error"]), None)
    if samples:
        row["samples"] = [sample(r, expected, reference_tokens) for r in results]
    return row


LATENCY_KEYS = [f"{k}_p{q}_ms" for k in LATENCIES for q in PERCENTILES]


def median_rows(rounds: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per load point (client count or rate) from the rounds of a measurement, each round a
    list of :func:`summarize` rows: the median over the rounds of throughput, every latency
    percentile and ``cores_busy`` (where the rows have it), with the rounds' range of throughput
    and of each p50 (``output_tokens_per_s_range``, ``{key}_p50_ms_range``: a picture's error
    bars), and ``tokens_per_event``: output tokens per streamed event (a request's first chunk and
    each gap after it) over all rounds.  Keys an older record lacks are left out.

    Example:
        >>> row = {"concurrency": 1, "output_tokens_per_s": 10.0, "ttft_p50_ms": 5.0}
        >>> median_rows([[row], [{**row, "output_tokens_per_s": 12.0}], [{**row, "output_tokens_per_s": 20.0}]])[0]
        {'arrivals': 'fixed', 'concurrency': 1, 'rate': None, 'rounds': 3, 'output_tokens_per_s': 12.0, 'output_tokens_per_s_range': (10.0, 20.0), 'ttft_p50_ms': 5.0, 'ttft_p50_ms_range': (5.0, 5.0)}
    """
    by: dict = {}
    for rows in rounds:
        for r in rows:
            if isinstance(r, dict) and isinstance(r.get("output_tokens_per_s"), (int, float)):
                by.setdefault((r.get("arrivals", "fixed"), r.get("concurrency"), r.get("rate")), []).append(r)
    out = []
    for (arrivals, c, rate), rs in by.items():
        row = {"arrivals": arrivals, "concurrency": c, "rate": rate, "rounds": len(rs)}
        for key in ("output_tokens_per_s", "requests_per_s", *LATENCY_KEYS, "cores_busy"):
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            if vals:
                row[key] = statistics.median(vals)
                if key == "output_tokens_per_s" or key.endswith("_p50_ms"):
                    row[f"{key}_range"] = (min(vals), max(vals))
        if all(isinstance(r.get(k), int) for r in rs for k in ("completed", "itl_n", "output_tokens")):
            events = sum(r["completed"] + r["itl_n"] for r in rs)
            if events:
                row["tokens_per_event"] = sum(r["output_tokens"] for r in rs) / events
        out.append(row)
    return out


def per_round(rounds: Sequence[Sequence[dict]], concurrency: int, key: str) -> list:
    """``key`` of the row at ``concurrency`` clients in every round (the pairs a comparison takes).

    Example:
        >>> per_round([[{"concurrency": 1, "x": 1}, {"concurrency": 8, "x": 2}], [{"concurrency": 8, "x": 3}]], 8, "x")
        [2, 3]
    """
    return [r[key] for rows in rounds for r in rows if r.get("concurrency") == concurrency]


def matches(expected: str | None, r: dict, reference_tokens: int | None = None) -> bool:
    """The answer equals the reference; or, asked for fewer tokens than the reference's
    ``reference_tokens``, is its beginning (a character cut in half at its end, U+FFFD, is
    not a difference)."""
    if expected is None:
        return False
    if r["text"] == expected:
        return True
    shorter = reference_tokens is not None and (r.get("max_tokens") or 0) < reference_tokens
    return shorter and expected.startswith(r["text"].rstrip("\ufffd"))


async def reference(url: str, prompts: list[str], max_tokens, extensions="auto") -> dict:
    """Every distinct prompt asked alone, one at a time, for the longest length: the answers load
    must not change.  ``extensions`` must be the runs' (the same fields, so the same lengths)."""
    res = await run_load(url, prompts=list(dict.fromkeys(prompts)), max_tokens=longest(max_tokens),
                         requests=len(set(prompts)), concurrency=1, extensions=extensions)
    bad = [r["error"] for r in res if r["error"]]
    if bad:
        raise UserError(f"the reference pass failed: {bad[0]}")
    return {r["prompt"]: r["text"] for r in res}


async def length_control(url: str, extensions="auto") -> LengthControl:
    """:func:`resolve_extensions` for ``url`` in a client of its own (once for a whole sweep)."""
    import httpx

    url = check_url(url)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        return await resolve_extensions(client, url, extensions)


def sweep(url: str, *, concurrencies=(1,), rates=(), prompts=None, max_tokens=32,
          requests: int = 32, duration: float = 120.0, check: bool = True, extensions="auto",
          goodput_slos: dict[str, float] | None = None) -> dict:
    """A reference pass, then one run per concurrency (and per Poisson rate); a JSON-ready dict
    with the ``metric_definitions`` it used and how output lengths were held (``length_control``)."""
    prompts = prompts or DEFAULT_PROMPTS
    url = check_url(url)
    control = asyncio.run(length_control(url, extensions))
    expected = asyncio.run(reference(url, prompts, max_tokens, control)) if check else None
    kw = dict(prompts=prompts, max_tokens=max_tokens, requests=requests, duration=duration, extensions=control)
    runs = []
    for c in concurrencies:
        res = asyncio.run(run_load(url, concurrency=c, **kw))
        runs.append(summarize(res, expected, {"arrivals": "fixed", "concurrency": c}, longest(max_tokens),
                              goodput_slos=goodput_slos))
    for r in rates:
        res = asyncio.run(run_load(url, rate=r, **kw))
        runs.append(summarize(res, expected, {"arrivals": "poisson", "rate": r}, longest(max_tokens),
                              goodput_slos=goodput_slos))
    return {"url": url, "max_tokens": max_tokens, "requests_per_run": requests,
            "metric_definitions": METRIC_DEFINITIONS, "length_control": control.record(),
            "goodput_slos_ms": goodput_slos or None, "runs": runs}


# ---------------------------------------------------------------------------- tables

def table(result: dict) -> str:
    """The runs of :func:`sweep`, one line each (ms)."""
    good = any("goodput" in r for r in result["runs"])
    head = f"{'arrivals':>12} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} " \
           f"{'ITL p50':>8} {'e2e p50':>8} {'p99':>8} {'err':>4} {'mism':>4}" + (f" {'good/s':>7}" if good else "")
    lines = [head]
    f = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in result["runs"]:
        tag = f"C={r['concurrency']}" if r["arrivals"] == "fixed" else f"{r['rate']}/s"
        line = (f"{tag:>12} {f(r['requests_per_s']):>7} {f(r['output_tokens_per_s']):>8} "
                f"{f(r['ttft_p50_ms']):>9} {f(r['ttft_p99_ms']):>8} {f(r['tpot_p50_ms']):>9} "
                f"{f(r['itl_p50_ms']):>8} {f(r['e2e_p50_ms']):>8} {f(r['e2e_p99_ms']):>8} {r['errors']:>4} "
                f"{r.get('mismatches', '-'):>4}")
        if good:
            line += f" {f(r['goodput']['goodput_requests_per_s']):>7}"
        lines.append(line)
    lc = result.get("length_control") or {}
    held = all(r.get("lengths_held") for r in result["runs"])
    notes = [f"(times in ms; vLLM bench serve's definitions, numpy percentiles; output lengths: "
             f"{lc.get('how', '?')}{'' if held else ', not all requests made max_tokens'})"]
    if lc.get("refused"):
        notes.append("refused extensions: " + "; ".join(f"{k} ({v})" for k, v in lc["refused"].items()))
    if result.get("goodput_slos_ms"):
        notes.append("goodput SLOs (ms): " + ", ".join(f"{k} <= {v:g}" for k, v in result["goodput_slos_ms"].items()))
    return "\n".join(lines + notes)


MIN_FOR_PERCENTILES = 10   # fewer values than this: min / median / max, never a p90 or p99


def spread(row: dict, key: str) -> str:
    """One latency of a :func:`summarize` row as a reader should see it: ``p50 / p90`` from
    :data:`MIN_FOR_PERCENTILES` values on, else ``median (min-max)``, in ms."""
    n = row.get(f"{key}_n") or 0
    if not n:
        return "-"
    f = lambda v: f"{v:.1f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    if n >= MIN_FOR_PERCENTILES:
        return f"p50 {f(row[f'{key}_p50_ms'])} / p90 {f(row[f'{key}_p90_ms'])}"
    return f"{f(row[f'{key}_median_ms'])} ({f(row[f'{key}_min_ms'])}-{f(row[f'{key}_max_ms'])})"


def spread_table(runs: list[dict]) -> str:
    """Runs side by side with :func:`spread` latencies: percentiles only where a run has enough
    values for them (requests; for ITL, the gaps pooled over its requests)."""
    cols = [("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("end to end", "e2e")]
    head = f"{'clients':>8} {'requests':>8} {'tokens/s':>9} " + " ".join(f"{c:>22}" for c, _ in cols)
    lines = [head]
    for r in runs:
        tag = r.get("concurrency", r.get("rate", "-"))
        tps = r["output_tokens_per_s"]
        lines.append(f"{tag!s:>8} {r['requests']:>8} {(f'{tps:.1f}' if tps else '-'):>9} "
                     + " ".join(f"{spread(r, k):>22}" for _, k in cols))
    return "\n".join(lines) + (f"\n(ms; 'p50 / p90' from {MIN_FOR_PERCENTILES} requests on, "
                               "else 'median (min-max)'; ITL counts gaps between chunks, not requests)")


# ---------------------------------------------------------------------------- the picture

LATENCY_NAMES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
                 "e2e": "end-to-end latency"}


def point_tag(row: dict) -> str:
    """How a run's load is named beside its point: ``C=16`` (closed-loop clients) or ``2/s`` (Poisson).

    Example:
        >>> point_tag({"arrivals": "fixed", "concurrency": 16}), point_tag({"arrivals": "poisson", "rate": 2.0})
        ('C=16', '2/s')
    """
    if row.get("arrivals") == "poisson" and row.get("rate") is not None:
        return f"{row['rate']:g}/s"
    return f"C={row['concurrency']}" if row.get("concurrency") is not None else ""


def latency_bar(row: dict, key: str) -> tuple[float, float, str] | None:
    """The error bar of one latency of a :func:`summarize` row: ``(low, high, what)`` in ms, or None.

    The range of the rounds' p50 where the row carries one (``{key}_p50_ms_range``, a benchmark's
    median row); else p50 to p90 where the run had :data:`MIN_FOR_PERCENTILES` values or more (or
    does not say how many: older records); else its fastest to slowest value (as :func:`spread`).

    Example:
        >>> latency_bar({"ttft_p50_ms": 30.0, "ttft_p90_ms": 45.0, "ttft_n": 12}, "ttft")
        (30.0, 45.0, 'p50 to p90')
    """
    rng = row.get(f"{key}_p50_ms_range")
    if rng:
        return float(rng[0]), float(rng[1]), "range of the rounds' p50"
    n = row.get(f"{key}_n")
    if n is not None and n < MIN_FOR_PERCENTILES:
        lo, hi = row.get(f"{key}_min_ms"), row.get(f"{key}_max_ms")
        return (float(lo), float(hi), f"fastest to slowest (under {MIN_FOR_PERCENTILES} values)") \
            if lo is not None and hi is not None else None
    p50, p90 = row.get(f"{key}_p50_ms"), row.get(f"{key}_p90_ms")
    return (float(p50), float(p90), "p50 to p90") if p50 is not None and p90 is not None else None


def _load_order(row: dict) -> float:
    return float(row.get("rate") if row.get("arrivals") == "poisson" else row.get("concurrency") or 0)


def plot_latency_throughput(series: dict[str, list[dict]], axes=None, latencies: Sequence[str] = ("ttft", "tpot"),
                            title: str | None = None) -> list:
    """Latency against throughput, the way vLLM's and DeepSpeed-FastGen's serving results are
    shown: x the output tokens per second of a run (all clients together), y a latency's p50, one
    line per server, its points in order of load and named by it (``C=16``, ``2/s``).

    A server is better where its line lies lower (less waiting) and further right (more tokens);
    as load grows, a line first runs right (throughput grows, latency barely) and then bends
    upward: past that knee more load buys latency, not throughput.  Error bars: :func:`latency_bar`
    (and the rounds' range of throughput where a row carries ``output_tokens_per_s_range``).
    Rows without a throughput (every request failed) are left out.

    Args:
        series: the line's label (a server, a kind of traffic) -> its :func:`summarize` rows.
        axes: one Axes per latency (a new :func:`bloomkit.results.figure`'s when ``None``).
        latencies: which of ``ttft``, ``tpot``, ``itl``, ``e2e`` to draw, one panel each.
        title: put before each panel's title (e.g. the traffic).

    Returns:
        the Axes, one per latency.

    Example:
        >>> rows = [{"arrivals": "fixed", "concurrency": c, "output_tokens_per_s": tps, "ttft_p50_ms": t,
        ...          "tpot_p50_ms": p} for c, tps, t, p in ((1, 50, 35, 20), (16, 250, 170, 55))]
        >>> [ax.get_xlabel() for ax in plot_latency_throughput({"ours": rows})][0]
        'output tokens / s (all clients together)'
    """
    if axes is None:
        from .. import results

        axes = results.figure(len(latencies), width=5.5)[1]
    axes = list(axes)
    if len(axes) != len(latencies):
        raise ValueError(f"{len(latencies)} latencies need as many Axes, got {len(axes)}")
    for ax, key in zip(axes, latencies):
        kinds = []
        for i, (label, rows) in enumerate(series.items()):
            pts = sorted((r for r in rows if isinstance(r.get("output_tokens_per_s"), (int, float))
                          and isinstance(r.get(f"{key}_p50_ms"), (int, float))), key=_load_order)
            if not pts:
                continue
            xs = [float(r["output_tokens_per_s"]) for r in pts]
            ys = [float(r[f"{key}_p50_ms"]) for r in pts]
            bars = [latency_bar(r, key) for r in pts]
            kinds += [b[2] for b in bars if b]
            yerr = ([[max(y - (b or (y, y))[0], 0) for y, b in zip(ys, bars)],
                     [max((b or (y, y))[1] - y, 0) for y, b in zip(ys, bars)]] if any(bars) else None)
            xr = [r.get("output_tokens_per_s_range") or (x, x) for x, r in zip(xs, pts)]
            xerr = [[max(x - lo, 0) for x, (lo, _) in zip(xs, xr)], [max(hi - x, 0) for x, (_, hi) in zip(xs, xr)]] \
                if any(r.get("output_tokens_per_s_range") for r in pts) else None
            line = ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, marker="o", capsize=3, label=label)
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(point_tag(r), (x, y), textcoords="offset points", xytext=(5, (4, -11)[i % 2]), fontsize=8,
                            color=line.lines[0].get_color())
        name = LATENCY_NAMES.get(key, key)
        bar_note = "\nbars: " + ", or ".join(dict.fromkeys(kinds)) if kinds else ""
        ax.set_xlabel("output tokens / s (all clients together)")
        ax.set_ylabel(f"{key.upper()} p50, ms{bar_note}", fontsize=9 if bar_note else None)
        ax.set_title(f"{title + ': ' if title else ''}{name}\nlower and further right is better", fontsize=10)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return axes


def plot_result(result: dict, path, latencies: Sequence[str] = ("ttft", "tpot")):
    """Draw a :func:`sweep` result (the load test's JSON) as a PNG at ``path``: one line for the
    closed-loop runs and one for the Poisson ones, one panel per latency
    (:func:`plot_latency_throughput`).  Returns the path.

    Example:
        >>> plot_result(sweep("http://127.0.0.1:8000"), "load.png")        # doctest: +SKIP
        PosixPath('load.png')
    """
    from .. import results

    runs = result.get("runs") or []
    series = {}
    for kind, what in (("fixed", "closed loop"), ("poisson", "Poisson arrivals")):
        rows = [r for r in runs if r.get("arrivals", "fixed") == kind]
        if rows:
            series[f"{result.get('url', 'the server')} ({what})"] = rows
    if not any(isinstance(r.get("output_tokens_per_s"), (int, float)) for r in runs):
        raise UserError("nothing to draw: no run completed a request; see the table's errors")
    fig, axes = results.figure(len(latencies), width=5.5)
    plot_latency_throughput(series, axes, latencies)
    lengths = result.get("max_tokens")
    lengths = f"{lengths[0]}-{lengths[1]}" if isinstance(lengths, (list, tuple)) else lengths
    fig.suptitle(f"load test: {result.get('requests_per_run', '?')} requests a run, max_tokens {lengths}, "
                 f"output lengths {(result.get('length_control') or {}).get('how', '?')}", fontsize=10)
    return results.save_png(fig, path)


# ---------------------------------------------------------------------------- the command line

def _list(cast):
    def parse(text):
        try:
            vals = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if not vals or any(v <= 0 for v in vals):
            raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
        return vals
    return parse


def _length(text: str):
    """``N`` or ``LO-HI`` (1 <= LO <= HI)."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, e.g. 32 or 16-48; got {text!r}")
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"lengths must be positive and LO <= HI; got {text!r}")
    return lo if lo == hi else (lo, hi)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def parser() -> Parser:
    """The command line's flags; a bad one is a single ``error:`` line (:class:`~bloomkit.cli.Parser`)."""
    p = Parser(prog="python -m bloomkit.serve.loadtest", description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--concurrency", type=_list(int), default=[1, 4, 16], help="closed-loop clients, e.g. 1,16")
    p.add_argument("--rate", type=_list(float), default=[], help="Poisson arrivals per second, e.g. 2,8")
    p.add_argument("--requests", type=positive_int, default=32, help="requests per run")
    p.add_argument("--duration", type=_positive_float, default=120.0, help="seconds of arrivals per run at most")
    p.add_argument("--max_tokens", type=_length, default=32,
                   help="tokens per request: N, or LO-HI for a length drawn per request (mixed traffic)")
    p.add_argument("--prompts_file", default=None, help="one prompt per line; None: the blog's 8")
    p.add_argument("--extensions", type=parse_extensions, default="auto",
                   help="fields beyond the OpenAI API that hold output lengths equal: auto (those the server's "
                        "/v1/models owned_by is known to honour: ignore_eos for bloomkit and vllm, none for "
                        "others), none, or a list of ignore_eos,min_tokens (each tried once; refused ones dropped)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el; a request is good when "
                        "it meets all of them)")
    p.add_argument("--no_check", action="store_true", help="skip the greedy reference check")
    p.add_argument("--json_out", default=None,
                   help="write the result (metric definitions, runs, per-request samples) to this JSON file")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw latency against throughput (TTFT and TPOT p50 against output tokens/s, one "
                        "point per concurrency or rate) as a PNG at this path")
    return p


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    url = check_url(a.url)
    if a.plot or a.json_out:   # before any request: a path that cannot be written fails now, not after the run
        from .. import results

        results.check_writable(a.json_out)
        results.check_writable(a.plot, "--plot")
    slos = parse_goodput(a.goodput) if a.goodput else None
    prompts = None
    if a.prompts_file:
        from pathlib import Path

        path = Path(a.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts_file {a.prompts_file}: no such file; give a text file, one prompt per line")
        prompts = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise UserError(f"--prompts_file {a.prompts_file} has no prompt; put one prompt per line")
    import httpx

    try:
        res = sweep(url, concurrencies=a.concurrency, rates=a.rate, prompts=prompts, max_tokens=a.max_tokens,
                    requests=a.requests, duration=a.duration, check=not a.no_check, extensions=a.extensions,
                    goodput_slos=slos)
    except httpx.ConnectError as exc:
        raise UserError(f"no server answers at {url} ({exc}); start one (python recipes/serve.py) or fix --url")
    except httpx.HTTPError as exc:
        raise UserError(f"the server at {url} failed: {type(exc).__name__}: {exc}")
    print(table(res))
    if a.json_out:
        from .. import results

        results.write_json(a.json_out, res)
    if a.plot:
        print(f"saved {plot_result(res, a.plot)}")
    bad = sum(r["errors"] + r.get("mismatches", 0) for r in res["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
