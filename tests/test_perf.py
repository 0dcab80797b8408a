"""The speed-ups change nothing that is computed: each fast path gives, bit for bit on CPU, what
the plain one gives (the forward that stops at the hook, the sorted store reads, the batch read
ahead on a background thread), the thread defaults follow the machine and yield to the
environment, and the GPU's deferred NaN check still keeps a non-finite loss out of every
checkpoint."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL, tiny_config
from test_resume import FAULTS, inject_nan_at_step, start

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(**TINY_MODEL, d_vocab=50, seed=0)).eval()


def test_the_forward_stops_at_the_hook_and_reads_what_run_with_cache_reads(model):
    from tasks.model import hooks_activations

    tokens = torch.randint(0, 50, (4, 16))
    ran = []
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda *args: ran.append("blocks.1.attn"))
    try:
        for hooks, block_1_attention_starts in (
            ([("blocks.1.hook_resid_pre", None)], False),  # SAELens would run block 1 for this one
            ([("blocks.0.hook_resid_post", None)], False),
            ([("blocks.1.attn.hook_z", 2)], True),
            ([("blocks.1.attn.hook_z", None)], True),
            ([("blocks.0.mlp.hook_post", None), ("hook_embed", None), ("blocks.1.hook_resid_post", None)], True),
        ):
            _, cache = model.run_with_cache(tokens, names_filter=[name for name, _ in hooks])
            expected = [cache[name][:, :, head] if head is not None else cache[name].flatten(2) if cache[name].ndim > 3 else cache[name] for name, head in hooks]
            ran.clear()
            for got, want in zip(hooks_activations(model, tokens, hooks), expected, strict=True):
                assert torch.equal(got, want)
                assert not got.requires_grad
            assert bool(ran) == block_1_attention_starts
    finally:
        handle.remove()
    assert not model.hook_dict["blocks.1.hook_resid_pre"].fwd_hooks  # no hook left behind
    with pytest.raises(ValueError, match=r"hooks \['blocks.0.attn.hook_result'\] did not run"):  # only with use_attn_result
        hooks_activations(model, tokens, [("blocks.0.attn.hook_result", None)])


@pytest.mark.parametrize("hook", [("blocks.1.hook_resid_pre", None), ("blocks.1.attn.hook_z", 2)])
def test_streamed_chunks_are_written_in_place_as_the_shuffled_activations(model, hook):
    """A streaming chunk's rows are written straight to their shuffled places; the batches are
    those of making the chunk's activations and then shuffling them, bit for bit."""
    from tasks.streaming import StreamedBatches, activations_for

    spec = {"device": "cpu", "dtype": "float32", "autocast_lm": False, "store_batch_size_prompts": 3, "hook_name": hook[0], "hook_head_index": hook[1]}
    spec["d_in"] = 8 if hook[1] is not None else 32  # d_head, d_model
    contexts = torch.randint(0, 50, (10, 8), generator=torch.Generator().manual_seed(1))
    batches = StreamedBatches(model, contexts, spec, batch_size=12, seed=5, chunk_contexts=4)
    served = torch.cat([next(batches) for _ in range(10)])  # 120 rows: a whole epoch of 3 chunks (4, 4, 2 contexts) and the next's first

    expected = []
    for epoch in (0, 1):
        order = torch.randperm(10, generator=batches._generator(epoch))
        for chunk, first in enumerate(range(0, 10, 4)):
            acts = activations_for(model, contexts[order[first : first + 4]], spec)
            expected.append(acts[torch.randperm(len(acts), generator=batches._generator(epoch, chunk))])
    assert torch.equal(served, torch.cat(expected)[:120])


def _write_store(folder: Path, acts: torch.Tensor, shard_rows: list[int]) -> dict:
    """A complete cached store of `acts` in shards of `shard_rows` rows, and its reference."""
    shards, start = [], 0
    for i, rows in enumerate(shard_rows):
        save_file({"tokens": torch.zeros(rows, dtype=torch.int64), "activations": acts[start : start + rows]}, folder / f"s{i}.safetensors")
        shards.append({"file": f"s{i}.safetensors", "start": start, "stop": start + rows})
        start += rows
    (folder / "manifest.json").write_text(json.dumps({"complete": True, "shards": shards}))
    return {"path": str(folder), "dtype": str(acts.dtype).removeprefix("torch."), "n_tokens": start}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_rows_read_in_sorted_order_give_the_rows_asked_for(tmp_path, dtype):
    from tasks.activations import ShuffledBatches, StoreRows

    acts = torch.randn(1000, 8).to(dtype)
    store = StoreRows(_write_store(tmp_path, acts, [300, 1, 499, 200]))  # uneven shards, one of a single row

    generator = torch.Generator().manual_seed(0)
    for rows in (torch.randint(0, 1000, (333,), generator=generator), torch.tensor([999, 0, 300, 300, 299, 301]), torch.arange(1000)):
        assert torch.equal(store[rows], acts[rows])
    # Batches that cross an epoch boundary (two permutations) are the ones the in-memory store gives.
    from_disk, in_memory = ShuffledBatches(store, 384, seed=3), ShuffledBatches(acts, 384, seed=3)
    for _ in range(6):
        assert torch.equal(next(from_disk), next(in_memory))


def test_a_store_of_more_shards_than_the_open_files_soft_limit_is_read(tmp_path):
    """Each mapped shard keeps a file open: with a soft limit below the shard count (1,024 is
    common, a 460 GB store has 862 shards) the limit is raised to the hard one; with a hard limit
    too low the error says how to raise it."""
    acts = torch.randn(300, 4)
    ref = _write_store(tmp_path, acts, [1] * 300)
    torch.save(acts, tmp_path / "acts.pt")
    code = f"""
import resource, torch
from tasks.activations import StoreRows
ref, acts = {ref!r}, torch.load({str(tmp_path / "acts.pt")!r})
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
assert torch.equal(StoreRows(ref)[torch.arange(300)], acts)
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
try:
    StoreRows(ref)
except RuntimeError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "True"
    assert out[1].endswith("has 300 shards, each kept open while training reads it, and this process may not open more files: raise the open-files limit (`ulimit -n`, or LimitNOFILE / your scheduler's setting) to at least 856")


def test_store_rows_let_go_of_the_store_pages_they_read(tmp_path, monkeypatch):
    """Random batches leave none of the store mapped in the process: the store's resident pages
    (as /proc/self/smaps counts them, and so RSS) are zero after each batch, and stay a small
    part of the store while one is read (those of the rows read since the last `RELEASE_ROWS`).
    The rows are the ones asked for."""
    from tasks.activations import ShuffledBatches, StoreRows

    acts = torch.randn(65536, 64)  # 16 MiB in 4 shards
    store_ref = _write_store(tmp_path, acts, [16384] * 4)

    def store_resident_kb() -> int:
        total, in_store = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                in_store = fields[-1].startswith(str(tmp_path))
            elif in_store and fields[0] == "Rss:":
                total += int(fields[1])
        return total

    store = StoreRows(store_ref)
    assert store.parts[0][::1024].sum().isfinite() and store_resident_kb() > 0  # reading through the map shows
    store[torch.arange(10)]
    assert store_resident_kb() == 0

    # 32 rows of 256 bytes map at most 32 of the kernel's 64 KB fault-around windows: 2 MiB.
    monkeypatch.setattr(StoreRows, "RELEASE_ROWS", 32)
    resident_before_reads, reads = [], itertools.count()
    index_select = torch.index_select

    def noting_index_select(*args, **kwargs):
        if next(reads) % 4 == 0:  # reading smaps takes about 50 ms: every 4th read is enough to see growth
            resident_before_reads.append(store_resident_kb())
        return index_select(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", noting_index_select)
    from_disk, in_memory = ShuffledBatches(store, 4096, seed=0), ShuffledBatches(acts, 4096, seed=0)
    resident_after_batches = []
    for _ in range(4):
        assert torch.equal(next(from_disk), next(in_memory))
        resident_after_batches.append(store_resident_kb())
    assert len(resident_before_reads) >= 4 * 4096 // 32 // 4
    assert max(resident_before_reads) <= 4096 and max(resident_after_batches) == 0


def test_read_ahead_reads_the_next_batch_on_another_thread_and_changes_nothing():
    import threading

    from tasks.activations import ReadAhead, ShuffledBatches, read_ahead

    data = torch.randn(40, 3)
    plain = ShuffledBatches(data, 4, seed=3)
    expected = [next(plain) for _ in range(12)]  # across an epoch boundary
    with ReadAhead(ShuffledBatches(data, 4, seed=3)) as ahead:
        assert all(torch.equal(next(ahead), batch) for batch in expected)

    asked, second_asked = [], threading.Event()

    def batches():
        for i in range(3):
            asked.append(threading.current_thread().name)
            if i == 1:
                second_asked.set()
            yield i
        raise RuntimeError("the store's disk went away")

    with ReadAhead(batches()) as ahead:
        assert next(ahead) == 0
        assert second_asked.wait(10)  # batch 1 is being made before it is asked for
        assert next(ahead) == 1 and next(ahead) == 2
        with pytest.raises(RuntimeError, match="disk went away"):  # raised in its place, not earlier
            next(ahead)
    assert all(name.startswith("saeflow-read-ahead") for name in asked)
    assert not any(thread.name.startswith("saeflow-read-ahead") for thread in threading.enumerate())

    # With a limit (the batches training has left), none is made past the last: in streaming
    # mode the next could start a whole chunk of model passes.
    made = []
    counted = (made.append(i) or i for i in range(100))
    with ReadAhead(counted, limit=3) as ahead:
        assert list(ahead) == [0, 1, 2] and made == [0, 1, 2]

    # Training reads ahead on accelerators only; on the CPU it reads in the training loop.
    stream = iter(range(5))
    with read_ahead(stream, "cpu") as provider:
        assert provider is stream
    with read_ahead(stream, "cuda") as provider:
        assert isinstance(provider, ReadAhead) and next(provider) == 0


def test_worker_processes_read_a_cached_store_s_batches_in_order_and_stop_with_training(tmp_path, monkeypatch):
    """On an accelerator a cached store's batches are read by worker processes: from the batch
    training resumes at, across epoch boundaries, they are the ones the training loop would
    read itself. The workers are gone when training stops, and an error reading a batch
    reaches training when it asks for that batch."""
    import multiprocessing

    import flows
    import tasks.activations
    from tasks.activations import ReadAhead, ShuffledBatches, StoreRows, WorkerReads, read_ahead

    acts = torch.randn(1000, 8)
    store = _write_store(tmp_path, acts, [300, 1, 499, 200])
    from_workers = ShuffledBatches(StoreRows(store), 384, seed=3)
    from_workers.next_batch = 2
    in_loop = ShuffledBatches(acts, 384, seed=3)
    in_loop.next_batch = 2
    with WorkerReads(from_workers, workers=2, limit=10) as batches:
        assert all(torch.equal(next(batches), next(in_loop)) for _ in range(10))  # 3,840 rows: 4 epochs
        assert len(multiprocessing.active_children()) == 2
        with pytest.raises(StopIteration):  # none read past the limit
            next(batches)
    assert multiprocessing.active_children() == []
    # In the SAE's dtype where the store's differs (store_dtype): the same rows, converted.
    with WorkerReads(ShuffledBatches(StoreRows(store), 384, seed=3, dtype=torch.float64), workers=2) as batches:
        in_loop = ShuffledBatches(acts, 384, seed=3, dtype=torch.float64)
        for _ in range(3):
            batch = next(batches)
            assert batch.dtype == torch.float64 and torch.equal(batch, next(in_loop))
    assert torch.equal(next(in_loop), next(ShuffledBatches(acts, 384, seed=3, start_batch=3)).double())

    # What training on an accelerator gets: workers for a cached store, a thread for anything
    # else; `read_workers` sets how many, 0 reading in the training loop, on any device.
    with read_ahead(ShuffledBatches(StoreRows(store), 384, seed=3), "cuda") as provider:
        assert isinstance(provider, WorkerReads) and len(multiprocessing.active_children()) == min(4, flows.usable_cpus())
    monkeypatch.setattr(flows, "usable_cpus", lambda: 1)  # a container's CPU quota, under its affinity
    with read_ahead(ShuffledBatches(StoreRows(store), 384, seed=3), "cuda") as provider:
        assert isinstance(provider, WorkerReads) and len(multiprocessing.active_children()) == 1
    monkeypatch.undo()
    with read_ahead(ShuffledBatches(acts, 384, seed=3), "cuda") as provider:
        assert isinstance(provider, ReadAhead)
    for device, workers in (("cuda", 0), ("cpu", None)):
        cached = ShuffledBatches(StoreRows(store), 384, seed=3)
        with read_ahead(cached, device, workers) as provider:
            assert provider is cached
    with read_ahead(ShuffledBatches(StoreRows(store), 384, seed=3), "cpu", 3) as provider:
        assert isinstance(provider, WorkerReads) and len(multiprocessing.active_children()) == 3
    assert multiprocessing.active_children() == []

    # Shared memory to hand the batches over: 2 workers hold 2 batches of 384 x 8 x 4 bytes
    # each, and twice that must be free. With a byte less (as in Docker's 64 MB default, at real
    # sizes) training reads them in its loop, and the run's log says how to give the container more.
    warned = []
    logger = type("Logger", (), {"warning": lambda self, message: warned.append(message), "info": lambda self, message: None})()
    for free, workers_started in ((2 * 2 * 2 * 384 * 8 * 4, True), (2 * 2 * 2 * 384 * 8 * 4 - 1, False)):
        monkeypatch.setattr(tasks.activations, "shared_memory_free", lambda: free)
        cached = ShuffledBatches(StoreRows(store), 384, seed=3)
        with read_ahead(cached, "cuda", 2, logger) as provider:
            assert isinstance(provider, WorkerReads) is workers_started and (provider is cached) is not workers_started
            assert torch.equal(next(provider).cpu(), next(ShuffledBatches(acts, 384, seed=3)))
    assert len(warned) == 1 and "/dev/shm has 0 MiB free" in warned[0] and "--shm-size" in warned[0] and "read_workers" in warned[0]

    # A daemon process (a Dask worker started by its nanny) may not start processes: it reads
    # in its training loop, saying so, where starting the workers raised an AssertionError.
    monkeypatch.undo()
    answers = multiprocessing.get_context("fork").Queue()

    def train_in_a_daemon():
        torch.set_num_threads(1)  # OpenMP's threads do not survive a fork (as in DataLoader's workers)
        said = []
        logger = type("Logger", (), {"warning": lambda self, message: said.append(message), "info": lambda self, message: None})()
        cached = ShuffledBatches(StoreRows(store), 384, seed=3)
        try:
            with read_ahead(cached, "cuda", 2, logger) as provider:
                answers.put((provider is cached, torch.equal(next(provider), next(ShuffledBatches(acts, 384, seed=3))), said))
        except BaseException as error:
            answers.put((False, False, [repr(error)]))

    daemon = multiprocessing.get_context("fork").Process(target=train_in_a_daemon, daemon=True)
    daemon.start()
    read_in_loop, same_batch, said = answers.get(timeout=60)
    daemon.join(60)
    assert read_in_loop and same_batch and daemon.exitcode == 0
    assert len(said) == 1 and "daemon process" in said[0] and "distributed.worker.daemon: false" in said[0]

    opened_here = ShuffledBatches(StoreRows(store), 384, seed=3)
    (tmp_path / "s2.safetensors").unlink()  # the workers open the store when they first read
    with WorkerReads(opened_here, workers=2) as batches:
        with pytest.raises(FileNotFoundError, match="s2.safetensors"):
            next(batches)


def test_context_batches_are_the_batches_sae_lens_reads_row_by_row(model):
    """The fill's bulk reads of the pretokenised contexts give SAELens's `get_batch_tokens`
    batches, down to its end of data: the incomplete batch dropped, the data started again."""
    from datasets import Dataset, Features, Sequence, Value

    from tasks.activations import ContextBatches, _activations_store

    generator = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, 50, (10, 16), generator=generator)
    dataset = Dataset.from_dict({"tokens": contexts.tolist()}, features=Features({"tokens": Sequence(Value("int32"))}))
    spec = {"streaming": False, "hook_name": "blocks.0.hook_resid_post", "hook_head_index": None, "context_size": 16, "d_in": 32,
            "n_tokens": 160, "store_batch_size_prompts": 3, "prepend_bos": True, "device": "cpu", "dtype": "float32", "autocast_lm": False}
    sae_lens_store, bulk = _activations_store(model, dataset, spec), ContextBatches(dataset, 3)
    for expected_rows in ([0, 1, 2], [3, 4, 5], [6, 7, 8], None, [0, 1, 2], [3, 4, 5]):
        if expected_rows is None:  # one context left: both refuse a short batch and start again
            for reader in (sae_lens_store.get_batch_tokens, bulk.next_batch):
                with pytest.raises(StopIteration):
                    reader(raise_at_epoch_end=True)
            continue
        theirs, ours = sae_lens_store.get_batch_tokens(raise_at_epoch_end=True), bulk.next_batch(raise_at_epoch_end=True)
        assert ours.dtype == theirs.dtype == torch.long
        assert torch.equal(ours, theirs) and torch.equal(ours, contexts[expected_rows])
    assert torch.equal(bulk.next_batch(), contexts[[6, 7, 8]]) and torch.equal(bulk.next_batch(), contexts[[0, 1, 2]])  # wraps silently


def test_usable_cpus_follow_the_affinity_and_the_container_quota(tmp_path):
    from flows import usable_cpus

    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{100000 * affinity + 1} 100000\n")  # a quota above the affinity does not add CPUs
    assert usable_cpus(cpu_max) == affinity
    assert usable_cpus(tmp_path / "missing") == affinity


def test_torch_gets_the_thread_settings_of_the_machine_unless_the_environment_says_otherwise():
    from flows import usable_cpus

    code = "import os, flows, torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    default = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert default.stdout.split() == [str(usable_cpus()), "PASSIVE", "1000"]
    chosen_env = {**env, "OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "0"}
    chosen = subprocess.run([sys.executable, "-c", code], env=chosen_env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert chosen.stdout.split() == ["1", "PASSIVE", "0"]


@pytest.mark.parametrize(
    "training_tokens, nan_step, stopped_at, checkpoints, log_steps",
    [
        # 64 steps, checkpoints after 13, 26, 39, 52; log rows every 50
        (32_768, 45, 50, [13, 26, 39], []),  # the only row due (step 50) is refused, not written with NaN
        # 65 steps (the batch does not divide the tokens): the last one is checked too
        (33_024, 65, 65, [26, 39, 52], [50]),  # the newest 3 (keep_checkpoints)
    ],
)
def test_a_deferred_nan_check_keeps_the_nan_out_of_every_checkpoint(
    prefect_server, tmp_path, monkeypatch, training_tokens, nan_step, stopped_at, checkpoints, log_steps
):
    """The GPU's check (at log rows, checkpoints and the end, not every step), run here on CPU."""
    import tasks.train
    from tasks.preflight import resolve

    monkeypatch.setattr(tasks.train, "nan_check_deferred", lambda device: True)
    inject_nan_at_step(monkeypatch, nan_step)
    cfg = resolve(tiny_config(**{**FAULTS, "training_tokens": training_tokens}))
    state = start(cfg, tmp_path, "deferred", return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"loss is nan at step {nan_step}; training stopped at step {stopped_at}, before anything trained since then was written" in message
    run = tmp_path / "runs" / "deferred"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{n:09d}" for n in checkpoints]
    newest = run / "checkpoints" / f"step-{checkpoints[-1]:09d}" / "sae_weights.safetensors"
    assert all(torch.isfinite(t).all() for t in load_file(newest).values())
    assert not (run / "trained").exists()
    log = run / "train_log.jsonl"
    rows = log.read_text().splitlines() if log.exists() else []
    assert [json.loads(row)["step"] for row in rows] == log_steps


def test_the_deferred_nan_check_costs_one_copy_per_step_and_names_the_first_non_finite_loss():
    """The GPU step is launch-bound, so recording a loss for the deferred check issues one
    operation that computes (a copy into the buffer) and no host sync; the check names the
    first non-finite loss, and a full buffer is checked before it takes the next."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tasks.train import NonFiniteGuard, NonFiniteLoss

    guard = NonFiniteGuard()
    guard.record(torch.tensor(1.0), 1)
    dispatched = []

    class Noting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dispatched.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    loss = torch.tensor(2.0)
    with Noting():
        guard.record(loss, 2)
    assert [op for op in dispatched if op not in ("select", "detach", "alias")] == ["copy_"]

    guard.check(2)  # all finite
    for step, loss in [(3, 1.0), (4, float("inf")), (5, float("nan"))]:
        guard.record(torch.tensor(loss), step)
    with pytest.raises(NonFiniteLoss, match="loss is inf at step 4; training stopped at step 5"):
        guard.check(5)

    guard = NonFiniteGuard()
    guard.CAPACITY = 4
    for step in range(1, 9):  # checked when full, before steps 5 and 9
        guard.record(torch.tensor(0.5), step)
    for step, loss in [(9, 1.0), (10, float("nan")), (11, 1.0), (12, 1.0)]:
        guard.record(torch.tensor(loss), step)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 10; training stopped at step 12"):
        guard.record(torch.tensor(1.0), 13)


@pytest.mark.parametrize(
    "architecture",
    [{}, {"architecture": "topk", "k": 8}, {"architecture": "batchtopk", "k": 8}, {"architecture": "jumprelu", "l0_coefficient": 0.5},
     {"architecture": "gated", "l1_coefficient": 0.5}, {"architecture": "matryoshka", "k": 8, "matryoshka_widths": [32, 64, 128]}],
    ids=lambda a: a.get("architecture", "standard"),
)
def test_compile_sae_trains_like_the_uncompiled_step(architecture):
    """torch.compile (off by default) compiles every architecture's training step, and matches
    eager mode to float32 rounding, not bit for bit."""
    from tasks.preflight import resolve
    from tasks.train import _make_trainer, new_training_sae

    assert resolve(tiny_config(**architecture)).compile_sae is False
    weights = {}
    for compiled in (False, True):
        cfg = resolve(tiny_config(**architecture, compile_sae=compiled))
        batches = [torch.randn(512, cfg.d_in, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        sae, runner_cfg = new_training_sae(cfg)
        assert hasattr(sae.training_forward_pass, "_torchdynamo_orig_callable") == compiled
        trainer = _make_trainer(sae, runner_cfg, lambda *args: None)
        for batch in batches:
            trainer.step(batch)
        weights[compiled] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    for key, eager in weights[False].items():
        torch.testing.assert_close(weights[True][key], eager, atol=1e-5, rtol=1e-4)


def test_a_numbered_cuda_device_becomes_the_current_one_of_the_thread_that_uses_it(monkeypatch):
    """Pinned memory and new CUDA contexts go to the current device: with `cuda:1` that must be
    GPU 1, in the thread of each stage (sweep members are threads), or GPU 0 gets a context too."""
    import threading

    from tasks.model import select_cuda_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append((torch.device(device), threading.current_thread().name)))
    member = threading.Thread(target=select_cuda_device, args=("cuda:1",), name="member")
    member.start()
    member.join()
    for device in ("cuda", "cpu"):  # `cuda` is GPU 0, also in a thread that used another before
        select_cuda_device(device)
    assert chosen == [(torch.device("cuda:1"), "member"), (torch.device("cuda:0"), "MainThread")]


def test_progress_bars_are_updated_at_most_every_few_seconds_and_always_at_the_end(monkeypatch):
    """Each update is a call to the Prefect API that training waits for: at every log row it would
    cost a GPU's short steps a good share of their time."""
    import prefect.artifacts

    from tasks.artifacts import ProgressArtifact

    sent = []
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda percent, description: sent.append(("new", percent)) or "id")
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda artifact_id, percent: sent.append((artifact_id, percent)))
    progress = ProgressArtifact(10.0, "Training SAE")
    for percent in (20.0, 30.0):
        progress.update(percent)
    progress.update(100.0, final=True)
    assert sent == [("new", 10.0), ("id", 100.0)]
    monkeypatch.setattr(ProgressArtifact, "MIN_SECONDS", 0.0)
    progress.update(40.0)
    assert sent[-1] == ("id", 40.0)
