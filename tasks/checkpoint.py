"""Training checkpoints: complete, atomic and verifiable.

A checkpoint folder `step-NNNNNNNNN/` holds everything that decides the rest of the training:

- `sae_weights.safetensors`, `cfg.json`: the SAE (SAELens `save_model`, training format);
- `trainer_state.safetensors` + `trainer_state.json`: optimizer, LR and coefficient schedulers,
  counters, feature-firing and dead-feature statistics, and the RNG states (torch CPU and the
  training GPU's, numpy, python), tensors in safetensors and the rest in JSON (no pickle, no `torch.load`);
- `activation_scaler.json`: the normalisation state (SAELens's own format);
- `sparsity.safetensors`: log10 feature firing frequency over the current window, for people;
- `manifest.json`: the step, the data position, the run that wrote it and the sha256 of every file.

It is written into a temporary folder, fsynced and renamed into place, so a crash leaves either
the whole checkpoint or none of it. Loading takes the newest folder whose checksums verify.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tasks.artifacts import atomic_dir, exclusive_lock, read_json, set_aside, verify_manifest, whole_safetensors, write_json, write_manifest
from tasks.config import holding_torch_globals

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
SCALER = "activation_scaler.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous ones are untouched."""


class NonFiniteWeights(ValueError):
    """The SAE's weights hold NaN or inf at a checkpoint, so none is written; a retry from the
    previous checkpoint would end the same way."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `value`, with its tensors moved into `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _rng_state(device: str) -> dict[str, Any]:
    """The RNG states; on a GPU only the training device's, so that a run resumes on a machine
    with fewer GPUs visible (a requeued job)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if torch.device(device).type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "rest": [numpy_state[0], *numpy_state[2:]]},
        "python": random.getstate(),
    }


@holding_torch_globals
def _set_rng_state(state: dict[str, Any], device: str) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.device(device).type == "cuda":
        # Checkpoints written before 2026-11-30 hold the state of every visible GPU, in order.
        index = torch.device(device).index or 0
        torch.cuda.set_rng_state(cuda[index] if index < len(cuda) else cuda[0], device)
    name, *rest = state["numpy"]["rest"]
    np.random.set_state((name, state["numpy"]["keys"].numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def trainer_state(trainer) -> dict[str, Any]:
    """Everything in a SAELens `SAETrainer` that the remaining steps depend on, except the SAE."""
    return {
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "coefficient_schedulers": {n: s.state_dict() for n, s in trainer.coefficient_schedulers.items()},
        "n_training_samples": trainer.n_training_samples,
        "n_training_steps": trainer.n_training_steps,
        "act_freq_scores": trainer.act_freq_scores,
        "n_forward_passes_since_fired": trainer.n_forward_passes_since_fired,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "started_fine_tuning": trainer.started_fine_tuning,
        "rng": _rng_state(trainer.cfg.device),
    }


# In the run's folder: the newest checkpoint written, so that a checkpoint folder that went missing
# (moved with a folder, on a disk not mounted) is told from one that was never written.
LAST_CHECKPOINT_FILE = "last_checkpoint.json"


def missing_checkpoints(checkpoint_path: str | None, run_folder: Path) -> str | None:
    """Why a run's training would start again from step 0 though it wrote checkpoints (its
    checkpoint folder is gone), with what to do; None when it would not."""
    root = checkpoint_root(checkpoint_path, run_folder)
    marker = run_folder / LAST_CHECKPOINT_FILE
    if any(root.glob("step-*")) or not marker.is_file() or verify_manifest(run_folder / "trained") is not None:
        return None
    on_purpose = f"to train from step 0 on purpose, delete {marker}"
    try:
        last = Path(read_json(marker)["path"])
    except (OSError, ValueError, KeyError, TypeError):  # cut short by a crash of the machine
        last = None
    if last is not None and last.parent.resolve() != root.resolve() and any(last.parent.glob("step-*")):  # checkpoint_path changed since
        if last.parent.resolve() == (run_folder / "checkpoints").resolve():
            back = "leave checkpoint_path out (its default is where they are), or "
        elif last.parent.name == run_folder.name:
            back = f"set checkpoint_path back to {last.parent.parent}, or "
        else:
            back = ""
        return (
            f"run '{run_folder.name}' has its checkpoints in {last.parent}, but training would look for them in {root} "
            f"(and start again from step 0): {back}move them into {root}; {on_purpose}"
        )
    if root.exists():  # its checkpoints set aside as broken, or deleted on purpose: training starts again, with a warning
        return None
    return (
        f"run '{run_folder.name}' wrote checkpoints (the last: {last or f'unknown, {marker} is unreadable'}), but its checkpoint "
        f"folder {root} does not exist now (moved, deleted, or on a disk that is not mounted): training would start again "
        f"from step 0. If they moved, give their place: --set checkpoint_path=<the folder holding {root.name}/>; {on_purpose}"
    )


def checkpoint_root(checkpoint_path: str | None, run_folder: Path) -> Path:
    """Where a run's checkpoints go: `<checkpoint_path>/<run name>`, or `<run>/checkpoints`."""
    return Path(checkpoint_path) / run_folder.name if checkpoint_path else run_folder / "checkpoints"


def checkpoint_folder_lock(checkpoint_path: str | None, run_folder: Path):
    """Hold the lock of a run's checkpoint folder where it lies outside the run's folder
    (`checkpoint_path`, whose lock covers the rest): a run of the same name in another artifacts
    folder may share it. Raises Busy if another process holds it."""
    root = checkpoint_root(checkpoint_path, run_folder)
    if not checkpoint_path or root.resolve() == Path(run_folder).resolve():  # the run folder itself (checkpoint_path: <artifacts>/runs)
        return contextlib.nullcontext()
    return exclusive_lock(
        root / ".lock", f"checkpoint folder {root}", wait=False,
        hint="a run of this name in another artifacts folder trains into it (they share checkpoint_path); give this run "
        "a checkpoint_path of its own, or another --run-name",
    )


def run_owner(cfg, run_name: str) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it: its name and the config fields that
    change the result."""
    return {"run": run_name, "result_fields": cfg.result_fields()}


def checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder `step-<n>`; None for another name."""
    match = re.fullmatch(r"step-([0-9]+)", folder.name)
    return int(match[1]) if match else None


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders in `root` (`step-<n>`), newest (highest step) first."""
    return sorted((p for p in root.glob("step-*") if checkpoint_step(p) is not None), key=lambda p: (checkpoint_step(p), p.name), reverse=True)


def checkpoint_owners(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Each checkpoint in `root` that records the run that wrote it (`run_owner`), with that run."""
    owners = []
    for folder in reversed(checkpoint_folders(root)):
        try:
            owner = read_json(folder / "manifest.json").get("run")
        except (OSError, ValueError):
            continue  # incomplete: set aside when training starts
        if owner is not None:
            owners.append((folder, owner))
    return owners


def save_checkpoint(trainer, root: Path, steps: int, data_position: dict[str, Any], keep: int, owner: dict[str, Any]) -> Path:
    """Write the trainer's state after `steps` completed steps, recording the run that wrote it
    (`run_owner`), and keep the newest `keep` checkpoints. Raises CheckpointWriteError (previous
    checkpoints intact) on I/O errors, and NonFiniteWeights rather than save non-finite weights."""
    for name, param in trainer.sae.named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteWeights(
                f"SAE parameter {name} holds non-finite values at step {steps}; no checkpoint of this state is written and the "
                f"previous checkpoints are kept. Lower lr, check the activations for NaN/inf, or try normalize_activations, in a "
                f"new run (`--new`: this one keeps its settings)"
            )
    final = root / f"step-{steps:09d}"
    try:
        with atomic_dir(final) as tmp:
            trainer.sae.save_model(tmp)
            save_file({"sparsity": trainer.log_feature_sparsity}, tmp / "sparsity.safetensors")
            tensors: dict[str, torch.Tensor] = {}
            write_json(tmp / STATE_JSON, _encode({**trainer_state(trainer), "n_training_steps": steps}, "state", tensors))
            save_file(tensors, tmp / STATE_TENSORS)
            trainer.activation_scaler.save(str(tmp / SCALER))
            write_manifest(tmp, {"n_training_steps": steps, "n_training_samples": trainer.n_training_samples, "data": data_position, "run": owner})
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        try:
            previous = newest_checkpoint(root)
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        except OSError as unreadable:  # the filesystem fails reads too
            kept = f"the earlier checkpoints could not be read either ({unreadable.strerror or unreadable})"
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {getattr(error, 'strerror', None) or error}; {kept}. Free disk space or fix the "
            f"folder's permissions, then run the same command again"
        ) from error
    for old in checkpoint_folders(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer, folder: Path) -> dict[str, Any]:
    """Restore the SAE, the trainer and the RNGs from a checkpoint; returns its manifest."""
    manifest = read_json(folder / "manifest.json")
    tensors = load_file(folder / STATE_TENSORS)
    state = _decode(read_json(folder / STATE_JSON), tensors)
    trainer.sae.load_weights_from_checkpoint(folder)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, scheduler_state in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(scheduler_state)
    device = trainer.cfg.device
    trainer.n_training_samples = state["n_training_samples"]
    trainer.n_training_steps = state["n_training_steps"]
    trainer.act_freq_scores = state["act_freq_scores"].to(device)
    trainer.n_forward_passes_since_fired = state["n_forward_passes_since_fired"].to(device)
    trainer.n_frac_active_samples = state["n_frac_active_samples"]
    trainer.started_fine_tuning = state["started_fine_tuning"]
    trainer.activation_scaler.load(folder / SCALER)
    _set_rng_state(state["rng"], device)
    return manifest


def resume_point(root: Path, logger) -> Path | None:
    """The newest checkpoint whose files match their checksums, after tidying `root` (call while
    holding the run's lock): temporary folders of interrupted writes are removed, and newer
    checkpoints that fail their checksums are renamed `broken-*` (kept for inspection, out of the
    way of the checkpoints that training will write again), with a warning naming each."""
    for tmp in root.glob(".tmp-step-*"):
        logger.info(f"Removing {tmp.name}, a checkpoint write that did not finish")
        shutil.rmtree(tmp, ignore_errors=True)
    broken = 0
    for folder in checkpoint_folders(root):
        if verify_manifest(folder) is not None:
            return folder
        set_aside(folder, "an older one is used, if there is one")
        broken += 1
    if broken:
        logger.warning(f"No usable checkpoint in {root} (the {broken} set aside are kept): training starts again from step 0")
    return None


def newest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums."""
    for folder in checkpoint_folders(root):
        if verify_manifest(folder) is not None:
            return folder
    return None


def newest_whole_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose manifest reads and lists files that are there, its
    safetensors files whole: `newest_checkpoint` without hashing gigabytes, for a report."""
    for folder in checkpoint_folders(root):
        try:
            files = [folder / name for name in read_json(folder / "manifest.json")["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(f.is_file() and (f.suffix != ".safetensors" or whole_safetensors(f)) for f in files):
            return folder
    return None
