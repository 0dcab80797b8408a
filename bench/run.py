"""saeflow against SAELens's `LanguageModelSAETrainingRunner`, side by side on the same config and
data: end-to-end tokens/s, where the time goes (model forward, data loading, SAE step), the SAE
step's GFLOP/s against `torch.matmul` at the same shapes, activation filling against the bare
model forward, a fully cached re-run against an empty Prefect flow, and peak RSS.

    .venv/bin/python bench/run.py [--sizes small large] [--repeats 3] [--tokens small=N large=N] [--heap]

Every measurement runs in a fresh subprocess (peak RSS is that process's `ru_maxrss`; no warm
caches carry over), and the two systems alternate, so machine noise hits both alike. Writes
bench/results/run.json and prints the markdown tables of BENCHMARKS.md. Resume latency is
measured by bench/resume_latency.py; its last results are copied into the report.

What "end to end" includes, for a fresh run of `training_tokens` tokens, with the model already
built on disk (a locally built model, so neither side downloads anything):
- saeflow: one Prefect flow of the pipeline's first stages, as `flows/pipeline.py` runs them:
  build-model (finds the model), pretokenise, fill the activation store (the training tokens'
  activations plus the held-out tokens), train with its checkpoints (`n_checkpoints`: 10) and
  the trained SAE written to disk. Not the later stages (save, evaluate, analyse, report).
- SAELens: `LanguageModelSAETrainingRunner(cfg, override_model=, override_dataset=)` built and
  `.run()`: tokenising on the fly, the model forward in its mixing buffer, training. No
  checkpoints and no output folder (`n_checkpoints=0`, `checkpoint_path=None`,
  `output_path=None`), no wandb. Its model is loaded from the same files first (not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER_ENV = dict(os.environ)  # before `flows` sets its process defaults: what SAELens runs with
sys.path.insert(0, str(ROOT))

SIZES = {
    "small": {"n_layers": 2, "d_model": 64, "n_ctx": 128, "d_head": 16, "n_heads": 4, "d_mlp": 256, "act_fn": "gelu", "normalization_type": "LN"},
    "large": {"n_layers": 4, "d_model": 256, "n_ctx": 128, "d_head": 32, "n_heads": 8, "d_mlp": 1024, "act_fn": "gelu", "normalization_type": "LN"},
}
DEFAULT_TOKENS = {"small": 600_000, "large": 160_000}
RERUN_TOKENS = 200_000


def bench_config(size: str, tokens: int, device: str = "cpu", compile_sae: bool = False, mode: str = "cached"):
    """The run both systems train: standard SAE x8 on the middle layer's residual stream, batch
    4096, context 64, a mixing buffer of 64 model batches (the least that holds one batch). On a
    GPU, the model and the SAE step run under bf16 autocast."""
    from tasks.config import make_config
    from tasks.preflight import resolve

    model = SIZES[size]
    return resolve(
        make_config(
            {
                "model_name": f"bench-{size}",
                "model_cfg": model,
                "hook_name": f"blocks.{model['n_layers'] // 2}.hook_resid_pre",
                "context_size": 64,
                "training_tokens": tokens,
                "train_batch_size_tokens": 4096,
                "n_batches_in_buffer": 64,
                "expansion_factor": 8,
                "eval_tokens": 4096,
                "sparsity_tokens": 65_536,
                "device": device,
                "autocast": device != "cpu",
                "autocast_lm": device != "cpu",
                "compile_sae": compile_sae,
                "activation_mode": mode,
            }
        )
    )


# --- timers -------------------------------------------------------------------------------------

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
STEP_SECONDS: list[float] = []  # each SAETrainer.step, in order
DEVICE = ["cpu"]
HEAP_ON = [False]  # --heap
READ_IN_LOOP = [True]  # whether saeflow's training read its batches in the loop (not ahead)


class LoopWait:
    """The batches training gets, timed by `timed` where the training loop asks for them: the
    whole read when it reads in the loop, the wait for a batch read ahead otherwise."""

    def __init__(self, provider):
        self.provider = provider

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.provider)


def sync() -> None:
    """Wait for the GPU, so that timers measure work done rather than work queued (on a GPU the
    timed split thus adds one sync per timed call, to both systems alike)."""
    if DEVICE[0].startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(owner, attribute: str, key: str) -> None:
    """Add the time spent in `owner.attribute` (a function or method) to TIMES[key]."""
    real = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        sync()
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            sync()
            TIMES[key] += time.perf_counter() - started
            CALLS[key] += 1
            if key == "sae_step":
                STEP_SECONDS.append(time.perf_counter() - started)

    setattr(owner, attribute, wrapper)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's resident memory every 20 ms, split into anonymous memory and mapped
    files (the memory-mapped activation store's pages count in `ru_maxrss`, but they are page
    cache the kernel can drop), and keeps the peak of each."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            for key, value in rss_now_mb().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.02)


SAMPLER: list[RssSampler] = []  # the worker's sampler, started first


def rss_now_mb() -> dict:
    """This process's resident memory now: anonymous memory and mapped files."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile") if key in status}


HEAP: list[tuple[str, float, float]] = []  # with --heap: (where, MB in use, MB free) of glibc's heap


@functools.cache
def mallinfo2():
    """glibc's `mallinfo2` (the heap's figures over all arenas), callable."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
        _fields_ = [(name, ctypes.c_size_t) for name in names]

    function = ctypes.CDLL("libc.so.6").mallinfo2
    function.restype = MallInfo2
    return function


def note_heap(where: str) -> None:
    """Record glibc's heap now: bytes in use, and bytes free but kept."""
    info = mallinfo2()()
    HEAP.append((where, info.uordblks / 2**20, info.fordblks / 2**20))


def noting_heap(owner, attribute: str, where: str, when: str) -> None:
    """Record the heap (`note_heap`) on entering ("before") or leaving ("after") `owner.attribute`."""
    real = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        if when == "before":
            note_heap(where)
        try:
            return real(*args, **kwargs)
        finally:
            if when == "after":
                note_heap(where)

    setattr(owner, attribute, wrapper)


def heap_report() -> dict:
    """The heap after the fill (saeflow), when training starts, and after the SAE steps (the median
    of the steps from the third on)."""
    report = {}
    for where in ("after_fill", "train_start", "after_step"):
        rows = [(used, free) for at, used, free in HEAP if at == where]
        rows = rows[2:] if where == "after_step" else rows
        if rows:
            report[where] = {"in_use_mb": statistics.median(r[0] for r in rows), "free_mb": statistics.median(r[1] for r in rows)}
    return report


def wait_setting(threads: dict) -> str:
    """How OpenMP threads wait, for the table: the policy, and GNU OpenMP's spin count if set."""
    spin = threads.get("GOMP_SPINCOUNT")
    return (threads["OMP_WAIT_POLICY"] or "default wait") + (f", spin {spin}" if spin else "")


def threads() -> dict:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    }


def matmul_reference(batch: int, d_in: int, d_sae: int, device: str, dtype, repeats: int = 20) -> dict:
    """GFLOP/s of the six float32 matmuls of a standard SAE step at these shapes (encoder and
    decoder forward; the decoder's weight and input gradients; the encoder's weight gradient and,
    because `b_dec` is subtracted from the input, its input gradient), timed here with
    `torch.matmul` (in bf16 where the step runs under autocast)."""
    import torch

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    x, w_enc, f, w_dec, g = randn(batch, d_in), randn(d_in, d_sae), randn(batch, d_sae), randn(d_sae, d_in), randn(batch, d_in)

    def step():
        torch.matmul(x, w_enc)
        torch.matmul(f, w_dec)
        torch.matmul(f.T, g)
        torch.matmul(g, w_dec.T)
        torch.matmul(x.T, f)
        torch.matmul(f, w_enc.T)

    step()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"seconds_per_step": seconds, "gflops": sae_step_flops(batch, d_in, d_sae) / seconds / 1e9}


def sae_step_flops(batch: int, d_in: int, d_sae: int) -> float:
    """Matmul FLOPs of one standard-SAE training step (the rest is elementwise)."""
    return 6 * 2 * batch * d_in * d_sae


def bare_forward(model, contexts, stop_at_layer: int, batch_prompts: int, seconds: float = 3.0) -> dict:
    """Tokens/s of the model alone, stopping at the hooked layer, no hooks: the ceiling of filling."""
    import torch

    device = next(model.parameters()).device
    contexts = contexts.to(device)
    done, started = 0, time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(contexts), batch_prompts):
            model(contexts[start : start + batch_prompts], stop_at_layer=stop_at_layer)
            done += contexts[start : start + batch_prompts].numel()
            if time.perf_counter() - started > seconds:
                break
    sync()
    return {"tokens": done, "tokens_per_s": done / (time.perf_counter() - started)}


def step_report(cfg, run_seconds: float, train_seconds: float) -> dict:
    steps = CALLS["sae_step"]
    # The median step: with compile_sae the first step also compiles (reported on its own).
    step_seconds = statistics.median(STEP_SECONDS) if STEP_SECONDS else 0.0
    import torch

    dtype = torch.bfloat16 if cfg.autocast else getattr(torch, cfg.dtype)
    reference = matmul_reference(cfg.train_batch_size_tokens, cfg.d_in, cfg.sae_width, cfg.device, dtype)
    achieved = sae_step_flops(cfg.train_batch_size_tokens, cfg.d_in, cfg.sae_width) / step_seconds / 1e9
    return {
        "steps": steps,
        "sae_step_seconds": TIMES["sae_step"],
        "sae_step_ms": 1000 * step_seconds,
        "first_sae_step_seconds": STEP_SECONDS[0] if STEP_SECONDS else 0.0,
        "compile_sae": cfg.compile_sae,
        "sae_step_gflops": achieved,
        "matmul_gflops": reference["gflops"],
        "sae_step_share_of_matmul": achieved / reference["gflops"],
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "train_tokens_per_s": steps * cfg.train_batch_size_tokens / train_seconds,
        "sae_step_only_tokens_per_s": cfg.train_batch_size_tokens / step_seconds,
        "train_share_of_step_ceiling": TIMES["sae_step"] / train_seconds,
    }


# --- workers (one measurement each, in a fresh process) ------------------------------------------


def worker_saeflow(cfg, work: Path, base: Path) -> dict:
    import torch
    from prefect import flow
    from sae_lens import SAETrainer

    import tasks.activations
    import tasks.model
    import tasks.tokens
    import tasks.train
    from tasks.activations import fill_activations, store_spec
    from tasks.artifacts import RESULTS_DIRNAME
    from tasks.model import build_model, load_model, model_spec
    from tasks.tokens import open_tokens, pretokenise, tokens_spec
    from tasks.train import train_sae, train_spec

    artifacts = work / "artifacts"
    shutil.copytree(base / "models", artifacts / "models")
    timed(tasks.model, "hooks_activations", "forward")
    timed(tasks.tokens, "_write_contexts", "pretokenise")
    timed(tasks.activations, "_fill", "fill")
    fill = tasks.activations._fill

    def fill_then_note_its_forward(*args, **kwargs):
        try:
            return fill(*args, **kwargs)
        finally:
            TIMES["fill_forward"] = TIMES["forward"]  # what follows is streaming training's

    tasks.activations._fill = fill_then_note_its_forward
    timed(tasks.activations, "_save_shard", "write")  # on the writer thread, beside the forward
    timed(tasks.activations._StoreWriter, "wait", "write_wait")  # the fill waiting for a write
    timed(tasks.activations.ContextBatches, "next_batch", "read_tokens")
    timed(LoopWait, "__next__", "data")
    real_read_ahead = tasks.train.read_ahead

    @contextlib.contextmanager
    def read_ahead_timing_the_loop_s_wait(batches, *args, **kwargs):
        with real_read_ahead(batches, *args, **kwargs) as provider:
            READ_IN_LOOP[0] = provider is batches  # else worker processes or a thread read them ahead
            yield LoopWait(provider)

    tasks.train.read_ahead = read_ahead_timing_the_loop_s_wait
    timed(SAETrainer, "step", "sae_step")
    timed(SAETrainer, "fit", "train")
    if HEAP_ON[0]:
        noting_heap(tasks.activations, "_fill", "after_fill", "after")
        noting_heap(SAETrainer, "fit", "train_start", "before")
        noting_heap(SAETrainer, "step", "after_step", "after")

    @flow(name="saeflow-bench", persist_result=True, result_serializer="json", result_storage=artifacts.resolve() / RESULTS_DIRNAME)
    def fill_and_train(config: dict, artifacts_dir: str) -> dict:
        """The pipeline's stages up to training, composed as flows/pipeline.py composes them."""
        from tasks.config import RunConfig

        cfg = RunConfig(**config)
        model_ref = build_model(model_spec(cfg), artifacts_dir)
        tokens_ref = pretokenise(tokens_spec(cfg, model_ref), model_ref, cfg.model_from_pretrained_kwargs, artifacts_dir)
        store_ref = fill_activations(store_spec(cfg, model_ref, cfg.activation_mode), model_ref, tokens_ref, artifacts_dir)
        run_dir = Path(artifacts_dir) / "runs" / "bench"
        run_dir.mkdir(parents=True, exist_ok=True)  # the run folder `claim_run` makes in the pipeline
        trained = train_sae(train_spec(cfg), store_ref, str(run_dir))
        return {"model": model_ref, "tokens": tokens_ref, "store": store_ref, "trained": trained}

    started = time.perf_counter()
    refs = fill_and_train(config=cfg.model_dump(mode="json"), artifacts_dir=str(artifacts))
    seconds = time.perf_counter() - started
    rss, rss_split = peak_rss_mb(), dict(SAMPLER[0].peak)

    store = Path(refs["store"]["path"])
    store_bytes = sum(p.stat().st_size for p in store.glob("shard-*.safetensors"))
    n_tokens = refs["store"]["n_tokens"]
    raw_bytes = n_tokens * cfg.d_in * torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    model = load_model(refs["model"], cfg.device)
    contexts = torch.tensor(open_tokens(refs["tokens"])["tokens"][:4096])
    stop = int(cfg.hook_name.split(".")[1])
    bare = bare_forward(model, contexts, stop, cfg.store_batch_size_prompts)
    fill_rate = n_tokens / TIMES["fill"]
    train_forward = TIMES["forward"] - TIMES["fill_forward"]  # streaming mode's: inside the loop's wait when it reads in the loop
    return {
        "activation_mode": cfg.activation_mode,
        "end_to_end_seconds": seconds,
        "end_to_end_tokens_per_s": cfg.training_tokens / seconds,
        "peak_rss_mb": rss,
        "peak_rss_split_mb": rss_split,
        "seconds": {
            "pretokenise": TIMES["pretokenise"],
            "fill": TIMES["fill"],
            "model_forward": TIMES["forward"],
            "fill_read_tokens": TIMES["read_tokens"],
            "fill_write_shards": TIMES["write"],
            "fill_write_wait": TIMES["write_wait"],
            "fill_other": TIMES["fill"] - TIMES["fill_forward"] - TIMES["read_tokens"] - TIMES["write_wait"],
            "fill_model_forward": TIMES["fill_forward"],
            "train": TIMES["train"],
            "train_model_forward": train_forward,
            "data_loading": TIMES["data"] - (train_forward if READ_IN_LOOP[0] else 0.0),
            "sae_step": TIMES["sae_step"],
            "train_other": TIMES["train"] - TIMES["data"] - TIMES["sae_step"],
            "rest": seconds - TIMES["pretokenise"] - TIMES["fill"] - TIMES["train"],
        },
        "fill": {
            "tokens": n_tokens,
            "tokens_per_s": fill_rate,
            "bare_forward_tokens_per_s": bare["tokens_per_s"],
            "share_of_bare_forward": fill_rate / bare["tokens_per_s"],
            "bytes_per_token": store_bytes / n_tokens,
            "raw_bytes_per_token": raw_bytes / n_tokens,
            "bytes_over_raw": store_bytes / raw_bytes,
        },
        **step_report(cfg, seconds, TIMES["train"]),
        "threads": threads(),
        **({"heap": heap_report()} if HEAP_ON[0] else {}),
    }


def worker_saelens(cfg, work: Path, base: Path) -> dict:
    import torch
    from sae_lens import LanguageModelSAETrainingRunner, SAETrainer
    from sae_lens.training.activations_store import ActivationsStore
    from transformer_lens import HookedTransformer

    from tasks.artifacts import read_json
    from tasks.data import load_text_dataset
    from tasks.model import load_model
    from tasks.train import runner_config

    model = load_model(read_json(base / "model_ref.json"), cfg.device)
    dataset = load_text_dataset(cfg.dataset_path, streaming=cfg.streaming, seed=cfg.seed)
    runner_cfg = runner_config(cfg)
    runner_cfg.n_checkpoints, runner_cfg.checkpoint_path, runner_cfg.output_path = 0, None, None
    timed(HookedTransformer, "run_with_cache", "forward")
    timed(ActivationsStore, "__next__", "data")
    timed(SAETrainer, "step", "sae_step")
    timed(SAETrainer, "fit", "train")
    if HEAP_ON[0]:
        noting_heap(SAETrainer, "fit", "train_start", "before")
        noting_heap(SAETrainer, "step", "after_step", "after")

    os.chdir(work)  # anything SAELens writes by default lands in the scratch folder
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset)
    setup = time.perf_counter() - started
    runner.run()
    seconds = time.perf_counter() - started
    rss, rss_split = peak_rss_mb(), dict(SAMPLER[0].peak)

    contexts = torch.stack([runner.activations_store.get_batch_tokens() for _ in range(4096 // cfg.store_batch_size_prompts)]).flatten(0, 1)
    stop = int(cfg.hook_name.split(".")[1])
    bare = bare_forward(model, contexts, stop, cfg.store_batch_size_prompts)
    forward_tokens = CALLS["forward"] * cfg.store_batch_size_prompts * cfg.context_size
    return {
        "end_to_end_seconds": seconds,
        "end_to_end_tokens_per_s": cfg.training_tokens / seconds,
        "peak_rss_mb": rss,
        "peak_rss_split_mb": rss_split,
        "seconds": {
            "setup": setup,
            "model_forward": TIMES["forward"],
            "train": TIMES["train"],
            "data_loading": TIMES["data"] - TIMES["forward"],
            "sae_step": TIMES["sae_step"],
            "train_other": TIMES["train"] - TIMES["data"] - TIMES["sae_step"],
            "rest": seconds - setup - TIMES["train"],
        },
        "fill": {
            "tokens": forward_tokens,
            "tokens_per_s": forward_tokens / TIMES["forward"],
            "bare_forward_tokens_per_s": bare["tokens_per_s"],
            "share_of_bare_forward": forward_tokens / TIMES["forward"] / bare["tokens_per_s"],
        },
        **step_report(cfg, seconds, TIMES["train"]),
        "threads": threads(),
        **({"heap": heap_report()} if HEAP_ON[0] else {}),
    }


def worker_rerun(cfg, work: Path, base: Path, repeats: int) -> dict:
    """Wall time of a fully cached re-run of the whole pipeline against an empty Prefect flow,
    alternating, in one process (imports and the server are warm for both)."""
    from prefect import flow

    from flows.pipeline import run_pipeline
    from tasks.preflight import claim_run

    artifacts = work / "artifacts"
    shutil.copytree(base / "models", artifacts / "models")

    @flow(name="empty")
    def empty() -> None:
        return None

    name = claim_run(cfg, artifacts, "bench", new=False)
    started = time.perf_counter()
    run_pipeline(cfg, name, artifacts)
    first = time.perf_counter() - started
    cached, bare = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        run_pipeline(cfg, name, artifacts)
        cached.append(time.perf_counter() - started)
        started = time.perf_counter()
        empty()
        bare.append(time.perf_counter() - started)
    return {"first_run_seconds": first, "cached_rerun_seconds": cached, "empty_flow_seconds": bare, "peak_rss_mb": peak_rss_mb()}


def worker_prepare(cfg, work: Path) -> dict:
    """Build the model once (a Prefect flow of the build-model stage); later workers copy it."""
    from prefect import flow

    from tasks.artifacts import write_json
    from tasks.model import build_model, model_spec

    @flow(name="prepare", result_storage=work.resolve() / "prefect-results")
    def prepare() -> dict:
        return build_model(model_spec(cfg), str(work))

    model_ref = prepare()
    write_json(work / "model_ref.json", model_ref)
    return model_ref


def worker_main(args) -> None:
    SAMPLER.append(RssSampler())
    if args.system != "saelens" or args.saelens_env == "same":
        import flows  # noqa: F401  (saeflow's process defaults, as its command line sets them)
    DEVICE[0] = args.device
    HEAP_ON[0] = args.heap
    cfg = bench_config(args.size, args.tokens, args.device, compile_sae=args.compile_sae and args.system == "saeflow", mode=args.mode)
    work, base = Path(args.work), Path(args.base)
    work.mkdir(parents=True, exist_ok=True)
    if args.system == "prepare":
        result = worker_prepare(cfg, base)
    elif args.system == "saeflow":
        result = worker_saeflow(cfg, work, base)
    elif args.system == "saelens":
        result = worker_saelens(cfg, work, base)
    else:
        result = worker_rerun(cfg, work, base, args.repeats)
    Path(args.result).write_text(json.dumps(result, indent=2))


# --- the orchestrating process -------------------------------------------------------------------


WORKER_FLAGS: list[str] = []  # this invocation's options that every worker takes too (--device, --mode, ...)


def spawn(system: str, size: str, tokens: int, work: Path, base: Path, api_url: str, repeats: int = 0) -> dict:
    result = work / f"{system}.json"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), USER_ENV.get("PYTHONPATH")]))  # packages installed with --target stay found
    env = {**USER_ENV, "PREFECT_API_URL": api_url, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": pythonpath}
    # torch.compile's kernel cache lives in the benchmark's folder: the first compiled run is cold, later ones warm.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(base.parent / "inductor-cache"))
    command = [sys.executable, __file__, "--worker", system, "--size", size, "--tokens", str(tokens)]
    command += ["--work", str(work), "--base", str(base), "--result", str(result), "--repeats", str(repeats), *WORKER_FLAGS]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench worker {system}/{size} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    value = json.loads(result.read_text())
    print(f"  {system:8s} {size:6s} {value.get('end_to_end_tokens_per_s', 0):10,.0f} tokens/s  ({time.perf_counter() - started:.0f} s with start-up)", flush=True)
    return value


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarise(runs: list[dict], path: tuple[str, ...]) -> float:
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value[key]
        values.append(value)
    return median(values)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "sae-lens", "transformer-lens", "prefect")} | {"python": platform.python_version()}


def machine() -> str:
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", nargs="*", default=[], help="training tokens per size, e.g. small=600000 large=160000")
    parser.add_argument("--rerun-tokens", type=int, default=RERUN_TOKENS, help="training tokens of the cached re-run (0: skip it)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "run.json"))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast for the model and the SAE step)")
    parser.add_argument(
        "--saelens-env",
        choices=["same", "default"],
        default="same",
        help="same: SAELens runs with saeflow's process defaults (OpenMP passive wait, threads = usable CPUs); "
        "default: with the environment as it is (OpenMP spin-waits)",
    )
    parser.add_argument(
        "--compile-sae",
        action="store_true",
        help="compile saeflow's SAE training step with torch.compile (compile_sae: true); SAELens's runner stays at its default, uncompiled",
    )
    parser.add_argument(
        "--mode",
        choices=["cached", "streaming"],
        default="cached",
        help="saeflow's activation mode: cached (store the activations, train from them) or streaming (store token ids, "
        "make the activations while training, as SAELens's runner does)",
    )
    parser.add_argument(
        "--heap",
        action="store_true",
        help="also record glibc's heap (mallinfo2: MB in use and MB free but kept) after the fill, when training starts and "
        "after each SAE step, to see where peak RSS comes from (Linux with glibc; adds a little to each step's time)",
    )
    parser.add_argument("--tables", metavar="REPORT", help="print the tables of a report written before (also one stopped part-way) and exit")
    parser.add_argument("--worker", choices=["prepare", "saeflow", "saelens", "rerun"], dest="system", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.system:
        args.tokens = int(args.tokens[0])
        return worker_main(args)
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return

    tokens = dict(DEFAULT_TOKENS) | {k: int(v) for k, v in (item.split("=") for item in args.tokens)}
    WORKER_FLAGS[:] = ["--saelens-env", args.saelens_env, "--device", args.device, "--mode", args.mode] + (["--compile-sae"] if args.compile_sae else []) + (["--heap"] if args.heap else [])
    # The temporary Prefect server of this process: no telemetry (it only contends for its database).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    load_before = os.getloadavg()
    report = {
        "benchmark": "saeflow vs SAELens runner",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "versions": versions(),
        "load_average_before": load_before,
        "repeats": args.repeats,
        "saelens_env": args.saelens_env,
        "compile_sae": args.compile_sae,
        "activation_mode": args.mode,
        "device": args.device,
        "heap": args.heap,
        "sizes": {},
    }
    work = Path(tempfile.mkdtemp(prefix="saeflow-bench-run-"))
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {size: {"saeflow": [], "saelens": []} for size in args.sizes}
    try:
        with prefect_test_harness(server_startup_timeout=180):
            url = PREFECT_API_URL.value()
            bases = {}
            for size in args.sizes:
                bases[size] = work / f"base-{size}"
                spawn("prepare", size, tokens[size], work / f"prepare-{size}", bases[size], url)
            for repeat in range(args.repeats):
                order = ["saeflow", "saelens"] if repeat % 2 == 0 else ["saelens", "saeflow"]
                for size in args.sizes:
                    for system in order:
                        folder = work / f"{size}-{system}-{repeat}"
                        runs[size][system].append(spawn(system, size, tokens[size], folder, bases[size], url))
                        shutil.rmtree(folder, ignore_errors=True)
                        # Written after every run, so that an invocation stopped part-way (a GPU lent for minutes) keeps its pairs.
                        write_report(report, runs, tokens, args.device, started, out, complete=False)
            if args.rerun_tokens:
                size = args.sizes[0]
                report["cached_rerun"] = spawn("rerun", size, args.rerun_tokens, work / "rerun", bases[size], url, repeats=args.repeats)
                report["cached_rerun"] |= {"size": size, "training_tokens": args.rerun_tokens}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(report, runs, tokens, args.device, started, out, complete=True)
    print(tables(report))
    print(f"\n({out})")


def write_report(report: dict, runs: dict, tokens: dict, device: str, started: float, out: Path, complete: bool) -> None:
    """Fill `report` with the pairs run so far and write it to `out` (`complete`: false while
    runs are still to come)."""
    report["load_average_after"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - started
    report["complete"] = complete
    for size, by_system in runs.items():
        pairs = list(zip(by_system["saeflow"], by_system["saelens"]))
        if not pairs:
            continue
        cfg = bench_config(size, tokens[size], device)
        report["sizes"][size] = {
            "model": SIZES[size],
            "hook_name": cfg.hook_name,
            "training_tokens": tokens[size],
            "d_in": cfg.d_in,
            "d_sae": cfg.sae_width,
            "ratios": {
                "end_to_end": [a["end_to_end_tokens_per_s"] / b["end_to_end_tokens_per_s"] for a, b in pairs],
                "peak_rss": [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs],
            },
            "runs": {system: done[: len(pairs)] for system, done in by_system.items()},
        }
    resume = ROOT / "bench" / "results" / "resume_latency.json"
    if resume.exists():
        report["resume_latency"] = {"source": str(resume.relative_to(ROOT)), **json.loads(resume.read_text())}
    out.write_text(json.dumps(report, indent=2))


def tables(report: dict) -> str:
    """The markdown tables of BENCHMARKS.md, from a report."""
    lines = [
        f"{report['date']}; {report['machine']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"load average before {report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f}; "
        f"medians of {report['repeats']} alternating runs each; saeflow's activation mode: {report.get('activation_mode', 'cached')}",
    ]
    if report.get("compile_sae"):
        firsts = {size: [run["first_sae_step_seconds"] for run in result["runs"]["saeflow"]] for size, result in report["sizes"].items()}
        lines.append(
            "saeflow's SAE step compiled (compile_sae: true), SAELens's not; saeflow's first step, which compiles (runs in order; "
            "the first compiles with an empty kernel cache): " + "; ".join(f"{size} {', '.join(f'{s:.1f}' for s in seconds)} s" for size, seconds in firsts.items())
        )
    lines += [
        "",
        "| model | training tokens | system | end-to-end tokens/s | ratio (pairs) | forward s | data s | SAE step s | other train s | SAE step GFLOP/s | matmul GFLOP/s | step / matmul | train / step ceiling | peak RSS MB (peak anon / peak mapped files) | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, result in report["sizes"].items():
        model = result["model"]
        for system in ("saeflow", "saelens"):
            runs = result["runs"][system]
            ratio = result["ratios"]["end_to_end"]
            ratio_text = f"{median(ratio):.2f} ({', '.join(f'{r:.2f}' for r in ratio)})" if system == "saeflow" else ""
            t = runs[0]["threads"]
            lines.append(
                f"| {model['n_layers']}L d{model['d_model']} | {result['training_tokens']:,} | {system} "
                f"| {summarise(runs, ('end_to_end_tokens_per_s',)):,.0f} | {ratio_text} "
                f"| {summarise(runs, ('seconds', 'model_forward')):.1f} | {summarise(runs, ('seconds', 'data_loading')):.1f} "
                f"| {summarise(runs, ('seconds', 'sae_step')):.1f} | {summarise(runs, ('seconds', 'train_other')):.1f} "
                f"| {summarise(runs, ('sae_step_gflops',)):.1f} | {summarise(runs, ('matmul_gflops',)):.1f} "
                f"| {summarise(runs, ('sae_step_share_of_matmul',)):.0%} | {summarise(runs, ('train_share_of_step_ceiling',)):.0%} "
                f"| {summarise(runs, ('peak_rss_mb',)):,.0f} ({summarise(runs, ('peak_rss_split_mb', 'RssAnon')):,.0f} / {summarise(runs, ('peak_rss_split_mb', 'RssFile')):,.0f}) | {t['torch_threads']} ({wait_setting(t)}) |"
            )
    lines += [
        "",
        "| model | system | filling tokens/s | bare forward tokens/s | filling / bare forward | bytes per token | raw bytes per token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, result in report["sizes"].items():
        model = result["model"]
        for system in ("saeflow", "saelens"):
            runs = result["runs"][system]
            store = system == "saeflow"
            token_ids_only = store and report.get("activation_mode") == "streaming"  # no forward while filling
            label = "saeflow (token ids only)" if token_ids_only else system if store else "saelens (forward only)"
            share = "-" if token_ids_only else f"{summarise(runs, ('fill', 'share_of_bare_forward')):.2f}"
            lines.append(
                f"| {model['n_layers']}L d{model['d_model']} | {label} | {summarise(runs, ('fill', 'tokens_per_s')):,.0f} "
                f"| {summarise(runs, ('fill', 'bare_forward_tokens_per_s')):,.0f} | {share} "
                + (f"| {summarise(runs, ('fill', 'bytes_per_token')):,.0f} | {summarise(runs, ('fill', 'raw_bytes_per_token')):,.0f} |" if store else "| - | - |")
            )
    lines += [
        "",
        "Where saeflow's end-to-end time goes (medians, seconds):",
        "",
        "| model | end to end | pretokenise | fill: forward | fill: token reads | fill: shard writes (writer thread) | fill: waiting for writes | fill: other | train: model forward (streaming) | train: data | train: SAE step | train: other | Prefect and the rest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, result in report["sizes"].items():
        model, runs = result["model"], result["runs"]["saeflow"]
        keys = ("pretokenise", "fill_model_forward", "fill_read_tokens", "fill_write_shards", "fill_write_wait", "fill_other", "train_model_forward", "data_loading", "sae_step", "train_other", "rest")
        cells = " | ".join(f"{summarise(runs, ('seconds', key)):.2f}" for key in keys)
        lines.append(f"| {model['n_layers']}L d{model['d_model']} | {summarise(runs, ('end_to_end_seconds',)):.2f} | {cells} |")
    if report.get("heap"):
        lines += [
            "",
            "glibc's heap (mallinfo2, MB in use / MB free but kept; medians):",
            "",
            "| model | system | after the fill | when training starts | after an SAE step |",
            "| --- | --- | --- | --- | --- |",
        ]
        for size, result in report["sizes"].items():
            model = result["model"]
            for system in ("saeflow", "saelens"):
                runs = result["runs"][system]
                cells = []
                for where in ("after_fill", "train_start", "after_step"):
                    known = [run["heap"][where] for run in runs if where in run["heap"]]
                    cells.append(f"{median([h['in_use_mb'] for h in known]):,.0f} / {median([h['free_mb'] for h in known]):,.0f}" if known else "-")
                lines.append(f"| {model['n_layers']}L d{model['d_model']} | {system} | " + " | ".join(cells) + " |")
    if "cached_rerun" in report:
        rerun = report["cached_rerun"]
        lines += [
            "",
            f"Fully cached re-run of the whole pipeline ({rerun['size']}, {rerun['training_tokens']:,} tokens): "
            f"{median(rerun['cached_rerun_seconds']):.2f} s median against {median(rerun['empty_flow_seconds']):.2f} s for an empty "
            f"Prefect flow (runs: {', '.join(f'{s:.2f}' for s in rerun['cached_rerun_seconds'])} / "
            f"{', '.join(f'{s:.2f}' for s in rerun['empty_flow_seconds'])}); the first, uncached run took {rerun['first_run_seconds']:.1f} s.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
