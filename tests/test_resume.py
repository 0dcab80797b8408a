"""A run killed with SIGKILL during training resumes from its checkpoint and ends where an
uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from flows.pipeline import run_pipeline
from tasks.preflight import claim_run, resolve

# Large SAE, small store: training takes several seconds, so there is time to kill it mid-way.
SLOW_TRAINING = {"expansion_factor": 64, "train_batch_size_tokens": 4096, "training_tokens": 131_072, "n_batches_in_buffer": 128, "n_checkpoints": 16}


def saeflow(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", *args],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )


def wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended before it could be killed:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def test_sigkilled_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(prefect_server, tmp_path: Path):
    artifacts = tmp_path / "artifacts"
    cfg = resolve(tiny_config(**SLOW_TRAINING))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    checkpoints = artifacts / "runs" / "killed" / "checkpoints"

    first = saeflow(str(config), "--artifacts-dir", str(artifacts), "--run-name", "killed")
    wait_for(lambda: any(checkpoints.glob("step-*")), 300, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (artifacts / "runs" / "killed" / "trained").exists()

    second = saeflow(str(config), "--artifacts-dir", str(artifacts), "--run-name", "killed")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert "Resuming training from step-" in output
    summary = yaml.safe_load((artifacts / "runs" / "killed" / "summary.json").read_text())
    assert summary["training"]["resumed_from_step"] > 0
    assert summary["training"]["n_training_steps"] == cfg.training_tokens // cfg.train_batch_size_tokens

    name = claim_run(cfg, artifacts, "straight", new=False)
    straight = run_pipeline(cfg, name, artifacts)
    killed_weights = load_file(Path(summary["training"]["path"]) / "sae_weights.safetensors")
    straight_weights = load_file(Path(straight["training"]["path"]) / "sae_weights.safetensors")
    assert killed_weights.keys() == straight_weights.keys()
    for key in killed_weights:
        assert (killed_weights[key] == straight_weights[key]).all(), f"{key} differs after resume"
