"""The GPU path: `device: cuda` with bf16 autocast trains as the CPU does, and with deterministic
kernels a retried GPU training ends bitwise equal to an uninterrupted one. On `cuda` training
reads a cached store's batches ahead in worker processes and makes a streaming store's on a
thread (`read_ahead`), so these runs check those paths too: the retried run restarts the workers
at the batch it resumes from.

These need a CUDA device, so `pytest` deselects them (`-m "not gpu"` in pyproject.toml);
bench/gpu_check.sh runs them on a GPU machine with `pytest -m gpu`. The deterministic test comes
first, so that CUDA starts after `deterministic: true` has set `CUBLAS_WORKSPACE_CONFIG`."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import start, start_failing_once, tiny_config
from test_resume import assert_bitwise_equal

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = {"device": "cuda", "autocast": True, "autocast_lm": True}


def trained_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(f"{summary['training']['path']}/sae_weights.safetensors")


@pytest.fixture
def deterministic_kernels_reset():
    """`deterministic: true` switches deterministic algorithms on for the whole process."""
    yield
    torch.use_deterministic_algorithms(False)


def test_a_retried_gpu_training_with_deterministic_kernels_ends_bitwise_equal(prefect_server, tmp_path, monkeypatch, deterministic_kernels_reset):
    cfg = tiny_config(training_tokens=32_768, n_checkpoints=4, deterministic=True, **GPU)  # checkpoints after steps 13, 26, 39, 52
    reference = trained_weights(start(cfg, tmp_path, "straight"))

    summary = start_failing_once(cfg, tmp_path, "retried", monkeypatch)
    assert summary["training"]["resumed_from_step"] == 26
    assert_bitwise_equal(trained_weights(summary), reference)


@pytest.mark.parametrize("mode", ["cached", "streaming"])
def test_bf16_training_on_the_gpu_learns_as_on_the_cpu(prefect_server, tmp_path, mode):
    cpu = start(tiny_config(training_tokens=65_536), tmp_path, "cpu")
    gpu = start(tiny_config(training_tokens=65_536, activation_mode=mode, **GPU), tmp_path, f"gpu-{mode}")

    weights = trained_weights(gpu)
    assert all(w.dtype == torch.float32 and w.isfinite().all() for w in weights.values())  # bf16 only inside autocast
    on_cpu, on_gpu = cpu["metrics"]["metrics"], gpu["metrics"]["metrics"]
    assert on_gpu["explained_variance"] == pytest.approx(on_cpu["explained_variance"], abs=0.05)
    assert on_gpu["ce_loss_score"] == pytest.approx(on_cpu["ce_loss_score"], abs=0.05)
    assert on_gpu["l0"] == pytest.approx(on_cpu["l0"], rel=0.25)
    assert gpu["training"]["n_training_tokens"] == cpu["training"]["n_training_tokens"]
