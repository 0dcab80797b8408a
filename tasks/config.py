"""The run configuration: one YAML file, validated before any work starts.

Field names follow the SAELens guide (`model_name`, `hook_layer`, `expansion_factor`,
`l1_coefficient`, ...) and are mapped onto the sae-lens 6.x API in `tasks/train.py`. Each
field's docstring is its documentation: `saeflow config-reference` prints them and the README's
reference table is generated from them.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
ARCHITECTURE_ALIASES = {"matryoshka": "matryoshka_batchtopk"}

# Fields that only some architectures read; changing one for another architecture is an error.
ARCHITECTURE_FIELDS = {
    "l1_coefficient": ("standard", "gated"),
    "l1_warm_up_steps": ("standard", "gated"),
    "k": ("topk", "batchtopk", "matryoshka_batchtopk"),
    "l0_coefficient": ("jumprelu",),
    "l0_warm_up_steps": ("jumprelu",),
    "matryoshka_widths": ("matryoshka_batchtopk",),
}

# Fields about the model and its data; meaningless when the activations come from elsewhere.
MODEL_ONLY_FIELDS = (
    "model_cfg", "tokenizer_path", "model_from_pretrained_kwargs", "model_train_tokens", "hook_head_index", "dataset_path", "activation_mode",
)

# Fields that do not change the trained SAE: they may differ when a run is continued.
NON_RESULT_FIELDS = {
    "log_to_wandb",
    "wandb_project",
    "wandb_entity",
    "wandb_log_frequency",
    "n_checkpoints",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "retries",
    "retry_delay_seconds",
    "checkpoint_path",
    "prompts",
    "analysis_token_index",
    "top_k_features",
    "top_k_tokens",
    "sparsity_tokens",
    "eval_batch_size_prompts",
    "log_every",
    "dashboard_features",
    "dashboard_contexts",
    "max_cache_gb",
    "read_workers",
}


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


def check_run_name(name: str, artifacts_dir: str | Path | None = None) -> None:
    """Raise ConfigError unless `name` is a plain folder name: it names `<artifacts>/runs/<name>/`,
    and `../x` or `a/b` would put a run outside that folder or inside another run's list. A run
    of `artifacts_dir` so named by an earlier saeflow (a hook name holding `/`) passes."""
    if name and Path(name).name == name and not name.startswith("."):
        return
    parts = name.split("/")  # an earlier saeflow's name: folder names joined by single slashes, none of them hidden
    if all(p and not p.startswith(".") for p in parts) and artifacts_dir is not None and os.path.isfile(Path(artifacts_dir) / "runs" / name / "config.json"):
        return
    path = Path(name)
    found = f"; for the run in {path}, give its name and artifacts folder: {path.name} --artifacts-dir {path.parent.parent}" if os.path.isfile(path / "config.json") and path.parent.name == "runs" else ""
    raise ConfigError(f"run name {name!r} must be a plain folder name (it names <artifacts>/runs/<name>/){found}")


class RunConfig(BaseModel):
    """Everything that defines one saeflow run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # --- model -------------------------------------------------------------------------------
    model_name: str = "gelu-1l"
    """TransformerLens pretrained model name (e.g. `tiny-stories-1M`, `gpt2`), or the path of a
    local Hugging Face checkpoint folder (`save_pretrained` output with its tokenizer) of an
    architecture TransformerLens supports, loaded without network. With `model_cfg` set, only a
    label for the locally built model (a new run refuses a pretrained model's name, the default's
    included, or a checkpoint's path there: the SAE would claim that model); with `activations_path` or `synthetic`, only a label
    (default: the folder's name, or `synthetic`)."""
    model_cfg: dict[str, Any] | None = None
    """`HookedTransformerConfig` fields of a model built locally with random weights (seeded by
    `seed`; trained when `model_train_tokens` is set) instead of a pretrained one. `d_vocab`
    defaults to the tokenizer's size."""
    tokenizer_path: str | None = None
    """Folder of a Hugging Face tokenizer for a `model_cfg` model (empty: a word-level tokenizer is
    trained on the dataset and stored with the model), or for a local checkpoint saved without
    its tokenizer. A new run with a pretrained model name, which uses its own, is refused."""
    model_from_pretrained_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for `HookedTransformer.from_pretrained_no_processing`; for a local
    checkpoint, only those that shape its config (`dtype`, `n_ctx`, `first_n_layers`,
    `default_prepend_bos`, `n_devices`); none for a `model_cfg` model (set them in `model_cfg`).
    A new run giving one that its model would ignore is refused."""
    model_train_tokens: int = Field(0, ge=0)
    """Tokens a `model_cfg` model is trained on (next-token prediction on `dataset_path`, in
    contexts of its `n_ctx` tokens, Adam, seeded by `seed`) before its activations are made.
    0 keeps its random weights."""
    model_train_lr: float = Field(1e-3, gt=0)
    """Adam learning rate of the model training (`model_train_tokens`); linear warm-up over the
    first 5% of steps, cosine decay to a tenth of it."""
    model_train_batch_size: int = Field(32, gt=0)
    """Contexts (of the model's `n_ctx` tokens) per model-training step."""

    # --- hook and data -----------------------------------------------------------------------
    hook_name: str = "blocks.0.hook_resid_post"
    """TransformerLens hook whose activations the SAE is trained on. With `activations_path`: the
    activation column of a `CacheActivationsRunner` dataset; for tensor files (required there) the
    hook they came from, recorded in the SAE's `cfg.json`."""
    hook_layer: int | None = None
    """Layer of `hook_name` (guide name, no longer needed by SAELens); checked against it."""
    hook_head_index: int | None = None
    """For per-head hooks (`attn.hook_z`, ...): train on this head only."""
    d_in: int | None = None
    """Width of the hook's activations. Read from the model when empty; a stated value that does
    not match the hook is an error."""
    activations_path: str | None = None
    """Train on activations made elsewhere instead of running a model: a folder of `.safetensors`
    (tensor `activations`, or the file's only tensor; optional `tokens`) or `.npy` files of shape
    `[n, d_in]`, read in file-name order, or a dataset folder written by SAELens's
    `CacheActivationsRunner` (its `hook_name` column). Imported once into an activation store; the
    last `eval_tokens` rows are held out for evaluation. No model is loaded: `model_name` and
    `hook_name` are only labels."""
    synthetic: dict[str, Any] | None = None
    """Train on synthetic activations with known features instead of running a model: the fields
    of SAELens's `SyntheticModelConfig` (`num_features`, `firing_probability`,
    `mean_firing_magnitudes`, `std_firing_magnitudes`, `bias`, ...; `hidden_dim` defaults to
    `d_in`, `seed` to `seed`). `training_tokens` + `eval_tokens` rows are generated and stored with
    the feature dictionary; the evaluation adds SAELens's synthetic metrics (MCC, precision/recall,
    shrinkage). See `configs/synthetic.yaml`."""
    dataset_path: str = "demo:stories"
    """Hugging Face dataset name, a local `.txt`/`.jsonl`/`.json`/`.parquet`/`.arrow` file or
    folder of them, a folder written by `Dataset.save_to_disk` (as SAELens's `PretokenizeRunner`
    writes) or `DatasetDict.save_to_disk` (its `train` split), or `demo:stories` for the built-in
    generated story corpus (offline)."""
    is_dataset_tokenized: bool | None = None
    """Whether the dataset holds token ids (`tokens`/`input_ids`) rather than `text`. Empty: read
    from the data; a stated value that does not match the data is an error. Token ids are checked
    against the model's tokenizer; text is tokenised once by the pretokenise stage."""
    streaming: bool = True
    """Stream hub datasets instead of downloading them whole."""
    context_size: int = Field(128, gt=0)
    """Tokens per sequence fed to the model (at most the model's `n_ctx`)."""
    prepend_bos: bool = True
    """Start every context with the BOS token, as most models were trained. For a dataset of
    token ids (used as they are), each row must then begin with the model's BOS token."""

    activation_mode: Literal["cached", "streaming", "auto"] = "cached"
    """`cached`: the hook's activations are computed once and kept on disk (fast re-runs, shared by
    sweeps). `streaming`: only the token ids are kept and training makes the activations on the fly
    (for runs too big to cache). `auto`: streaming when the cached activations would exceed
    `max_cache_gb` and no run has cached them yet; decided once when the run starts."""
    max_cache_gb: float | None = Field(None, gt=0)
    """Largest activation cache `auto` allows, in GB (10^9 bytes). Empty: half the free disk of the
    artifacts folder."""

    # --- SAE ----------------------------------------------------------------------------------
    architecture: Architecture = "standard"
    """SAE architecture: standard, topk, batchtopk, jumprelu, gated or matryoshka_batchtopk
    (alias `matryoshka`), each trained with its SAELens 6 training config."""
    expansion_factor: int = Field(8, gt=0)
    """SAE width as a multiple of `d_in` (`d_sae = expansion_factor * d_in`)."""
    d_sae: int | None = Field(None, gt=0)
    """SAE width; overrides `expansion_factor` when set."""
    l1_coefficient: float = Field(1.0, ge=0)
    """Sparsity penalty (standard and gated)."""
    l1_warm_up_steps: int = Field(0, ge=0)
    """Steps over which the L1 penalty ramps up from zero (standard and gated)."""
    k: int = Field(100, gt=0)
    """Active features per token (topk; the batch average for batchtopk and matryoshka)."""
    l0_coefficient: float = Field(1.0, ge=0)
    """L0 sparsity penalty (jumprelu)."""
    l0_warm_up_steps: int = Field(0, ge=0)
    """Steps over which the L0 penalty ramps up (jumprelu)."""
    matryoshka_widths: list[int] = Field(default_factory=list)
    """Nested dictionary widths, increasing (matryoshka); `d_sae` is added as the last one."""
    sae_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further fields of the architecture's SAELens training config (e.g. `decoder_init_norm`,
    `jumprelu_bandwidth`, `aux_loss_coefficient`)."""
    normalize_activations: Literal["none", "expected_average_only_in", "layer_norm"] = "none"
    """Activation normalisation (SAELens): `expected_average_only_in` scales inputs to norm
    sqrt(d_in), estimated from the stored activations and folded into the saved weights;
    `layer_norm` normalises each input (mean 0, std 1) and undoes it on the output."""

    # --- training -----------------------------------------------------------------------------
    lr: float = Field(3e-4, gt=0)
    """Adam learning rate."""
    lr_end: float | None = Field(None, ge=0)
    """Final learning rate of cosine schedules (default `lr / 10`)."""
    lr_scheduler_name: Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"] = "constant"
    """Learning-rate schedule (SAELens's): `constant`, `cosineannealing` (to `lr_end`, between the
    warm-up and the decay) or `cosineannealingwarmrestarts`."""
    lr_warm_up_steps: int = Field(0, ge=0)
    """Steps of linear learning-rate warm-up."""
    lr_decay_steps: int = Field(0, ge=0)
    """Steps of linear decay to zero at the end."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """Adam beta2."""
    train_batch_size_tokens: int = Field(4096, gt=0)
    """Activations (tokens) per training step."""
    training_tokens: int = Field(2_000_000, gt=0)
    """Tokens to train on; the activation store holds this many (rounded up to whole contexts)."""
    n_batches_in_buffer: int = Field(20, gt=0)
    """Streaming mode only: the model makes the activations of a chunk of
    `n_batches_in_buffer * store_batch_size_prompts` contexts at a time, whose tokens are shuffled
    among themselves (training batches may span chunks). Unused in cached mode, which shuffles the
    whole store, but a run's setting still (`activation_mode: auto` may choose either mode):
    changing it names a new run."""
    store_batch_size_prompts: int = Field(32, gt=0)
    """Sequences per model forward pass while filling the activation store."""
    dead_feature_window: int = Field(1000, gt=0)
    """Steps without firing after which a feature counts as dead in training (the log's and the
    curves' `dead_features`, which stay 0 for the first this many steps, so in shorter runs)."""
    feature_sampling_window: int = Field(2000, gt=0)
    """Steps per window of feature-firing statistics."""
    device: str = "cpu"
    """Device for the model and the SAE (`cpu`, `cuda`, `cuda:1`, `mps`)."""
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    """Data type of the SAE (its weights and Adam's state) and of the stored activations, as in
    SAELens (`store_dtype` stores the activations in another). For bf16 speed on a GPU use float32
    with `autocast`: with bfloat16 the weights keep 8
    significant bits, which round away Adam steps below about 1/256 of a weight (at lr 3e-4, most
    of them; training warns). float16 is refused: Adam's epsilon (1e-8) is 0 in float16, so a
    feature that does not fire gets NaN weights at its first step."""
    store_dtype: Literal["float32", "bfloat16"] | None = None
    """Data type of the stored activations (a cached store, imported or synthetic ones, a streaming
    chunk), when it should differ from `dtype`: bfloat16 halves the store (GPT-2 small's residual
    stream over 300M tokens: 460 instead of 920 GB) while the SAE trains in float32; each batch is
    taken to `dtype` as training reads it. Default: `dtype`."""
    autocast: bool = False
    """bf16 autocast for the SAE training step (GPU)."""
    autocast_lm: bool = False
    """bf16 autocast for the model forward pass while filling the store (GPU)."""
    seed: int = 42
    """Seeds the SAE initialisation, the data order, locally built models, the built-in dataset
    (which changes the pretokenised contexts and the activation store; a local model, the store)
    and synthetic activations unless `synthetic.seed` is set (pin it for a seed sweep on one set
    of rows)."""
    compile_sae: bool = False
    """Compile the SAE's training step with `torch.compile` (SAELens's `compile_sae`), for long
    runs. Results differ from an uncompiled run in the last bits; a compiled run still resumes
    bitwise exactly. On a 2-core CPU the step ran 1.4-1.6x faster at d_in 64 and 1.1-1.2x at
    d_in 256, and the first step compiled for 6-14 s (2 s with torch's kernel cache warm), so it
    paid within a thousand steps (BENCHMARKS.md). On an H200 it made the step 1.51x faster at
    d_in 768 and d_sae 24,576, and slower at the small sizes, where launching kernels dominates.
    On the CPU it needs a C++ compiler."""

    deterministic: bool = False
    """GPU: deterministic kernels (`torch.use_deterministic_algorithms`, `CUBLAS_WORKSPACE_CONFIG`)
    so that a resumed run can match an uninterrupted one bit for bit; the SAE step ran 1.07-1.21x
    slower on an H200. CPU runs are deterministic without it."""
    read_workers: int | None = Field(None, ge=0)
    """Processes that read a cached activation store's training batches ahead of the SAE step and
    hand them over through shared memory (/dev/shm). Default: 4 (at most the CPUs this process
    may use) on an accelerator, where reading a batch took longer than the SAE step (7.6 against
    3.1 ms on an H200's host); 0 on the CPU, where readers competed with the step for the cores.
    0 reads each batch in the training loop, as does a daemon process (a Dask worker started by
    its nanny, unless `distributed.worker.daemon` is false), which may not start processes. The
    batches, and so the trained SAE, are the same whatever it is. Streaming stores ignore it: on an accelerator they are made one batch ahead on a thread."""

    # --- checkpoints and logging --------------------------------------------------------------
    n_checkpoints: int = Field(10, ge=0)
    """Checkpoints written during training, evenly spaced, plus one after the last step (none with
    0, but for `checkpoint_every_minutes`'s, and then the one after the last step); a restarted
    run resumes from the newest."""
    checkpoint_every_minutes: float | None = Field(None, gt=0)
    """Also write a checkpoint at the end of the first step once this many minutes of training
    have passed since the last one (or since training started), so that a run killed without
    warning (out of memory, a lost node) loses about that much: `n_checkpoints` are spaced by
    tokens, hours apart in a multi-day run. They count among the `keep_checkpoints` newest. A
    signal or `saeflow stop` writes one at once either way."""
    keep_checkpoints: int = Field(3, gt=0)
    """How many of the newest checkpoints are kept."""
    retries: int = Field(0, ge=0)
    """Times Prefect retries a failed training task; each retry resumes from the newest checkpoint
    in the same flow run. Deliberate stops (signals, non-finite loss, a failed checkpoint write)
    are not retried."""
    retry_delay_seconds: float = Field(10, ge=0)
    """Wait before each retry."""
    checkpoint_path: str | None = None
    """Folder for checkpoints (guide name); default `<artifacts>/runs/<run>/checkpoints`. The run
    name is appended; a relative path is made absolute when the run starts."""
    log_to_wandb: bool = False
    """Log training to Weights & Biases."""
    wandb_project: str = "saeflow"
    """Weights & Biases project."""
    wandb_entity: str | None = None
    """Weights & Biases entity (user or team) the run is logged under; default: your default entity."""
    wandb_log_frequency: int = Field(10, gt=0)
    """Steps between Weights & Biases log entries."""

    log_every: int = Field(50, gt=0)
    """Steps between rows of `runs/<run>/train_log.jsonl`; at such a step the Prefect log also gets
    a line and the UI's progress bar an update, each at most every 10 s (and at the last step)."""

    # --- evaluation, saving and analysis ------------------------------------------------------
    eval_tokens: int = Field(65_536, gt=0)
    """Held-out tokens (the data after the training tokens, rounded up to whole contexts) for the
    evaluation and the dashboard's max-activating contexts. With `activations_path`: the last
    `eval_tokens` rows of the source; with `synthetic`: `eval_tokens` more generated rows."""
    sparsity_tokens: int = Field(1_000_000, gt=0)
    """Stored activations the final SAE is run over to measure each feature's firing frequency
    (saved as `sparsity.safetensors`), 8,192 at a time; those at special tokens (BOS, EOS,
    padding) are left out. Changing it on a finished run measures again (the SAE is kept) and
    evaluates and analyses the remade `sae/` again."""
    eval_batch_size_prompts: int | None = Field(None, gt=0)
    """Held-out contexts per model pass in the evaluation (SAELens's name; empty: as
    `store_batch_size_prompts`; unused without a model). For the CE and KL metrics SAELens holds up to six `[batch,
    context_size, d_vocab]` tensors at once (the clean, SAE-spliced and zero-ablated logits and
    the KL's softmaxes): lower it if the evaluation runs out of memory (big vocabularies, long
    contexts). Changed on a finished run, only the evaluation and the report are computed again (the
    training task only finds its result on disk); whole batches are evaluated, so the evaluated
    contexts are the held-out ones rounded down to a multiple of it."""
    prompts: list[str] = Field(default_factory=lambda: ["The quick brown fox jumps over the lazy"])
    """Prompts analysed after training: top features at `analysis_token_index`."""
    analysis_token_index: int = -1
    """Token position whose features are analysed (negative counts from the end)."""
    top_k_features: int = Field(5, gt=0)
    """Features reported per prompt, and analysed through `W_dec @ W_U`."""
    top_k_tokens: int = Field(10, gt=0)
    """Promoted and inhibited tokens listed per feature."""
    dashboard_features: int = Field(16, gt=0)
    """Features shown on the HTML dashboard: the prompts' top features (all of them), topped up
    with the most frequent ones to this many in all."""
    dashboard_contexts: int = Field(5, gt=0)
    """Max-activating held-out contexts shown per dashboard feature."""

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("architecture") in ARCHITECTURE_ALIASES:
            data = {**data, "architecture": ARCHITECTURE_ALIASES[data["architecture"]]}
        if isinstance(data, dict) and "model_name" not in data:
            # without a model, the label in run names and SAE metadata says where the activations came from
            if data.get("activations_path"):
                data = {**data, "model_name": Path(data["activations_path"]).name or "activations"}
            elif data.get("synthetic") is not None:
                data = {**data, "model_name": "synthetic"}
        if isinstance(data, dict) and data.get("store_dtype") is not None and data["store_dtype"] == data.get("dtype", "float32"):
            data = {k: v for k, v in data.items() if k != "store_dtype"}  # the default: the same run as without it
        if isinstance(data, dict):
            # YAML reads 1e6 (no dot) as text, which an integer setting would refuse: a whole number in
            # scientific notation is taken as that number, as `lr: 1e-4` is for a float.
            for name in cls._integer_fields() & data.keys():
                value = data[name]
                if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()) and float(value).is_integer() and abs(float(value)) < 2**53:
                    data = {**data, name: int(float(value))}
        return data

    @classmethod
    @functools.cache
    def _integer_fields(cls) -> frozenset[str]:
        return frozenset(name for name, field in cls.model_fields.items() if field.annotation in (int, int | None))

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        layer = hook_layer_of(self.hook_name)
        if self.hook_layer is not None and layer is not None and self.hook_layer != layer:
            raise ValueError(
                f"hook_layer is {self.hook_layer} but hook_name '{self.hook_name}' is in layer {layer}; "
                f"fix one of them (hook_layer can be left out)"
            )
        for name, architectures in ARCHITECTURE_FIELDS.items():
            default = RunConfig.model_fields[name].get_default(call_default_factory=True)
            if getattr(self, name) != default and self.architecture not in architectures:
                raise ValueError(
                    f"{name} is used only by the {' and '.join(architectures)} architecture(s), "
                    f"not by '{self.architecture}'; remove it (or set it to its default, {json.dumps(default)}) or change architecture"
                )
        if self.training_tokens < self.train_batch_size_tokens:
            raise ValueError(
                f"training_tokens ({self.training_tokens}) is smaller than one batch "
                f"(train_batch_size_tokens = {self.train_batch_size_tokens}); raise training_tokens "
                f"or lower train_batch_size_tokens"
            )
        if self.dtype == "float16":
            raise ValueError(
                "dtype float16 cannot train an SAE: Adam's epsilon (1e-8) is 0 in float16, so a feature that does not "
                "fire gets NaN weights at its first step; use float32 with autocast: true (bf16 compute, float32 weights)"
            )
        if self.d_in is not None and self.d_in <= 0:
            raise ValueError(f"d_in must be positive, got {self.d_in}")
        if self.activations_path is not None and self.synthetic is not None:
            raise ValueError("activations_path and synthetic are two sources of activations; give one of them")
        if self.activation_source is not None:
            for name in MODEL_ONLY_FIELDS:
                if getattr(self, name) != RunConfig.model_fields[name].get_default(call_default_factory=True):
                    key = "activations_path" if self.activations_path is not None else "synthetic"
                    raise ValueError(
                        f"{name} is set, but with {key} no model is run (saeflow cannot tell which model "
                        f"and hook made the activations); remove {name}, or remove {key} to make the "
                        f"activations with the model"
                    )
        if self.model_train_tokens and self.model_cfg is None:
            raise ValueError(
                "model_train_tokens trains a locally built model, but model_cfg is not set; "
                "set model_cfg or remove model_train_tokens"
            )
        if self.model_cfg is not None and "n_ctx" in self.model_cfg and self.context_size > self.model_cfg["n_ctx"]:
            raise ValueError(
                f"context_size ({self.context_size}) is larger than the model's n_ctx "
                f"({self.model_cfg['n_ctx']}); lower context_size"
            )
        return self

    @property
    def activation_source(self) -> Literal["files", "synthetic"] | None:
        """Where the activations come from when no model makes them: `files` (`activations_path`),
        `synthetic`, or None (the model runs over the dataset)."""
        if self.activations_path is not None:
            return "files"
        return "synthetic" if self.synthetic is not None else None

    @property
    def sae_width(self) -> int:
        """`d_sae`, from `d_sae` or `expansion_factor * d_in` (needs `d_in`)."""
        if self.d_sae is not None:
            return self.d_sae
        if self.d_in is None:
            raise ConfigError("d_in is not known yet; resolve it from the model first")
        return self.expansion_factor * self.d_in

    @property
    def activation_dtype(self) -> str:
        """The stored activations' data type: `store_dtype`, else `dtype`."""
        return self.store_dtype or self.dtype

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the trained SAE, as JSON-able values."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}


def hook_layer_of(hook_name: str) -> int | None:
    """The layer number in a `blocks.N.` hook name, or None for hooks outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else None


def device_kind(device: str) -> str:
    """A device's kind, without its index: "cuda:3" -> "cuda"."""
    return str(device).split(":")[0]


def stable_hash(value: Any, length: int = 12) -> str:
    """A short hash of a JSON-able value, stable across runs and machines."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# SAELens's own names that are not saeflow keys, and what to use instead.
SAELENS_EQUIVALENTS = {
    "run_name": "name the run on the command line (--run-name NAME)",
    "use_cached_activations": "to train on activations cached on disk, set activations_path to their folder",
    "cached_activations_path": "set activations_path to the folder of the cached activations",
    "decoder_heuristic_init_norm": "SAELens 6 calls it decoder_init_norm: give it under sae_kwargs",
}
# Settings of SAELens before version 6, which no longer has them.
REMOVED_IN_SAELENS_6 = (
    "b_dec_init_method", "decoder_heuristic_init", "decoder_orthogonal_init", "init_encoder_as_decoder_transpose",
    "normalize_sae_decoder", "scale_sparsity_penalty_by_decoder_norm", "use_ghost_grads", "mse_loss_normalization", "noise_scale",
)


def unknown_key_hint(key: str) -> str:
    """What to write instead of `key`, which is not a saeflow key."""
    import dataclasses

    from sae_lens import saes
    from sae_lens.config import LanguageModelSAERunnerConfig

    if key in ("base", "grid", "members"):
        return "; it is a sweep file's key: run a sweep file with `saeflow sweep FILE`"
    if key in SAELENS_EQUIVALENTS:
        return f"; {SAELENS_EQUIVALENTS[key]}"
    if key in REMOVED_IN_SAELENS_6:
        return "; it is a setting of SAELens before version 6, which has none by that name: leave it out"
    sae_fields = {
        field.name
        for name in dir(saes)
        if name.endswith("TrainingSAEConfig") and dataclasses.is_dataclass(getattr(saes, name))
        for field in dataclasses.fields(getattr(saes, name))
    }
    if key in sae_fields:
        return f"; it is a SAELens SAE setting: give it under sae_kwargs (sae_kwargs: {{{key}: ...}})"
    if key in {field.name for field in dataclasses.fields(LanguageModelSAERunnerConfig)}:
        return "; it is a setting of SAELens's runner that saeflow does not take: see `saeflow config-reference` for valid keys"
    close = difflib.get_close_matches(key, list(RunConfig.model_fields), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else "; see `saeflow config-reference` for valid keys"


SCIENTIFIC = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+")
# What YAML made of a value that a setting of another type refused, and what to write instead.
YAML_HINTS = {
    "int_parsing": "write a whole number, e.g. 1000000 or 1_000_000",
    "int_from_float": "write a whole number",
    "string_type": "YAML reads yes/no/on/off/true/false as booleans and bare numbers as numbers: put the value in quotes",
    "list_type": 'give a list, e.g. [a, b], or one "- item" line each',
}


def _choice_hint(key: str, given: str, choices: list[str]) -> str:
    """What to write instead of `given`, which is none of `choices` of `key`."""
    if key == "lr_scheduler_name" and ("warm" in given.lower() or "decay" in given.lower()):
        # SAELens before 6 had schedulers with warm-up or decay in their names (the guide's cosine_warmup)
        return "; SAELens 6 sets warm-up and decay apart: use cosineannealing (or constant) with lr_warm_up_steps and lr_decay_steps"
    close = difflib.get_close_matches(given.lower(), choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _friendly_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{where}'{unknown_key_hint(where)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            kind = item["type"]
            if (kind in YAML_HINTS or kind.endswith(("_parsing", "_type")) or kind == "literal_error") and item["loc"] and "input" in item:  # what YAML made of it
                message += f" (given {item['input']!r}" + (f"; {YAML_HINTS[kind]})" if kind in YAML_HINTS else ")")
            if kind == "literal_error" and isinstance(item.get("input"), str):
                message += _choice_hint(where, item["input"], re.findall(r"'([^']*)'", item.get("ctx", {}).get("expected", "")))
            lines.append(f"{where}: {message}" if item["loc"] else message)
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `--set key=value` override; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def make_config(values: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Validate raw values plus `--set` overrides into a RunConfig, or raise ConfigError."""
    values = dict(values)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    try:
        return RunConfig(**values)
    except ValidationError as error:
        raise ConfigError(_friendly_errors(error)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error (YAML keeps the
    last, so a setting written earlier in the file would be silently dropped)."""


def _mapping_of_unique_keys(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, which YAML's own loader merges
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            line = lines.get(key)
        except TypeError:  # a key YAML itself cannot use (a list)
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} cannot be a key", key_node.start_mark) from None
        if line is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {line + 1} and {key_node.start_mark.line + 1}; YAML would keep the second); keep one", key_node.start_mark
            )
        lines[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_of_unique_keys)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML file holds (`what` names the file in messages), or ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys (key: value lines), not {type(values).__name__}")
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the built-in demo config when `path` is None) and validate it."""
    return make_config(read_yaml_mapping(DEMO_CONFIG if path is None else path), overrides)


def config_reference() -> str:
    """A markdown table of every config field with its default and docstring."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, field in RunConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        doc = " ".join((field.description or "").split())
        rows.append(f"| `{name}` | `{json.dumps(default)}` | {doc} |")
    return "\n".join(rows)


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


TORCH_GLOBALS = threading.RLock()
"""Held while work uses or changes state that torch and transformers keep for the whole process,
because the members of a sweep are threads of one process: torch's global random generator
(seeded, restored and drawn from by SAE initialisation and loading, locally built models,
synthetic rows and ground truth, checkpoint restores: a member whose initialisation was
interleaved with another's seeding got other weights than alone, 4 of 20 tries of 4 members
started together), and what a transformers model load changes while it runs (the default dtype,
a no-op `tie_weights` on the model class: two loads at once failed, 8 of 10 tries in a review,
and one in bfloat16 left the default dtype bfloat16). The SAE trainer is made under it, as its
counters take the default dtype."""


def holding_torch_globals(function):
    """`function`, called holding TORCH_GLOBALS."""

    @functools.wraps(function)
    def holding(*args, **kwargs):
        with TORCH_GLOBALS:
            return function(*args, **kwargs)

    return holding
