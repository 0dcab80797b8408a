"""Run `saeflow run ARGS...` as on an accelerator, on the CPU: training reads a cached store's
batches in worker processes (`WorkerReads`), for the tests of signals sent to a whole job.

    python tests/worker_reads_driver.py ARGS...
"""

import sys

import flows  # noqa: F401  (process defaults, as the CLI sets them)
import tasks.activations
from flows.cli import main

tasks.activations.reads_ahead = lambda device: True
sys.exit(main(["run", *sys.argv[1:]]))
