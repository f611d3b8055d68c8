#!/usr/bin/env bash
# Every GPU-specific check and timing in one go, for a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh        (after bash .ci/setup)
# Prints the device, runs the gpu-marked tests, then times the default job and one epoch in bf16 and fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
$PY -m pytest -q -m gpu tests/test_gpu.py
export MLFLOW_TRACKING_URI=sqlite:///$(mktemp -d)/gpu.db
for precision in bf16-mixed 32-true; do
  start=$(date +%s.%N)
  $PY -m mlproject train --auto-lr true --accelerator gpu --precision "$precision" --experiment-name gpu-timing
  echo "default job, $precision: $(echo "$(date +%s.%N) - $start" | bc) s wall"
done
$PY - <<'PYEOF'
from mlflow.tracking import MlflowClient
import os
c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
for run in c.search_runs([c.get_experiment_by_name("gpu-timing").experiment_id]):
    epochs = [m.value for m in c.get_metric_history(run.info.run_id, "epoch_seconds")]
    print(run.data.tags["precision"], "range test", round(run.data.metrics["lr_find_seconds"], 2), "s;",
          "epochs", [round(e, 2) for e in epochs], "s; test_acc", round(run.data.metrics["test_acc"], 4))
PYEOF
