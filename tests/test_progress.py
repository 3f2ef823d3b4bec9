"""Progress on long work where a person watches, and nothing of it elsewhere (issue 28).

A bar is drawn on a terminal (a real pseudo-terminal here, from the ``pty`` machinery of the
OS), on rank 0, outside CI and outside a Jupyter kernel; a redirected log gets the lines a log
keeps and no ``"\\r"`` redraws.  The training run saves its loss curve beside the model."""
from __future__ import annotations

import fcntl
import io
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from bloomkit import progress

from conftest import ROOT

# a recipe's run that loads (transformers' "Loading weights") and sweeps two batch sizes
RECIPE = [sys.executable, str(ROOT / "recipes" / "accelerate_inference.py"), "--name", "tiny",
          "--batch_size", "1,2", "--benchmark", "--cycles", "1", "--max_new_tokens", "4"]
TRAIN = [sys.executable, "-m", "bloomkit.train", "--max_files", "8", "--vocab", "512", "--hidden",
         "32", "--layers", "1", "--heads", "2", "--seq_len", "32", "--batch", "4", "--log_every", "5"]


def quiet_env(**extra) -> dict:
    """This environment without CI's marker (the test may itself run in CI) and without a rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "RANK", "HF_HUB_DISABLE_PROGRESS_BARS")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def terminal():
    """A pseudo-terminal of 120 columns: ``(master fd, slave fd)``."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    return master, slave


def read_all(master: int, proc: subprocess.Popen | None = None, timeout: float = 300) -> str:
    """Everything written to the terminal until every writer closed it (or ``timeout``)."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc is not None and proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:   # EIO: the last writer closed the slave side
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def run_on_terminal(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdin, stdout and stderr on a pseudo-terminal, as in a person's shell."""
    master, slave = terminal()
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(ROOT))
    finally:
        os.close(slave)
    try:
        out = read_all(master, proc, timeout)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, out


def run_to_log(cmd: list[str], env: dict, log, timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr redirected to the file ``log``, as ``cmd > log 2>&1``."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                            env=env, cwd=str(ROOT), timeout=timeout).returncode
    return rc, open(log).read()


@pytest.fixture
def restore_library_bars():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@pytest.fixture
def tty():
    """A real terminal stream (the slave side of a pseudo-terminal) and a reader of its output."""
    master, slave = terminal()
    stream = os.fdopen(slave, "w", buffering=1)
    yield stream, lambda: (stream.flush(), _drain(master))[1]
    stream.close()
    os.close(master)


def _drain(master: int) -> str:
    out = []
    while select.select([master], [], [], 0.2)[0]:
        out.append(os.read(master, 65536))
    return b"".join(out).decode(errors="replace")


# ---------------------------------------------------------------------------- the decision

def test_watched_on_a_terminal_only_outside_ci_and_on_rank_0(tty, monkeypatch):
    stream, _ = tty
    for var in ("CI", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert progress.watched(stream)
    assert not progress.watched(io.StringIO())          # a log file, captured output
    monkeypatch.setenv("CI", "true")
    assert not progress.watched(stream)                 # CI's output is a log
    monkeypatch.setenv("CI", "0")
    assert progress.watched(stream)
    monkeypatch.setenv("RANK", "1")
    assert not progress.watched(stream)                 # the other ranks would draw it again
    monkeypatch.setenv("RANK", "0")
    assert progress.watched(stream)


def test_library_bars_switch_transformers_loading_bars(tty, monkeypatch, restore_library_bars):
    from transformers.utils import logging as hf_logging

    stream, _ = tty
    for var in ("CI", "RANK", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    assert progress.library_bars(stream) and hf_logging.is_progress_bar_enabled()
    assert not progress.library_bars(io.StringIO()) and not hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # the user's own "off" is kept
    assert not progress.library_bars(stream) and not hf_logging.is_progress_bar_enabled()


def test_bar_and_its_ticking_draw_on_a_terminal_and_nothing_in_a_log(tty, monkeypatch):
    stream, read = tty
    for var in ("CI", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with progress.bar(total=2, desc="notebooks", stream=stream) as b:
        with progress.ticking(b, every=0.05, note=lambda: "01_x.ipynb busy"):
            time.sleep(0.3)
        b.update(2)
    shown = read()
    assert "notebooks" in shown and "\r" in shown and "01_x.ipynb busy" in shown, shown
    assert shown.count("01_x.ipynb busy") >= 3, shown    # redrawn while the step runs
    log = io.StringIO()
    with progress.bar(total=2, desc="notebooks", stream=log) as b:
        with progress.ticking(b, every=0.05, note=lambda: "busy"):
            time.sleep(0.1)
        b.update(2)
    assert log.getvalue() == ""


# ---------------------------------------------------------------------------- real runs

def test_recipe_shows_loading_and_sweep_bars_on_a_terminal_and_none_in_its_log(tmp_path):
    rc, shown = run_on_terminal(RECIPE, quiet_env())
    assert rc == 0, shown[-3000:]
    assert "Loading weights" in shown, shown[-3000:]          # transformers' own bar
    assert "batch sizes" in shown and "ms/token" in shown, shown[-3000:]   # the sweep's bar
    assert "%|" in shown
    rc, log = run_to_log(RECIPE, quiet_env(), tmp_path / "run.log")
    assert rc == 0, log[-3000:]
    assert "ms/token" in log                                   # the results a log keeps
    assert "\r" not in log and "Loading weights" not in log and "batch sizes" not in log, log[-3000:]


def test_training_shows_loss_and_tokens_per_second_on_a_terminal(tmp_path):
    out = tmp_path / "trained-tty"
    rc, shown = run_on_terminal([*TRAIN, "--out", str(out), "--minutes", "0.03"], quiet_env())
    assert rc == 0, shown[-3000:]
    bar = [s for s in shown.split("\r") if s.startswith("training:") and "%|" in s]
    assert bar, shown[-3000:]
    assert "loss" in bar[-1] and "tokens/s" in bar[-1], bar[-1]
    assert (out / "loss_curve.png").is_file()


def test_training_saves_its_loss_curve_beside_the_model_and_logs_no_bar(tmp_path):
    from PIL import Image

    out = tmp_path / "trained"
    rc, log = run_to_log([*TRAIN, "--out", str(out), "--max_steps", "12", "--minutes", "5"],
                         quiet_env(), tmp_path / "train.log")
    assert rc == 0, log[-3000:]
    png = out / "loss_curve.png"
    assert f"loss curve: {png}" in log
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 200
        darkest, lightest = im.convert("L").getextrema()
        assert lightest - darkest > 100                      # a drawing, not a blank canvas
    meta = json.loads((out / "bloomkit_trained.json").read_text())
    assert meta["loss_curve"] == "loss_curve.png" and meta["steps"] == 12
    assert "tokens/s" in log and "step     10  loss" in log   # the log keeps its loss lines
    assert "\r" not in log and "%|" not in log, log[-3000:]
