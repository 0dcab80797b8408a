"""Stage 6, analyse: the guide's two analyses on the loaded SAE, written to `<run>/analysis.json`.

1. Top features for each configured prompt at `analysis_token_index`: the model's activations
   at the hook, encoded by the SAE, `topk` over features.
2. For the features found in (1), the tokens each one promotes and inhibits most through its
   direct path to the logits, `W_dec @ W_U` (through `W_out` or `W_O` first for MLP-neuron and
   per-head hooks). The model is loaded with its layer norms folded, as the guide requires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.artifacts import stage, write_json
from tasks.config import RunConfig

STAGE_VERSION = 1


def analysis_spec(cfg: RunConfig) -> dict[str, Any]:
    keys = ("prompts", "analysis_token_index", "top_k_features", "top_k_tokens", "context_size", "prepend_bos", "device", "model_from_pretrained_kwargs")
    return {k: getattr(cfg, k) for k in keys}


@torch.no_grad()
def top_features_for_prompt(model, sae, prompt: str, token_index: int, k: int, context_size: int, prepend_bos: bool, logger=None) -> dict[str, Any]:
    """The `k` most active SAE features at one token of a prompt."""
    from tasks.model import hook_activations

    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    if tokens.shape[1] > context_size:
        if logger:
            logger.warning(f"Prompt of {tokens.shape[1]} tokens is longer than context_size {context_size}; truncated")
        tokens = tokens[:, :context_size]
    acts = hook_activations(model, tokens, sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    feature_acts = sae.encode(acts.to(sae.dtype))[0, token_index]
    values, indices = torch.topk(feature_acts, min(k, sae.cfg.d_sae))
    return {
        "prompt": prompt,
        "tokens": model.to_str_tokens(tokens[0]),
        "token_index": token_index,
        "token": model.to_string(tokens[0, token_index]),
        "top_features": [{"feature": int(i), "activation": float(v)} for v, i in zip(values, indices)],
    }


@torch.no_grad()
def logit_effects(model, sae, features: list[int], k: int) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Top promoted and inhibited tokens of each feature through `W_dec @ W_U`, and the
    projection's shape `(d_sae, d_vocab)`; empty when the hook has no direct path to the logits."""
    from tasks.model import residual_directions

    directions = residual_directions(model, sae.W_dec.to(model.W_U.dtype), sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    if directions is None:
        return [], None
    projection = directions @ model.W_U  # [d_sae, d_vocab]
    effects = []
    for feature in features:
        row = projection[feature]
        top, bottom = torch.topk(row, k), torch.topk(-row, k)
        effects.append(
            {
                "feature": feature,
                "promoted": [{"token": model.to_string(int(i)), "logit": float(v)} for v, i in zip(top.values, top.indices)],
                "inhibited": [{"token": model.to_string(int(i)), "logit": float(-v)} for v, i in zip(bottom.values, bottom.indices)],
            }
        )
    return effects, list(projection.shape)


@stage("analyse", STAGE_VERSION, key_inputs=("spec", "model_ref", "sae_ref", "run_dir"))
def analyse(spec: dict[str, Any], model_ref: dict[str, Any], sae_ref: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Run both analyses and write `analysis.json`."""
    from prefect import get_run_logger

    from tasks.load import open_sae
    from tasks.model import load_model

    logger = get_run_logger()
    model = load_model(model_ref, spec["device"], processed=True, from_pretrained_kwargs=spec["model_from_pretrained_kwargs"])
    sae, sparsity = open_sae(sae_ref["source"], spec["device"])
    sae.eval()
    prompts = [
        top_features_for_prompt(model, sae, p, spec["analysis_token_index"], spec["top_k_features"], spec["context_size"], spec["prepend_bos"], logger)
        for p in spec["prompts"]
    ]
    features = sorted({f["feature"] for p in prompts for f in p["top_features"] if f["activation"] > 0})
    chosen_by = "active at the analysed prompt tokens"
    if not features and sparsity is not None:
        features = torch.topk(sparsity, min(spec["top_k_features"], len(sparsity))).indices.tolist()
        chosen_by = "most frequently firing (no feature fired at the analysed prompt tokens)"
    effects, shape = logit_effects(model, sae, features, spec["top_k_tokens"])
    out = Path(run_dir) / "analysis.json"
    write_json(out, {"prompts": prompts, "features_chosen": chosen_by, "logit_effects": effects, "projection_shape": shape})
    for p in prompts:
        top = ", ".join(f"{f['feature']} ({f['activation']:.3f})" for f in p["top_features"])
        logger.info(f"Top features at {p['token']!r} of {p['prompt']!r}: {top}")
    return {"path": str(out), "n_features": len(features), "outputs": [str(out)]}
