#!/usr/bin/env bash
# Create .venv and install vol3d with its extras. Idempotent: a second run only checks.
#   bash scripts/setup.sh            # runtime + notebook extras
#   bash scripts/setup.sh dev        # + test/lint tools
# TORCH_SPEC picks the torch build. The default is the CPU wheel this project is
# tested with; pinning it first stops pip from resolving an unpinned torch to a
# multi-GB CUDA build. On a GPU box: TORCH_SPEC="torch==2.13.0" with the CUDA index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras="notebook"
[ "${1:-}" = "dev" ] && extras="notebook,dev"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
.venv/bin/pip install -q -e ".[${extras}]"
.venv/bin/python -c "import torch, vol3d; print(f'vol3d {vol3d.__version__} ready (torch {torch.__version__})')"
