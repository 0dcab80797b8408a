"""Stage 9, report: what a researcher judges the SAE from, in `<run>/` and in the Prefect UI.

- `plots/feature_density.png`: histogram of log10 feature firing frequency (dead features apart);
- `plots/training_curves.png`: loss, MSE, L0, explained variance and dead features over tokens,
  from `train_log.jsonl`;
- `report.md`, also published as a Prefect markdown artifact, and a table artifact of the
  metrics, both keyed by the run name so the UI's Artifacts page shows each run's latest report.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tasks.artifacts import output_hashes, stage
from tasks.config import ARCHITECTURE_FIELDS
from tasks.save import firing_frequencies

STAGE_VERSION = 3  # 2: tokens escaped, the architecture's settings in the config, no zero-activation features; 3: over which tokens dead features are counted
CURVES = [("loss", "loss"), ("mse", "MSE"), ("l0", "L0"), ("explained_variance", "explained variance"), ("dead_features", "dead features")]
METRIC_ROWS = [
    ("explained_variance", "explained variance"),
    ("mse", "MSE"),
    ("cossim", "cosine similarity"),
    ("l0", "L0"),
    ("l1", "L1"),
    ("ce_loss_score", "CE-loss score"),
    ("ce_loss_without_sae", "CE loss, clean"),
    ("ce_loss_with_sae", "CE loss, SAE spliced in"),
    ("ce_loss_with_ablation", "CE loss, zero-ablated"),
    ("kl_div_score", "KL-divergence score"),
    ("kl_div_with_sae", "KL divergence, SAE"),
    ("kl_div_with_ablation", "KL divergence, zero-ablated"),
    ("l2_ratio", "L2 ratio"),
    ("relative_reconstruction_bias", "relative reconstruction bias"),
    ("dead_features", "dead features (never fired on the held-out tokens)"),
    ("dense_features", "dense features (>10% of the held-out tokens)"),
    ("synthetic_mcc", "synthetic: MCC"),
    ("synthetic_uniqueness", "synthetic: uniqueness"),
    ("synthetic_precision", "synthetic: precision"),
    ("synthetic_recall", "synthetic: recall"),
    ("synthetic_f1_score", "synthetic: F1"),
    ("synthetic_accuracy", "synthetic: accuracy"),
    ("synthetic_dead_latents", "synthetic: dead latents"),
    ("synthetic_shrinkage", "synthetic: shrinkage"),
    ("synthetic_explained_variance", "synthetic: explained variance"),
    ("synthetic_sae_l0", "synthetic: SAE L0"),
    ("synthetic_true_l0", "synthetic: true L0"),
]


def artifact_key(run_name: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a run."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"saeflow-{run_name}-{kind}".lower())).strip("-")


def _pyplot():
    """matplotlib's pyplot, rendering with no display; imported only when plotting (it added
    about 20 MB and 0.4 s to every process that imports the pipeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_feature_density(log_sparsity: torch.Tensor, n_tokens: int, path: Path) -> None:
    """Histogram of the live features' log10 firing frequencies, measured over `n_tokens`
    training tokens, into `path`, with the dead ones counted in the title."""
    plt = _pyplot()
    dead = firing_frequencies(log_sparsity) == 0
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(log_sparsity[~dead].numpy(), bins=50, color="#d2691e")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"Feature density over {n_tokens:,} training tokens ({int(dead.sum())} of {len(log_sparsity)} never fired)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """The training log's curves (CURVES) against tokens into `path`, one panel each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    tokens = [r["tokens"] for r in rows]
    for ax, (key, label) in zip(axes, CURVES):
        ax.plot(tokens, [r[key] for r in rows], marker=".")
        ax.set_title(label)
        ax.set_xlabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


NOT_HELD_OUT = "the dataset ran out while the activations were made, so these tokens were trained on too; use more data"


def metric_value(value: float | None) -> str:
    """A metric as the report shows it; `n/a` for one that is not a number (null in summary.json)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.6g}"


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows (label, key, value) of the metrics the report shows, in its order."""
    return [{"metric": label, "key": key, "value": metrics[key]} for key, label in METRIC_ROWS if key in metrics]


def md_code(text: str, in_table: bool = False) -> str:
    """`text` as a markdown code span that survives any backticks in it; in a table cell `|` is
    escaped too (GFM ends a cell at a `|` even inside code, and reads `\\|` there as `|`)."""
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_token(token: str, in_table: bool = False) -> str:
    """A token (or prompt) as its quoted Python repr in code: leading spaces and the empty token
    stay visible, newlines and other control characters become escapes that keep the line whole."""
    return md_code(repr(token), in_table)


def config_keys(config: dict[str, Any]) -> list[str]:
    """The settings that tell runs apart in the report: the architecture's own ones included."""
    own = [key for key, architectures in ARCHITECTURE_FIELDS.items() if config.get("architecture") in architectures]
    return [
        "model_name", "activations_path", "synthetic", "hook_name", "hook_head_index", "architecture", *own,
        "normalize_activations", "d_in", "d_sae", "expansion_factor", "training_tokens", "lr", "seed", "activations",
    ]


def render_markdown(run_name: str, config: dict[str, Any], metrics: dict[str, Any], analysis: dict[str, Any], files: dict[str, str]) -> str:
    lines = [f"# saeflow run `{run_name}`", "", "## Config", ""]
    for key in config_keys(config):
        if config.get(key) is not None:
            lines.append(f"- **{key}**: {md_code(str(config[key]))}")
    held_out = f"{metrics['eval_rows']} held-out activation rows" if "eval_rows" in metrics else "held-out tokens"
    lines += ["", f"## Metrics ({held_out})", ""]
    if metrics.get("eval_repeats_training"):
        lines += [f"**Not held out:** {NOT_HELD_OUT}.", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {row['metric']} | {metric_value(row['value'])} |" for row in metrics_table(metrics)]
    if "synthetic_mcc" in metrics:
        lines += ["", f"Synthetic metrics: SAELens's `eval_sae_on_synthetic_data` on {metrics['synthetic_samples']} fresh samples of the ground-truth generator."]
    if "skipped" in analysis:
        lines += ["", "## Analysis", "", analysis["skipped"]]
    else:
        lines += _analysis_markdown(analysis)
    lines += ["", "## Files", ""] + [f"- {name}: `{path}`" for name, path in files.items()]
    return "\n".join(lines) + "\n"


def _analysis_markdown(analysis: dict[str, Any]) -> list[str]:
    lines = ["", "## Top features of the prompts", ""]
    for prompt in analysis["prompts"]:
        top = ", ".join(f"{f['feature']} ({f['activation']:.3f})" for f in prompt["top_features"]) or "no feature fires"
        bos = " (the BOS token `prepend_bos` adds, not a word of the prompt)" if prompt["is_bos"] else ""
        lines.append(f"- {md_token(prompt['prompt'])} at {md_token(prompt['token'])}{bos}: {top}")
    if analysis["logit_effects"]:
        lines += ["", "## Tokens the features promote and inhibit (`W_dec @ W_U`)", "", "| feature | promotes | inhibits |", "| --- | --- | --- |"]
        for effect in analysis["logit_effects"]:
            promoted = " ".join(md_token(t["token"], in_table=True) for t in effect["promoted"])
            inhibited = " ".join(md_token(t["token"], in_table=True) for t in effect["inhibited"])
            lines.append(f"| {effect['feature']} | {promoted} | {inhibited} |")
    return lines


@stage("report", STAGE_VERSION, key_inputs=("run_name", "run_dir", "metrics_ref", "analysis_ref", "sae_ref"))
def report(run_name: str, run_dir: str, config: dict[str, Any], metrics_ref: dict[str, Any], analysis_ref: dict[str, Any], sae_ref: dict[str, Any]) -> dict[str, Any]:
    """Write the plots and `report.md` (`publish_report` shows them in Prefect)."""
    from prefect import get_run_logger

    from tasks.train import read_log_rows

    run = Path(run_dir)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    density_png, curves_png = plots / "feature_density.png", plots / "training_curves.png"
    plot_feature_density(load_file(Path(sae_ref["path"]) / "sparsity.safetensors")["sparsity"], sae_ref["sparsity_tokens"], density_png)
    rows = read_log_rows(run / "train_log.jsonl", get_run_logger())
    plot_training_curves(rows, curves_png)

    metrics = metrics_ref["metrics"]
    analysis = analysis_ref if "skipped" in analysis_ref else json.loads(Path(analysis_ref["path"]).read_text())
    files = {
        "dashboard": analysis_ref.get("dashboard"),
        "feature density plot": str(density_png),
        "training curves": str(curves_png),
        "metrics": metrics_ref["path"],
        "analysis": analysis_ref.get("path"),
        "SAE": sae_ref["path"],
    }
    files = {name: path for name, path in files.items() if path is not None}
    markdown = render_markdown(run_name, config, metrics, analysis, files)
    report_md = run / "report.md"
    report_md.write_text(markdown)
    return {"path": str(report_md), "plots": [str(density_png), str(curves_png)], "outputs": [str(report_md), str(density_png), str(curves_png)], "output_sha256": output_hashes(report_md, density_png, curves_png)}


def publish_report(run_name: str, report_ref: dict[str, Any], metrics_ref: dict[str, Any]) -> None:
    """Publish the run's report (markdown) and metrics (table) as Prefect artifacts keyed by the
    run, from the flow, so that they are on every flow run's page, also one whose stages were
    all cached (a scheduled run continuing a finished run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = Path(report_ref["path"]).read_text()
    create_markdown_artifact(markdown, key=artifact_key(run_name, "report"), description=f"saeflow report of run {run_name}")
    create_table_artifact(metrics_table(metrics_ref["metrics"]), key=artifact_key(run_name, "metrics"), description=f"Metrics of run {run_name}")
