#!/usr/bin/env bash
# GPU check, for a machine with a CUDA device, this repository and its venv (about 5 minutes):
#   1. one short training through the real pipeline (`saeflow run`) with device: cuda and bf16
#      autocast for the model and the SAE step; prints its tokens/s from train_log.jsonl;
#   2. the SAE step alone on device-resident batches against the bf16 matmul rate at its shapes;
#   3. bench/run.py at GPU settings (one repetition, saeflow against SAELens's runner).
# Usage: bench/gpu_check.sh [PYTHON]   (default .venv/bin/python); results in bench/results/gpu_*.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch $("$PY" -c 'import torch; print(torch.__version__)'))." >&2
  echo "Run it on a GPU machine with a CUDA build of torch (make demo TORCH=\"torch --index-url https://download.pytorch.org/whl/cu128\")." >&2
  exit 1
fi
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== 1. pipeline run on cuda, bf16 autocast (demo config, 2M tokens)"
"$PY" -m flows.cli run configs/demo.yaml --artifacts-dir "$WORK/artifacts" --run-name gpu \
  --set device=cuda --set autocast=true --set autocast_lm=true --set training_tokens=2000000 >"$WORK/run.log" 2>&1 \
  || { tail -40 "$WORK/run.log"; exit 1; }
"$PY" - "$WORK/artifacts/runs/gpu" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
metrics = json.loads((run / "metrics.json").read_text())
rate = sorted(r["tokens_per_s"] for r in rows[1:] or rows)[len(rows[1:] or rows) // 2]
out = {"training_tokens_per_s_median": rate, "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
       "explained_variance": metrics.get("metrics", metrics).get("explained_variance")}
print(json.dumps(out, indent=2))
Path("bench/results/gpu_pipeline.json").write_text(json.dumps(out, indent=2))
PY

echo "== 2. SAE step alone vs the bf16 matmul rate (4096 x d_in x 8 d_in)"
"$PY" - <<'PY'
import json, time
from pathlib import Path
import flows  # noqa: F401
import torch
import bench.run as b
from tasks.train import _make_trainer, new_training_sae
b.DEVICE[0] = "cuda"
out = {}
for size in ("small", "large"):
    cfg = b.bench_config(size, 4_000_000, "cuda")
    sae, runner_cfg = new_training_sae(cfg)
    trainer = _make_trainer(sae, runner_cfg, lambda *a: None)
    batches = [torch.randn(4096, cfg.d_in, device="cuda") for _ in range(8)]
    for batch in batches:
        trainer.step(batch)
    b.sync(); started = time.perf_counter(); n = 200
    for i in range(n):
        trainer.step(batches[i % 8])
    b.sync(); step = (time.perf_counter() - started) / n
    ref = b.matmul_reference(4096, cfg.d_in, cfg.sae_width, "cuda", torch.bfloat16, repeats=50)
    achieved = b.sae_step_flops(4096, cfg.d_in, cfg.sae_width) / step / 1e9
    out[size] = {"d_in": cfg.d_in, "d_sae": cfg.sae_width, "sae_step_ms": 1000 * step, "sae_step_tokens_per_s": 4096 / step,
                 "sae_step_gflops": achieved, "bf16_matmul_gflops": ref["gflops"], "share_of_matmul": achieved / ref["gflops"]}
    print(size, json.dumps(out[size]))
Path("bench/results/gpu_step.json").write_text(json.dumps(out, indent=2))
PY

echo "== 3. bench/run.py on cuda (1 repetition)"
"$PY" bench/run.py --device cuda --repeats 1 --tokens small=4000000 large=2000000 --rerun-tokens 0 --out bench/results/gpu_run.json
