#!/usr/bin/env bash
# Set-up for the end-to-end benchmarks on the lent GPU, where there is no .venv:
# the carried wheels (.whl/, git-ignored: carry it) go into /tmp/site, which the
# benchmark commands put first on PYTHONPATH. httpx and its dependencies, and a
# recent typing_extensions (.whl/extra/), go in too when the stack does not
# import without them.
#   bash benchmarks/gpu_setup.sh && PYTHONPATH=/tmp/site:. python3 benchmarks/colocate.py
set -euo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_setup: .whl/ is missing: carry it" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
check='import fastapi, uvicorn, httpx, pydantic, tomli_w, platformdirs, app.cli, app.daemon'
if ! PYTHONPATH=/tmp/site:. python3 -c "$check" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/extra/*.whl
fi
PYTHONPATH=/tmp/site:. python3 -c "$check"
echo "gpu_setup: ready on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo 'no CUDA')"
