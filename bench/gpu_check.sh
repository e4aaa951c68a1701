#!/usr/bin/env bash
# GPU check: in one call on a GPU machine, the CUDA tests, the fast (and Muon) presets to 94% with
# their wall time, ResNet-18 and ViT images/s, the pipeline against a torchvision DataLoader, and
# onnxruntime on CUDA at batch 1 and 256; $OUT/gpu_check.json and $OUT/gpu_check.log
# (bench/README.md, "GPU check").
#
#   bash bench/gpu_check.sh --prepare          # here, once: .devdata/ (data pack + wheels), size check
#   bash bench/gpu_check.sh                    # on the GPU machine, with .devdata carried
#   bash bench/gpu_check.sh --smoke            # here, on the CPU: every step with tiny budgets
#   bash bench/gpu_check.sh --only fast,vit    # a rerun of some steps (setup and device always run)
#
# The steps, their budgets (one table at its top) and the parsing are in bench/gpu_check.py, which
# needs only the standard library; it picks the Python with torch for the steps itself
# (GPU_CHECK_PYTHON, ./.venv, the image's python3). OUT defaults to /tmp/gpu_check_out, the work
# folder (runs, data, outputs of every step) to /tmp/gpu_check (GPU_CHECK_WORK).
set -u
cd "$(dirname "$0")/.." || exit 2
export OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
for orchestrator in python3 python .venv/bin/python; do
    if command -v "$orchestrator" >/dev/null 2>&1; then
        exec "$orchestrator" bench/gpu_check.py "$@"
    fi
done
# No Python at all: still leave the two files the caller reads.
echo "GPU check: no python3 on PATH" | tee "$OUT/gpu_check.log"
printf '{"schema": 1, "steps": {}, "error": "no python3 on PATH"}\n' >"$OUT/gpu_check.json"
exit 1
