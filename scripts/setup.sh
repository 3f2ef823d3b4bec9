#!/usr/bin/env bash
# Bootstrap everything `make run` / `make test` need; quick when already done.
#   .venv with the pinned packages, bloomkit installed editable, the Jupyter kernel
#   "bloomkit", and libaio-dev (DeepSpeed's async_io op for ZeRO NVMe offload).
# Usage: scripts/setup.sh REQUIREMENTS_FILE VENV_DIR [extra pip args...]
set -euo pipefail
req=${1:-requirements.txt}; venv=${2:-.venv}; shift 2 || true
stamp="$venv/.bloomkit-$(cat "$req" pyproject.toml | sha1sum | cut -c1-12)"

# apt_need PACKAGE WHY: install a Debian package when root, else print the exact command.
apt_need() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing $1 ($2)"
    (apt-get install -y -q "$1" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; }) \
      || echo "setup: could not install $1 ($2). Run: apt-get install $1" >&2
  else
    echo "setup: $1 is missing ($2). Run: sudo apt-get install $1" >&2
  fi
}

# System library for ZeRO NVMe offload: DeepSpeed's async_io op links -laio.
if ! { [ -e /usr/include/libaio.h ] || ldconfig -p 2>/dev/null | grep -q 'libaio.so '; }; then
  apt_need libaio-dev "ZeRO NVMe offload"
fi
# The legacy stack's DeepSpeed (0.15) counts CPU "devices" with `numactl --hardware` in its launcher.
if [[ "$req" == *legacy* ]] && ! command -v numactl >/dev/null; then
  apt_need numactl "the legacy DeepSpeed launcher on CPU ranks; else use torchrun"
fi
# Headless Chromium: the test that opens the HTML report the way a reader would.
if ! command -v chromium >/dev/null; then
  apt_need chromium "headless check of the HTML report"
fi

if [ ! -f "$stamp" ]; then
  echo "setup: creating $venv and installing $req (first time only)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # pip byte-compiles one file after another; compileall uses every core (2 cores: 47 s of pip
  # plus 50 s of compileall, where pip alone took about 130 s). The .pyc files must exist: with
  # PYTHONDONTWRITEBYTECODE set, every process would recompile what it imports (20 s, not 9 s).
  "$venv/bin/python" -m pip install -q --no-compile -r "$req" "$@"
  "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
  "$venv/bin/python" -m pip install -q --no-deps -e .
  "$venv/bin/python" -m ipykernel install --sys-prefix --name bloomkit --display-name "Python (bloomkit)" >/dev/null
  rm -f "$venv"/.bloomkit-*
  touch "$stamp"
fi

# DeepSpeed JIT-compiles its C++ ops on first use (async_io for NVMe offload, the shared-memory
# all-reduce for CPU ranks, pin_memory): minutes on a small machine. Build them once here, into
# $venv/torch_extensions (bloomkit.dsops says why there), so no timed step pays for g++.
ops="$venv/torch_extensions"
if ! [ -f "$ops/.bloomkit-prebuilt" ]; then
  echo "setup: building DeepSpeed's CPU ops once (async_io, shm comm, pin_memory; a few minutes)"
  timeout 1200 "$venv/bin/python" -c "from bloomkit import dsops; dsops.prebuild(unlock=True)" \
    || echo "setup: DeepSpeed's ops are not prebuilt (see the line above, or the 20-minute limit); the first run that needs them builds them" >&2
fi
echo "setup: ready"
