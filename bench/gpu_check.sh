#!/usr/bin/env bash
# GPU check, for a machine with a CUDA device, this repository and its packages (stages 1-4: 9 minutes on an H200):
#   1. the GPU tests (`pytest -m gpu`, tests/test_gpu.py): bf16 training on cuda learns as on the
#      CPU, cached and streaming; a retried training with deterministic kernels ends bitwise equal;
#   2. one short training through the real pipeline (`saeflow run`) with device: cuda and bf16
#      autocast for the model and the SAE step; prints its tokens/s from train_log.jsonl;
#   3. the SAE step alone on device-resident batches against the bf16 matmul rate at its shapes,
#      eager, compiled and with deterministic kernels (bench/gpu_step.py);
#   4. bench/run.py on cuda (one repetition, saeflow against SAELens's runner);
#   5. SAE steps fed from a 2 GB store of 64 and 128 shards: by the training loop reading,
#      by a reading thread and by 1, 2 and 4 worker processes, against resident batches
#      (bench/feed.py).
# Every stage runs even when one before it failed; the exit status says whether all passed.
# Usage: bench/gpu_check.sh [PYTHON] [STAGE...]   (default: .venv/bin/python, stages 1 2 3 4 5;
# measured on an H200: 1.5, 1.5, 1 and 5 minutes, stage 5 not yet run); results in bench/results/gpu_*.json
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
STAGES=" ${*:2} "
[[ "$STAGES" == "  " ]] && STAGES=" 1 2 3 4 5 "
for s in $STAGES; do
  [[ "$s" == [1-5] ]] || { echo "gpu_check: unknown stage '$s'; the stages are 1 2 3 4 5" >&2; exit 2; }
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch $("$PY" -c 'import torch; print(torch.__version__)'))." >&2
  echo "Run it on a GPU machine with a CUDA build of torch (make demo TORCH=\"torch --index-url https://download.pytorch.org/whl/cu128\")." >&2
  exit 1
fi
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
failed=()
stage() {  # stage NAME COMMAND...: run it (when asked for), time it, note a failure and go on
  [[ "$STAGES" == *" ${1%%.*} "* ]] || return 0
  echo "== $1"
  local started=$SECONDS
  "${@:2}" || failed+=("$1")
  echo "   ($1: $((SECONDS - started)) s)"
}

stage "1. GPU tests" "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider

pipeline() {
  "$PY" -m flows.cli run configs/demo.yaml --artifacts-dir "$WORK/artifacts" --run-name gpu \
    --set device=cuda --set autocast=true --set autocast_lm=true --set training_tokens=2000000 >"$WORK/run.log" 2>&1 \
    || { tail -40 "$WORK/run.log"; return 1; }
  "$PY" - "$WORK/artifacts/runs/gpu" <<'PY'
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
metrics = json.loads((run / "metrics.json").read_text())["metrics"]
out = {"training_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows), "steps": rows[-1]["step"],
       "final_loss": rows[-1]["loss"]} | {key: metrics[key] for key in ("explained_variance", "l0", "ce_loss_score", "dead_features")}
print(json.dumps(out, indent=2))
Path("bench/results/gpu_pipeline.json").write_text(json.dumps(out, indent=2))
PY
}
stage "2. pipeline run on cuda, bf16 autocast (demo config, 2M tokens)" pipeline

stage "3. SAE step alone vs the bf16 matmul rate" "$PY" bench/gpu_step.py --device cuda

stage "4. bench/run.py on cuda (1 repetition)" \
  "$PY" bench/run.py --device cuda --repeats 1 --tokens small=4000000 large=2000000 --rerun-tokens 0 --out bench/results/gpu_run.json

stage "5. SAE steps fed from the store, by way of reading" \
  "$PY" bench/feed.py --device cuda --dir "$WORK" --out bench/results/gpu_feed.json

if ((${#failed[@]})); then
  echo "gpu_check: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all stages passed"
