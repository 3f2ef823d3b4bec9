"""Shared fixtures: the embedded tiny model, the reference generation, recipe runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
NOTEBOOKS = ROOT / "notebooks"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path():
    from bloomkit import models

    return models.resolve_model("tiny")


@pytest.fixture(scope="session")
def small_path():
    from bloomkit import models

    return models.resolve_model("small")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from bloomkit import models

    return models.load_tokenizer(tiny_path)


def run_script(args: list[str], *, timeout: int = 300, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command (a recipe: ``["recipes/x.py", ...]``) and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, *args] if args[0].endswith(".py") else args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(cwd or ROOT))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A bad-input run: non-zero exit, no traceback, one ``error:`` line naming the fix."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert errors, proc.stderr
    for n in needles:
        assert n.lower() in errors[-1].lower(), errors[-1]
    return errors[-1]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def run_recipe_inprocess(recipe: str, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """A recipe's ``main(argv)`` in this process (one rank, no launcher), as a completed
    process: saves the ~5 s start of a fresh interpreter per bad-input case.  Each recipe's
    tests keep launched cases too, which cover real processes (exit code, no traceback)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(recipe).stem + "_recipe", ROOT / recipe)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stdout = sys.stdout
    try:
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
    finally:
        sys.stdout = stdout
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exc.value.code, cap.out, cap.err)


# ---------------------------------------------------------------------------- standalone recipes

def run_standalone(tmp_path: Path, recipe: str, args: list[str], nprocs: int = 1,
                   launcher: str = "python", timeout: int = 600) -> subprocess.CompletedProcess:
    """A recipe copied alone into an empty folder and run there, on ``nprocs`` ranks, by a
    Python in which ``import bloomkit`` fails in every process (a ``sitecustomize`` on
    ``PYTHONPATH`` sets ``sys.modules["bloomkit"] = None``), as a user who copied the file runs
    it.  DeepSpeed's ops come prebuilt from this env's build folder (a fresh build takes
    minutes); the shared-memory segments CPU ranks left behind are listed as
    ``proc.leftover_shm``, then removed; ``proc.blocked_processes`` counts the Python processes
    (launcher and ranks) that ran with ``bloomkit`` blocked."""
    import shutil

    from bloomkit import dsops, launch

    work = tmp_path / "standalone"
    work.mkdir(exist_ok=True)
    shutil.copy(ROOT / recipe, work)
    blocker = tmp_path / "no-bloomkit"
    blocker.mkdir(exist_ok=True)
    marker = blocker / "blocked-in.txt"   # one line per Python process that ran with the block
    marker.unlink(missing_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import os, sys\nsys.modules['bloomkit'] = None\n"
        f"with open({str(marker)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(blocker),
           "TORCH_EXTENSIONS_DIR": str(dsops.build_root()), **launch.cpu_env(nprocs)}
    port = launch.free_port()
    cmd = launch.launcher_command(work / Path(recipe).name, args, nprocs, launcher, port=port)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(work))
        proc.leftover_shm = dsops.shm_buffers(port)   # what the recipe itself failed to free
        proc.blocked_processes = len(marker.read_text().split()) if marker.exists() else 0
        return proc
    finally:
        dsops.remove_shm_buffers(port)


def printed_completions(stdout: str) -> list[tuple[str, str]]:
    """The ``in=...`` / ``out=...`` pairs a standalone recipe prints (the blog's format)."""
    import ast
    import re

    return [(ast.literal_eval(p), ast.literal_eval(t))
            for p, t in re.findall(r"^in=(.*)\nout=(.*)$", stdout, re.M)]
