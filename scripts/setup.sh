#!/usr/bin/env bash
# Set up neuclip_hf on a fresh Debian/Ubuntu machine: the Fashion-MNIST data package, a virtual environment in
# .venv, the CPU build of torch (installed FIRST so pip never pulls a multi-GB CUDA build), then the package with
# its test extras. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${NEUCLIP_FASHION_MNIST_DIR:-}" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "Location" || true
# On a GPU machine install the matching CUDA wheel of torch yourself before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "Location" || true
.venv/bin/python -c "import neuclip_hf, torch, transformers; print('neuclip_hf', neuclip_hf.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
# The embedded default dataset (Fashion-MNIST captions as parquet shards in ~/.cache/neuclip_hf, ~12 s once);
# otherwise it is prepared on first use.
.venv/bin/python scripts/prepare_default_data.py
