"""The SAE training step alone, on batches already on the device, against the matmul rate at its
shapes (bf16 on a GPU, where the step runs under autocast; float32 on a CPU): eager, compiled
(`compile_sae`), eager with deterministic kernels (`deterministic`), and eager with torch's fused
Adam (`fused_adam`, a candidate: fewer kernel launches). Run by bench/gpu_check.sh.

    python bench/gpu_step.py --device cuda [--shapes small large gpt2] [--steps 200]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (process defaults)
import torch  # noqa: E402

import bench.run as bench  # noqa: E402
from tasks.train import NonFiniteGuard, _make_trainer, nan_check_deferred, new_training_sae  # noqa: E402

# (d_in, expansion factor): the benchmark's two models, and GPT-2 small's residual stream at x32
SHAPES = {"small": (64, 8), "large": (256, 8), "gpt2": (768, 32)}
BATCH = 4096
# eager: SAELens's step as saeflow runs it; compiled: compile_sae; deterministic: deterministic kernels;
# fused_adam: eager with torch's fused Adam in place of SAELens's (foreach) Adam, not in saeflow yet
VARIANTS = ["eager", "compiled", "deterministic", "fused_adam"]


def time_steps(cfg, variant: str, steps: int) -> dict:
    """Median and first-step seconds of `steps` SAETrainer steps, batches resident on the device."""
    sae, runner_cfg = new_training_sae(cfg)
    if variant == "compiled":
        sae.training_forward_pass = torch.compile(sae.training_forward_pass)
    guard = NonFiniteGuard() if nan_check_deferred(cfg.device) else None
    trainer = _make_trainer(sae, runner_cfg, lambda *args: None, guard)
    if variant == "fused_adam":  # what torch's fused Adam would gain (the LR schedule then steps the replaced optimizer)
        trainer.optimizer = torch.optim.Adam(sae.parameters(), lr=runner_cfg.lr, betas=(runner_cfg.adam_beta1, runner_cfg.adam_beta2), fused=True)
    batches = [torch.randn(BATCH, cfg.d_in, device=cfg.device) for _ in range(8)]
    torch.use_deterministic_algorithms(variant == "deterministic")
    try:
        bench.sync()
        started = time.perf_counter()
        trainer.step(batches[0])
        bench.sync()
        first = time.perf_counter() - started
        for batch in batches[1:]:  # warm-up
            trainer.step(batch)
        times = []
        for i in range(steps):
            bench.sync()
            started = time.perf_counter()
            trainer.step(batches[i % len(batches)])
            bench.sync()
            times.append(time.perf_counter() - started)
        if guard is not None:
            guard.check(trainer.n_training_steps)
    finally:
        torch.use_deterministic_algorithms(False)
    return {"first_step_s": first, "step_ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_step.json"))
    args = parser.parse_args()

    bench.DEVICE[0] = args.device
    on_gpu = args.device != "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    results = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__, "batch": BATCH, "matmul_dtype": str(dtype), "shapes": {}}
    for name in args.shapes:
        d_in, expansion = SHAPES[name]
        cfg = bench.bench_config("small", 4_000_000, args.device).model_copy(update={"d_in": d_in, "expansion_factor": expansion})
        timings = {variant: time_steps(cfg, variant, args.steps) for variant in args.variants}
        # After the steps, so that the GPU runs at the clocks it trained at (an idle one starts low)
        bench.matmul_reference(BATCH, d_in, cfg.sae_width, args.device, dtype, repeats=10)
        matmul = bench.matmul_reference(BATCH, d_in, cfg.sae_width, args.device, dtype, repeats=50)
        row = {"d_in": d_in, "d_sae": cfg.sae_width, "matmul_gflops": matmul["gflops"]}
        for variant, timing in timings.items():
            gflops = bench.sae_step_flops(BATCH, d_in, cfg.sae_width) / (timing["step_ms"] / 1000) / 1e9
            row[variant] = timing | {"tokens_per_s": BATCH / (timing["step_ms"] / 1000), "gflops": gflops, "share_of_matmul": gflops / matmul["gflops"]}
            print(f"{name:6} d_in {d_in:4} d_sae {cfg.sae_width:6} {variant:13} {timing['step_ms']:8.3f} ms/step  "
                  f"{gflops:9.1f} GFLOP/s = {gflops / matmul['gflops']:5.1%} of matmul ({matmul['gflops']:.0f})  first step {timing['first_step_s']:.2f} s", flush=True)
        results["shapes"][name] = row
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"({args.out})")


if __name__ == "__main__":
    main()
