"""Stage 6, evaluate: is this SAE any good? SAELens's `run_evals` on held-out tokens (the
contexts that follow the training tokens in the data), written to `<run>/metrics.json`.

Reported: explained variance, MSE, cosine similarity (reconstruction); L0 and L1 (sparsity);
the CE-loss score with the clean, SAE-spliced and zero-ablated losses behind it, and the
KL-divergence score with its two divergences (effect on the model); the L2 ratio and the relative
reconstruction bias (shrinkage); and from the per-feature firing density over the same tokens,
the dead features (never fired) and dense features (firing on more than 10% of tokens). As in
SAELens, special tokens (BOS, ...) are left out of every metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.artifacts import stage, write_json

STAGE_VERSION = 1
DENSE_THRESHOLD = 0.1


def eval_store(model, sae, tokens: torch.Tensor, batch_prompts: int, device: str):
    """A SAELens `ActivationsStore` that serves the given token contexts, in order, at the SAE's hook."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(
        model=model,
        dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        streaming=False,
        hook_name=sae.cfg.metadata.hook_name,
        hook_head_index=sae.cfg.metadata.hook_head_index,
        context_size=tokens.shape[1],
        d_in=sae.cfg.d_in,
        n_batches_in_buffer=1,
        total_training_tokens=tokens.numel(),
        store_batch_size_prompts=batch_prompts,
        train_batch_size_tokens=tokens.shape[1],
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device(device),
        dtype="float32",
    )


@stage("evaluate", STAGE_VERSION, key_inputs=("sae_ref", "store_ref", "run_dir", "batch_prompts"))
def evaluate(sae_ref: dict[str, Any], model_ref: dict[str, Any], store_ref: dict[str, Any], run_dir: str, batch_prompts: int, device: str, from_pretrained_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run SAELens's evaluations on the held-out tokens and write `metrics.json`."""
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    from tasks.activations import load_eval_tokens
    from tasks.load import open_sae
    from tasks.model import load_model

    sae, _ = open_sae(sae_ref["source"], device)
    sae.eval()
    model = load_model(model_ref, device, from_pretrained_kwargs=from_pretrained_kwargs)
    tokens = load_eval_tokens(store_ref)
    batch_prompts = min(batch_prompts, len(tokens))
    n_batches = len(tokens) // batch_prompts  # never more than the held-out tokens: no wrap-around
    store = eval_store(model, sae, tokens, batch_prompts, device)
    config = get_eval_everything_config(batch_size_prompts=batch_prompts, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches)
    groups, features = run_evals(sae, store, model, ActivationScaler(), eval_config=config)

    density = torch.tensor(features["feature_density"])
    metrics: dict[str, Any] = {name: value for group in groups.values() for name, value in group.items()}
    metrics.update(
        dead_features=int((density == 0).sum()),
        dense_features=int((density > DENSE_THRESHOLD).sum()),
        d_sae=sae.cfg.d_sae,
        eval_contexts=n_batches * batch_prompts,
    )
    out = Path(run_dir) / "metrics.json"
    write_json(out, {"metrics": metrics, "feature_density": features["feature_density"]})
    return {"path": str(out), "metrics": metrics, "outputs": [str(out)]}
