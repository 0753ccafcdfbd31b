#!/usr/bin/env bash
# Make bench/.venv-peers: the benchmark's own environment (never the project's dependencies).
#   bash bench/setup.sh            # create or update it
#   bash bench/setup.sh --fresh    # delete and recreate it
# torch==2.13.0 is installed FIRST so pip takes the local CPU wheel (never a CUDA build);
# ppl itself is installed editable from this checkout so the driver can run `ppl` from either venv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.venv-peers"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--fresh" ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then "$PY" -m venv "$VENV"; fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

"${PIP[@]}" "torch==2.13.0"
# the peers; torch is pinned again so no resolver step can swap it for another build
"${PIP[@]}" "torch==2.13.0" pyro-ppl numpyro "jax[cpu]" pymc psutil numpy
# a bench-side copy of the project's runtime deps (the project's .venv is used to run ppl itself)
"${PIP[@]}" "torch==2.13.0" lark networkx

"$VENV/bin/python" - <<'PY'
import importlib, sys
import torch
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
mods = ["torch", "pyro", "numpyro", "jax", "jaxlib", "pymc", "pytensor", "psutil", "numpy"]
for m in mods:
    mod = importlib.import_module(m)
    print(f"  {m:<9} {getattr(mod, '__version__', '?')}")
import jax
print("  jax devices:", jax.devices())
PY
echo "bench/.venv-peers ready"
