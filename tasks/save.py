"""Stage 5, save: the final SAE in SAELens's native format at `<run>/sae/`, with its real
feature sparsity.

`cfg.json` and `sae_weights.safetensors` are SAELens's inference format (`save_inference_model`:
normalisation folded in, BatchTopK saved as JumpReLU, ...), loadable with plain
`sae_lens.SAE.load_from_disk`. `sparsity.safetensors` holds, under `sparsity`, the log10 firing
frequency of each feature (SAELens's convention), measured by running the saved SAE over
`sparsity_tokens` stored activations drawn at random (whole contexts, made by the model, in
streaming mode), a batch at a time; a feature that never fired reads -10. Rows at the
tokenizer's special tokens (BOS, EOS, padding) are left out, as SAELens's evaluation and the
dashboard leave them out: a feature that fires only on BOS reads as never firing.

`sae/` is derived from `trained/`: when the measurement's settings (`sparsity_tokens`, `seed`,
the tokens left out) differ from those recorded in its manifest, it is made again beside the old
one and swapped in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tasks.activations import sample_activation_batches
from tasks.artifacts import atomic_dir, file_sha256, output_hashes, read_json, stage, set_aside, verify_manifest, write_json, write_manifest
from tasks.config import TORCH_GLOBALS

STAGE_VERSION = 3  # 2: the manifest records the measurement's settings; the result carries the manifest's sha256; 3: special tokens left out
LOG_EPS = 1e-10


def firing_frequencies(log_sparsity: torch.Tensor) -> torch.Tensor:
    """The firing frequencies whose log10 (plus LOG_EPS) a `sparsity.safetensors` holds, 0 for
    the features that never fired."""
    return torch.where(log_sparsity <= math.log10(LOG_EPS) + 1e-3, 0.0, 10 ** log_sparsity.float())
ENCODE_BATCH = 8192


@torch.no_grad()
def firing_frequency(sae, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Fraction of the activation rows on which each feature is non-zero, and the number of rows."""
    counts, n_rows = torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0
    for batch in batches:
        counts += (sae.encode(batch.to(sae.device, sae.dtype)) != 0).sum(0).to("cpu", torch.float64)
        n_rows += len(batch)
    return (counts / n_rows).float(), n_rows


@stage("save-sae", STAGE_VERSION, key_inputs=("trained_ref", "store_ref", "run_dir", "sparsity_tokens", "seed"))
def save_sae(
    trained_ref: dict[str, Any],
    store_ref: dict[str, Any],
    run_dir: str,
    sparsity_tokens: int,
    seed: int,
    device: str,
    model_ref: dict[str, Any] | None = None,
    from_pretrained_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the trained SAE in inference format with its measured feature sparsity: over the
    store's rows at tokens other than the special tokens of `model_ref`'s tokenizer (all rows of
    a store made without a model)."""
    from sae_lens import SAE, TrainingSAE

    from tasks.model import special_token_ids

    out = Path(run_dir) / "sae"
    skip_tokens = special_token_ids(model_ref, from_pretrained_kwargs or {}) if model_ref is not None else []
    # The trained SAE's manifest too: a trained/ made again (moved away, retrained) makes sae/ again.
    trained_manifest = file_sha256(Path(trained_ref["path"]) / "manifest.json")
    measured_with = {"sparsity_tokens": sparsity_tokens, "seed": seed, "skipped_tokens": skip_tokens, "trained": trained_manifest}
    manifest = verify_manifest(out)
    if manifest is None and out.exists():
        set_aside(out, "it is made again from trained/")
    if manifest is None or manifest.get("measured_with") != measured_with:
        with TORCH_GLOBALS:  # its initialisation draws from it before its weights are loaded
            trained = TrainingSAE.load_from_disk(trained_ref["path"], device=device)
        # An older sae/ is replaced only once the new one is complete (it is remade from trained/).
        with atomic_dir(out, replace=manifest is not None) as tmp:
            trained.save_inference_model(tmp)
            with TORCH_GLOBALS:
                sae = SAE.load_from_disk(tmp, device=device)
            frequency, n = firing_frequency(sae, sample_activation_batches(store_ref, sparsity_tokens, seed, ENCODE_BATCH, device, skip_tokens))
            save_file({"sparsity": torch.log10(frequency + LOG_EPS)}, tmp / "sparsity.safetensors")
            # SAELens records the last training window's L0 and dead features (special tokens
            # included); a loaded SAE's cfg.metadata should tell what sparsity.safetensors holds.
            cfg_json = read_json(tmp / "cfg.json")
            cfg_json["metadata"].update(l0=float(frequency.sum()), num_dead_features=int((frequency == 0).sum()))
            write_json(tmp / "cfg.json", cfg_json)
            write_manifest(
                tmp,
                {
                    "architecture": sae.cfg.architecture(),
                    "d_in": sae.cfg.d_in,
                    "d_sae": sae.cfg.d_sae,
                    "sparsity_tokens": n,
                    "measured_with": measured_with,
                    "dead_features": int((frequency == 0).sum()),
                    "mean_l0": float(frequency.sum()),
                },
            )
    manifest = read_json(out / "manifest.json")
    keys = ("architecture", "d_in", "d_sae", "sparsity_tokens", "dead_features", "mean_l0")
    return {
        "path": str(out),
        **{k: manifest[k] for k in keys},
        "manifest_sha256": file_sha256(out / "manifest.json"),
        "outputs": [str(out)],
        "output_sha256": output_hashes(out / "manifest.json"),
    }
