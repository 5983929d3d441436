#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST package (Debian) and a virtual environment
# with the pinned torch/torchvision pair. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing dataset-fashion-mnist (Debian)"
    apt-get update -qq >/dev/null || true
    apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; install it with 'sudo apt-get install dataset-fashion-mnist'," \
         "or set data.root, or data.download: true on a machine that is online" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.pfp-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the package and its dependencies (first time: a few minutes)"
  # The machine's pip config may point at a local torch wheel that torchvision cannot
  # load; constraints.txt pins the pair from the registry so the choice is reproducible.
  quiet() { grep -v '^WARNING: Location' || true; }  # the machine's empty local indexes warn per package
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
  # PYTHONWARNINGS: setuptools warns, in a page of asterisks, that a folder named like a package
  # may shadow it; here the folders are the package (an editable install of this checkout).
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -c constraints.txt -e ".[export,test]" 2>&1 | quiet
  .venv/bin/python -c "import torch, torchvision, torch_pruning; torchvision.ops.nms" \
    || { echo "setup: torch/torchvision do not import together" >&2; exit 1; }
  echo "$want" > $stamp
fi
