#!/usr/bin/env bash
# Every GPU-specific check and timing in one go, for a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh        (after bash .ci/setup)
# Prints the device, runs the gpu-marked tests, times the default job in bf16 and fp32 and with compile, the job
# on devices=1 and (with two GPUs or more) devices=2 through torchrun, then the training step alone (step.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
$PY -m pytest -q -m gpu tests/test_gpu.py
store=$(mktemp -d)
export MLFLOW_TRACKING_URI=sqlite:///$store/gpu.db
for variant in "bf16-mixed false" "32-true false" "bf16-mixed true"; do
  read -r precision compile <<<"$variant"
  start=$(date +%s.%N)
  $PY -m mlproject train --auto-lr true --accelerator gpu --precision "$precision" --compile "$compile" \
    --experiment-name gpu-timing
  echo "default job, $precision, compile=$compile: $(echo "$(date +%s.%N) - $start" | bc) s wall"
done
$PY - <<'PYEOF'
from mlflow.tracking import MlflowClient
import os
c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
for run in c.search_runs([c.get_experiment_by_name("gpu-timing").experiment_id]):
    epochs = [m.value for m in c.get_metric_history(run.info.run_id, "epoch_seconds")]
    print(run.data.tags["precision"], "compile", run.data.params["compile"], "range test", round(run.data.metrics["lr_find_seconds"], 2), "s;",
          "epochs", [round(e, 2) for e in epochs], "s; test_acc", round(run.data.metrics["test_acc"], 4))
PYEOF
# Several processes against one (the same global batch): on one GPU devices=1 only, on two or more devices=2 too.
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$gpus" -ge 2 ]; then
  $PY -m benchmarks.ddp --devices 2 --accelerator gpu --repeats 2 --train-subset 0 --epochs 2
else
  $PY -m mlproject train --auto-lr true --accelerator gpu --devices 1 --experiment-name gpu-devices1 --progress lines
fi
# The step alone, interleaved: the job's Lightning fit against channels_last flipped, a Fabric loop and a bare loop.
$PY -m benchmarks.step --blocks 8
