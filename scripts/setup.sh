#!/usr/bin/env bash
# Bootstrap everything `make run` / `make test` need; quick when already done.
#   .venv with the pinned packages, bloomkit installed editable, the Jupyter kernel
#   "bloomkit", and libaio-dev (DeepSpeed's async_io op for ZeRO NVMe offload).
# Usage: scripts/setup.sh REQUIREMENTS_FILE VENV_DIR [extra pip args...]
set -euo pipefail
req=${1:-requirements.txt}; venv=${2:-.venv}; shift 2 || true
stamp="$venv/.bloomkit-$(cat "$req" pyproject.toml | sha1sum | cut -c1-12)"

# System library for ZeRO NVMe offload (needs root; otherwise say exactly what to run).
if ! { [ -e /usr/include/libaio.h ] || ldconfig -p 2>/dev/null | grep -q 'libaio.so '; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libaio-dev (ZeRO NVMe offload)"
    (apt-get install -y -q libaio-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libaio-dev >/dev/null; }) \
      || echo "setup: could not install libaio-dev; NVMe offload tests will fail. Run: apt-get install libaio-dev" >&2
  else
    echo "setup: libaio-dev is missing (ZeRO NVMe offload needs it). Run: sudo apt-get install libaio-dev" >&2
  fi
fi

# The legacy stack's DeepSpeed (0.15) counts CPU "devices" with `numactl --hardware` in its launcher.
if [[ "$req" == *legacy* ]] && ! command -v numactl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing numactl (the legacy DeepSpeed launcher on CPU ranks)"
    (apt-get install -y -q numactl >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q numactl >/dev/null; }) \
      || echo "setup: could not install numactl; use torchrun for CPU ranks. Run: apt-get install numactl" >&2
  else
    echo "setup: numactl is missing (the legacy DeepSpeed launcher needs it on CPU). Run: sudo apt-get install numactl" >&2
  fi
fi

# Headless Chromium: the test that opens the HTML report the way a reader would.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium (headless check of the HTML report)"
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
      || echo "setup: could not install chromium; the report test will fail. Run: apt-get install chromium" >&2
  else
    echo "setup: headless Chromium is missing (report test). Run: sudo apt-get install chromium" >&2
  fi
fi

if [ ! -f "$stamp" ]; then
  echo "setup: creating $venv and installing $req (first time only)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$req" "$@"
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
    || echo "setup: could not prebuild DeepSpeed's ops (needs g++ and libaio-dev); the first run that needs them builds them" >&2
fi
echo "setup: ready"
