#!/usr/bin/env bash
# `make setup-guidellm`: GuideLLM (a third-party benchmark client) in its own virtual environment,
# .venv-guidellm, beside .venv and never in it. Quick when already done (a stamp of requirements-guidellm.txt).
# Usage: scripts/setup-guidellm.sh [VENV_DIR] [extra pip args...]
set -euo pipefail
venv=${1:-.venv-guidellm}; shift || true
req=requirements-guidellm.txt
grep -qE '^guidellm==' "$req" || { echo "error: $req has no 'guidellm==VERSION' line; add the pin" >&2; exit 2; }
stamp="$venv/.bloomkit-guidellm-$(sha1sum "$req" | cut -c1-12)"

if [ ! -f "$stamp" ]; then
  start=$SECONDS
  echo "setup-guidellm: creating $venv from $req (first time only)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q --no-compile -r "$req" "$@"
  # as in scripts/setup.sh: byte-compile on every core (pip compiles one file after another)
  "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
  "$venv/bin/guidellm" --version
  rm -f "$venv"/.bloomkit-guidellm-*
  touch "$stamp"
  echo "setup-guidellm: built in $(( SECONDS - start )) s"
fi
echo "setup-guidellm: ready ($venv/bin/guidellm run --help; make test-guidellm)"
