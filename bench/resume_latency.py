"""Resume latency: time from the start of the training stage to its first new step, when resuming
from a checkpoint at 10% and at 90% of a run. Constant-time resume means the ratio is about 1.

    .venv/bin/python bench/resume_latency.py [--repeats 3] [--training-tokens 4000000]

Writes bench/results/resume_latency.json and prints a markdown table. The 10% and 90% cases
alternate, so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (process defaults)
import tasks.activations  # noqa: E402
import tasks.train  # noqa: E402
from flows.pipeline import run_pipeline  # noqa: E402
from tasks.config import make_config  # noqa: E402
from tasks.preflight import claim_run, resolve  # noqa: E402

MODEL = {"n_layers": 2, "d_model": 64, "n_ctx": 128, "d_head": 16, "n_heads": 4, "d_mlp": 256, "act_fn": "gelu", "normalization_type": "LN"}


def instrument() -> dict[str, float]:
    """Record when the training stage starts (it loads the store) and when its first new step
    asks for a batch."""
    marks: dict[str, float] = {}
    load_store, next_batch = tasks.train.load_store, tasks.activations.ShuffledBatches.__next__

    def timed_load_store(*args, **kwargs):
        marks["start"] = time.perf_counter()
        return load_store(*args, **kwargs)

    def timed_next(self):
        marks.setdefault("first_step", time.perf_counter())
        return next_batch(self)

    tasks.train.load_store = timed_load_store
    tasks.activations.ShuffledBatches.__next__ = timed_next
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--training-tokens", type=int, default=2_000_000)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    marks = instrument()
    work = Path(tempfile.mkdtemp(prefix="saeflow-bench-"))
    cfg = resolve(
        make_config(
            {
                "model_name": "bench-2l",
                "model_cfg": MODEL,
                "context_size": 64,
                "training_tokens": args.training_tokens,
                "train_batch_size_tokens": 4096,
                "n_batches_in_buffer": 64,
                "n_checkpoints": 9,
                "keep_checkpoints": 9,
            }
        )
    )
    results: dict[str, list[float]] = {"10%": [], "90%": []}
    with prefect_test_harness(server_startup_timeout=180):
        base = work / "base"
        full = run_pipeline(cfg, claim_run(cfg, base, "full", new=False), base)
        checkpoints = sorted((base / "runs" / "full" / "checkpoints").glob("step-*"))
        chosen = {"10%": checkpoints[0], "90%": checkpoints[-1]}
        for repeat in range(args.repeats):
            for label, checkpoint in chosen.items():
                trial = work / f"{label[:-1]}-{repeat}"
                shutil.copytree(base / "models", trial / "models")
                shutil.copytree(base / "activations", trial / "activations")
                shutil.copytree(checkpoint, trial / "runs" / "trial" / "checkpoints" / checkpoint.name)
                marks.clear()
                run_pipeline(cfg, claim_run(cfg, trial, "trial", new=False), trial)
                results[label].append(marks["first_step"] - marks["start"])
                shutil.rmtree(trial)
    shutil.rmtree(work)

    median = {label: statistics.median(times) for label, times in results.items()}
    report = {
        "benchmark": "resume_latency",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "training_tokens": args.training_tokens,
        "steps": full["training"]["n_training_steps"],
        "seconds": results,
        "median_seconds": median,
        "ratio_90_to_10": median["90%"] / median["10%"],
    }
    out = ROOT / "bench" / "results" / "resume_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("| resumed at | median time to first new step (s) | runs |")
    print("| --- | --- | --- |")
    for label in results:
        print(f"| {label} | {median[label]:.3f} | {len(results[label])} |")
    print(f"\nratio 90% / 10%: {report['ratio_90_to_10']:.2f}  ({out})")


if __name__ == "__main__":
    main()
