#!/usr/bin/env bash
# Wheels of the visd dependencies that the GPU machine's image lacks, for its Python 3.12, into .whl/
# (git-ignored). That machine has torch, triton, transformers, timm, huggingface_hub, safetensors, numpy,
# pandas, scipy and matplotlib, and can fetch nothing. The versions are the ones installed here, the
# combination the tests pass with. Run this here, then the device call of benchmarks/gpu.sh with
# carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
packages=$(python - <<'PY'
from importlib.metadata import version
names = ["open_clip_torch", "ftfy", "wcwidth", "monai", "pydantic", "pydantic_core", "annotated-types",
         "typing-inspection", "nibabel", "pydicom"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
rm -rf .whl && mkdir .whl
python -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --dest .whl $packages
du -sh .whl
