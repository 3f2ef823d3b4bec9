"""Start ``recipes/serve.py`` as a subprocess (one process, or N ranks under a launcher) and stop
it cleanly — for tests, the notebook and the benchmark.

The server runs in its own process group (``start_new_session``), so stopping it reaches the
launcher *and* every rank: SIGTERM first (uvicorn shuts down gracefully, rank 0 tells the other
ranks to stop), SIGKILL for whatever is left after a grace period, then the ``/dev/shm``
segments DeepSpeed's CPU all-reduce may have left behind are swept.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..dsops import remove_shm_buffers
from ..errors import UserError
from ..launch import ROOT, cpu_env, free_port, launcher_command

RECIPE = ROOT / "recipes" / "serve.py"


def free_ports(n: int = 1) -> int:
    """A port p such that p .. p+n-1 are all free now (bind to port 0 first)."""
    for _ in range(50):
        p = free_port()
        ok = True
        for q in range(p + 1, p + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
        if ok and p + n < 65536:
            return p
    raise UserError(f"found no {n} consecutive free ports")


class Server:
    """``with Server(["--name", "tiny"]) as srv: httpx.get(srv.url + "/health")``.

    ``nprocs`` > 1 starts ``launcher`` (deepspeed or torchrun) with that many CPU ranks;
    ``ready_timeout`` bounds the wait for ``/health`` (loading, and ranks joining)."""

    def __init__(self, args: list[str], nprocs: int = 1, *, launcher: str = "deepspeed",
                 env: dict | None = None, device: str = "cpu", ready_timeout: float = 180.0,
                 ports: int | None = None):
        self.args, self.nprocs, self.launcher = list(args), nprocs, launcher
        self.env, self.device, self.ready_timeout = env or {}, device, ready_timeout
        zero_ranks = "ds-zero" in self.args and nprocs > 1
        self.n_ports = ports or (nprocs if zero_ranks else 1)
        self.port = free_ports(self.n_ports)
        self.master_port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="bloomkit-serve-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [*self.args, "--port", str(self.port), "--host", "127.0.0.1"]
        if self.nprocs == 1 and self.launcher in ("python", "deepspeed"):
            return [sys.executable, str(RECIPE), *args]
        return launcher_command(RECIPE, args, self.nprocs, self.launcher, port=self.master_port)

    def start(self) -> "Server":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(cpu_env(self.nprocs) if self.device == "cpu" else {}),
               **self.env}
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(ROOT), start_new_session=True)
        # its own session: an interpreter that ends without stop() (a notebook kernel that failed
        # half-way) must not leave the server running
        atexit.register(self.stop, 5.0)
        return self

    def wait_ready(self) -> "Server":
        import httpx

        t0 = time.monotonic()
        waiting = [self.port + i for i in range(self.n_ports)]  # ZeRO: every rank serves its own port
        while time.monotonic() - t0 < self.ready_timeout:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited with {self.proc.returncode} before it was ready: "
                                f"{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{waiting[0]}/health", timeout=2).status_code == 200:
                    waiting.pop(0)
                    if not waiting:
                        return self
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise UserError(f"the server was not ready after {self.ready_timeout:.0f} s: {self.log_tail()}")

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def log_tail(self, n: int = 1500) -> str:
        return self.log()[-n:]

    def pids(self) -> list[int]:
        """The launcher and every process it started (ranks included)."""
        import psutil

        if self.proc is None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rank_pid(self, rank: int) -> int | None:
        """The pid of rank ``rank`` (read from each process's ``RANK`` variable)."""
        import psutil

        for pid in self.pids():
            try:
                env = psutil.Process(pid).environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if env.get("RANK") == str(rank) and "serve.py" in " ".join(psutil.Process(pid).cmdline()):
                return pid
        return None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL after ``grace`` s; sweep /dev/shm. Returns
        the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.returncode is not None and not self.pids():
            return self.proc.returncode
        pids = self.pids()
        code = self.proc.poll()
        if code is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                code = self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                code = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        _kill_left(pids)
        remove_shm_buffers(self.master_port)
        return code

    def __enter__(self) -> "Server":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop(grace=5)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


def _kill_left(pids: list[int], wait: float = 10.0) -> None:
    """SIGKILL what is left of ``pids`` and wait until it is gone."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.kill()
            procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=wait)
