"""Stage 8, analyse: the guide's two analyses on the loaded SAE, written to `<run>/analysis.json`,
and a feature dashboard, `<run>/dashboard.html`.

1. Top features for each configured prompt at `analysis_token_index`: the model's activations
   at the hook, encoded by the SAE, `topk` over features.
2. For the features found in (1), the tokens each one promotes and inhibits most through its
   direct path to the logits, `W_dec @ W_U` (through `W_out` or `W_O` first for MLP-neuron and
   per-head hooks), through the final norm's gain and with the unembedding centred: what the
   guide's model with folded layer norms gives, read off the model that made the activations.
3. The dashboard: for those features and then the most frequent ones (`dashboard_features` in
   all), the held-out contexts where each fires hardest, with the activating tokens highlighted,
   next to the tokens it promotes and inhibits.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from tasks.artifacts import output_hashes, read_json, stage, write_json
from tasks.config import ConfigError, RunConfig
from tasks.save import firing_frequencies

STAGE_VERSION = 6  # 2: prompts' features that do not fire left out, `is_bos`; 3: no dashboard peak at a special token; 4: the model as trained, `unembed_directions`; 5: a bf16 model's W_dec @ W_out / W_O in float32; 6: never-fired features at frequency 0, over how many tokens


def analysis_spec(cfg: RunConfig) -> dict[str, Any]:
    """The analyse stage's settings from the run's config (prompts, counts, device): its cache key."""
    keys = (
        "prompts", "analysis_token_index", "top_k_features", "top_k_tokens", "dashboard_features", "dashboard_contexts",
        "context_size", "prepend_bos", "device", "model_from_pretrained_kwargs",
    )
    return {k: getattr(cfg, k) for k in keys}


def prompt_tokens(model, prompt: str, token_index: int, context_size: int, prepend_bos: bool, setting: str = "analysis_token_index", logger=None) -> torch.Tensor:
    """The prompt's tokens as the analysis sees them (cut to `context_size`), or a ConfigError
    naming the prompt and `setting` when `token_index` is not one of them."""
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    truncated = tokens.shape[1] > context_size
    if truncated:
        if logger:
            logger.warning(f"Prompt of {tokens.shape[1]} tokens is longer than context_size {context_size}; truncated")
        tokens = tokens[:, :context_size]
    n = tokens.shape[1]
    if not -n <= token_index < n:
        counted = ", ".join([*(["the BOS token included"] if prepend_bos else []), *(["cut to context_size"] if truncated else [])])
        fix = f"use an index from {-n} to {n - 1} (negative ones count from the end: -1 is the last token)" if n else "give a prompt that is not empty"
        raise ConfigError(f"{setting} is {token_index}, but prompt {prompt!r} has {n} tokens{f' ({counted})' if counted else ''}; {fix}")
    return tokens


def check_token_index(model_ref: dict[str, Any], from_pretrained_kwargs: dict[str, Any], prompts: list[str], token_index: int, context_size: int, prepend_bos: bool, setting: str = "analysis_token_index") -> None:
    """Raise a ConfigError if `token_index` is outside one of `prompts`, tokenised by the model's
    tokenizer alone (no weights): a bad index stops a run before training, not after it."""
    from tasks.model import tokenizing_model

    check_prompts(tokenizing_model(model_ref, from_pretrained_kwargs), prompts, token_index, context_size, prepend_bos, setting)


def check_prompts(model, prompts: list[str], token_index: int, context_size: int, prepend_bos: bool, setting: str = "analysis_token_index") -> None:
    """`check_token_index` for a model (on the meta device will do) already in hand."""
    for prompt in prompts:
        prompt_tokens(model, prompt, token_index, context_size, prepend_bos, setting)


@torch.no_grad()
def top_features_for_prompt(model, sae, prompt: str, token_index: int, k: int, context_size: int, prepend_bos: bool, logger=None) -> dict[str, Any]:
    """The (up to) `k` most active SAE features at one token of a prompt; features that do not
    fire there are left out."""
    from tasks.model import hook_activations

    tokens = prompt_tokens(model, prompt, token_index, context_size, prepend_bos, logger=logger)
    is_bos = prepend_bos and token_index % tokens.shape[1] == 0
    if is_bos and logger:
        logger.warning(f"Token {token_index} of {prompt!r} is the BOS token that prepend_bos adds: its features say nothing about the prompt")
    tokenizer = model.tokenizer
    unknown = getattr(tokenizer, "unk_token_id", None)
    # GPT-2-style tokenizers name one token unk, BOS and EOS, and never produce it for text.
    special = {getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad")}
    if unknown is not None and unknown not in special and int(tokens[0, token_index]) == unknown and logger:
        logger.warning(
            f"Token {token_index} of {prompt!r} is the tokenizer's unknown token {tokenizer.unk_token!r}: the tokenizer "
            f"does not know that text (a word-level tokenizer trained on the dataset knows only the dataset's words), so its "
            f"features describe no word of the prompt; use words of the dataset"
        )
    acts = hook_activations(model, tokens, sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    feature_acts = sae.encode(acts.to(sae.dtype))[0, token_index]
    values, indices = torch.topk(feature_acts, min(k, sae.cfg.d_sae))
    return {
        "prompt": prompt,
        "tokens": model.to_str_tokens(tokens[0]),
        "token_index": token_index,
        "token": model.to_string(tokens[0, token_index]),
        "is_bos": is_bos,
        "top_features": [{"feature": int(i), "activation": float(v)} for v, i in zip(values, indices) if v > 0],
    }


@torch.no_grad()
def logit_effects(model, sae, features: list[int], k: int) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Top promoted and inhibited tokens of each of `features` through `W_dec @ W_U`, and the
    projection's shape `(d_sae, d_vocab)`; empty when the hook has no direct path to the logits."""
    from tasks.model import residual_directions, unembed_directions

    # Only the rows asked for: the whole [d_sae, d_vocab] projection of a large SAE takes tens of
    # GB, and even its [d_sae, d_model] directions, in float32, GBs.
    directions = residual_directions(model, sae.W_dec[features], sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    if directions is None:
        return [], None
    rows = unembed_directions(model, directions)
    k = min(k, rows.shape[1])  # a top_k_tokens beyond the vocabulary lists all of it
    effects = []
    for feature, row in zip(features, rows):
        top, bottom = torch.topk(row, k), torch.topk(-row, k)
        effects.append(
            {
                "feature": feature,
                "promoted": [{"token": model.to_string(int(i)), "logit": float(v)} for v, i in zip(top.values, top.indices)],
                "inhibited": [{"token": model.to_string(int(i)), "logit": float(-v)} for v, i in zip(bottom.values, bottom.indices)],
            }
        )
    return effects, [sae.cfg.d_sae, model.W_U.shape[1]]


@torch.no_grad()
def max_activating_contexts(model, sae, tokens: torch.Tensor, features: list[int], n_contexts: int, batch: int = 32, window: int = 12) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the `n_contexts` held-out contexts where it fires hardest: the tokens up
    to `window` before the peak and 3 after, each with the feature's activation. Special tokens
    (BOS, EOS, padding) count as 0, as in the metrics: a BOS residual's large norm would otherwise
    make many features peak there."""
    from sae_lens.util import get_special_token_ids

    from tasks.model import hook_activations

    per_token = []  # [n, ctx, len(features)]
    for start in range(0, len(tokens), batch):
        chunk = tokens[start : start + batch].to(sae.device)
        acts = hook_activations(model, chunk, sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
        per_token.append(sae.encode(acts.to(sae.dtype))[..., features].float().cpu())
    special = torch.isin(tokens, torch.tensor(get_special_token_ids(model.tokenizer), dtype=tokens.dtype))
    per_token = torch.cat(per_token).masked_fill(special[..., None], 0.0)
    peak_values, peak_positions = per_token.max(dim=1)  # [n, F]
    result = {}
    for column, feature in enumerate(features):
        best = torch.topk(peak_values[:, column], min(n_contexts, len(tokens)))
        contexts = []
        for value, row in zip(best.values.tolist(), best.indices.tolist()):
            if value <= 0:
                break
            peak = int(peak_positions[row, column])
            lo, hi = max(0, peak - window), min(tokens.shape[1], peak + 4)
            contexts.append(
                {
                    "tokens": model.to_str_tokens(tokens[row, lo:hi]),
                    "activations": per_token[row, lo:hi, column].tolist(),
                    "peak": peak - lo,
                    "max": value,
                }
            )
        result[feature] = contexts
    return result


def render_dashboard(run_name: str, analysis: dict[str, Any]) -> str:
    """A self-contained HTML page: per feature, its max-activating contexts with the activating
    tokens highlighted, and the tokens it promotes and inhibits."""

    def tokens_html(context: dict[str, Any]) -> str:
        top = max(context["max"], 1e-9)
        spans = []
        for i, (token, act) in enumerate(zip(context["tokens"], context["activations"])):
            alpha = max(0.0, min(1.0, act / top))
            border = " peak" if i == context["peak"] else ""
            spans.append(f'<span class="t{border}" style="background:rgba(255,140,0,{alpha:.2f})" title="{act:.3f}">{html.escape(token)}</span>')
        return "".join(spans)

    def token_list(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"<code>{html.escape(i['token'])}</code> {i['logit']:+.2f}" for i in items)

    measured = f"the {analysis['frequency_tokens']:,} training tokens its sparsity was measured on"
    sections = []
    for entry in analysis["dashboard"]:
        contexts = "".join(f'<li>{tokens_html(c)} <span class="max">max {c["max"]:.3f}</span></li>' for c in entry["contexts"])
        sections.append(
            f'<section id="feature-{entry["feature"]}"><h2>Feature {entry["feature"]}</h2>'
            f'<p class="meta">fires on {100 * entry["frequency"]:.3f}% of {measured}</p>'
            f'<div class="cols"><div><h3>Max-activating held-out contexts</h3><ol>{contexts or "<li>never fired</li>"}</ol></div>'
            f'<div><h3>Promotes</h3><p>{token_list(entry["promoted"])}</p><h3>Inhibits</h3><p>{token_list(entry["inhibited"])}</p></div></div></section>'
        )
    prompts = "".join(
        f"<li><q>{html.escape(p['prompt'])}</q> at <code>{html.escape(p['token'])}</code>: "
        + (", ".join(f'<a href="#feature-{f["feature"]}">{f["feature"]}</a> ({f["activation"]:.3f})' for f in p["top_features"]) or "no feature fires")
        + "</li>"
        for p in analysis["prompts"]
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        ".t{white-space:pre;padding:1px 0;margin-right:3px}.peak{outline:1px solid #c60}.meta,.max{color:#777;font-size:90%}"
        ".cols{display:grid;grid-template-columns:3fr 2fr;gap:2em}section{border-top:1px solid #ddd}"
        "li{margin:.3em 0;font-family:monospace}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>saeflow: {html.escape(run_name)}</title><style>{style}</style></head>"
        f"<body><h1>SAE features of run {html.escape(run_name)}</h1><h2>Top features of the prompts</h2><ul>{prompts}</ul>"
        f"{''.join(sections)}</body></html>"
    )


@stage("analyse", STAGE_VERSION, key_inputs=("spec", "model_ref", "sae_ref", "store_ref", "run_dir"))
def analyse(spec: dict[str, Any], model_ref: dict[str, Any], sae_ref: dict[str, Any], store_ref: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Run the analyses; write `analysis.json` and the `dashboard.html` page."""
    from prefect import get_run_logger

    from tasks.activations import load_eval_tokens
    from tasks.load import open_sae
    from tasks.model import load_model

    logger = get_run_logger()
    model = load_model(model_ref, spec["device"], from_pretrained_kwargs=spec["model_from_pretrained_kwargs"])
    sae, sparsity = open_sae(sae_ref["source"], spec["device"])
    sae.eval()
    prompts = [
        top_features_for_prompt(model, sae, p, spec["analysis_token_index"], spec["top_k_features"], spec["context_size"], spec["prepend_bos"], logger)
        for p in spec["prompts"]
    ]
    features = sorted({f["feature"] for p in prompts for f in p["top_features"]})
    chosen_by = "active at the analysed prompt tokens"
    if not features and sparsity is not None:
        features = torch.topk(sparsity, min(spec["top_k_features"], len(sparsity))).indices.tolist()
        chosen_by = "most frequently firing (no feature fired at the analysed prompt tokens)"

    frequency = firing_frequencies(sparsity) if sparsity is not None else torch.zeros(sae.cfg.d_sae)
    dashboard_features = list(features)
    for feature in torch.argsort(frequency, descending=True).tolist():
        if len(dashboard_features) >= spec["dashboard_features"]:
            break
        if feature not in dashboard_features:
            dashboard_features.append(feature)
    contexts = max_activating_contexts(model, sae, load_eval_tokens(store_ref), dashboard_features, spec["dashboard_contexts"])
    # one projection for the prompts' features and the dashboard's (which starts with them)
    all_effects, shape = logit_effects(model, sae, dashboard_features, spec["top_k_tokens"])
    effect_of = {e["feature"]: e for e in all_effects}
    effects = [effect_of[f] for f in features if f in effect_of]
    dashboard = [
        {
            "feature": f,
            "frequency": float(frequency[f]),
            "contexts": contexts[f],
            "promoted": effect_of.get(f, {}).get("promoted", []),
            "inhibited": effect_of.get(f, {}).get("inhibited", []),
        }
        for f in dashboard_features
    ]

    frequency_tokens = read_json(Path(sae_ref["source"]["path"]) / "manifest.json")["sparsity_tokens"]
    analysis = {
        "prompts": prompts,
        "features_chosen": chosen_by,
        "logit_effects": effects,
        "projection_shape": shape,
        "dashboard": dashboard,
        "frequency_tokens": frequency_tokens,
    }
    out = Path(run_dir) / "analysis.json"
    write_json(out, analysis)
    page = Path(run_dir) / "dashboard.html"
    page.write_text(render_dashboard(Path(run_dir).name, analysis))
    for p in prompts:
        top = ", ".join(f"{f['feature']} ({f['activation']:.3f})" for f in p["top_features"]) or "no feature fires"
        logger.info(f"Top features at {p['token']!r} of {p['prompt']!r}: {top}")
    return {"path": str(out), "dashboard": str(page), "n_features": len(features), "outputs": [str(out), str(page)], "output_sha256": output_hashes(out, page)}
