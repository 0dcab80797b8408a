"""How fast training gets its batches from a cached store: SAE steps fed by each way of reading,
side by side in one process. Run by bench/gpu_check.sh (stage 5).

Writes a store of `--mb` MB of 1 KB rows (d_in 256, float32, the 4L benchmark's) in each
`--shards` count, then times, for each:
- read: one thread reading 4096-row batches alone (`StoreRows`, as the training loop reads them);
- SAELens's `SAETrainer.step` at d_in 256 x8 (bf16 autocast on a GPU), fed
  - `resident`: from batches already on the device, the step-only ceiling;
  - `loop`: by the training loop reading each batch itself (saeflow on the CPU);
  - `thread`: by a thread reading one batch ahead (`ReadAhead`; saeflow on a GPU before the
    worker processes);
  - `workers-N`: by N worker processes (`WorkerReads`, saeflow on an accelerator).

    python bench/feed.py --device cuda                       # 2 GB store, 64 and 128 shards
    .venv/bin/python bench/feed.py --device cpu --mb 256 --steps 10
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (process defaults)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import bench.run as bench  # noqa: E402
from tasks.activations import ReadAhead, ShuffledBatches, StoreRows, WorkerReads  # noqa: E402
from tasks.train import NonFiniteGuard, _make_trainer, nan_check_deferred, new_training_sae  # noqa: E402

D_IN, EXPANSION, BATCH = 256, 8, 4096


def write_store(folder: Path, rows: int, shards: int) -> dict:
    folder.mkdir(parents=True)
    entries, per_shard = [], -(-rows // shards)
    for i, start in enumerate(range(0, rows, per_shard)):
        stop = min(rows, start + per_shard)
        save_file({"tokens": torch.zeros(stop - start, dtype=torch.int64), "activations": torch.randn(stop - start, D_IN)}, folder / f"s{i}.safetensors")
        entries.append({"file": f"s{i}.safetensors", "start": start, "stop": stop})
    (folder / "manifest.json").write_text(json.dumps({"complete": True, "shards": entries}))
    return {"path": str(folder), "dtype": "float32", "n_tokens": rows}


def read_ms(store_ref: dict, batches: int) -> float:
    """Median milliseconds of reading one batch, alone."""
    store, generator, times = StoreRows(store_ref), torch.Generator().manual_seed(1), []
    for _ in range(batches):
        rows = torch.randperm(len(store), generator=generator)[:BATCH]
        started = time.perf_counter()
        store[rows]
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def feeder(way: str, store_ref: dict, device: str):
    """The batches `way` gives, as a context manager."""
    if way == "resident":
        resident = [torch.randn(BATCH, D_IN, device=device) for _ in range(8)]
        return contextlib.nullcontext(resident[i % 8] for i in range(10**9))
    batches = ShuffledBatches(StoreRows(store_ref), BATCH, seed=0, device=device)
    if way == "loop":
        return contextlib.nullcontext(batches)
    if way == "thread":
        return ReadAhead(batches)
    return WorkerReads(batches, int(way.removeprefix("workers-")))


def step_ms(cfg, way: str, store_ref: dict, steps: int) -> dict:
    """Milliseconds per SAE step fed by `way` (its mean over `steps` after 10 warm-up steps), and
    the seconds from asking for the batches to the end of the warm-up."""
    sae, runner_cfg = new_training_sae(cfg)
    guard = NonFiniteGuard() if nan_check_deferred(cfg.device) else None
    trainer = _make_trainer(sae, runner_cfg, lambda *args: None, guard)
    started = time.perf_counter()
    with feeder(way, store_ref, cfg.device) as batches:
        for _ in range(10):
            trainer.step(next(batches))
        bench.sync()
        warm = time.perf_counter()
        for _ in range(steps):
            trainer.step(next(batches))
        bench.sync()
        done = time.perf_counter()
    return {"step_ms": 1000 * (done - warm) / steps, "start_and_warm_up_s": warm - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mb", type=int, default=2048, help="store size in MB")
    parser.add_argument("--shards", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--ways", nargs="+", default=["resident", "loop", "thread", "workers-1", "workers-2", "workers-4"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "feed.json"))
    args = parser.parse_args()

    bench.DEVICE[0] = args.device
    cfg = bench.bench_config("small", 4_000_000, args.device).model_copy(update={"d_in": D_IN, "expansion_factor": EXPANSION})
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "store_mb": args.mb,
        "row_bytes": 4 * D_IN,
        "batch": BATCH,
        "shards": {},
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for shards in args.shards:
            store_ref = write_store(Path(tmp) / str(shards), args.mb * 2**20 // (4 * D_IN), shards)
            row = {"read_alone_ms": read_ms(store_ref, 40)}
            print(f"{shards:4} shards  read alone        {row['read_alone_ms']:6.2f} ms per batch", flush=True)
            for way in args.ways:
                row[way] = step_ms(cfg, way, store_ref, args.steps)
                print(f"{shards:4} shards  {way:17} {row[way]['step_ms']:6.2f} ms per step  (start and warm-up {row[way]['start_and_warm_up_s']:.1f} s)", flush=True)
            results["shards"][shards] = row
            shutil.rmtree(store_ref["path"])  # one store on disk at a time
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"({args.out})")


if __name__ == "__main__":
    main()
