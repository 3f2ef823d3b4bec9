"""A load-test client that speaks only the OpenAI API (so it measures vLLM's server the same way).

``python -m bloomkit.serve.loadtest --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 48``

Arrivals are either a *fixed concurrency* (C clients, each sending its next request as soon as
the last one is answered: a closed loop, the server's throughput at C in flight) or *Poisson*
(``--rate`` requests/s with exponential gaps, an open loop: latency under a given offered load,
which keeps climbing once the rate passes what the server can do).  Runs are bounded in count
and in time, and the URL must be on loopback.

Every request streams (``stream: true``), which is how time to first token (TTFT: queueing +
prefill) and time per output token (TPOT: the decode step the request shares with the batch)
are seen from the outside; end-to-end latency is the whole request.  Requests are greedy
(``temperature: 0``) with ``ignore_eos`` (vLLM's extension, so each makes exactly ``max_tokens``
tokens), and a reference pass first asks every distinct prompt alone: under load, each answer
must equal the answer its own prompt got alone — a response that went to the wrong request, or
a batch that changed the arithmetic, shows up as a mismatch.

**Output lengths.**  ``max_tokens`` is one number, or a range ``(lo, hi)`` from which each request
draws its own length (seeded by its index, so every run asks the same sequence).  With one
length, closed-loop clients fall into *lock-step*: requests that start together end together,
so all C of them come back, arrive again at once and are prefilled as one group; every request
then waits for the whole group's prefill.  Real traffic has mixed lengths, which spreads the
arrivals out so that each new request joins a running batch on its own.  Both are worth
measuring: the single length is the worst case for time to first token.  An answer shorter than
the reference must be its prefix.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from urllib.parse import urlparse

from ..prompts import STANDARD_PROMPTS

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

DEFAULT_PROMPTS = list(STANDARD_PROMPTS)  # the blog's 8


def check_url(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and host.strip("[]") not in LOOPBACK:
        raise SystemExit(f"error: --url {url} is not on loopback; this client only loads a local server "
                         "(127.0.0.1, localhost, ::1)")
    return url.rstrip("/")


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion; its timings, text and token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, tokens, error = None, [], None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        error = str(ev["error"])
                        break
                    for c in ev.get("choices") or []:
                        if first is None:   # the first token's event (its text may still be empty)
                            first = time.perf_counter()
                        text.append(c.get("text") or "")
                    if ev.get("usage"):
                        tokens = ev["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    tokens = tokens if tokens is not None else len(text)   # without usage: one event per token
    ttft = (first or end) - t0
    return {"prompt": prompt, "text": "".join(text), "tokens": tokens, "error": error, "start": t0,
            "max_tokens": max_tokens,
            "ttft": ttft, "e2e": end - t0,
            "tpot": (end - (first or end)) / (tokens - 1) if tokens and tokens > 1 else None}


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
                   duration: float = 120.0, model: str | None = None, seed: int = 0) -> list[dict]:
    """Send ``requests`` requests (at most ``duration`` s of arrivals): ``concurrency`` closed-loop
    clients, or Poisson arrivals at ``rate``/s.  Request i asks ``prompts[i % len(prompts)]`` for
    ``lengths(max_tokens, ...)[i]`` tokens."""
    import httpx

    url = check_url(url)
    n_tokens = lengths(max_tokens, requests, seed)
    limits = httpx.Limits(max_connections=max(concurrency or 0, 64) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        if model is None:
            model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        deadline = time.perf_counter() + duration
        out: list[dict] = []
        if rate:
            rng = random.Random(seed)
            tasks = []
            for i in range(requests):
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(one(client, url, model, prompts[i % len(prompts)], n_tokens[i])))
                await asyncio.sleep(rng.expovariate(rate))
            out = list(await asyncio.gather(*tasks))
        else:
            counter = iter(range(requests))

            async def worker():
                for i in counter:
                    if time.perf_counter() > deadline:
                        return
                    out.append(await one(client, url, model, prompts[i % len(prompts)], n_tokens[i]))

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        return out


def summarize(results: list[dict], expected: dict | None = None, label: dict | None = None,
              reference_tokens: int | None = None) -> dict:
    """requests/s, output tokens/s, TTFT / TPOT / end-to-end p50/p90/p99 (ms), errors, mismatches
    (against ``expected``, answers of ``reference_tokens`` tokens: see :func:`matches`)."""
    ok = [r for r in results if r["error"] is None]
    if results:
        t0 = min(r["start"] for r in results)
        wall = max(r["start"] + r["e2e"] for r in results) - t0
    else:
        wall = 0.0
    row = dict(label or {})
    row.update(requests=len(results), errors=len(results) - len(ok), wall_s=round(wall, 3),
               requests_per_s=len(ok) / wall if wall else None,
               output_tokens_per_s=sum(r["tokens"] for r in ok) / wall if wall else None)
    for key in ("ttft", "tpot", "e2e"):
        vals = [r[key] * 1e3 for r in ok if r[key] is not None]
        for q in (50, 90, 99):
            row[f"{key}_p{q}_ms"] = pct(vals, q)
        row[f"{key}_min_ms"] = min(vals) if vals else None
        row[f"{key}_median_ms"] = statistics.median(vals) if vals else None
        row[f"{key}_max_ms"] = max(vals) if vals else None
        row[f"{key}_n"] = len(vals)
    if expected is not None:
        row["mismatches"] = sum(1 for r in ok if not matches(expected.get(r["prompt"]), r, reference_tokens))
    row["first_error"] = next((r["error"] for r in results if r["error"]), None)
    return row


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


async def reference(url: str, prompts: list[str], max_tokens) -> dict:
    """Every distinct prompt asked alone, one at a time, for the longest length: the answers load
    must not change."""
    res = await run_load(url, prompts=list(dict.fromkeys(prompts)), max_tokens=longest(max_tokens),
                         requests=len(set(prompts)), concurrency=1)
    bad = [r["error"] for r in res if r["error"]]
    if bad:
        raise SystemExit(f"error: the reference pass failed: {bad[0]}")
    return {r["prompt"]: r["text"] for r in res}


def sweep(url: str, *, concurrencies=(1,), rates=(), prompts=None, max_tokens=32,
          requests: int = 32, duration: float = 120.0, check: bool = True) -> dict:
    """A reference pass, then one run per concurrency (and per Poisson rate); a JSON-ready dict."""
    prompts = prompts or DEFAULT_PROMPTS
    expected = asyncio.run(reference(url, prompts, max_tokens)) if check else None
    runs = []
    for c in concurrencies:
        res = asyncio.run(run_load(url, prompts=prompts, max_tokens=max_tokens, requests=requests,
                                   concurrency=c, duration=duration))
        runs.append(summarize(res, expected, {"arrivals": "fixed", "concurrency": c}, longest(max_tokens)))
    for r in rates:
        res = asyncio.run(run_load(url, prompts=prompts, max_tokens=max_tokens, requests=requests,
                                   rate=r, duration=duration))
        runs.append(summarize(res, expected, {"arrivals": "poisson", "rate": r}, longest(max_tokens)))
    return {"url": url, "max_tokens": max_tokens, "requests_per_run": requests, "runs": runs}


def table(result: dict) -> str:
    head = f"{'arrivals':>12} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} " \
           f"{'e2e p50':>8} {'p99':>8} {'err':>4} {'mism':>4}"
    lines = [head]
    f = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in result["runs"]:
        tag = f"C={r['concurrency']}" if r["arrivals"] == "fixed" else f"{r['rate']}/s"
        lines.append(f"{tag:>12} {f(r['requests_per_s']):>7} {f(r['output_tokens_per_s']):>8} "
                     f"{f(r['ttft_p50_ms']):>9} {f(r['ttft_p99_ms']):>8} {f(r['tpot_p50_ms']):>9} "
                     f"{f(r['e2e_p50_ms']):>8} {f(r['e2e_p99_ms']):>8} {r['errors']:>4} "
                     f"{r.get('mismatches', '-'):>4}")
    return "\n".join(lines) + "\n(times in ms)"


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
    requests for them."""
    cols = [("TTFT", "ttft"), ("TPOT", "tpot"), ("end to end", "e2e")]
    head = f"{'clients':>8} {'requests':>8} {'tokens/s':>9} " + " ".join(f"{c:>22}" for c, _ in cols)
    lines = [head]
    for r in runs:
        tag = r.get("concurrency", r.get("rate", "-"))
        tps = r["output_tokens_per_s"]
        lines.append(f"{tag!s:>8} {r['requests']:>8} {(f'{tps:.1f}' if tps else '-'):>9} "
                     + " ".join(f"{spread(r, k):>22}" for _, k in cols))
    return "\n".join(lines) + (f"\n(ms; 'p50 / p90' from {MIN_FOR_PERCENTILES} requests on, "
                               "else 'median (min-max)')")


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--concurrency", type=_list(int), default=[1, 4, 16], help="closed-loop clients, e.g. 1,16")
    p.add_argument("--rate", type=_list(float), default=[], help="Poisson arrivals per second, e.g. 2,8")
    p.add_argument("--requests", type=int, default=32, help="requests per run")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per run at most")
    p.add_argument("--max_tokens", type=_length, default=32,
                   help="tokens per request: N, or LO-HI for a length drawn per request (mixed traffic)")
    p.add_argument("--prompts_file", default=None, help="one prompt per line (default: the blog's 8)")
    p.add_argument("--no_check", action="store_true", help="skip the greedy reference check")
    p.add_argument("--json_out", default=None)
    a = p.parse_args(argv)
    if a.requests <= 0 or a.duration <= 0:
        p.error("--requests and --duration must be positive")
    prompts = None
    if a.prompts_file:
        from pathlib import Path

        prompts = [ln for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    res = sweep(check_url(a.url), concurrencies=a.concurrency, rates=a.rate, prompts=prompts,
                max_tokens=a.max_tokens, requests=a.requests, duration=a.duration, check=not a.no_check)
    print(table(res))
    if a.json_out:
        from pathlib import Path

        Path(a.json_out).write_text(json.dumps(res, indent=1))
    bad = sum(r["errors"] + r.get("mismatches", 0) for r in res["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
