"""GuideLLM, a third-party benchmark client, run against an OpenAI-compatible server on loopback.

``run_guidellm("http://127.0.0.1:8000", "trained", streams=(1, 8), requests=16, out_dir="runs/gl")``

GuideLLM (``guidellm run``, the CLI of GuideLLM 0.8) lives in its own environment,
``.venv-guidellm`` (``make setup-guidellm``), never in ``.venv``: it brings its own transformers,
datasets and torch.  :func:`run_guidellm` runs it the way its documentation benchmarks a vLLM
server: the ``openai_http`` backend on ``/v1/completions``, streamed; synthetic prompts of exactly
``prompt_tokens`` tokens (``synthetic_text`` data, counted by the model's own tokenizer, read
from its local directory: nothing from the hub), each asking for ``output_tokens`` tokens (GuideLLM
sends ``max_tokens`` with ``ignore_eos: true``; ``temperature: 0`` is added through its backend's
``extras``, as it sends no temperature of its own); a ``concurrent`` profile
(``streams`` requests in flight, one benchmark per value), each benchmark ended by a
``max_requests`` constraint.  Its own JSON report is kept in ``out_dir`` beside its log, and
:func:`summarize_report` reads the summary out of it.

**Its definitions are not vLLM's** (:data:`DEFINITIONS`, copied into every summary): GuideLLM's TPOT
is the request's time to its last token divided by *all* its output tokens (the first token
included), its ITL is (last token - first token) / (output tokens - 1), which is what vLLM calls
TPOT; its TPOT and ITL distributions weigh each request by its tokens.  So each summary also gives
the per-request TTFT, TPOT and E2E by vLLM's definitions (numpy percentiles over requests),
recomputed from the request timings in GuideLLM's report, to set beside
:mod:`bloomkit.serve.loadtest`'s rows.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..launch import ROOT
from .loadtest import check_url, percentile

GUIDELLM_VENV = ROOT / ".venv-guidellm"
SETUP = "make setup-guidellm"
QUANTILES = (50, 90, 99)

DEFINITIONS = {
    "source": "GuideLLM 0.8 (guidellm/schemas/base/request_stats.py, benchmark/schemas/generative): its JSON "
              "report's metrics, successful requests only",
    "ttft": "request start -> first streamed chunk with text (time_to_first_token_ms)",
    "itl": "per request (last token - first token) / (output tokens - 1) (inter_token_latency_ms): vLLM's TPOT; "
           "its distribution has one value per output token after the first (token-weighted)",
    "tpot": "per request (last token - request start) / output tokens, the FIRST TOKEN INCLUDED "
            "(time_per_output_token_ms); token-weighted",
    "request_latency": "request start -> request end (request_latency)",
    "output_tokens_per_s": "output tokens of successful requests over the benchmark's duration "
                           "(output_tokens_per_second, its mean)",
    "requests_per_s": "successful requests over the benchmark's duration (requests_per_second, its mean)",
    "percentiles": "GuideLLM's own (its p50, p90, p99 fields)",
    "refill_gap_ms": "per stream (GuideLLM's scheduler_node_id): request end -> that stream's next request start",
    "vllm_definitions": "recomputed here from each successful request's timings in the report: ttft as above, "
                        "tpot = (request end - request start - ttft) / (output tokens - 1), e2e = request end - "
                        "request start; numpy percentiles over requests (bloomkit.serve.loadtest's rule)",
}


def guidellm_bin(venv: str | Path = GUIDELLM_VENV) -> Path:
    """GuideLLM's command in ``venv``.

    Example:
        >>> guidellm_bin("/x/.venv-guidellm").as_posix()
        '/x/.venv-guidellm/bin/guidellm'
    """
    return Path(venv) / "bin" / "guidellm"


def available(venv: str | Path = GUIDELLM_VENV) -> bool:
    """Whether ``venv`` holds GuideLLM (``make setup-guidellm`` built it)."""
    return guidellm_bin(venv).exists()


def versions(venv: str | Path = GUIDELLM_VENV) -> dict:
    """GuideLLM's version and that of what it counts tokens and loads data with, in ``venv``
    (read from their metadata, without starting it); None for one not installed."""
    from .peers import installed_version

    py = Path(venv) / "bin" / "python"
    return {name: (installed_version(py, (name,)) or (None, None))[1]
            for name in ("guidellm", "transformers", "tokenizers", "torch", "datasets", "httpx")}


def command(url: str, model: str, *, streams: Sequence[int], requests: int, prompt_tokens: int,
            output_tokens: int, tokenizer: str | Path, report: str | Path, seed: int = 42,
            timeout_s: float = 600.0, greedy: bool = True, venv: str | Path = GUIDELLM_VENV) -> list[str]:
    """The ``guidellm run`` command line of :func:`run_guidellm`.

    Args:
        url: the server, on loopback.
        model: the model id the server serves (its ``/v1/models``).
        streams: one benchmark per value: that many requests in flight (``concurrent`` profile).
        requests: requests per benchmark (``max_requests``).
        prompt_tokens: tokens of every synthetic prompt.
        output_tokens: tokens every request asks for.
        tokenizer: the local model directory whose tokenizer counts them.
        report: where GuideLLM writes its JSON report.
        seed: GuideLLM's seed for the synthetic prompts.
        timeout_s: GuideLLM's own read timeout per request.
        greedy: add ``temperature: 0`` to every request (GuideLLM sends none of its own, so a
            server samples at the API's default temperature, 1).
        venv: GuideLLM's environment.

    Example:
        >>> cmd = command("http://127.0.0.1:8000", "trained", streams=[1, 8], requests=16, prompt_tokens=32,
        ...               output_tokens=32, tokenizer="/m", report="/r.json", venv="/v")
        >>> cmd[:2], cmd[cmd.index("--profile") + 1]
        (['/v/bin/guidellm', 'run'], '{"kind": "concurrent", "streams": [1, 8]}')
    """
    def arg(**kw) -> str:
        return json.dumps(kw)

    backend = {"kind": "openai_http", "target": check_url(url), "model": model,
               "request_format": "/v1/completions", "timeout": timeout_s}
    if greedy:
        backend["extras"] = {"body": {"temperature": 0}}
    return [str(guidellm_bin(venv)), "run",
            "--backend", json.dumps(backend),
            "--profile", arg(kind="concurrent", streams=[int(s) for s in streams]),
            "--constraint", arg(kind="max_requests", count=int(requests)),
            "--tokenizer", arg(kind="huggingface_auto", model=str(tokenizer)),
            "--data", arg(kind="synthetic_text", prompt_tokens=int(prompt_tokens), output_tokens=int(output_tokens)),
            "--seed", arg(kind="static", value=int(seed)),
            "--output", arg(kind="json", path=str(report)),
            "--disable-console-interactive"]   # the result tables go to the log; no progress bars there


def run_guidellm(url: str, model: str, *, streams: int | Sequence[int], requests: int, prompt_tokens: int = 32,
                 output_tokens: int = 32, out_dir: str | Path, tokenizer: str | Path | None = None,
                 venv: str | Path = GUIDELLM_VENV, timeout: float = 600.0, seed: int = 42,
                 greedy: bool = True) -> dict:
    """Run GuideLLM against the server at ``url`` and return the summary of its own JSON report.

    One ``guidellm run`` (its start, importing torch and spawning a worker per stream, takes
    20-30 s on 2 cores), one benchmark per value of ``streams``, in that order.

    Args:
        url: the server, on loopback (``Server(...).url``).
        model: the model id it serves, and (unless ``tokenizer``) the bloomkit model name whose
            local directory gives the tokenizer (:func:`bloomkit.models.resolve_model`).
        streams: requests in flight: one number, or several (one benchmark each).
        requests: requests per benchmark.
        prompt_tokens: tokens of every synthetic prompt (by the model's tokenizer).
        output_tokens: tokens every request asks for (held with ``ignore_eos``).
        out_dir: where GuideLLM's report (``guidellm.json``) and log (``guidellm.log``) are kept.
        tokenizer: a local model directory for the tokenizer (default: ``model``'s).
        venv: GuideLLM's environment (``make setup-guidellm``).
        timeout: seconds for the whole run; past it GuideLLM is stopped and this raises.
        seed: GuideLLM's seed for its synthetic prompts.
        greedy: every request greedy (``temperature: 0`` through GuideLLM's ``extras``), so its
            answers can be checked against the same prompts' answers alone.

    Returns:
        ``{"client": "guidellm", "versions", "command", "report", "log", "wall_s", "definitions",
        "runs": [one summary per benchmark (:func:`summarize_benchmark`)]}``.

    Raises:
        UserError: one line, when ``.venv-guidellm`` is absent (naming ``make setup-guidellm``),
            when GuideLLM fails or runs past ``timeout`` (its log's last lines), or leaves no report.

    Example:
        >>> with Server(["--name", "trained"]) as srv:                     # doctest: +SKIP
        ...     res = run_guidellm(srv.url, "trained", streams=(1, 8), requests=16, out_dir=tmp)
        >>> [(r["streams"], r["requests"]["errored"]) for r in res["runs"]]  # doctest: +SKIP
        [(1, 0), (8, 0)]
    """
    if not available(venv):
        raise UserError(f"GuideLLM is not installed ({guidellm_bin(venv)} is missing): run `{SETUP}` "
                        "(its own environment, .venv-guidellm)")
    streams = [streams] if isinstance(streams, int) else list(streams)
    if not streams or any(int(s) < 1 for s in streams) or requests < 1:
        raise UserError(f"streams {streams} and requests {requests} must be positive")
    if tokenizer is None:
        from .. import models

        tokenizer = models.resolve_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, log = out_dir / "guidellm.json", out_dir / "guidellm.log"
    report.unlink(missing_ok=True)
    cmd = command(url, model, streams=streams, requests=requests, prompt_tokens=prompt_tokens,
                  output_tokens=output_tokens, tokenizer=tokenizer, report=report, seed=seed,
                  timeout_s=timeout, greedy=greedy, venv=venv)
    # a client: no hub, and one thread for the torch it imports (its data loader) so that it does
    # not spin cores the server needs; its cwd is out_dir (GuideLLM writes beside its cwd)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "COLUMNS": "200", "NO_COLOR": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(out_dir),
                                start_new_session=True)   # its worker processes go with it
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop_group(proc)
    wall = time.perf_counter() - t0
    if code is None:
        raise UserError(f"GuideLLM did not finish within {timeout:.0f} s (stopped; log {log}): {log_tail(log)}")
    if code != 0 or not report.exists():
        raise UserError(f"GuideLLM failed (exit {code}; log {log}): {log_tail(log)}")
    out = {"client": "guidellm", "versions": versions(venv), "command": " ".join(cmd), "report": str(report),
           "log": str(log), "wall_s": round(wall, 3), "definitions": DEFINITIONS}
    out["runs"] = summarize_report(json.loads(report.read_text()))
    return out


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM GuideLLM's process group (it and its workers), SIGKILL after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(0.2)   # workers of a group whose leader already left


def log_tail(path: str | Path, lines: int = 4, chars: int = 600) -> str:
    """The last non-empty lines of a log, joined into one line (for a :class:`UserError`).

    Example:
        >>> import tempfile; p = tempfile.mktemp(); _ = open(p, "w").write("a\\n\\nb\\nc\\n")
        >>> log_tail(p, 2)
        'b | c'
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip() and set(ln.strip()) - set("=|-")]
    return " | ".join(kept[-lines:])[-chars:] or "(empty log)"


def _stats(dist: dict | None, scale: float = 1.0) -> dict:
    """GuideLLM's distribution of successful requests as mean, p50, p90, p99 and count."""
    s = (dist or {}).get("successful") or {}
    pct = s.get("percentiles") or {}
    out = {"mean": s.get("mean"), **{f"p{q}": pct.get(f"p{q}") for q in QUANTILES}, "n": s.get("count")}
    return {k: (v * scale if isinstance(v, (int, float)) and k != "n" else v) for k, v in out.items()}


def _vllm_definitions(reqs: list[dict]) -> dict:
    """TTFT, TPOT and E2E by vLLM's definitions from the requests' timings (numpy percentiles)."""
    ttft, tpot, e2e = [], [], []
    for r in reqs:
        t = (r.get("info") or {}).get("timings") or {}
        start, first, end = t.get("request_start"), t.get("first_token_iteration"), t.get("request_end")
        n = (r.get("output_metrics") or {}).get("text_tokens")
        if start is None or end is None:
            continue
        e2e.append((end - start) * 1e3)
        if first is not None:
            ttft.append((first - start) * 1e3)
            if n and n > 1:
                tpot.append((end - first) * 1e3 / (n - 1))
    out = {}
    for key, vals in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in QUANTILES:
            out[f"{key}_p{q}_ms"] = percentile(vals, q)
        out[f"{key}_n"] = len(vals)
    return out


def _refill_gaps_ms(reqs: list[dict]) -> list[float]:
    """For each stream (GuideLLM's worker, ``scheduler_node_id``), the gaps between one request's end
    and the next request's start: how long a freed slot stayed empty on the client's side."""
    by: dict = {}
    for r in reqs:
        info = r.get("info") or {}
        t = info.get("timings") or {}
        if t.get("request_start") is not None and t.get("request_end") is not None:
            by.setdefault(info.get("scheduler_node_id"), []).append((t["request_start"], t["request_end"]))
    gaps = []
    for spans in by.values():
        spans.sort()
        gaps += [(b[0] - a[1]) * 1e3 for a, b in zip(spans, spans[1:])]
    return gaps


def summarize_benchmark(bench: dict) -> dict:
    """One benchmark of GuideLLM's JSON report, summarised.

    Keys: ``streams``; ``requests`` (successful, errored, incomplete, total); ``duration_s``;
    ``output_tokens`` (the successful requests' sum); ``output_tokens_per_s``, ``requests_per_s``,
    ``concurrency_mean`` (GuideLLM's); ``ttft_ms``, ``itl_ms``, ``tpot_ms`` (its TPOT: first token
    included), ``request_latency_ms``, ``prompt_tokens``, ``output_tokens_per_request``,
    ``stream_iterations`` (mean, p50, p90, p99, n); ``vllm_definitions`` (:data:`DEFINITIONS`);
    ``refill_gap_ms``: per stream, a request's end to the stream's next request's start (numpy p50,
    p90, p99 over the gaps): how long GuideLLM left a freed slot empty.

    Args:
        bench: one element of the report's ``benchmarks``.
    """
    m = bench["metrics"]
    strategy = bench["config"]["strategy"]
    reqs = (bench.get("requests") or {}).get("successful") or []
    gaps = _refill_gaps_ms(reqs)
    out_tokens = ((m.get("output_token_count") or {}).get("successful") or {}).get("total_sum")
    return {
        "streams": strategy.get("streams", strategy.get("max_concurrency")),
        "requests": dict(m["request_totals"]),
        "duration_s": bench.get("duration"),
        "output_tokens": out_tokens,
        "output_tokens_per_s": _stats(m.get("output_tokens_per_second"))["mean"],
        "requests_per_s": _stats(m.get("requests_per_second"))["mean"],
        "concurrency_mean": _stats(m.get("request_concurrency"))["mean"],
        "ttft_ms": _stats(m.get("time_to_first_token_ms")),
        "itl_ms": _stats(m.get("inter_token_latency_ms")),
        "tpot_ms": _stats(m.get("time_per_output_token_ms")),
        "request_latency_ms": _stats(m.get("request_latency"), 1e3),
        "prompt_tokens": _stats(m.get("prompt_token_count")),
        "output_tokens_per_request": _stats(m.get("output_token_count")),
        "stream_iterations": _stats(m.get("request_streaming_iterations_count")),
        "vllm_definitions": _vllm_definitions(reqs),
        "refill_gap_ms": {f"p{q}": percentile(gaps, q) for q in QUANTILES} | {"n": len(gaps)},
    }


def summarize_report(report: dict) -> list[dict]:
    """Every benchmark of a GuideLLM 0.8 JSON report (``--output kind=json``), in its order.

    Raises:
        UserError: when the file is not such a report.
    """
    benches = report.get("benchmarks") if isinstance(report, dict) else None
    if not isinstance(benches, list):
        raise UserError("not a GuideLLM JSON report (no 'benchmarks' list): pass the file `guidellm run "
                        "--output kind=json,path=...` wrote")
    return [summarize_benchmark(b) for b in benches]


def answers(report: dict, index: int = 0) -> list[tuple[str, str]]:
    """``(prompt, streamed text)`` of every successful request of benchmark ``index`` of a GuideLLM
    report, in the order they were sent: the prompts GuideLLM made (to send the same ones with
    another client) and the answers it got (to check them).

    Args:
        report: GuideLLM's JSON report (``json.loads`` of the file :func:`run_guidellm` names).
        index: which benchmark of the report.
    """
    reqs = summarize_report(report) and report["benchmarks"][index]["requests"]["successful"]
    reqs = sorted(reqs, key=lambda r: ((r.get("info") or {}).get("timings") or {}).get("request_start") or 0)
    out = []
    for r in reqs:
        body = json.loads(r["request_args"]).get("body") or {} if isinstance(r.get("request_args"), str) else {}
        out.append((body.get("prompt", ""), r.get("output") or ""))
    return out
