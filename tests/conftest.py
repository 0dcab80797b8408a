"""Shared test setup: offline, CPU, one Prefect server for the whole session, small local models."""

import contextlib
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import flows  # noqa: E402,F401  (process defaults: OMP passive wait, no Prefect telemetry)
import pytest  # noqa: E402

from tasks.config import RunConfig, make_config  # noqa: E402

TINY_MODEL = {
    "n_layers": 2,
    "d_model": 32,
    "n_ctx": 64,
    "d_head": 8,
    "n_heads": 4,
    "d_mlp": 128,
    "act_fn": "gelu",
    "normalization_type": "LN",
}


def tiny_config(**overrides) -> RunConfig:
    """A run on a small locally built model and the generated stories: seconds on a CPU."""
    values = {
        "model_name": "tiny-test",
        "model_cfg": TINY_MODEL,
        "dataset_path": "demo:stories",
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 32,
        "expansion_factor": 4,
        "train_batch_size_tokens": 512,
        "training_tokens": 32_768,
        "n_batches_in_buffer": 16,
        "store_batch_size_prompts": 16,
        "n_checkpoints": 4,
        "prompts": ["Lily went to the park with a red ball .", "The cat was happy because Tom fed it ."],
        "top_k_features": 3,
        "top_k_tokens": 5,
    }
    values.update(overrides)
    return make_config(values)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the session; subprocesses reach it through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        yield url
        os.environ.pop("PREFECT_API_URL", None)


def task_states(flow_state, n_tasks: int | None = None, timeout: float = 30) -> dict[str, str]:
    """Task name -> state name ("Completed", "Cached", ...) for the flow run behind a final state.

    The server records task-run states from events, a moment after the flow has ended: read until
    every task run shown has a final state (and, given `n_tasks`, that many are shown)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
            settled = all(run.state and run.state.is_final() for run in runs) and n_tasks in (None, len(runs))
            if settled or time.monotonic() > deadline:
                return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
            time.sleep(0.2)


def start(cfg, artifacts, run_name=None, new=False, **kwargs):
    """Resolve and claim a run as the CLI does, then run the flow (kwargs go to run_pipeline)."""
    from flows.pipeline import run_pipeline
    from tasks.preflight import claim_run, resolve

    cfg = resolve(cfg)
    name = claim_run(cfg, artifacts, run_name, new)
    return run_pipeline(cfg, name, artifacts, **kwargs)


@pytest.fixture(scope="session")
def finished_run(prefect_server, tmp_path_factory):
    """One finished run of `tiny_config()`, shared by the tests that only read it."""
    from tasks.preflight import resolve

    artifacts = tmp_path_factory.mktemp("finished")
    state = start(tiny_config(), artifacts, return_state=True)
    assert state.is_completed()
    summary = state.result()
    return {"cfg": resolve(tiny_config()), "artifacts": artifacts, "name": summary["run_name"], "state": state, "summary": summary}


def with_random_norms(model):
    """A copy of `model` with random gains and biases in its norms (a trained model's are not 1 and 0)."""
    import copy

    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("ln") or ".ln" in name:
                param.copy_(1 + 0.5 * torch.randn_like(param) if name.endswith(".w") else torch.randn_like(param))
    return model


def folded(model):
    """A copy of `model` as the guide loads it for `W_dec @ W_U`: its layer norms folded and its
    unembedding centred, by TransformerLens."""
    import copy

    copied = copy.deepcopy(model)
    copied.load_and_process_state_dict(model.state_dict(), fold_ln=True, center_writing_weights=False, center_unembed=True, fold_value_biases=False)
    return copied


def start_failing_once(cfg, artifacts, run_name: str, monkeypatch, batch: int = 30) -> dict:
    """Run `cfg` with one retry while training fails once, as an out-of-memory error would, when
    it asks for `batch`, however it reads its batches (in the loop, by worker processes or on a
    thread); the retried run must complete. Returns its summary."""
    import contextlib

    import tasks.train

    real_read_ahead, failed = tasks.train.read_ahead, []

    @contextlib.contextmanager
    def failing_once(batches, *args, **kwargs):
        first = batches.next_batch
        with real_read_ahead(batches, *args, **kwargs) as provider:

            def asked():
                for number, given in enumerate(provider, first):
                    if number == batch and not failed:
                        failed.append(True)
                        raise RuntimeError("CUDA out of memory (simulated)")
                    yield given

            yield asked()

    monkeypatch.setattr(tasks.train, "read_ahead", failing_once)
    state = start(cfg.model_copy(update={"retries": 1, "retry_delay_seconds": 0}), artifacts, run_name, return_state=True)
    assert state.is_completed() and failed
    return state.result()


@contextlib.contextmanager
def held_by_another_thread(lock):
    """The exclusive lock at the path `lock` (or the context manager `lock()` makes) held by
    another thread, as by another process (flock; a thread may take again a lock it holds itself),
    until `release` is set or the block ends; yields (that thread, release)."""
    from tasks.artifacts import exclusive_lock

    held, release = threading.Event(), threading.Event()

    def holder():
        with exclusive_lock(lock, "activation store S", wait=False) if isinstance(lock, Path) else lock():
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    try:
        yield thread, release
    finally:
        release.set()
        thread.join()
