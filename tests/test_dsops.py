"""DeepSpeed's compiled ops and what they leave behind (bloomkit.dsops).

A real 2-rank CPU launch must leave no shared-memory all-reduce segment in /dev/shm (DeepSpeed
never frees them: 66 MB per rank per launch); a killed build's lock must not hang later loads;
the op cache lives inside the environment.
"""
import os
import subprocess
import sys
import time

import pytest

from bloomkit import dsops, launch
from conftest import ROOT


def test_ops_build_into_this_environment():
    out = subprocess.run([sys.executable, "-c", "import bloomkit, os, sys; "
                          "print(os.environ['TORCH_EXTENSIONS_DIR']); print(sys.prefix)"],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"})
    ext, prefix = out.stdout.split()
    assert ext == os.path.join(prefix, "torch_extensions")


@pytest.mark.timeout(300)
def test_loading_an_op_again_does_not_rebuild_it_whatever_the_path():
    """The env's ninja and the system's rewrote each other's build log ("command line
    changed"), so the shm all-reduce op was recompiled at most DeepSpeed starts: bloomkit puts
    the env's bin first on PATH.  Two loads, started with and without the env on PATH: the
    built library is not touched."""
    code = ("import bloomkit, os, sys; from bloomkit import dsops; os.environ['DS_ACCELERATOR'] = 'cpu'; "
            "print(os.environ['PATH'].split(os.pathsep)[0]); dsops.prebuild(['ShareMemCommBuilder'], log=lambda m: None); "
            "print(os.path.getmtime(next(dsops.build_root().glob('deepspeed_shm_comm/*.so'))))")
    seen = []
    for path in (f"{os.path.dirname(sys.executable)}{os.pathsep}/usr/bin:/bin", "/usr/bin:/bin"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280,
                             env={**os.environ, "PATH": path})
        assert out.returncode == 0, out.stderr[-2000:]
        first, mtime = out.stdout.split()[-2:]
        assert first == os.path.dirname(sys.executable)
        seen.append(float(mtime))
    assert seen[0] == seen[1], "the second load rebuilt the op"


def test_an_explicit_extensions_dir_wins(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import bloomkit, os; print(os.environ['TORCH_EXTENSIONS_DIR'])"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert out.stdout.strip() == str(tmp_path)


def test_stale_build_locks_are_removed_fresh_ones_kept(tmp_path):
    old, new = tmp_path / "async_io" / "lock", tmp_path / "pin_memory" / "lock"
    for p in (old, new):
        p.parent.mkdir()
        p.touch()
    t = time.time() - dsops.STALE_LOCK_S - 60
    os.utime(old, (t, t))
    assert dsops.clear_stale_locks(root=tmp_path) == [old]
    assert not old.exists() and new.exists()
    assert dsops.clear_stale_locks(0, root=tmp_path) == [new]


def test_a_load_lock_with_no_build_behind_it_is_removed_after_two_minutes(tmp_path):
    """torch locks at every op load; a rank killed then leaves a lock in a folder whose build
    finished long ago (nothing written since): removed after IDLE_LOCK_S, not 15 minutes.
    A lock beside freshly written objects (a build in progress) stays."""
    idle, busy = tmp_path / "shm" / "lock", tmp_path / "aio" / "lock"
    for lock in (idle, busy):
        lock.parent.mkdir()
        (lock.parent / "op.so").touch()
        lock.touch()
    t = time.time() - dsops.IDLE_LOCK_S - 30
    for f in (idle, idle.parent / "op.so", busy):
        os.utime(f, (t, t))
    assert dsops.clear_stale_locks(root=tmp_path) == [idle]
    assert busy.exists()


@pytest.mark.timeout(200)
def test_a_two_rank_launch_leaves_no_shm_segments(tmp_path):
    """Run the launcher directly (not launch.launch, which also sweeps afterwards): the ranks
    themselves must release their segments."""
    port = launch.free_port()
    cmd = launch.launcher_command(ROOT / "recipes" / "ds_inference.py",
                                  ["--max_new_tokens", "2", "--batch_size", "1",
                                   "--json_out", str(tmp_path / "r.json")], 2, port=port)
    env = {**os.environ, **launch.cpu_env(2), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shm" in (proc.stdout + proc.stderr).lower()  # DeepSpeed really used its shm op
    assert dsops.shm_buffers(port) == []


def test_sweep_removes_a_crashed_launchs_segments():
    port = launch.free_port()
    made = [dsops.SHM_DIR / f"{dsops.SHM_PREFIX}_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1)]
    other = dsops.SHM_DIR / f"{dsops.SHM_PREFIX}_{os.getuid()}_127.0.0.1_{port + 1}_0"
    for p in (*made, other):
        p.write_bytes(b"x")
    try:
        assert dsops.shm_buffers(port) == made
        assert dsops.remove_shm_buffers(port) == 2
        assert dsops.shm_buffers(port) == [] and other.exists()
    finally:
        other.unlink(missing_ok=True)


def test_a_rank_releases_its_own_segment_only(monkeypatch):
    """``release_shm_buffers`` (what every CPU rank calls after init_distributed) unlinks this
    rank's name and leaves the other ranks' (each unlinks its own after the barrier)."""
    port = launch.free_port()
    mine, other = (dsops.SHM_DIR / f"{dsops.SHM_PREFIX}_{os.getuid()}_127.0.0.1_{port}_{r}"
                   for r in (0, 1))
    for p in (mine, other):
        p.write_bytes(b"x")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        assert dsops.release_shm_buffers() == 1  # no process group here: rank 0
        assert not mine.exists() and other.exists()
    finally:
        for p in (mine, other):
            p.unlink(missing_ok=True)


def test_a_failed_op_build_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    proc = subprocess.run([sys.executable, "-c", "from bloomkit import dsops; "
                           "dsops.prebuild(['ShareMemCommBuilder'], unlock=True)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("setup: DeepSpeed op ShareMemCommBuilder did not build")
    assert not (tmp_path / dsops.PREBUILT_MARK).exists()
