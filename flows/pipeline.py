"""The pipeline flow: build model -> fill activation store -> train -> save -> load -> analyse.

The flow only composes; each stage is one idempotent Prefect task in `tasks/` whose JSON result
is persisted, so running the same run again skips every finished stage and continues an
interrupted training from its newest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks.activations import fill_activations, store_spec
from tasks.analyse import analyse, analysis_spec
from tasks.artifacts import RESULTS_DIRNAME, run_dir, write_json
from tasks.config import RunConfig
from tasks.load import load_sae
from tasks.model import build_model, model_spec
from tasks.preflight import claim_run, resolve
from tasks.save import save_sae
from tasks.train import train_sae, train_spec


@flow(name="saeflow", flow_run_name="{run_name}", persist_result=True, result_serializer="json")
def sae_pipeline(config: dict[str, Any], run_name: str, artifacts_dir: str) -> dict[str, Any]:
    """Train, save, load and analyse one SAE; returns the run's summary."""
    cfg = resolve(RunConfig(**config))
    claim_run(cfg, artifacts_dir, run_name, new=False)
    run = str(run_dir(artifacts_dir, run_name))

    model_ref = build_model(model_spec(cfg), artifacts_dir)
    store_ref = fill_activations(store_spec(cfg, model_ref), model_ref, artifacts_dir)
    trained = train_sae(train_spec(cfg), store_ref, run)
    saved = save_sae(trained, store_ref, run, cfg.sparsity_tokens, cfg.seed, cfg.device)
    loaded = load_sae({"path": saved["path"]}, cfg.device)
    analysis = analyse(analysis_spec(cfg), model_ref, loaded, run)

    summary = {
        "run_name": run_name,
        "run_dir": run,
        "model": model_ref,
        "activations": store_ref,
        "training": trained,
        "sae": saved,
        "loaded": loaded,
        "analysis": analysis,
    }
    write_json(Path(run) / "summary.json", summary)
    return summary


def run_pipeline(cfg: RunConfig, run_name: str, artifacts_dir: str | Path, return_state: bool = False):
    """Run the flow with its results persisted under `<artifacts_dir>/prefect-results/`.

    Returns the run's summary, or the flow run's final Prefect state with `return_state`."""
    artifacts_dir = Path(artifacts_dir).resolve()
    pipeline = sae_pipeline.with_options(result_storage=artifacts_dir / RESULTS_DIRNAME)
    return pipeline(config=cfg.model_dump(mode="json"), run_name=run_name, artifacts_dir=str(artifacts_dir), return_state=return_state)
