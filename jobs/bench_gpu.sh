#!/usr/bin/env bash
# ResNet-18, 224 px, bf16 training images/s on ONE GPU: the bare loop vs the whole pipeline
# (Ray Data -> TorchTrainer, 2 epochs, a fine-tune from a weights file), plus Ray Data vs DataLoader
# ingest. Installs nothing from the network: torch/torchvision must be there; Ray and its few
# extra dependencies may come as wheels in .whl/ (made by jobs/gpu_wheels.sh). About 5 minutes.
#   bash jobs/bench_gpu.sh            # from the repo root; results in $OUT (default: a temp dir)
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-/tmp/finetune-bench-gpu}
PER_CLASS=${PER_CLASS:-10000}
BATCH=${BATCH:-256}
mkdir -p "$OUT" "$WORK"
if ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi -L
python3 -c "import torch, torchvision, ray; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__)"
# A weights file to fine-tune from (no download possible here; throughput does not depend on the values).
python3 -c "import torch, torchvision; torch.save(torchvision.models.resnet18().state_dict(), '$WORK/resnet18_init.pth')"
python3 -m pipeline.cli bench --gpu --generate "$PER_CLASS" --size 224 --arch resnet18 --batch-size "$BATCH" \
  --workers 1 --epochs 2 --weights "$WORK/resnet18_init.pth" --work-dir "$WORK" --skip peer,scaling,tune \
  2>&1 | grep -v "Reporting training result" | tee "$OUT/bench_gpu.log"
cp "$WORK/bench.json" "$OUT/bench_gpu.json"
