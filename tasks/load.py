"""Stage 6, load: open the saved SAE with plain SAELens (`SAE.load_from_disk`) and check it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tasks.artifacts import file_sha256, stage
from tasks.config import TORCH_GLOBALS

STAGE_VERSION = 1


def open_sae(source: dict[str, Any], device: str = "cpu"):
    """The SAE and its log10 feature sparsity (None if the folder has none) from `{"path": folder}`.

    The pipeline's source also names the sha256 of the folder's `manifest.json`
    (`"manifest_sha256"`, from the save stage): it makes the stages that read the SAE (load,
    evaluate, analyse) run again whenever `sae/` is made again, and the folder is checked
    against it."""
    from sae_lens import SAE

    path = Path(source["path"])
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path} holds no saved SAE (cfg.json is missing)")
    if "manifest_sha256" in source and file_sha256(path / "manifest.json") != source["manifest_sha256"]:
        raise RuntimeError(f"{path} changed since it was saved (its manifest.json is not the one asked for); run the pipeline again")
    with TORCH_GLOBALS:  # the SAE's initialisation draws from it before its weights are loaded
        sae = SAE.load_from_disk(path, device=device)
    sparsity_file = path / "sparsity.safetensors"
    sparsity = load_file(sparsity_file)["sparsity"] if sparsity_file.is_file() else None
    return sae, sparsity


@stage("load-sae", STAGE_VERSION, key_inputs=("source",))
def load_sae(source: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Load the SAE, check that its weights and sparsity are usable, and describe it."""
    sae, sparsity = open_sae(source, device)
    for name, param in sae.state_dict().items():
        if not torch.isfinite(param).all():
            raise ValueError(f"SAE from {source} has non-finite values in {name}")
    if sparsity is not None and sparsity.shape != (sae.cfg.d_sae,):
        raise ValueError(f"SAE from {source}: sparsity has shape {tuple(sparsity.shape)}, expected ({sae.cfg.d_sae},)")
    return {
        "source": source,
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "hook_name": sae.cfg.metadata.hook_name,
        "hook_head_index": sae.cfg.metadata.hook_head_index,
        "has_sparsity": sparsity is not None,
        "outputs": [source["path"]],
    }
