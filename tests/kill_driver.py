"""Run `saeflow run ARGS...` and SIGKILL this process at a chosen moment: fault injection for the
kill-and-resume tests.

    python tests/kill_driver.py POINT N ARGS...

With KILL_SIGNAL=SIGTERM (or another signal's name) in the environment, that signal is sent to
this process instead (not to its children: as `kill PID` sends it); with KILL_GROUP=1 as well,
to its whole process group (as Slurm signals a job).

POINT is where the Nth event of this process kills it (fill points also make every model batch
its own shard):
- fill-write: a shard's temporary file is written, not yet renamed into place;
- fill-shard: a shard is in place, the manifest does not list it yet;
- train-step: a training step is about to fetch its batch (cached activations);
- stream-step: the same, in streaming mode;
- checkpoint-write: a checkpoint's files are written in its temporary folder, before its
  manifest and the rename;
- fill-end: the fill has written its last shard and the held-out tokens;
- trained-write: training has ended, its trained SAE is about to be written;
- save: the save stage is about to measure the feature sparsity.
"""

import os
import signal
import sys

import flows  # noqa: F401  (process defaults, as the CLI sets them)
import tasks.activations
import tasks.checkpoint
import tasks.save
import tasks.streaming
import tasks.train
from flows.cli import main

point, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
events = 0


def event() -> None:
    global events
    events += 1
    if events == n:
        number = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
        if os.environ.get("KILL_GROUP"):
            os.killpg(0, number)
        else:
            os.kill(os.getpid(), number)


def after(function):
    def wrapped(*a, **k):
        result = function(*a, **k)
        event()
        return result

    return wrapped


def before(function):
    def wrapped(*a, **k):
        event()
        return function(*a, **k)

    return wrapped


if point.startswith("fill"):
    tasks.activations.SHARD_BYTES = 1  # one model batch per shard, so that a fill has many shards
if point == "fill-write":
    tasks.activations.save_file = after(tasks.activations.save_file)
elif point == "fill-shard":
    tasks.activations._save_shard = after(tasks.activations._save_shard)
elif point == "train-step":
    tasks.activations.ShuffledBatches.__next__ = before(tasks.activations.ShuffledBatches.__next__)
elif point == "stream-step":
    tasks.streaming.StreamedBatches.__next__ = before(tasks.streaming.StreamedBatches.__next__)
elif point == "checkpoint-write":
    tasks.checkpoint.write_manifest = before(tasks.checkpoint.write_manifest)
elif point == "fill-end":
    tasks.activations._fill = after(tasks.activations._fill)
elif point == "trained-write":
    tasks.train.atomic_dir = before(tasks.train.atomic_dir)
elif point == "save":
    tasks.save.firing_frequency = before(tasks.save.firing_frequency)
else:
    sys.exit(f"unknown kill point {point}")
sys.exit(main(["run", *args]))
