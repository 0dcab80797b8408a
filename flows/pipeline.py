"""The pipeline flow: build model -> pretokenise -> fill activation store -> train -> save -> load
-> evaluate -> analyse -> report. With activations made elsewhere (`activations_path`) or
synthetic ones, there is no model: import activations -> train -> save -> load -> evaluate ->
report.

The flow only composes; each stage is one idempotent Prefect task in `tasks/` whose JSON result
is persisted, so running the same run again skips every finished stage and continues an
interrupted training from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (process defaults, also when a Prefect worker loads this file by its path)
from prefect import flow
from prefect.states import Cancelled

from tasks.activations import check_room_for_stores, fill_activations, store_dir, store_spec
from tasks.analyse import analyse, analysis_spec, check_token_index
from tasks.artifacts import RESULTS_DIRNAME, exclusive_lock, run_dir, write_json
from tasks.checkpoint import LAST_CHECKPOINT_FILE, checkpoint_folder_lock
from tasks.config import RunConfig, load_config, make_config
from tasks.evaluate import evaluate
from tasks.load import load_sae
from tasks.model import build_model, model_spec, select_cuda_device
from tasks.preflight import claim_run, default_run_name, resolve
from tasks.report import publish_report, report
from tasks.save import save_sae
from tasks.sources import import_activations, import_spec
from tasks.stopping import Preempted, Terminated, cancelled_in_prefect, stop_after_fill, watching_for_cancel
from tasks.streaming import choose_activation_mode
from tasks.tokens import pretokenise, tokens_spec
from tasks.train import train_sae, train_spec


FLOW_NAME = "saeflow"
NO_MODEL_ANALYSIS = (
    "No model: the activations come from {source}, so there are no prompts to run, no unembedding for "
    "W_dec @ W_U and no token contexts for a dashboard."
)


def effective_run_name(config: dict[str, Any] | str, run_name: str | None, new_each_run: bool, artifacts_dir: str = "artifacts") -> str:
    """The run a flow run works on: `run_name`, else the config's stable name; with
    `new_each_run`, a fresh run named after the flow run's scheduled start time."""
    from prefect import runtime

    cfg = load_config(config) if isinstance(config, str) else make_config(config)
    if new_each_run:  # a fresh run: named as saeflow names runs now, not as an earlier one of the config was
        return f"{run_name or default_run_name(cfg)}-{runtime.flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"
    return run_name or default_run_name(cfg, artifacts_dir)


def _flow_run_name() -> str:
    from prefect import runtime

    p = runtime.flow_run.parameters
    try:
        return effective_run_name(p["config"], p.get("run_name"), p.get("new_each_run", False), p.get("artifacts_dir", "artifacts"))
    except Exception:  # noqa: BLE001 - a bad config (a deployment run with custom parameters) fails in the flow, with its message there
        return p.get("run_name") or "invalid-config"


PREEMPTED = "Preempted"  # the name of a stopped flow run's final state (of type Cancelled)
RUN_AGAIN = ". Run it again to continue"


@flow(name=FLOW_NAME, flow_run_name=_flow_run_name, persist_result=True, result_serializer="json")
def sae_pipeline(config: dict[str, Any] | str, run_name: str | None = None, artifacts_dir: str = "artifacts", new_each_run: bool = False) -> dict[str, Any]:
    """Train, save, load, evaluate and analyse one SAE; returns the run's summary.

    `config` is a config mapping or the path of a YAML config. The run continues `run_name` (by
    default the config's stable name) unless `new_each_run` makes it a fresh one."""
    run_name = effective_run_name(config, run_name, new_each_run, artifacts_dir)
    artifacts_dir = str(Path(artifacts_dir).resolve())  # a deployment may give it relative to its working directory
    cfg = resolve(load_config(config) if isinstance(config, str) else make_config(config))
    _tag_flow_run(cfg)
    claimed = contextlib.ExitStack()  # the run's locks, held from its claim to its end
    claim_run(cfg, artifacts_dir, run_name, new=False, keep_locks=claimed)
    run = str(run_dir(artifacts_dir, run_name))
    try:
        with claimed, watching_for_cancel(run):
            use_deterministic_kernels(cfg)
            select_cuda_device(cfg.device)  # the stages run in this thread
            summary = _run_stages(cfg, run_name, run, artifacts_dir)
    except Preempted as error:
        if cancelled_in_prefect():
            # Cancelled from the Prefect UI (or `prefect flow-run cancel`): its runner sent SIGTERM,
            # which the fill or training took as a stop at a safe point. The runner marks the run
            # Cancelled ("cancelled successfully"); this says what was kept and how to continue.
            return Cancelled(message=f"Cancelled: {error}{RUN_AGAIN}")
        # A signal or `saeflow stop`, at a safe point: the UI shows the flow run "Preempted" (of
        # type Cancelled), not Failed, with what was kept.
        return Cancelled(name=PREEMPTED, message=f"{error}{RUN_AGAIN}")
    except Terminated as error:  # SIGTERM where no stage stops at a safe point: stopped where it was, not crashed
        return Cancelled(name=PREEMPTED, message=f"{error}{RUN_AGAIN}")
    if cancelled_in_prefect():  # too late to stop (Prefect allows a Cancelling run no other end)
        return Cancelled(message="Cancelled in Prefect once its last stages ran: every stage finished and is kept. Run it again for its summary (every stage cached)")
    return summary


def _run_stages(cfg: RunConfig, run_name: str, run: str, artifacts_dir: str) -> dict[str, Any]:
    with exclusive_lock(Path(run) / ".lock", f"run '{run_name}'", wait=False), checkpoint_folder_lock(cfg.checkpoint_path, Path(run)):
        crash_ghost_runs(run_name, artifacts_dir)
        if cfg.activation_source is None:
            prompts = {"prompts": cfg.prompts, "token_index": cfg.analysis_token_index, "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos}
            model_ref = build_model(model_spec(cfg), artifacts_dir, prompts, run)
            check_token_index(model_ref, cfg.model_from_pretrained_kwargs, cfg.prompts, cfg.analysis_token_index, cfg.context_size, cfg.prepend_bos)
            mode, why = choose_activation_mode(cfg, artifacts_dir, run, store_dir(artifacts_dir, store_spec(cfg, model_ref, "cached")))
            check_room_for_stores([store_spec(cfg, model_ref, mode)], artifacts_dir)  # before tokenising, which may take hours
            text = tokens_spec(cfg, model_ref)  # None when the dataset already holds token ids
            tokens_ref = pretokenise(text, model_ref, cfg.model_from_pretrained_kwargs, artifacts_dir, run) if text else None
            store_ref = fill_activations(store_spec(cfg, model_ref, mode), model_ref, tokens_ref, artifacts_dir, run)
            stop_after_fill(store_ref)
        else:
            model_ref = tokens_ref = None
            mode, why = "cached", f"imported from {cfg.activations_path}" if cfg.activations_path else "generated by sae_lens.synthetic"
            store_ref = import_activations(import_spec(cfg), artifacts_dir, run)
            stop_after_fill(store_ref)
        flow_logger().info(f"Activations: {mode} ({why})")
        train = train_sae.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_seconds)
        trained = train(train_spec(cfg), store_ref, run)
        saved = save_sae(trained, store_ref, run, cfg.sparsity_tokens, cfg.seed, cfg.device, model_ref, cfg.model_from_pretrained_kwargs)
        loaded = load_sae({"path": saved["path"], "manifest_sha256": saved["manifest_sha256"]}, cfg.device)
        eval_batch = cfg.eval_batch_size_prompts or cfg.store_batch_size_prompts
        metrics = evaluate(loaded, model_ref, store_ref, run, eval_batch, cfg.device, cfg.model_from_pretrained_kwargs)
        if model_ref is not None:
            analysis = analyse(analysis_spec(cfg), model_ref, loaded, store_ref, run)
        else:
            analysis = {"skipped": NO_MODEL_ANALYSIS.format(source=cfg.activations_path or "sae_lens.synthetic")}
        reported = report(run_name, run, cfg.model_dump(mode="json") | {"d_sae": saved["d_sae"], "activations": f"{mode} ({why})"}, metrics, analysis, saved)
        publish_report(run_name, reported, metrics)
        summary = {
            "run_name": run_name,
            "run_dir": run,
            "model": model_ref or {"skipped": f"no model: the activations come from {cfg.activations_path or 'sae_lens.synthetic'}"},
            "tokens": tokens_ref,
            "activations": store_ref,
            "training": trained,
            "sae": saved,
            "loaded": loaded,
            "metrics": metrics,
            "analysis": analysis,
            "report": reported,
        }
        write_json(Path(run) / "summary.json", summary, nonfinite_as_null=True)
    return summary


def crash_ghost_runs(run_name: str, artifacts_dir: str, flow_name: str = FLOW_NAME) -> None:
    """Mark Crashed the flow runs (and their task runs) of this run (flow `flow_name`, flow run
    `run_name`) that Prefect still shows Running: this process holds the run's lock, so their
    processes are gone (SIGKILL, OOM kill, lost machine) and could not report it themselves. Only
    flow runs of this artifacts folder are this run's: the same name in another folder is another
    run, perhaps alive."""
    from prefect import get_client, runtime
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    with get_client(sync_client=True) as client:
        ghosts = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]), state=running),
        )
        here = Path(artifacts_dir).resolve()
        for ghost in ghosts:
            if str(ghost.id) == str(runtime.flow_run.id) or Path(ghost.parameters.get("artifacts_dir", "artifacts")).resolve() != here:
                continue
            message = f"Its process ended without reporting (killed?){_last_heard_of(run_dir(artifacts_dir, run_name))}; '{run_name}' was continued by flow run {runtime.flow_run.id}"
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[ghost.id])))
            for task_run in tasks:
                if task_run.state and task_run.state.type == StateType.RUNNING:
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(ghost.id, Crashed(message=message), force=True)
            flow_logger().warning(f"Flow run {ghost.name} ({ghost.id}) was left Running by a dead process; marked Crashed")


def flow_logger():
    """The current flow run's logger. `get_run_logger` gives a task run's where there is one: a
    sweep member's flow run runs inside its sweep's task, whose page its lines then landed on."""
    from prefect.context import FlowRunContext
    from prefect.logging.loggers import flow_run_logger

    context = FlowRunContext.get()
    return flow_run_logger(context.flow_run, context.flow)


def _last_heard_of(run: Path) -> str:
    """When a dead process last wrote its run's training log or a checkpoint, in words, or ''. Its
    flow run is marked Crashed when the run is continued, maybe days later, which the UI shows as
    its end."""
    import datetime

    times = [f.stat().st_mtime for f in (run / "train_log.jsonl", run / LAST_CHECKPOINT_FILE) if f.is_file()]
    if not times:
        return ""
    return f" after it last wrote its training log or a checkpoint, at {datetime.datetime.fromtimestamp(max(times), datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"


def use_deterministic_kernels(cfg: RunConfig) -> None:
    """With `deterministic`, make GPU kernels deterministic (before CUDA starts in this process)."""
    if cfg.deterministic:
        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def pipeline_for(artifacts_dir: str | Path):
    """The flow with its results persisted under `<artifacts_dir>/prefect-results/`."""
    return sae_pipeline.with_options(result_storage=Path(artifacts_dir).resolve() / RESULTS_DIRNAME)


def run_tags(cfg: RunConfig) -> list[str]:
    """Prefect tags of a run's flow runs, to filter runs by in the UI: its model, hook, architecture and width."""
    return [f"model:{cfg.model_name}", f"hook:{cfg.hook_name}", f"architecture:{cfg.architecture}", f"d_sae:{cfg.sae_width}"]


def _tag_flow_run(cfg: RunConfig) -> None:
    """Add `run_tags` to the current flow run, however it was started (a deployment's run with
    parameters from the UI, a work pool's, `saeflow run`, a sweep member)."""
    from prefect import get_client, runtime

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(runtime.flow_run.id, tags=sorted({*runtime.flow_run.tags, *run_tags(cfg)}))
    except Exception as error:  # noqa: BLE001 - tags are for the UI's filters, not worth failing a run over
        flow_logger().warning(f"Could not tag the flow run ({type(error).__name__}: {error})")


def run_pipeline(cfg: RunConfig, run_name: str, artifacts_dir: str | Path, return_state: bool = False):
    """Run the flow in this process. Returns the run's summary (raising `Preempted` when a signal
    or `saeflow stop` stopped it at a safe point), or the flow run's final Prefect state with
    `return_state`."""
    artifacts_dir = str(Path(artifacts_dir).resolve())
    state = pipeline_for(artifacts_dir)(config=cfg.model_dump(mode="json"), run_name=run_name, artifacts_dir=artifacts_dir, return_state=True)
    return state if return_state else summary_of(state)


def summary_of(state) -> dict[str, Any]:
    """The summary of a finished flow run of the pipeline, from its final state; `Preempted` for a
    run a signal or `saeflow stop` stopped, the flow run's error for a failed one."""
    if state.is_cancelled() and state.name == PREEMPTED:
        raise Preempted(state.message.removesuffix(RUN_AGAIN))
    return state.result(_sync=True)  # Prefect's `_sync`: a result, not a coroutine, also where an event loop runs (Jupyter)
