#!/usr/bin/env bash
# Creates ./.venv with srigl_jax (editable, with its test extra) and, where this
# machine allows it, installs Debian's Fashion-MNIST package, the default data.
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q uv
VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install -q -e '.[test]'

fmnist=/usr/share/datasets/fashion-mnist
if [ ! -e "$fmnist/train-images-idx3-ubyte.gz" ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && \
     { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "setup: installed Debian's dataset-fashion-mnist into $fmnist"
  else
    echo "setup: could not install dataset-fashion-mnist (needs apt-get and root);" \
         "training on Fashion-MNIST needs it, or --config.input.data_dir=DIR with the IDX files." >&2
  fi
fi
echo "setup: ready (.venv)"
