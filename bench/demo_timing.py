"""Demo timing: wall-clock time of `saeflow run` with no config (the built-in demo), first in an
empty artifacts folder, then again with every stage cached, as a user runs it.

    .venv/bin/python bench/demo_timing.py [--repeats 1]

Each repeat starts from a new empty folder. Writes bench/results/demo_timing.json (with the
seconds the model training and each stage took, and the load average, since the numbers are
only as quiet as the machine) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(artifacts: Path) -> tuple[float, str]:
    """One `saeflow run` in a fresh process; its wall time and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(artifacts)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    return time.perf_counter() - started, done.stdout + done.stderr


def stage_seconds(output: str) -> dict[str, float]:
    """Seconds from the flow's start to the end of each stage, from the Prefect log's timestamps."""
    def seconds(stamp: str) -> float:
        h, m, s = stamp.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    start = re.search(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO .* Beginning flow run", output, re.M)
    ends = re.findall(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO .*Task run '([a-z-]+)-\w+' - Finished", output, re.M)
    return {name: round(seconds(stamp) - seconds(start.group(1)), 1) for stamp, name in ends} if start else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    runs = []
    for _ in range(args.repeats):
        work = Path(tempfile.mkdtemp(prefix="saeflow-demo-bench-"))
        load_before = os.getloadavg()[0]
        first, first_output = run_demo(work)
        cached, _ = run_demo(work)
        summary = json.loads(next((work / "runs").glob("*/summary.json")).read_text())
        runs.append(
            {
                "first_s": round(first, 1),
                "cached_s": round(cached, 1),
                "model_training_s": summary["model"]["training"]["seconds"],
                "model_final_loss": summary["model"]["training"]["final_loss"],
                "stage_end_s": stage_seconds(first_output),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            }
        )
        shutil.rmtree(work)

    report = {
        "benchmark": "demo_timing",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "runs": runs,
        "median_first_s": statistics.median(r["first_s"] for r in runs),
        "median_cached_s": statistics.median(r["cached_s"] for r in runs),
    }
    out = ROOT / "bench" / "results" / "demo_timing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("| first run (s) | cached run (s) | model training (s) | load average before, after |")
    print("| --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['first_s']} | {r['cached_s']} | {r['model_training_s']} | {r['load_average_1min'][0]}, {r['load_average_1min'][1]} |")
    print(f"\n({out})")


if __name__ == "__main__":
    main()
