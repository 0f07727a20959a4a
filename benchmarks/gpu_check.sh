#!/usr/bin/env bash
# One GPU window for the project's GPU checks (a lent H200, about 9 minutes): the hf backend against
# `model.generate` (issue 25) and shared-prefix DPO at the real shape (issue 23). Run from the repository root with the
# wheels the image lacks in .whl/ (pip download --no-deps --python-version 3.12: trl, datasets, dill, multiprocess,
# pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, liger-kernel); each script writes
# its JSON figures to $OUT as it goes, so a script stopped at its limit still leaves what it measured.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"
timeout 235 python3 benchmarks/gpu_generate.py --budget-s 190 > "$OUT/gpu_generate.log" 2>&1
echo "gpu_generate exit $?"; tail -n 20 "$OUT/gpu_generate.log"
timeout 310 python3 benchmarks/gpu_train.py --budget-s 265 > "$OUT/gpu_train.log" 2>&1
echo "gpu_train exit $?"; tail -n 40 "$OUT/gpu_train.log"
