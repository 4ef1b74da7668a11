#!/usr/bin/env bash
# Creates .venv in the repository root and installs lit_jax with its test tools, from the project's files.
# torch==2.13.0 is for tests only (the PyTorch reference in third_party/); on our machines pip takes the CPU
# build that lies on disk. Re-running is cheap: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]' 'torch==2.13.0'
.venv/bin/python -c 'import jax, flax, optax, orbax.checkpoint, torch; print("lit_jax env ready: jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__)'
