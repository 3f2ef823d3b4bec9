"""Launch a recipe on several ranks from Python (a notebook, a test) and collect its records.

Multi-rank strategies (DeepSpeed-Inference TP, ZeRO with several streams) run as N
processes started by a launcher: ``deepspeed --num_gpus N`` on GPUs (``--num_accelerators
N`` on CPU, where the ranks talk over gloo) or ``torchrun --nproc_per_node N``.  A notebook
cannot *be* those N processes, so it starts the launcher as a subprocess, lets rank 0
write the result record to a temporary JSON file, and reads it back.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .dsops import remove_shm_buffers
from .errors import UserError
from .results import read_records

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = ROOT / "recipes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(script: str | Path, args: list[str], nprocs: int, launcher: str = "deepspeed",
                     port: int | None = None) -> list[str]:
    """The command line that starts ``script`` on ``nprocs`` local ranks."""
    script = str(script)
    port = port or free_port()
    # `python -m` instead of the console scripts: works wherever the packages are importable
    # (a venv, or a --target install on a GPU box), with this interpreter.
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(nprocs), "--master_port",
                str(port), script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_addr",
                "127.0.0.1", "--master_port", str(port), script, *args]
    if launcher == "python":
        if nprocs != 1:
            raise UserError("launcher 'python' runs one process; use deepspeed or torchrun for more")
        return [sys.executable, script, *args]
    raise UserError(f"unknown launcher {launcher!r}; use deepspeed, torchrun or python")


def thread_env(nprocs: int = 1) -> dict:
    """OpenMP settings of every CPU process this project starts (recipe ranks and notebook
    kernels alike, so a variant measured in a notebook and the same variant launched as a
    recipe run with the same threads): the cores split between ``nprocs`` processes, and
    PASSIVE waiting: idle OpenMP threads sleep instead of spinning; on a shared or
    oversubscribed CPU spinning threads made a 2-thread run up to 15x slower (measured here)."""
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    return {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def cpu_env(nprocs: int) -> dict:
    """Environment for CPU ranks: DeepSpeed's CPU accelerator, threads split between ranks."""
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", **thread_env(nprocs)}


def launch(script: str | Path, args: list[str], nprocs: int = 1, *, launcher: str = "deepspeed",
           device: str = "cpu", timeout: int = 600, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nprocs`` ranks and wait; raises with the ranks' last error line
    when ``check`` and the launch fails."""
    script = Path(script)
    if not script.is_absolute():
        script = RECIPE_DIR / script if (RECIPE_DIR / script).exists() else script
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        full_env.update(cpu_env(nprocs))
    full_env.update(env or {})
    port = free_port()
    cmd = launcher_command(script, args, nprocs, launcher, port=port)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                              cwd=str(ROOT))
    finally:
        remove_shm_buffers(port)  # what a crashed rank could not release (see dsops)
    if check and proc.returncode != 0:
        errs = [ln for ln in proc.stderr.splitlines() + proc.stdout.splitlines()
                if ln.startswith("error")]
        tail = errs[-1] if errs else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"{script.name} on {nprocs} rank(s) failed (exit {proc.returncode}): {tail}")
    return proc


def launch_records(script: str | Path, args: list[str], nprocs: int = 1, **kw) -> list[dict]:
    """:func:`launch` with ``--json_out`` pointed at a temporary file; returns its records."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "records.json"
        launch(script, [*args, "--json_out", str(out)], nprocs, **kw)
        return read_records(out)


# ---------------------------------------------------------------------------- several nodes
# On a cluster each node runs one launcher agent; the agents meet at node 0's address.
# torchrun: every node runs the same command but its --node_rank. deepspeed: one
# --hostfile lists the nodes (``name slots=N``); normally the launcher on node 0 starts the
# others over ssh (pdsh), or, with --no_ssh, each node runs it with its own --node_rank,
# exactly like torchrun. Both start the recipe unchanged: it reads RANK/WORLD_SIZE.

def torchrun_node_command(script: str | Path, args: list[str], *, nnodes: int, node_rank: int,
                          nproc_per_node: int = 1, master_addr: str = "127.0.0.1",
                          master_port: int = 29500) -> list[str]:
    """One node's ``torchrun`` agent in a ``--nnodes`` launch (run one per node, same port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc_per_node), "--master_addr", master_addr,
            "--master_port", str(master_port), str(script), *args]


def hostfile_text(nnodes: int, nproc_per_node: int = 1) -> str:
    """A DeepSpeed hostfile for ``nnodes`` nodes (``node0 slots=N`` ...). With ``--no_ssh``
    the names are only labels; with ssh/pdsh they must be the nodes' reachable host names."""
    return "".join(f"node{n} slots={nproc_per_node}\n" for n in range(nnodes))


def deepspeed_node_command(script: str | Path, args: list[str], *, hostfile: str | Path, node_rank: int,
                           master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[str]:
    """One node's ``deepspeed --hostfile H --no_ssh --node_rank K`` launcher (one per node)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", master_addr, "--master_port", str(master_port),
            str(script), *args]


def launch_nodes(script: str | Path, args: list[str], nnodes: int = 2, nproc_per_node: int = 1, *,
                 launcher: str = "torchrun", device: str = "cpu", timeout: int = 600,
                 env: dict | None = None, master_addr: str = "127.0.0.1") -> list[subprocess.CompletedProcess]:
    """Start ``nnodes`` launcher agents (``torchrun --nnodes`` or ``deepspeed --hostfile
    --no_ssh``) at once on this machine (loopback "nodes") and wait for all; returns each
    agent's completed process (node 0 first)."""
    if launcher not in ("torchrun", "deepspeed"):
        raise UserError(f"unknown multi-node launcher {launcher!r}; use torchrun or deepspeed")
    script = Path(script)
    if not script.is_absolute():
        script = RECIPE_DIR / script if (RECIPE_DIR / script).exists() else script
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        full_env.update(cpu_env(nnodes * nproc_per_node))
    full_env.update(env or {})
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        hostfile = Path(d) / "hostfile"
        hostfile.write_text(hostfile_text(nnodes, nproc_per_node))

        def command(n: int) -> list[str]:
            if launcher == "torchrun":
                return torchrun_node_command(script, args, nnodes=nnodes, node_rank=n,
                                             nproc_per_node=nproc_per_node, master_addr=master_addr,
                                             master_port=port)
            return deepspeed_node_command(script, args, hostfile=hostfile, node_rank=n,
                                          master_addr=master_addr, master_port=port)

        procs = [subprocess.Popen(command(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=full_env, cwd=str(ROOT)) for n in range(nnodes)]
        out = []
        try:
            for p in procs:
                so, se = p.communicate(timeout=timeout)
                out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            remove_shm_buffers(port)
    return out
