"""Stage 4, save: the final SAE in SAELens's native format at `<run>/sae/`, with its real
feature sparsity.

`cfg.json` and `sae_weights.safetensors` are SAELens's inference format (`save_inference_model`:
normalisation folded in, BatchTopK saved as JumpReLU, ...), loadable with plain
`sae_lens.SAE.load_from_disk`. `sparsity.safetensors` holds, under `sparsity`, the log10 firing
frequency of each feature (SAELens's convention), measured by running the saved SAE over
`sparsity_tokens` stored activations drawn at random (whole contexts, made by the model, in
streaming mode); a feature that never fired reads -10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tasks.activations import sample_activations
from tasks.artifacts import atomic_dir, read_json, stage, verify_manifest, write_manifest

STAGE_VERSION = 1
LOG_EPS = 1e-10
ENCODE_BATCH = 8192


@torch.no_grad()
def firing_frequency(sae, activations: torch.Tensor) -> torch.Tensor:
    """Fraction of the given activation rows on which each feature is non-zero."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, len(activations), ENCODE_BATCH):
        batch = activations[start : start + ENCODE_BATCH].to(sae.device, sae.dtype)
        counts += (sae.encode(batch) != 0).sum(0).to("cpu", torch.float64)
    return (counts / len(activations)).float()


@stage("save-sae", STAGE_VERSION, key_inputs=("trained_ref", "store_ref", "run_dir", "sparsity_tokens", "seed"))
def save_sae(
    trained_ref: dict[str, Any], store_ref: dict[str, Any], run_dir: str, sparsity_tokens: int, seed: int, device: str
) -> dict[str, Any]:
    """Write the trained SAE in inference format with its measured feature sparsity."""
    from sae_lens import SAE, TrainingSAE

    out = Path(run_dir) / "sae"
    if verify_manifest(out) is None:
        if out.exists():
            raise RuntimeError(f"{out} exists but fails its checksums; move it away and run again")
        trained = TrainingSAE.load_from_disk(trained_ref["path"], device=device)
        activations = sample_activations(store_ref, sparsity_tokens, seed)
        n = len(activations)
        with atomic_dir(out) as tmp:
            trained.save_inference_model(tmp)
            sae = SAE.load_from_disk(tmp, device=device)
            frequency = firing_frequency(sae, activations)
            save_file({"sparsity": torch.log10(frequency + LOG_EPS)}, tmp / "sparsity.safetensors")
            write_manifest(
                tmp,
                {
                    "architecture": sae.cfg.architecture(),
                    "d_in": sae.cfg.d_in,
                    "d_sae": sae.cfg.d_sae,
                    "sparsity_tokens": n,
                    "dead_features": int((frequency == 0).sum()),
                    "mean_l0": float(frequency.sum()),
                },
            )
    manifest = read_json(out / "manifest.json")
    keys = ("architecture", "d_in", "d_sae", "sparsity_tokens", "dead_features", "mean_l0")
    return {"path": str(out), **{k: manifest[k] for k in keys}, "outputs": [str(out)]}
