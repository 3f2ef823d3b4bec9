"""The HTTP side: an OpenAI-compatible FastAPI app in front of the :class:`~.scheduler.Engine`.

The event loop never runs the model: a handler validates the body, tokenizes, hands a
:class:`~.scheduler.Request` to the engine's queue and awaits its events (the model thread
posts them with ``loop.call_soon_threadsafe``).  So one slow step never blocks ``/health`` or
``/metrics``, and a thousand waiting clients cost a thousand small coroutines, not threads.

Bad input is answered, never fatal: malformed JSON, a field of the wrong type, an empty prompt,
``max_tokens`` <= 0 or beyond the context / the KV-cache budget get a 4xx whose JSON error
names the field (OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``); a full
queue is 429; a request past ``--request_timeout`` is 504; a client that goes away frees its row
at the next step.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import Request as HTTPRequest

from .scheduler import BadRequest, Engine, Params, QueueFull, Request

MAX_STOP = 4


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    kind = {429: "rate_limit_error", 404: "not_found_error", 503: "server_error", 504: "timeout"}
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind.get(status, "invalid_request_error"), "param": param,
        "code": status}})


def _number(body, key, default, lo, hi, integer=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}, got "
                         f"{type(v).__name__} {v!r}", key)
    if not (lo <= v <= hi):
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {v}", key)
    return v


def parse_params(body: dict, default_max_tokens: int, max_key: str = "max_tokens") -> Params:
    """The sampling fields of a completions body, checked one by one (each error names its field)."""
    keys = [max_key, "max_tokens"] if max_key != "max_tokens" else [max_key]
    key = next((k for k in keys if body.get(k) is not None), max_key)
    max_tokens = _number(body, key, default_max_tokens, -2**62, 2**62, integer=True)
    if max_tokens <= 0:
        raise BadRequest(f"{key} must be at least 1, got {max_tokens}", key)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise BadRequest(f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    for k in ("stream", "ignore_eos", "echo"):
        if body.get(k) is not None and not isinstance(body[k], bool):
            raise BadRequest(f"{k} must be true or false, got {body[k]!r}", k)
    for k, bad in (("n", lambda v: v not in (None, 1)), ("best_of", lambda v: v not in (None, 1)),
                   ("echo", lambda v: bool(v)), ("logprobs", lambda v: v not in (None, False, 0)),
                   ("suffix", lambda v: v is not None), ("tools", lambda v: bool(v))):
        if k in body and bad(body[k]):
            raise BadRequest(f"{k}={body[k]!r} is not supported by this server", k)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
    return Params(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                  top_p=float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9, stop=stop,
                  ignore_eos=bool(body.get("ignore_eos", False)), seed=seed)


def parse_prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    if p is None:
        raise BadRequest("prompt is required (a string or a list of strings)", "prompt")
    prompts = [p] if isinstance(p, str) else p
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
        raise BadRequest(f"prompt must be a string or a non-empty list of strings, got "
                         f"{type(p).__name__}", "prompt")
    if any(not x for x in prompts):
        raise BadRequest("prompt is empty; send at least one character", "prompt")
    return prompts


def parse_messages(body: dict) -> list[dict]:
    m = body.get("messages")
    if not isinstance(m, list) or not m or not all(
            isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)
            for x in m):
        raise BadRequest("messages must be a non-empty list of {role, content} objects with string "
                         "values", "messages")
    return m


def metrics_text(engine: Engine) -> str:
    """``/metrics``: the engine's registry (:class:`~.scheduler.Metrics`) in Prometheus' text
    format, written by prometheus_client's own exposition (``generate_latest``); read it back
    with :func:`read_metrics`."""
    from prometheus_client import generate_latest

    return generate_latest(engine.metrics.registry).decode()


def read_metrics(text: str) -> dict[str, float]:
    """Parse ``/metrics`` text with prometheus_client's parser: ``{sample: value}``, the sample
    named as exposed, labels sorted, e.g. ``bloomkit_generation_tokens_total``,
    ``bloomkit_requests_total{outcome="ok"}``, ``bloomkit_time_to_first_token_seconds_count``.
    Rates come from two reads: tokens/s = the difference of ``bloomkit_generation_tokens_total``
    over the seconds between them; mean TTFT = ``_sum`` / ``_count``.

    Args:
        text: the body of ``GET /metrics``.

    Example:
        >>> read_metrics('# TYPE x_total counter\\nx_total{a="1"} 2\\n')
        {'x_total{a="1"}': 2.0}
    """
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = float(s.value)
    return out


def create_app(engine: Engine, tokenizer, model_id: str, *, default_max_tokens: int = 16):
    """The FastAPI app.  ``model_id`` is what ``/v1/models`` lists and ``model`` must name."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST

    app = FastAPI(title="bloomkit serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def bad_request(_req, exc: BadRequest):
        return _error(exc.status, exc.message, exc.param)

    async def read_body(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        m = body.get("model")
        if m is not None and m != model_id:
            raise BadRequest(f"model {m!r} does not exist; this server serves {model_id!r} "
                             "(GET /v1/models)", "model", 404)
        return body

    def tokenize(prompts: list[str], params: Params) -> list[list[int]]:
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        for i in ids:
            if not i:
                raise BadRequest("prompt is empty after tokenization", "prompt")
            engine.check(i, params.max_tokens)
        return ids

    async def run(request, ids: list[list[int]], params: Params, stream: bool, chat: bool,
                  include_usage: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(ids, params, loop=loop, sink=events.put_nowait,
                      timeout_s=engine.request_timeout)
        try:
            engine.submit(req)
        except QueueFull as exc:
            return _error(429, str(exc))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"

        def choice(i, text, finish, delta):
            if not chat:
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
            return {"index": i, ("delta" if delta else "message"): body, "logprobs": None,
                    "finish_reason": finish}

        def usage(counts):
            p = sum(c[0] for c in counts.values())
            c = sum(c[1] for c in counts.values())
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if stream:
            async def sse():
                done, counts, ended = set(), {}, None
                try:
                    while len(done) < len(ids):
                        ev = await events.get()
                        if ev[0] == "error":
                            yield f"data: {json.dumps({'error': {'message': ev[2], 'code': ev[1]}})}\n\n"
                            break
                        _, i, text, finish, n_prompt, n_out = ev
                        counts[i] = (n_prompt, n_out)
                        if finish:
                            done.add(i)
                            if len(done) == len(ids):
                                ended = time.perf_counter()
                        fin = None if finish in (None,) else ("stop" if finish == "stop" else "length")
                        chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": int(time.time()),
                                 "model": model_id, "choices": [choice(i, text, fin, True)]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if include_usage and len(done) == len(ids):
                        chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": int(time.time()),
                                 "model": model_id, "choices": [], "usage": usage(counts)}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if len(done) < len(ids):
                        req.cancelled = True   # the client went away: free its rows
                    else:
                        engine.metrics.finished(req, max(c[1] for c in counts.values()), ended)

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts, finish, counts = {}, {}, {}
        try:
            while len(finish) < len(ids):
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return _error(499, "client closed the request")
                    continue
                if ev[0] == "error":
                    return _error(ev[1], ev[2])
                _, i, text, fin, n_prompt, n_out = ev
                texts[i] = texts.get(i, "") + text
                counts[i] = (n_prompt, n_out)
                if fin:
                    finish[i] = "stop" if fin == "stop" else "length"
        finally:
            if len(finish) < len(ids):
                req.cancelled = True
        engine.metrics.finished(req, max(c[1] for c in counts.values()))
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_id,
                             "choices": [choice(i, texts[i], finish[i], False) for i in range(len(ids))],
                             "usage": usage(counts)})

    def stream_flags(body) -> tuple[bool, bool]:
        so = body.get("stream_options")
        if so is not None and not (isinstance(so, dict) and isinstance(so.get("include_usage", False), bool)):
            raise BadRequest("stream_options must be an object like {\"include_usage\": true}",
                             "stream_options")
        return bool(body.get("stream")), bool((so or {}).get("include_usage"))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request)
        params = parse_params(body, default_max_tokens)
        ids = tokenize(parse_prompts(body), params)
        stream, usage = stream_flags(body)
        return await run(request, ids, params, stream, False, usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        if not getattr(tokenizer, "chat_template", None):
            return _error(400, f"{model_id}'s tokenizer has no chat template, so chat messages cannot "
                               "be turned into a prompt; use POST /v1/completions", "messages")
        body = await read_body(request)
        params = parse_params(body, default_max_tokens, "max_completion_tokens")
        text = tokenizer.apply_chat_template(parse_messages(body), add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenize([text], params)
        stream, usage = stream_flags(body)
        return await run(request, ids, params, stream, True, usage)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "bloomkit"}]}

    @app.get("/health")
    async def health():
        ok, why = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "detail": why},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(metrics_text(engine), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(app, engine: Engine, host: str, port: int, *, banner: str = "") -> int:
    """Run the engine's thread and uvicorn until a signal (SIGINT/SIGTERM: graceful) or until
    the engine fails (a rank died, a collective failed): then exit 1 within seconds, so the
    launcher tears down the other ranks.  Returns the exit code."""
    import os
    import sys

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    worker = threading.Thread(target=engine.run, name="engine", daemon=True)
    worker.start()

    def watchdog():
        while not server.should_exit:
            if engine.failed or engine.stopping.is_set() or not worker.is_alive():
                if engine.failed:
                    print(f"error: the model failed ({engine.failed}); shutting down", file=sys.stderr,
                          flush=True)
                server.should_exit = True
                # connections still open must not keep a dead server alive
                threading.Timer(10.0, lambda: os._exit(1 if engine.failed else 0)).start()
                return
            time.sleep(0.25)

    threading.Thread(target=watchdog, daemon=True).start()
    if banner:
        print(banner, flush=True)
    server.run()
    engine.stopping.set()
    worker.join(timeout=30)
    return 1 if engine.failed else 0
