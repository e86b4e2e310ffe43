#!/usr/bin/env bash
# Makes .whl/ (git-ignored): the wheels the lent GPU machine lacks (Python 3.12,
# x86_64, no network there), for benchmarks/gpu_setup.sh to install into /tmp/site.
# Only what its image does not already hold (KINDS.md in the device tool lists
# that image: torch, transformers, httpx, jinja2, tokenizers... are there); no
# dependencies pulled in, so nothing shadows the image's own torch stack.
# .whl/extra/ holds a recent typing_extensions, installed only when the stack
# does not import without it. Run once, here, where pip reaches the registry:
#   bash scripts/gpu_wheels.sh      # then carry [".whl"] in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
TARGET=(--only-binary :all: --no-deps --python-version 3.12 --implementation cp
        --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64
        --platform manylinux2014_x86_64 --platform any)
WEB=("fastapi==0.118.0" "starlette==0.48.0" pydantic pydantic_core annotated_types typing_inspection
     uvicorn tomli_w platformdirs gguf llguidance jsonschema
     jsonschema_specifications referencing rpds_py)
"$PY" -m pip download -q "${TARGET[@]}" -d .whl "${WEB[@]}"
"$PY" -m pip download -q "${TARGET[@]}" -d .whl/extra typing_extensions
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl"
