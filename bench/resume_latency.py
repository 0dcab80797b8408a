"""Resume latency: time from the start of the training stage to its first new step, when resuming
from a checkpoint at 10% and at 90% of a run, in cached and in streaming activation mode.
Constant-time resume means the 90%/10% ratio is about 1.

    .venv/bin/python bench/resume_latency.py [--repeats 3] [--training-tokens 2000000] [--modes cached streaming]

Writes bench/results/resume_latency.json and prints a markdown table. The 10% and 90% cases
alternate, so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
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
import tasks.streaming  # noqa: E402
import tasks.train  # noqa: E402
from flows.pipeline import run_pipeline  # noqa: E402
from tasks.config import make_config  # noqa: E402
from tasks.preflight import claim_run, resolve  # noqa: E402

MODEL = {"n_layers": 2, "d_model": 64, "n_ctx": 128, "d_head": 16, "n_heads": 4, "d_mlp": 256, "act_fn": "gelu", "normalization_type": "LN"}


def instrument() -> dict[str, float]:
    """Record when the training stage starts (it opens its batches) and when its first new step
    has its batch (in streaming mode, made by the model: the mixing buffer it resumes in)."""
    marks: dict[str, float] = {}
    training_batches = tasks.train.training_batches

    def timed_training_batches(*args, **kwargs):
        marks["start"] = time.perf_counter()
        return training_batches(*args, **kwargs)

    def timed(next_batch):
        def timed_next(self):
            batch = next_batch(self)
            marks.setdefault("first_step", time.perf_counter())
            return batch

        return timed_next

    tasks.train.training_batches = timed_training_batches
    tasks.activations.ShuffledBatches.__next__ = timed(tasks.activations.ShuffledBatches.__next__)
    tasks.streaming.StreamedBatches.__next__ = timed(tasks.streaming.StreamedBatches.__next__)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--training-tokens", type=int, default=2_000_000)
    parser.add_argument("--modes", nargs="+", default=["cached", "streaming"], choices=["cached", "streaming"])
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    marks = instrument()
    work = Path(tempfile.mkdtemp(prefix="saeflow-bench-"))
    report = {
        "benchmark": "resume_latency",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, python {platform.python_version()}",
        "training_tokens": args.training_tokens,
        "modes": {},
    }
    with prefect_test_harness(server_startup_timeout=180):
        for mode in args.modes:
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
                        "activation_mode": mode,
                    }
                )
            )
            results: dict[str, list[float]] = {"10%": [], "90%": []}
            base = work / mode
            full = run_pipeline(cfg, claim_run(cfg, base, "full", new=False), base)
            checkpoints = sorted((base / "runs" / "full" / "checkpoints").glob("step-*"))
            chosen = {"10%": checkpoints[0], "90%": checkpoints[-1]}
            for repeat in range(args.repeats):
                for label, checkpoint in chosen.items():
                    trial = work / f"{mode}-{label[:-1]}-{repeat}"
                    shutil.copytree(base / "models", trial / "models")
                    shutil.copytree(base / "activations", trial / "activations")
                    shutil.copytree(checkpoint, trial / "runs" / "trial" / "checkpoints" / checkpoint.name)
                    marks.clear()
                    run_pipeline(cfg, claim_run(cfg, trial, "trial", new=False), trial)
                    results[label].append(marks["first_step"] - marks["start"])
                    shutil.rmtree(trial)
            median = {label: statistics.median(times) for label, times in results.items()}
            report["modes"][mode] = {
                "steps": full["training"]["n_training_steps"],
                "seconds": results,
                "median_seconds": median,
                "ratio_90_to_10": median["90%"] / median["10%"],
            }
    shutil.rmtree(work)

    out = ROOT / "bench" / "results" / "resume_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("| mode | resumed at | median time to first new step (s) | runs | 90% / 10% |")
    print("| --- | --- | --- | --- | --- |")
    for mode, result in report["modes"].items():
        for label, median in result["median_seconds"].items():
            print(f"| {mode} | {label} | {median:.3f} | {len(result['seconds'][label])} | {result['ratio_90_to_10']:.2f} |")
    print(f"\n({out})")


if __name__ == "__main__":
    main()
