"""Stage 7, evaluate: is this SAE any good? SAELens's `run_evals` on held-out tokens (the
contexts that follow the training tokens in the data), written to `<run>/metrics.json`.

Reported: explained variance, MSE, cosine similarity (reconstruction); L0 and L1 (sparsity);
the CE-loss score with the clean, SAE-spliced and zero-ablated losses behind it, and the
KL-divergence score with its two divergences (effect on the model); the L2 ratio and the relative
reconstruction bias (shrinkage); and from the per-feature firing density over the same tokens,
the dead features (never fired) and dense features (firing on more than 10% of tokens). As in
SAELens, special tokens (BOS, ...) are left out of every metric.

Without a model (activations made elsewhere, or synthetic ones) the same metrics except the CE
and KL ones are computed on the store's held-out activation rows. For synthetic activations,
SAELens's `eval_sae_on_synthetic_data` adds how well the SAE recovered the known features (MCC,
uniqueness, precision/recall/F1 of each latent as a detector of its matched feature, dead
latents, shrinkage), as `synthetic_*`, on `eval_tokens` fresh seeded samples of the same
generator (its ground-truth feature activations are not stored).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tasks.artifacts import output_hashes, stage, write_json
from tasks.config import TORCH_GLOBALS

STAGE_VERSION = 4  # 2: cosine similarity without the model is averaged over the rows that are not all zero; 3: every metric on the same whole batches; 4: without the model, the held-out rows counted as evaluated
DENSE_THRESHOLD = 0.1
ROWS_PER_BATCH = 4096


class HeldOutRows:
    """Stand-ins for SAELens's model and activation store in `run_evals` when there is no model:
    a "token" is the number of a held-out activation row, and "running the model" looks it up.
    Contexts are one row long; batches come in order and the last one may be shorter."""

    context_size = 1
    store_batch_size_prompts = ROWS_PER_BATCH

    def __init__(self, activations: torch.Tensor):
        self.activations, self.next_row = activations, 0

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        rows = torch.arange(self.next_row, min(self.next_row + batch_size, len(self.activations)))
        self.next_row += len(rows)
        return rows.unsqueeze(1)

    def run_with_cache(self, rows: torch.Tensor, names_filter: list[str], **kwargs):
        return None, {names_filter[0]: self.activations[rows]}


def evaluate_rows(sae, activations: torch.Tensor, device: str) -> tuple[dict, dict, int]:
    """SAELens's `run_evals` (all but the CE and KL metrics, which need a model) on activation rows."""
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    # The stored rows are already one SAE input each: no per-head reshaping by hook name.
    sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index = "activations", None
    activations = activations.to(device, sae.dtype)  # stored in store_dtype, where it differs
    rows = HeldOutRows(activations)
    n_batches = -(-len(activations) // ROWS_PER_BATCH)
    config = get_eval_everything_config(batch_size_prompts=ROWS_PER_BATCH, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches)
    config.compute_kl = config.compute_ce_loss = False
    groups, features = run_evals(sae, rows, rows, ActivationScaler(), eval_config=config, exclude_special_tokens=False)
    groups["reconstruction_quality"]["cossim"] = mean_cosine_similarity(sae, activations)
    # SAELens counts whole batches of ROWS_PER_BATCH; the last one holds only the rows left.
    groups["token_stats"] = {"total_tokens_eval_reconstruction": len(activations), "total_tokens_eval_sparsity_variance": len(activations)}
    return groups, features, len(activations)


@torch.no_grad()
def mean_cosine_similarity(sae, activations: torch.Tensor) -> float:
    """Mean cosine similarity of reconstruction and input over the rows that are not all zero.
    SAELens averages over every row, and an all-zero row (common in synthetic data: no feature
    active) makes its mean NaN; a zero reconstruction of a nonzero row counts as 0."""
    import torch.nn.functional as F

    total, rows = 0.0, 0
    for batch in activations.split(ROWS_PER_BATCH):
        batch = batch[batch.norm(dim=-1) > 0]
        total += F.cosine_similarity(sae(batch), batch, dim=-1).sum().item()
        rows += len(batch)
    return total / rows if rows else float("nan")


def synthetic_metrics(sae, store_ref: dict[str, Any], n_samples: int, device: str) -> dict[str, Any]:
    """SAELens's `eval_sae_on_synthetic_data` against the store's ground truth, on `n_samples`
    fresh samples drawn with a fixed seed, flattened into `synthetic_*` metrics."""
    from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data

    from tasks.sources import eval_seed

    with TORCH_GLOBALS:  # SAELens seeds, draws from and restores the global generator while it loads
        truth = SyntheticModel.load_from_disk(store_ref["ground_truth"], device=device)
    if sae.W_dec.dtype != torch.float32:  # SAELens multiplies its weights with the float32 truth
        sae = copy.deepcopy(sae).to(torch.float32)
    with TORCH_GLOBALS, torch.random.fork_rng(devices=[]):
        torch.manual_seed(eval_seed(store_ref))
        result = eval_sae_on_synthetic_data(sae, truth.feature_dict, truth.activation_generator, num_samples=n_samples, batch_size=ROWS_PER_BATCH)
    flat = {k: v for k, v in result.to_dict().items() if k != "classification"} | result.to_dict()["classification"]
    return {f"synthetic_{k}": v for k, v in flat.items()} | {"synthetic_samples": n_samples}


def eval_store(model, sae, tokens: torch.Tensor, batch_prompts: int, device: str):
    """A SAELens `ActivationsStore` that serves the given token contexts, in order, at the SAE's hook."""
    import warnings

    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    with warnings.catch_warnings():
        # SAELens compares the dataset's rows (contexts) with the tokens asked for, so it warns of
        # "fewer samples" for any dataset of contexts; these are exactly the contexts to serve.
        warnings.filterwarnings("ignore", message=".*fewer samples.*")
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
    """Run SAELens's evaluations on the held-out tokens (or, without a model, the held-out
    activation rows) and write `metrics.json`."""
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    from tasks.activations import load_eval_activations, load_eval_tokens
    from tasks.load import open_sae
    from tasks.model import load_model

    sae, _ = open_sae(sae_ref["source"], device)
    sae.eval()
    if model_ref is None:
        groups, features, n_rows = evaluate_rows(sae, load_eval_activations(store_ref), device)
        held_out = {"eval_rows": n_rows}
    else:
        model = load_model(model_ref, device, from_pretrained_kwargs=from_pretrained_kwargs)
        tokens = load_eval_tokens(store_ref)
        batch_prompts = min(batch_prompts, len(tokens))
        n_batches = len(tokens) // batch_prompts  # never more than the held-out tokens: no wrap-around
        # Whole batches only: the sparsity and variance pass reads on where the loss pass stopped
        # (SAELens's reset_input_dataset does not reset the contexts it serves), so it would start
        # with the contexts left over and then wrap around.
        store = eval_store(model, sae, tokens[: n_batches * batch_prompts], batch_prompts, device)
        config = get_eval_everything_config(batch_size_prompts=batch_prompts, n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches)
        groups, features = run_evals(sae, store, model, ActivationScaler(), eval_config=config)
        held_out = {"eval_contexts": n_batches * batch_prompts}

    density = torch.tensor(features["feature_density"])
    metrics: dict[str, Any] = {name: value for group in groups.values() for name, value in group.items()}
    metrics.update(
        dead_features=int((density == 0).sum()),
        dense_features=int((density > DENSE_THRESHOLD).sum()),
        d_sae=sae.cfg.d_sae,
        **held_out,
    )
    if store_ref.get("eval_repeats_training"):  # a dataset of token ids that ran out (the fill warned)
        metrics["eval_repeats_training"] = True
    if "ground_truth" in store_ref:
        metrics.update(synthetic_metrics(sae, store_ref, store_ref["eval_rows"], device))
    out = Path(run_dir) / "metrics.json"
    write_json(out, {"metrics": metrics, "feature_density": features["feature_density"]}, nonfinite_as_null=True)
    return {"path": str(out), "metrics": metrics, "outputs": [str(out)], "output_sha256": output_hashes(out)}
