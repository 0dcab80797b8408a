"""Stage 4, train: SAELens's `SAETrainer` fed from the activation store, with checkpoints.

The run config is mapped onto sae-lens 6.x (`LanguageModelSAERunnerConfig`, its
`to_sae_trainer_config()`, the architecture's `*TrainingSAEConfig`); training itself is
`SAETrainer.fit()`. What saeflow adds:

- the data provider is `ShuffledBatches` over the stored activations (or, in streaming mode,
  `StreamedBatches` made by the model from the stored tokens), so the data position is just the
  batch number and a resumed run starts there directly;
- at the step boundary (a hook on the trainer, after the step is counted and logged),
  checkpoints are written at SAELens's evenly spaced thresholds, and on SIGTERM/SIGINT, by
  `tasks/checkpoint.py`: complete, atomic and checksummed, the newest `keep_checkpoints` kept;
- on start, the newest checkpoint whose checksums verify is loaded (SAE weights, optimizer,
  schedulers, counters, statistics, activation scaler, RNGs) and training continues from it;
- a NaN/inf loss stops training before the update (on a GPU, where a per-step check would stall
  the pipeline, it is recorded on the device and checked at each log row, checkpoint and the
  end: what was trained since the last checkpoint is discarded); the training log goes to
  `train_log.jsonl`, the Prefect log and a progress artifact.

The trained SAE (training format, before the final save) goes to `<run>/trained/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tasks.activations import read_ahead, store_contents, training_batches
from tasks.artifacts import ProgressArtifact, atomic_dir, finite_or_null, read_json, set_aside, stage, verify_manifest, write_json, write_manifest
from tasks.config import TORCH_GLOBALS, RunConfig
from tasks.stopping import PREEMPTIONS, STOP_CHECKPOINTS, Preempted, StopRequests, stop_requested, stop_signals

STAGE_VERSION = 1
ARCHITECTURE_KWARGS = {
    "standard": ("l1_coefficient", "l1_warm_up_steps"),
    "gated": ("l1_coefficient", "l1_warm_up_steps"),
    "topk": ("k",),
    "batchtopk": ("k",),
    "matryoshka_batchtopk": ("k", "matryoshka_widths"),
    "jumprelu": ("l0_coefficient", "l0_warm_up_steps"),
}


def training_sae_config(cfg: RunConfig):
    """The architecture's SAELens `*TrainingSAEConfig` for this run (needs `cfg.d_in`)."""
    import dataclasses

    from sae_lens.registry import get_sae_training_class

    config_class = get_sae_training_class(cfg.architecture)[1]
    valid = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(cfg.sae_kwargs) - valid)
    if unknown:
        raise ValueError(
            f"sae_kwargs {unknown} are not fields of SAELens's {config_class.__name__}; valid ones: "
            f"{', '.join(sorted(valid - {'metadata', 'd_in', 'd_sae', 'device', 'dtype'}))}"
        )
    kwargs = {name: getattr(cfg, name) for name in ARCHITECTURE_KWARGS[cfg.architecture]}
    if kwargs.get("matryoshka_widths") and kwargs["matryoshka_widths"][-1] != cfg.sae_width:
        kwargs["matryoshka_widths"] = [*kwargs["matryoshka_widths"], cfg.sae_width]  # as SAELens would, with a warning
    return config_class(
        d_in=cfg.d_in,
        d_sae=cfg.sae_width,
        dtype=cfg.dtype,
        device=cfg.device,
        normalize_activations=cfg.normalize_activations,
        **kwargs,
        **cfg.sae_kwargs,
    )


def runner_config(cfg: RunConfig, run_name: str | None = None):
    """The equivalent SAELens `LanguageModelSAERunnerConfig` (nothing is written by SAELens)."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    return LanguageModelSAERunnerConfig(
        sae=training_sae_config(cfg),
        model_name=cfg.model_name,
        hook_name=cfg.hook_name,
        hook_head_index=cfg.hook_head_index,
        dataset_path=cfg.dataset_path,
        is_dataset_tokenized=bool(cfg.is_dataset_tokenized),
        streaming=cfg.streaming,
        context_size=cfg.context_size,
        n_batches_in_buffer=cfg.n_batches_in_buffer,
        training_tokens=cfg.training_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        device=cfg.device,
        seed=cfg.seed,
        dtype=cfg.dtype,
        prepend_bos=cfg.prepend_bos,
        autocast=cfg.autocast,
        autocast_lm=cfg.autocast_lm,
        compile_sae=cfg.compile_sae,
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        lr=cfg.lr,
        lr_end=cfg.lr_end,
        lr_scheduler_name=cfg.lr_scheduler_name,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window,
        n_checkpoints=cfg.n_checkpoints,
        checkpoint_path=None,
        output_path=None,
        verbose=False,
        model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        logger=LoggingConfig(
            log_to_wandb=cfg.log_to_wandb,
            wandb_project=cfg.wandb_project,
            wandb_entity=cfg.wandb_entity,
            wandb_log_frequency=cfg.wandb_log_frequency,
            run_name=run_name,
        ),
    )


def new_training_sae(cfg: RunConfig, run_name: str | None = None):
    """A freshly initialised SAELens TrainingSAE for this run, seeded by `cfg.seed`, its training
    forward pass compiled (lazily, at its first call) when `compile_sae` is set."""
    from sae_lens import TrainingSAE

    runner_cfg = runner_config(cfg, run_name)
    sae_cfg = type(runner_cfg.sae).from_sae_runner_config(runner_cfg)
    source = str(Path(cfg.activations_path).expanduser().resolve()) if cfg.activations_path else None
    sae_cfg.metadata.dataset_path = source or ("sae_lens.synthetic" if cfg.synthetic is not None else cfg.dataset_path)
    with TORCH_GLOBALS:  # the seed and the draws of this SAE alone
        torch.manual_seed(cfg.seed)
        sae = TrainingSAE.from_dict(sae_cfg.to_dict())
    if cfg.compile_sae:
        sae.training_forward_pass = torch.compile(sae.training_forward_pass)
    return sae, runner_cfg


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a signal, a non-finite loss); retrying would not help."""


class TrainingPreempted(TrainingStopped, Preempted):
    """SIGTERM, SIGINT or `saeflow stop`: a checkpoint was written at the step boundary."""


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite; the checkpoints written before are kept."""


NON_FINITE_FIX = "Lower lr, check the activations for NaN/inf, or try normalize_activations, in a new run (`--new`: this one keeps its settings); the checkpoints written so far are kept"


def nan_check_deferred(device: str) -> bool:
    """Whether non-finite losses are checked at log rows and checkpoints instead of every step:
    on an accelerator, where a per-step check would make the host wait for each step to finish
    before it can queue the next. On CPU the check costs nothing."""
    return torch.device(device).type != "cpu"


class NonFiniteGuard:
    """The losses of the steps not yet checked, copied into a buffer on the loss's device without
    waiting for them: one operation per step, where keeping only the first non-finite loss took
    10 (the launch-bound GPU step issues about 90 kernels). `check()` reads them (one host sync)
    and raises NonFiniteLoss for the first that is not finite. A full buffer is checked before
    it takes the next loss."""

    CAPACITY = 1024

    def __init__(self):
        self.losses: torch.Tensor | None = None
        self.first_step, self.count = 0, 0

    def record(self, loss: torch.Tensor, step: int) -> None:
        if self.losses is None:
            self.losses = torch.empty(self.CAPACITY, device=loss.device)
        if self.count == self.CAPACITY:
            self.check(step - 1)
        if self.count == 0:
            self.first_step = step
        self.losses[self.count].copy_(loss.detach())
        self.count += 1

    def check(self, now: int) -> None:
        if not self.count:
            return
        finite = torch.isfinite(self.losses[: self.count])
        if not finite.all():
            first = int(torch.argmin(finite.int()))
            raise NonFiniteLoss(
                f"loss is {self.losses[first].item()} at step {self.first_step + first}; training stopped at step {now}, "
                f"before anything trained since then was written (checks on {self.losses.device.type} run at log rows and "
                f"checkpoints). {NON_FINITE_FIX}"
            )
        self.count = 0


def _make_trainer(sae, runner_cfg, on_step_end, guard: NonFiniteGuard | None = None):
    """The trainer, its SAE's forward pass checked for non-finite losses: at once (stopping
    before the update), or with `guard` recorded for checks at the step boundaries."""
    from sae_lens import SAETrainer

    class Trainer(SAETrainer):
        """SAELens's trainer with a hook at the step boundary (after the step is counted)."""

        def _update_pbar(self, step_output, pbar, update_interval: int = 100):
            super()._update_pbar(step_output, pbar, update_interval)
            on_step_end(self, step_output)

    forward = sae.training_forward_pass

    def checked_forward(step_input):
        output = forward(step_input)
        if guard is not None:
            guard.record(output.loss, step_input.n_training_steps + 1)
        elif not torch.isfinite(output.loss):  # stop before backward() and the optimizer step
            raise NonFiniteLoss(
                f"loss is {output.loss.item()} at step {step_input.n_training_steps + 1}; training stopped before the "
                f"update. {NON_FINITE_FIX}"
            )
        return output

    sae.training_forward_pass = checked_forward
    return Trainer(cfg=runner_cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))


def read_log_rows(path: Path, logger) -> list[dict[str, Any]]:
    """The rows of a `train_log.jsonl`, less those whose write was cut short (a full disk, a
    crash of the machine), each named in a warning."""
    rows = []
    for line in filter(None, path.read_text(errors="replace").splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning(f"{path}: dropping a row that was not written whole: {line[:80]!r}")
    return rows


class TrainingLog:
    """Every `log_every` steps: a row in `train_log.jsonl`, and a line in the Prefect log and the
    progress artifact at most every `LINE_SECONDS` (and at the last step): a GPU's steps of a few
    ms would otherwise send several lines a second, a million in a two-day run. The file survives
    resumes: rows after the resumed step are dropped first, so no step is listed twice or missing."""

    LINE_SECONDS = 10.0

    def __init__(self, path: Path, cfg: RunConfig, logger):
        self.path, self.every, self.logger = path, cfg.log_every, logger

    def start(self, trainer) -> None:

        done = trainer.n_training_steps
        if self.path.exists():
            rows = [row for row in read_log_rows(self.path, self.logger) if row["step"] <= done]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(finite_or_null(row), allow_nan=False) + "\n" for row in rows))
            os.replace(tmp, self.path)
        # SAELens trains until all the tokens are seen: one step more than its
        # `total_training_steps` when the batch does not divide them.
        self.total = -(-trainer.cfg.total_training_samples // trainer.cfg.train_batch_size_samples)
        self.progress = ProgressArtifact(100 * done / self.total, f"Training SAE ({self.path.parent.name})")
        self.last = (time.monotonic(), trainer.n_training_samples)
        self.logged = -math.inf

    def sync(self) -> None:
        """Put the rows written so far on disk, before a checkpoint: a crash of the machine then
        loses no row of the steps that the checkpoint holds."""
        if self.path.exists():
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())

    def due(self, trainer) -> bool:
        """Whether this step gets a log row."""
        step = trainer.n_training_steps
        return step % self.every == 0 or step == self.total

    @torch.no_grad()
    def after_step(self, trainer, step_output, stopping: bool = False) -> None:
        """The step's row, when due. `stopping` leaves out the progress artifact: a signal sent to
        the whole job may have stopped Prefect's temporary server, whose client would retry for
        minutes before the stop's checkpoint is written."""

        if not self.due(trainer):
            return
        step = trainer.n_training_steps
        metrics = trainer.build_train_step_log_dict(step_output, trainer.n_training_samples)
        now, tokens = time.monotonic(), trainer.n_training_samples
        row = {
            "step": step,
            "tokens": tokens,
            "loss": metrics["losses/overall_loss"],
            "mse": metrics.get("losses/mse_loss"),
            "l0": metrics["metrics/l0"],
            "explained_variance": metrics["metrics/explained_variance"],
            "dead_features": metrics["sparsity/dead_features"],
            "lr": metrics["details/current_learning_rate"],
            "tokens_per_s": (tokens - self.last[1]) / max(now - self.last[0], 1e-9),
        }
        self.last = (now, tokens)
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")
        if stopping or step == self.total or now - self.logged >= self.LINE_SECONDS:
            self.logged = now
            self.logger.info(
                f"step {step}/{self.total} | {row['tokens_per_s']:,.0f} tokens/s | loss {row['loss']:.4f} | "
                f"L0 {row['l0']:.1f} | EV {row['explained_variance']:.3f} | dead {row['dead_features']} | lr {row['lr']:.2e}"
            )
        if not stopping:
            self.progress.update(100 * step / self.total, final=step == self.total)


def _retry_unless_stopped(task, task_run, state) -> bool:
    from tasks.checkpoint import CheckpointWriteError, NonFiniteWeights

    try:
        state.result()
    except (TrainingStopped, CheckpointWriteError, NonFiniteWeights):
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth a retry from the checkpoint
        return True
    return True


def train_spec(cfg: RunConfig) -> dict[str, Any]:
    """The stage's inputs: the whole config (its cache key ignores nothing that matters)."""
    return cfg.model_dump(mode="json")


@stage("train-sae", STAGE_VERSION, key_inputs=("spec", "store_ref", "run_dir"), retry_condition_fn=_retry_unless_stopped)
def train_sae(spec: dict[str, Any], store_ref: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Train the SAE on the stored activations, resuming from the newest valid checkpoint."""
    from prefect import get_run_logger

    from tasks.checkpoint import LAST_CHECKPOINT_FILE, checkpoint_root, load_checkpoint, newest_checkpoint, resume_point, run_owner, save_checkpoint

    logger = get_run_logger()
    cfg = RunConfig(**spec)
    out = Path(run_dir) / "trained"
    if verify_manifest(out) is not None:
        return _result(out)
    root = checkpoint_root(cfg.checkpoint_path, Path(run_dir))
    if out.exists():
        newest = newest_checkpoint(root)
        set_aside(out, f"training continues from {newest.name}" if newest else "there is no checkpoint: training starts again from step 0")
    stop_requests = StopRequests(Path(run_dir))  # `saeflow stop`, from any process
    if stop := stop_requested() or stop_requests.requested():  # asked while the activations were made
        stop_requests.done()
        message = f"not started: {stop} was received before training began"
        PREEMPTIONS.append(message)
        raise TrainingPreempted(message)

    if cfg.dtype == "bfloat16":
        logger.warning(
            "dtype bfloat16: the SAE's weights and Adam's state are bfloat16, whose 8 significant bits round away "
            "updates below about 1/256 of a weight (most Adam steps at lr 3e-4), so it learns less than in float32. "
            "For bf16 speed with float32 weights, use dtype: float32 with autocast: true"
        )
    sae, runner_cfg = new_training_sae(cfg, Path(run_dir).name)
    batch = cfg.train_batch_size_tokens
    owner = run_owner(cfg, Path(run_dir).name)
    contents = store_contents(store_ref)

    last_checkpoint = [0.0]  # when training started or the last checkpoint was written (monotonic)

    def checkpoint(trainer) -> Path:
        steps = trainer.n_training_steps
        folder = root / f"step-{steps:09d}"
        if not folder.exists():  # a scheduled checkpoint may have just been written at this step
            position = {"next_batch": trainer.n_training_samples // batch, "seed": cfg.seed, "store": store_ref["path"], "store_contents": contents}
            log.sync()
            save_checkpoint(trainer, root, steps, position, cfg.keep_checkpoints, owner)
            write_json(Path(run_dir) / LAST_CHECKPOINT_FILE, {"path": str(folder), "step": steps})
            logger.info(f"Checkpoint {folder.name} written ({trainer.n_training_samples} tokens)")
        last_checkpoint[0] = time.monotonic()
        return folder

    log = TrainingLog(Path(run_dir) / "train_log.jsonl", cfg, logger)
    thresholds: list[int] = []

    guard = NonFiniteGuard() if nan_check_deferred(cfg.device) else None

    def on_step_end(trainer, step_output) -> None:
        stop = stop_requested() or stop_requests.requested()
        # After the last step too, so that a failure while the trained SAE is written (a full
        # disk, a signal) costs no step, where SAELens's last threshold lies a whole interval earlier.
        last = (cfg.n_checkpoints > 0 or cfg.checkpoint_every_minutes is not None) and trainer.n_training_samples >= trainer.cfg.total_training_samples
        timed = cfg.checkpoint_every_minutes is not None and time.monotonic() - last_checkpoint[0] >= 60 * cfg.checkpoint_every_minutes
        boundary = log.due(trainer) or (thresholds and trainer.n_training_samples > thresholds[0]) or stop or last or timed
        if guard is not None and boundary:
            guard.check(trainer.n_training_steps)
        log.after_step(trainer, step_output, stopping=bool(stop))  # the row comes before its step's checkpoint
        if thresholds and trainer.n_training_samples > thresholds[0]:
            while thresholds and trainer.n_training_samples > thresholds[0]:
                thresholds.pop(0)
            checkpoint(trainer)
        if stop:
            logger.warning(f"{stop} received: writing a checkpoint at the end of step {trainer.n_training_steps}, then stopping")
            folder = checkpoint(trainer)
            stop_requests.done()
            message = f"stopped by {stop} after step {trainer.n_training_steps}; checkpoint {folder} written"
            PREEMPTIONS.append(message)
            STOP_CHECKPOINTS.append(folder)
            raise TrainingPreempted(message)
        if last or timed:
            checkpoint(trainer)

    with TORCH_GLOBALS:  # its counters take the default dtype, which another thread's model load changes for a while
        trainer = _make_trainer(sae, runner_cfg, on_step_end, guard)
    # Checkpoints are taken at the step boundary, after the step's log row, at SAELens's evenly
    # spaced thresholds; SAELens itself is left none to take.
    thresholds[:], trainer.checkpoint_thresholds = trainer.checkpoint_thresholds, []
    batches = training_batches(store_ref, batch, cfg.seed, chunk_contexts=cfg.n_batches_in_buffer * cfg.store_batch_size_prompts, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    resumed_from, resumed_from_step = resume_point(root, logger), 0
    if resumed_from is not None:
        checkpoint_manifest = load_checkpoint(trainer, resumed_from)
        resumed_from_step = checkpoint_manifest["n_training_steps"]
        if checkpoint_manifest["data"].get("store_contents", contents) != contents:  # checkpoints before this check lack it
            logger.warning(
                f"{resumed_from.name} was trained on other contents than {store_ref['path']} holds now (the store was filled "
                f"again since, on other hardware or from data that changed): training continues on these, so the run is "
                f"not what it would have been uninterrupted"
            )
        thresholds[:] = [t for t in thresholds if t >= trainer.n_training_samples]
        logger.info(f"Resuming training from {resumed_from.name} ({trainer.n_training_samples} tokens done)")
    elif cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=cfg.d_in,
            data_provider=batches,
            n_batches_for_norm_estimate=min(trainer.cfg.n_batches_for_norm_estimate, math.ceil(store_ref["n_tokens"] / batch)),
        )
    batches.next_batch = trainer.n_training_samples // batch
    if cfg.training_tokens > store_ref["n_tokens"]:
        logger.info(f"Training on {cfg.training_tokens} activations: {cfg.training_tokens / store_ref['n_tokens']:.1f} passes over the {store_ref['n_tokens']} stored ones")
    log.start(trainer)

    start_tokens, started = trainer.n_training_samples, time.monotonic()
    last_checkpoint[0] = started
    try:
        with _wandb_run(cfg, runner_cfg, Path(run_dir).name), stop_signals(), read_ahead(batches, cfg.device, cfg.read_workers, logger, log.total - batches.next_batch) as provider:
            trainer.data_provider = provider
            sae = trainer.fit()
            if guard is not None:
                guard.check(trainer.n_training_steps)
    finally:
        # The forward pass patched onto the SAE (the loss check, torch.compile's) refers to the
        # SAE: a cycle that kept it, on a GPU its weights, after the stage (also a failed
        # attempt's while its retry ran) until Python's cycle collector ran.
        vars(sae).pop("training_forward_pass", None)
    elapsed = time.monotonic() - started
    trained_tokens = trainer.n_training_samples - start_tokens
    logger.info(f"Trained {trained_tokens} tokens in {elapsed:.1f}s ({trained_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")

    with atomic_dir(out) as tmp:
        sae.save_model(tmp)
        save_file({"sparsity": trainer.log_feature_sparsity}, tmp / "sparsity.safetensors")
        write_manifest(
            tmp,
            {
                "n_training_tokens": trainer.n_training_samples,
                "n_training_steps": trainer.n_training_steps,
                "resumed_from_step": resumed_from_step,
                "l0": sae.cfg.metadata.l0,
                "dead_features": sae.cfg.metadata.num_dead_features,
            },
        )
    return _result(out)


def _result(out: Path) -> dict[str, Any]:
    manifest = read_json(out / "manifest.json")
    keys = ("n_training_tokens", "n_training_steps", "resumed_from_step", "l0", "dead_features")
    return {"path": str(out), **{k: manifest[k] for k in keys}, "outputs": [str(out)]}


@contextlib.contextmanager
def _wandb_run(cfg: RunConfig, runner_cfg, run_name: str):
    if not cfg.log_to_wandb:
        yield
        return
    import wandb

    wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_name, id=run_name, resume="allow", config=runner_cfg.to_dict())
    try:
        yield
    finally:
        wandb.finish()
