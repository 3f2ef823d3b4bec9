"""Serving: an OpenAI-compatible HTTP server with continuous (iteration-level) batching.

* :mod:`.scheduler` — the engine: one thread owns the model, a batched KV cache that rows join
  and leave between decode steps, the plan each step is a pure function of, sampling;
* :mod:`.ranks` — how several ranks step together (tensor parallelism: rank 0 plans and
  broadcasts; ZeRO: every rank serves its own requests, all step in lockstep);
* :mod:`.app` — the FastAPI app (``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``, ``/health``, ``/metrics``) and how it runs under uvicorn;
* :mod:`.proc` — start a server as a subprocess (tests, notebook, benchmark) and stop it cleanly;
* :mod:`.loadtest` — a load-test client that speaks only the OpenAI API
  (``python -m bloomkit.serve.loadtest``).
"""
