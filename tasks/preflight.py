"""Checks made before any work starts: every problem that can be found without loading a model's
weights or touching the data at scale gets one clear message here.

`resolve` checks the config against the model's architecture (built on the meta device: hook
names and shapes, no weights) and the dataset's columns, and fills in `d_in`. `claim_run` picks
the run folder and refuses to continue a run whose stored config would change the result.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import os
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any

from tasks.artifacts import exclusive_lock, read_json, run_dir, verify_manifest, write_json
from tasks.config import ARCHITECTURE_FIELDS, ConfigError, RunConfig, TORCH_GLOBALS, check_run_name, device_kind, hook_layer_of, stable_hash


def _per_token_hooks(hooks: dict[str, tuple[int, ...] | None]) -> list[str]:
    """The hooks an SAE can be trained on: a vector per token (or per token and head)."""
    from tasks.model import HEAD_HOOKS

    return sorted(
        name for name, shape in hooks.items()
        if shape is not None and (len(shape) == 1 and shape[0] > 1 or any(h in name for h in HEAD_HOOKS))
    )


def _valid_hooks_message(hook_names: list[str], n_layers: int) -> str:
    outside = [h for h in hook_names if not h.startswith("blocks.")]
    in_block = sorted({h.split(".", 2)[2] for h in hook_names if h.startswith("blocks.0.")})
    return (
        f"valid hooks are blocks.N.<name> for N in 0..{n_layers - 1} with <name> one of: "
        f"{', '.join(in_block)}; and {', '.join(outside)}"
    )


def _available_devices() -> list[str]:
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def _unreachable_hub_hint(dataset_path: str, error: Exception) -> str:
    """How to read a hub dataset where the hub cannot be reached (an offline compute node), for
    `datasets`' "Couldn't reach ... on the Hub": it then reads the dataset from its own cache."""
    import datasets

    if not isinstance(error, ConnectionError):
        return ""
    local = f" There is no local file or folder {Path(dataset_path).resolve()} either." if "/" in dataset_path else ""
    return (
        f". Without the hub, a hub dataset is read from the datasets cache ({datasets.config.HF_DATASETS_CACHE}, "
        f"HF_DATASETS_CACHE), which does not hold it: load it once where the hub is reachable, into the same cache, "
        f"with `datasets.load_dataset('{dataset_path}', split='train')` (not streaming: streaming caches nothing), "
        f"or save it there with `save_to_disk` and set dataset_path to that folder.{local} On a machine without "
        f"network, HF_HUB_OFFLINE=1 makes this answer come at once instead of after the hub's retries"
    )


# The HookedTransformerConfig setting that makes TransformerLens compute a hook, by the hook's name.
OPTIONAL_HOOK_SETTINGS = {
    "hook_mlp_in": "use_hook_mlp_in",
    "hook_attn_in": "use_attn_in",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_result": "use_attn_result",
}


def missing_device(device: str) -> str | None:
    """Why this machine cannot run on `device` (a device string torch parses), or None."""
    import torch

    kind, index = torch.device(device).type, torch.device(device).index
    if kind == "cuda" and not torch.cuda.is_available():
        return f"this machine has {f'a torch {torch.__version__} built without CUDA' if torch.version.cuda is None else 'no CUDA GPU visible to torch'}"
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        return f"torch sees {torch.cuda.device_count()} CUDA GPU(s)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return "MPS (Apple GPU) is not available here"
    return None


def _check_wandb_login() -> None:
    """With `log_to_wandb`, W&B must have an API key here (or run offline): it is asked for only
    when training starts, after the model, the tokens and the activations are made. Checked
    without a network call (`verify=False`); at a terminal without a key, W&B asks for one now."""
    import wandb

    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return
    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as error:
        raise ConfigError(
            f"log_to_wandb is true but Weights & Biases cannot log in here ({error}): run `wandb login` or set "
            f"WANDB_API_KEY, or log offline with WANDB_MODE=offline (`wandb sync` uploads later), or set log_to_wandb: false"
        ) from None


def check_device_name(device: str) -> None:
    """Raise ConfigError unless `device` names a device saeflow can use (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):  # torch's message lists device types saeflow cannot use
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{device}' is not a device saeflow can use; use cpu, cuda, cuda:N or mps (available here: {', '.join(_available_devices())})")


def _check_device(cfg: RunConfig, here: bool) -> None:
    """`device` names a device torch knows and, with `here`, one this machine has."""
    check_device_name(cfg.device)
    missing = missing_device(cfg.device) if here else None
    if missing:
        raise ConfigError(f"device is '{cfg.device}', but {missing}; use device: cpu or another device available here ({', '.join(_available_devices())})")


def _resolve_source(cfg: RunConfig) -> RunConfig:
    """Check activations made without a model (their files' headers, or the synthetic settings);
    fill in `d_in`. Every row is checked for NaN/inf when the store is imported, before training."""
    from tasks.sources import BadActivations, is_saved_dataset, open_source, synthetic_model_config

    if cfg.activation_source == "synthetic":
        width = synthetic_model_config(cfg.synthetic, cfg.d_in, cfg.seed).hidden_dim
    else:
        try:
            readers = open_source(cfg.activations_path, cfg.hook_name)
        except BadActivations as error:
            raise ConfigError(str(error)) from None
        # Tensor files do not say which hook made them, and the SAE's cfg.json tells SAELens where
        # to attach it: a default left in place would be a wrong claim, not a label.
        if "hook_name" not in cfg.model_fields_set and not is_saved_dataset(Path(cfg.activations_path).expanduser()):
            raise ConfigError(
                f"hook_name is not set: saeflow cannot tell which hook made the activations in {cfg.activations_path}, "
                f"and the saved SAE's cfg.json records hook_name as the hook SAELens attaches it to; set hook_name to "
                f"the hook they came from (e.g. blocks.6.hook_resid_post). A run started without it continues with "
                f"`saeflow run --run-name NAME` (its stored config)"
            )
        width, rows = readers[0].width, sum(r.rows for r in readers)
        if cfg.d_in is not None and cfg.d_in != width:
            raise ConfigError(f"d_in is {cfg.d_in} but the activations in {cfg.activations_path} have width {width}; set d_in: {width} or leave it out")
        if rows - cfg.eval_tokens < cfg.train_batch_size_tokens:
            room = rows - cfg.train_batch_size_tokens  # the most rows that can be held out
            fix = f"lower eval_tokens to at most {room}" if room > 0 else f"lower train_batch_size_tokens below {rows}, and eval_tokens with it"
            raise ConfigError(
                f"{cfg.activations_path} holds {rows} rows; holding out the last eval_tokens = {cfg.eval_tokens} for "
                f"evaluation leaves {max(rows - cfg.eval_tokens, 0)} to train on, less than one batch "
                f"(train_batch_size_tokens = {cfg.train_batch_size_tokens}); {fix}, or give more rows"
            )
    return cfg.model_copy(update={"d_in": width, "hook_layer": hook_layer_of(cfg.hook_name)})


def resolve(cfg: RunConfig, runs_here: bool = True) -> RunConfig:
    """Check the config against the model and the data (or the activation source); return it
    with `d_in` filled in. `runs_here=False` (a sweep member run by a Dask cluster on other
    machines) leaves out whether this machine has the config's device."""
    from datasets.exceptions import DatasetGenerationError

    from tasks.data import check_dataset_columns, dataset_columns, load_text_dataset
    from tasks.model import OPTIONAL_HEAD_HOOKS, head_hook_problem, hook_width, meta_model, token_hooks
    from tasks.tokens import check_token_dataset

    _check_device(cfg, runs_here)
    if cfg.log_to_wandb and runs_here:
        _check_wandb_login()
    if cfg.checkpoint_path is not None:  # where it points must not depend on the folder a run starts in
        cfg = cfg.model_copy(update={"checkpoint_path": os.path.abspath(os.path.expanduser(cfg.checkpoint_path))})
    if cfg.activation_source is not None:
        cfg = _resolve_source(cfg)
        _check_sae_settings(cfg)
        if runs_here:
            _check_sae_fits(cfg)
        return RunConfig(**cfg.model_dump())
    try:
        model = meta_model(cfg)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        if cfg.model_cfg is not None:  # TransformerLens refused the model built from it
            raise ConfigError(f"model_cfg is refused by TransformerLens: {error}") from None
        raise ConfigError(
            f"cannot read the architecture of model '{cfg.model_name}': {str(error).rstrip('.')}. Use a TransformerLens "
            f"model name (offline, it must already be in the Hugging Face cache; HF_HUB_OFFLINE=1 then spares the hub's "
            f"retries), the path of a local checkpoint folder, or give model_cfg"
        ) from None
    hooks = token_hooks(model)
    if hooks.get(cfg.hook_name) is None:
        if cfg.hook_name not in model.hook_dict:
            problem = f"unknown hook_name '{cfg.hook_name}' for {cfg.model_name}"
        elif cfg.hook_name in hooks:
            problem = (
                f"hook_name '{cfg.hook_name}' has no activation per token (its dimension 1 is not the token position: "
                f"attention patterns and scores are per head and query-key pair), and the SAE is trained on one per token"
            )
        elif cfg.hook_name.endswith(OPTIONAL_HEAD_HOOKS):  # not computed as configured, and not usable if it were
            problem = f"hook_name {head_hook_problem(cfg.hook_name)}"
        else:
            setting = next((v for k, v in OPTIONAL_HOOK_SETTINGS.items() if cfg.hook_name.endswith(k)), None)
            if cfg.model_cfg is not None and setting:
                fix = f": add {setting}: true to model_cfg"
            else:
                fix = " (TransformerLens fills it only with a setting such as use_attn_result, use_split_qkv_input, use_attn_in or use_hook_mlp_in, which saeflow applies to a locally built model_cfg model)"
            problem = f"hook_name '{cfg.hook_name}' is not computed by {cfg.model_name} as configured{fix}"
        raise ConfigError(f"{problem}; " + _valid_hooks_message(_per_token_hooks(hooks), model.cfg.n_layers))
    if cfg.context_size > model.cfg.n_ctx:
        raise ConfigError(f"context_size ({cfg.context_size}) is larger than {cfg.model_name}'s n_ctx ({model.cfg.n_ctx}); lower context_size")
    try:
        width = hook_width(hooks[cfg.hook_name], cfg.hook_name, cfg.hook_head_index)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if width == 1:
        raise ConfigError(
            f"hook_name '{cfg.hook_name}' holds one number per token (a norm's scale): nothing for an SAE to decompose; "
            + _valid_hooks_message(_per_token_hooks(hooks), model.cfg.n_layers)
        )
    if cfg.d_in is not None and cfg.d_in != width:
        raise ConfigError(f"d_in is {cfg.d_in} but {cfg.hook_name} of {cfg.model_name} has width {width}; set d_in: {width} or leave it out")
    layer = hook_layer_of(cfg.hook_name)
    cfg = cfg.model_copy(update={"d_in": width, "hook_layer": layer})

    try:
        dataset = load_text_dataset(cfg.dataset_path, streaming=True, seed=cfg.seed)
        tokenized = check_dataset_columns(dataset_columns(dataset), cfg.is_dataset_tokenized, cfg.dataset_path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot use dataset '{cfg.dataset_path}': {error}{_unreachable_hub_hint(cfg.dataset_path, error)}") from None
    except DatasetGenerationError as error:  # `datasets` could not read a local file (an empty one, a malformed row)
        cause = error.__cause__ or error
        raise ConfigError(
            f"cannot use dataset '{cfg.dataset_path}': the datasets library could not read its files "
            f"({type(cause).__name__}: {cause}); check that each file holds data (an empty file has no rows) "
            f"in the format its extension names"
        ) from None
    if tokenized and cfg.model_cfg is not None and cfg.tokenizer_path is None:
        raise ConfigError(
            f"dataset {cfg.dataset_path} holds token ids, so no tokenizer can be trained on it for the local "
            f"model; set tokenizer_path to the tokenizer the dataset was made with"
        )
    if tokenized and cfg.model_train_tokens:
        raise ConfigError(
            f"model_train_tokens trains the model on text, but dataset {cfg.dataset_path} holds token ids; "
            f"train the model on a text dataset, or set model_train_tokens: 0"
        )
    if tokenized:
        try:
            tokenizer = meta_model(cfg, with_tokenizer=True).tokenizer
            check_token_dataset(dataset, cfg.dataset_path, tokenizer, model.cfg.d_vocab, cfg.context_size, cfg.prepend_bos)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot use dataset '{cfg.dataset_path}': {error}") from None
    cfg = cfg.model_copy(update={"is_dataset_tokenized": tokenized})
    _check_sae_settings(cfg)
    if runs_here:
        _check_sae_fits(cfg)
    return RunConfig(**cfg.model_dump())


def device_memory(device: str) -> int | None:
    """Bytes of memory `device` has in all (a GPU's, or this machine's RAM capped by a cgroup v2
    limit), or None where it cannot be told."""
    import torch

    kind = torch.device(device)
    if kind.type == "cuda":
        try:
            return torch.cuda.get_device_properties(kind.index or 0).total_memory
        except (RuntimeError, AssertionError):  # no CUDA here (a sweep's members may run elsewhere)
            return None
    if kind.type != "cpu":
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(limit)) if limit != "max" else total
    except (OSError, ValueError):
        return total


def _check_sae_fits(cfg: RunConfig) -> None:
    """Refuse an SAE that cannot train in its device's memory at all, before the store is filled
    (hours, for a large one): its weights, their gradients and Adam's two moments, and two
    `[batch, d_sae]` activations (the encoder's output and its gradient), a floor of what
    training takes."""
    import torch

    memory = device_memory(cfg.device)
    weights = 2 * cfg.d_in * cfg.sae_width * getattr(torch, cfg.dtype).itemsize
    batch = 2 * cfg.train_batch_size_tokens * cfg.sae_width * (2 if cfg.autocast or cfg.dtype == "bfloat16" else 4)
    if memory is not None and 4 * weights + batch > memory:
        raise ConfigError(
            f"the SAE (d_in {cfg.d_in}, d_sae {cfg.sae_width}) needs at least {(4 * weights + batch) / 1e9:,.1f} GB to train "
            f"(weights, gradients and Adam's moments {4 * weights / 1e9:,.1f} GB; two [train_batch_size_tokens, d_sae] "
            f"activations {batch / 1e9:,.1f} GB), more than the {memory / 1e9:,.1f} GB of {cfg.device}; lower d_sae or "
            f"expansion_factor, or train_batch_size_tokens"
        )


def _check_sae_settings(cfg: RunConfig) -> None:
    import torch

    from tasks.train import new_training_sae

    width = cfg.sae_width
    if cfg.architecture in ARCHITECTURE_FIELDS["k"] and cfg.k > width:
        raise ConfigError(
            f"k ({cfg.k}) is larger than the SAE's width (d_sae = {width}): a {cfg.architecture} SAE keeps k "
            f"active features per token out of d_sae; lower k (e.g. to {max(width // 4, 1)}) or widen the SAE "
            f"(d_sae or expansion_factor)"
        )
    wider = [w for w in cfg.matryoshka_widths if w > width]
    if wider:
        raise ConfigError(
            f"matryoshka_widths {wider} exceed the SAE's width (d_sae = {width}); each nested width must be at "
            f"most d_sae (which is added as the last one): lower them, or widen the SAE (d_sae or expansion_factor)"
        )
    try:
        # Its seeding of torch's generator is for training; under the lock, as other threads (sweep
        # members) seed and draw from that generator under it.
        with TORCH_GLOBALS, torch.random.fork_rng(devices=[]):
            _, runner_cfg = new_training_sae(cfg.model_copy(update={"device": "meta", "compile_sae": False}))  # checked, not trained: nothing to compile
    except (ValueError, TypeError) as error:
        raise ConfigError(f"SAELens rejects the {cfg.architecture} SAE settings: {error}") from None
    _check_schedules(runner_cfg.to_sae_trainer_config())
    if cfg.compile_sae and cfg.device.startswith("cpu"):  # "cpu" or "cpu:0"
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # noqa: BLE001 - inductor raises its own error types when it finds none
            raise ConfigError(
                "compile_sae: true on the CPU needs a C++ compiler (torch.compile builds C++ kernels) and none was "
                "found: install g++ (or point the CXX environment variable at one), or set compile_sae: false"
            ) from None


def check_new_run(cfg: RunConfig) -> None:
    """What only a new run is refused for (`claim_run`), as a run started so by an earlier saeflow
    must still be able to continue: warm-ups and decays longer than the run, which SAELens
    accepts and which leave the learning rate or the sparsity penalty short of its setting for
    the whole run; a `model_cfg` model named as a pretrained one or a checkpoint (the SAE would be
    labelled with it); `model_from_pretrained_kwargs` that a `model_cfg` model or a local
    checkpoint ignores (a misspelt key, too); an empty prompt; a `tokenizer_path` that a pretrained model ignores; an `activations_path`
    folder of both .safetensors and .npy files (each file of those suffixes would be imported)."""
    from tasks.model import CONFIG_KWARGS, checkpoint_folder, pretrained_model_names
    from tasks.sources import check_one_format

    path = Path(cfg.model_name).expanduser()
    checkpoint_like = (path / "config.json").is_file() or cfg.model_name.startswith(("/", "./", "../", "~"))
    if cfg.model_cfg is not None and (cfg.model_name.lower() in pretrained_model_names() or checkpoint_like):
        given = "the default model_name" if cfg.model_name == RunConfig.model_fields["model_name"].default else "model_name"
        raise ConfigError(
            f"{given} '{cfg.model_name}' names a pretrained model or a checkpoint folder, but model_cfg builds a model of its "
            f"own with random weights (trained only with model_train_tokens): the SAE would be trained on that one and "
            f"labelled '{cfg.model_name}'. Leave model_cfg out to use '{cfg.model_name}', or give the local model a model_name of its own"
        )
    if "" in cfg.prompts:  # an earlier saeflow analysed its BOS token
        raise ConfigError(f"prompts holds an empty prompt ({cfg.prompts}), which has nothing to analyse; remove it")
    kwargs = sorted(cfg.model_from_pretrained_kwargs)
    if cfg.model_cfg is not None and kwargs:
        raise ConfigError(
            f"model_from_pretrained_kwargs ({', '.join(kwargs)}) do nothing to a model_cfg model, which is built from model_cfg "
            f"alone: set such fields (dtype, n_ctx, ...) in model_cfg, and leave model_from_pretrained_kwargs out"
        )
    ignored = [k for k in kwargs if k not in CONFIG_KWARGS]
    if cfg.activation_source is None and checkpoint_folder(cfg) is not None and ignored:
        raise ConfigError(
            f"model_from_pretrained_kwargs {', '.join(ignored)} would do nothing to the local checkpoint {cfg.model_name}, which "
            f"is loaded as saved, with only {', '.join(CONFIG_KWARGS)} applied: leave {'it' if len(ignored) == 1 else 'them'} out"
        )
    if cfg.tokenizer_path is not None and cfg.model_cfg is None and cfg.activation_source is None and checkpoint_folder(cfg) is None:
        raise ConfigError(
            f"tokenizer_path is for a model_cfg model or a local checkpoint saved without its tokenizer; the pretrained "
            f"model '{cfg.model_name}' uses its own tokenizer, and would ignore it: leave tokenizer_path out"
        )
    if cfg.activations_path is not None:
        check_one_format(Path(cfg.activations_path).expanduser())
    steps, warm_up, decay = cfg.training_tokens // cfg.train_batch_size_tokens, cfg.lr_warm_up_steps, cfg.lr_decay_steps
    of_the_run = f"the run's {steps} training steps (training_tokens // train_batch_size_tokens; these settings count steps, not tokens)"
    if warm_up + decay > steps:
        raise ConfigError(
            f"lr_warm_up_steps ({warm_up}) + lr_decay_steps ({decay}) exceed {of_the_run}: the learning rate would "
            f"{'never reach lr' if warm_up > steps else 'not follow its schedule to the end'}; lower them or raise training_tokens"
        )
    for penalty, coefficient in (("l1", "l1_coefficient"), ("l0", "l0_coefficient")):
        penalty_warm_up = getattr(cfg, f"{penalty}_warm_up_steps")
        if penalty_warm_up > steps:
            raise ConfigError(
                f"{penalty}_warm_up_steps ({penalty_warm_up}) exceeds {of_the_run}: the {penalty.upper()} penalty would never "
                f"reach {coefficient}; lower it or raise training_tokens"
            )


def check_new_run_named(cfg: RunConfig, artifacts_dir: str | Path, run_name: str) -> None:
    """`check_new_run` unless run `run_name` exists already (has its config.json)."""
    if not (run_dir(artifacts_dir, run_name) / "config.json").exists():
        check_new_run(cfg)


def _check_schedules(trainer_cfg) -> None:
    """Build SAELens's learning-rate schedule as its trainer will, so that what it refuses is found
    before any work, and refuse the one schedule it builds but cannot step through."""
    import torch
    from sae_lens.training.optim import get_lr_scheduler

    steps, warm_up, decay = trainer_cfg.total_training_steps, trainer_cfg.lr_warm_up_steps, trainer_cfg.lr_decay_steps
    if trainer_cfg.lr_scheduler_name == "cosineannealing" and decay == 0 and warm_up == steps:
        # Its cosine phase has no step: the first step after the warm-up divides by zero.
        raise ConfigError(
            f"lr_warm_up_steps ({warm_up}) takes all {steps} training steps (training_tokens // train_batch_size_tokens), "
            f"leaving the cosineannealing schedule no step; lower lr_warm_up_steps or raise training_tokens"
        )
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=trainer_cfg.lr)
    try:
        get_lr_scheduler(
            trainer_cfg.lr_scheduler_name, optimizer, training_steps=steps, lr=trainer_cfg.lr, warm_up_steps=warm_up,
            decay_steps=decay, lr_end=trainer_cfg.lr_end, num_cycles=trainer_cfg.n_restart_cycles,
        )
    except ValueError as error:
        if "lr_end=0.0" in str(error):
            hint = "set lr_end above 0 (the decay runs from lr_end to 0), or lr_decay_steps: 0"
        elif "T_0" in str(error):
            hint = f"lr_warm_up_steps + lr_decay_steps must leave at least n_restart_cycles of the run's {steps} steps"
        else:
            hint = "change the lr_* settings"
        raise ConfigError(f"SAELens rejects the learning-rate schedule: {error} ({hint})") from None


DERIVED_FIELDS = ("d_in", "hook_layer", "is_dataset_tokenized")  # filled in by `resolve`


def run_identity(cfg: RunConfig) -> dict:
    """What a run's result depends on: the config fields that change it, plus, for a local
    checkpoint or an `activations_path`, the fingerprint of its files (so that a retrained
    checkpoint or rewritten activations make a new run)."""
    from tasks.model import checkpoint_fingerprint, checkpoint_folder, checkpoint_tokenizer_dir
    from tasks.sources import source_fingerprint

    identity = cfg.result_fields()
    folder = checkpoint_folder(cfg)
    if folder is not None and folder.is_dir():
        identity["checkpoint_fingerprint"] = checkpoint_fingerprint(folder, checkpoint_tokenizer_dir(folder, cfg.tokenizer_path))
    if cfg.activations_path is not None and Path(cfg.activations_path).expanduser().exists():
        identity["activations_fingerprint"] = stable_hash(source_fingerprint(Path(cfg.activations_path).expanduser().resolve()))
    return identity


def default_run_name(cfg: RunConfig, artifacts_dir: str | Path | None = None) -> str:
    """A stable, readable run name: the same config always gives the same name, whether or not
    it has been resolved (the fields `resolve` fills in follow from the others). With
    `artifacts_dir`, a run an earlier saeflow named otherwise (after a numbered GPU, `cuda:3`, or
    with a hook name holding `/`) keeps that name there."""
    from tasks.model import checkpoint_folder

    folder = checkpoint_folder(cfg)
    model = "".join(c if c.isalnum() else "-" for c in (folder.name if folder else cfg.model_name)).strip("-")
    hook = cfg.hook_name.replace("blocks.", "L").replace("hook_", "").replace(".", "-")
    # Fields at their defaults are left out, so a saeflow version that adds a field keeps the names.
    defaults = _default_fields()

    def named(identity: dict, hook: str) -> str:
        identity = {k: v for k, v in identity.items() if k not in DERIVED_FIELDS and (k not in defaults or v != defaults[k])}
        return f"{model}-{hook}-{cfg.architecture}-{stable_hash(identity, 8)}"

    # A device by its kind: a run requeued on another GPU (cuda:3, then cuda:0) is the same run.
    # An external source's hook name may hold any character: only a folder name's are kept.
    identity, plain_hook = run_identity(cfg), re.sub(r"[^A-Za-z0-9_-]", "-", hook)
    name = named(identity | {"device": device_kind(cfg.device)}, plain_hook)
    if artifacts_dir is not None:
        # Names of earlier saeflows, which a run they started keeps: with the GPU's number (until
        # 2026-11-30 evening) and the hook name as given (until 2026-12-01).
        earlier = [named(i, h) for i in (identity, identity | {"device": device_kind(cfg.device)}) for h in (hook, plain_hook)]
        for candidate in dict.fromkeys(earlier):
            if candidate != name and os.path.isfile(run_dir(artifacts_dir, candidate) / "config.json"):  # no error under an unsearchable folder
                return candidate
    return name


def _default_fields() -> dict:
    return RunConfig.model_construct().result_fields()


def check_artifacts_dir(artifacts_dir: str | Path) -> None:
    """Fail early, with the fix, if the artifacts folder cannot be written."""
    check_writable(Path(artifacts_dir), "artifacts directory", "choose another with --artifacts-dir")


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Raise ConfigError naming `what` and `fix` if `folder` cannot be made or written in."""
    probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
    existing = next((p for p in (folder, *folder.parents) if os.path.exists(p)), None)  # False, not an error, under a folder it may not search
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{what} {folder} cannot be a folder: {existing} is a file; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{what} {folder} is not writable ({error.strerror}); {fix}") from None


def stored_run_config(stored: Path) -> dict[str, Any]:
    """A run's recorded `config.json` (`config`, `result_fields`), or a ConfigError saying what to
    do when it cannot be read (cut short or zeroed by a crash of the machine)."""
    try:
        record = read_json(stored)
        if not isinstance(record, dict) or not {"config", "result_fields"} <= record.keys():
            raise ValueError("it holds no config and result_fields")
        return record
    except ValueError as error:
        raise ConfigError(
            f"{stored} cannot be read ({type(error).__name__}: {error}): it records the run's config. Restore it, or delete "
            f"it and continue the run with its config file (`saeflow run CONFIG --run-name {shlex.quote(stored.parent.name)} "
            f"--artifacts-dir {shlex.quote(str(stored.parent.parent.parent))}`; its checkpoints' recorded settings are still "
            f"checked against it)"
        ) from None


def claim_run(cfg: RunConfig, artifacts_dir: str | Path, run_name: str | None, new: bool, keep_locks: contextlib.ExitStack | None = None) -> str:
    """Choose the run name and record the config in the run folder.

    The same config (or `run_name`) continues its run. `new` picks the first free name of
    `<name>`, `<name>-2`, `<name>-3`, ... (free in the artifacts and the checkpoint folder) and
    leaves the old run alone. Refused with ConfigError: a new run whose warm-ups outlast it, continuing a run
    whose stored config differs in a field that changes the result (naming the fields), moving
    `checkpoint_path` away from the checkpoints of an unfinished run, and a checkpoint folder
    holding another run's checkpoints.
    Raises Busy if another process holds the run, or its checkpoint folder (`checkpoint_folder_lock`).
    `keep_locks` keeps holding their locks until it closes, so that no other command takes the
    run between its claim and its flow run (whose thread takes them again).
    """
    from tasks.checkpoint import checkpoint_folder_lock, checkpoint_owners, checkpoint_root, missing_checkpoints

    check_artifacts_dir(artifacts_dir)
    if run_name is not None:
        check_run_name(run_name, None if new else artifacts_dir)  # a fresh run's name is a plain one
    if cfg.checkpoint_path is not None:
        check_writable(Path(cfg.checkpoint_path), "checkpoint_path", "choose another, or leave it out to keep checkpoints in the run's folder")
    current = run_identity(cfg)
    # A fresh run (`new`) is named as saeflow names runs now, not as an earlier run of the config was.
    name = _new_run_folder(cfg, artifacts_dir, run_name or default_run_name(cfg)) if new else run_name or default_run_name(cfg, artifacts_dir)
    folder = run_dir(artifacts_dir, name)
    stored = folder / "config.json"
    root = checkpoint_root(cfg.checkpoint_path, folder)
    if not new:  # a new run's were checked before its folder was made
        check_new_run_named(cfg, artifacts_dir, name)
    if stored.exists():
        stored_config = stored_run_config(stored)
        previous = stored_config["result_fields"]
        changed = _changed_fields(previous, current)
        if changed == ["activations_fingerprint"] and previous.get("activations_fingerprint") in _earlier_fingerprints(cfg):
            changed = []  # recorded as an earlier saeflow did, over other files of the folder
        if changed:
            # Another activations_path or model_name is said as such; its files' fingerprint then differs too.
            fingerprints_said = {"activations_fingerprint": "activations_path", "checkpoint_fingerprint": "model_name"}
            details = "; ".join(
                FILES_CHANGED[k].format(cfg=cfg) if k in FILES_CHANGED else f"{k}: {previous.get(k, _default_fields().get(k))!r} -> {current.get(k)!r}"
                for k in changed
                if fingerprints_said.get(k) not in changed
            )
            raise ConfigError(
                f"run '{name}' was started with a different config ({details}). Start a new run with --new "
                f"(the old one is kept), or restore those settings to continue it"
            )
        old_path = stored_config["config"].get("checkpoint_path")
        old_root = checkpoint_root(old_path, folder)
        if old_root.resolve() != root.resolve() and any(old_root.glob("step-*")) and verify_manifest(folder / "trained") is None:
            raise ConfigError(
                f"checkpoint_path changed from {old_path!r} to {cfg.checkpoint_path!r}, but run '{name}' has its "
                f"checkpoints in {old_root}, which training would not find (it would start again from step 0). "
                f"Move them into {root}, or set checkpoint_path back to {old_path!r}"
            )
    if missing := missing_checkpoints(cfg.checkpoint_path, folder):  # also without config.json (deleted as its message says)
        raise ConfigError(missing)
    for checkpoint, owner in checkpoint_owners(root):
        if "result_fields" not in owner:
            continue  # written before checkpoints recorded their settings
        changed = _changed_fields(owner["result_fields"], cfg.result_fields())
        if changed:
            raise ConfigError(
                f"checkpoint {checkpoint} was written by run '{owner['run']}' with other settings ({', '.join(changed)}); "
                f"run '{name}' would continue its training. Give this run a checkpoint_path of its own (or another "
                f"--run-name), or move {root} away"
            )
    # Under the run's locks, so that a command refused because the run is in use changes nothing.
    with contextlib.ExitStack() as locks:
        locks.enter_context(exclusive_lock(folder / ".lock", f"run '{name}'", wait=False))
        locks.enter_context(checkpoint_folder_lock(cfg.checkpoint_path, folder))
        try:
            write_json(stored, {"config": cfg.model_dump(mode="json"), "result_fields": current})
        except BaseException:
            if new:  # the folders `_new_run_folder` made (locked: nobody else is in them), which would hold the name for nothing
                for made in {folder, root} if cfg.checkpoint_path is not None else {folder}:
                    shutil.rmtree(made, ignore_errors=True)
            raise
        if keep_locks is not None:
            keep_locks.enter_context(locks.pop_all())
    return name


# What a changed fingerprint means, for the message refusing to continue the run.
FILES_CHANGED = {
    "activations_fingerprint": "activations_fingerprint: the files of activations_path {cfg.activations_path} changed since "
    "the run started (a file added, removed, rewritten or touched)",
    "checkpoint_fingerprint": "checkpoint_fingerprint: the files of the model checkpoint {cfg.model_name} changed since the "
    "run started (rewritten, retrained or copied)",
}


def _earlier_fingerprints(cfg: RunConfig) -> set[str]:
    """An `activations_path`'s fingerprints as earlier saeflow versions recorded them, over other
    files than those read (`source_fingerprint`): every file of the folder (before 2026-11-30),
    and a saved dataset's `.arrow` and `.json` files, cache files of `datasets` included (until
    2026-11-30 evening)."""
    from tasks.sources import is_saved_dataset

    path = Path(cfg.activations_path or "").expanduser().resolve()
    if cfg.activations_path is None or not path.is_dir():
        return set()
    every_file = sorted(p for p in path.rglob("*") if p.is_file())
    earlier = [every_file]
    if is_saved_dataset(path):
        earlier.append(sorted(p for p in path.iterdir() if p.suffix in (".arrow", ".json")))
    return {stable_hash([[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]) for files in earlier}


def _new_run_folder(cfg: RunConfig, artifacts_dir: str | Path, base: str) -> str:
    """Make the run folder of the first free name of `base`, `<base>-2`, `<base>-3`, ... (free in
    the artifacts and the checkpoint folder), and return the name. The folders are made by
    `mkdir`, which fails if one exists: two `--new` runs started at once get two names."""
    from tasks.checkpoint import checkpoint_root

    check_new_run(cfg)  # before the folder is made
    for name in itertools.chain([base], (f"{base}-{n}" for n in itertools.count(2))):
        folder = run_dir(artifacts_dir, name)
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        root = checkpoint_root(cfg.checkpoint_path, folder)
        if cfg.checkpoint_path is not None and root.resolve() != folder.resolve():  # shared by other artifacts folders, whose runs may have the name
            try:
                root.mkdir(parents=True)
            except OSError as error:
                folder.rmdir()
                if isinstance(error, FileExistsError):
                    continue
                raise
        return name


def _changed_fields(previous: dict, current: dict) -> list[str]:
    """The result-changing settings that differ between a run's record and now. A field the
    record's saeflow version did not have yet ran at its default; a device counts by its kind
    (a job requeued from cuda:3 onto a machine's cuda:0 trains alike)."""
    previous, current = _default_fields() | previous, _default_fields() | current
    for fields in (previous, current):
        fields["device"] = device_kind(fields["device"])
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
