"""Stage 1, build model: a TransformerLens pretrained model, a local Hugging Face checkpoint
folder, or one built locally from a config (seeded random weights, optionally trained on the
dataset by next-token prediction).

The stage returns a small description of the model (kind, name, dimensions, where its files
are, its tokenizer's fingerprint), never the model itself; later stages call `load_model` with
that description.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks.artifacts import atomic_dir, exclusive_lock, read_json, stage, set_aside, verify_manifest, write_json, write_manifest
from tasks.config import ConfigError, RunConfig, holding_torch_globals, stable_hash
from tasks.data import load_text_dataset
from tasks.stopping import StopRequests

warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*", category=DeprecationWarning)

STAGE_VERSION = 2  # 2: the description holds the tokenizer's fingerprint
SPECIAL_TOKENS = ["<unk>", "<bos>", "<eos>", "<pad>"]
TOKENIZER_TRAINING_TEXTS = 50_000

# Decoder-only architectures whose config TransformerLens 3.9 converts from config.json alone
# (`convert_hf_model_config`) and whose weights it converts (`get_pretrained_state_dict`).
CHECKPOINT_ARCHITECTURES = (
    "GPT2LMHeadModel", "GPTNeoForCausalLM", "GPTJForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM",
    "BloomForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GptOssForCausalLM", "OlmoeForCausalLM",
    "Olmo3ForCausalLM", "ApertusForCausalLM",
)
# `from_pretrained` keyword arguments that shape the TransformerLens config itself.
CONFIG_KWARGS = ("n_devices", "dtype", "default_prepend_bos", "n_ctx", "first_n_layers")


def config_kwargs(from_pretrained_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `model_from_pretrained_kwargs` that shape a model's config, with a `dtype` named in
    the YAML (`bfloat16`) as the torch dtype TransformerLens's config needs (its
    `from_pretrained` takes the name, its config does not)."""
    from transformer_lens.HookedTransformer import DTYPE_FROM_STRING

    kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in CONFIG_KWARGS}
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in DTYPE_FROM_STRING:
            raise ValueError(f"model_from_pretrained_kwargs dtype '{kwargs['dtype']}' is none of {', '.join(DTYPE_FROM_STRING)}")
        kwargs["dtype"] = DTYPE_FROM_STRING[kwargs["dtype"]]
    return kwargs


def model_spec(cfg: RunConfig) -> dict[str, Any]:
    """What determines the model: the stage's inputs and cache key."""
    folder = checkpoint_folder(cfg)
    kind = "local" if cfg.model_cfg else "checkpoint" if folder else "pretrained"
    spec: dict[str, Any] = {"model_name": cfg.model_name, "kind": kind}
    if cfg.model_cfg is not None:
        spec.update(model_cfg=cfg.model_cfg, tokenizer_path=cfg.tokenizer_path, seed=cfg.seed)
        if cfg.tokenizer_path is None or cfg.model_train_tokens:
            spec.update(dataset_path=cfg.dataset_path)
        if cfg.model_train_tokens:  # absent when 0, so untrained models keep their folders
            spec.update(train={"tokens": cfg.model_train_tokens, "lr": cfg.model_train_lr, "batch_size": cfg.model_train_batch_size})
    elif folder is not None:
        tokenizer_dir = checkpoint_tokenizer_dir(folder, cfg.tokenizer_path)
        spec.update(
            path=str(folder),
            tokenizer_path=str(tokenizer_dir),
            fingerprint=checkpoint_fingerprint(folder, tokenizer_dir),
            from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        )
    else:
        spec.update(from_pretrained_kwargs=cfg.model_from_pretrained_kwargs)
    return spec


def checkpoint_folder(cfg: RunConfig) -> Path | None:
    """The local checkpoint folder `model_name` names (an existing path, or one written as a path:
    `/...`, `./...`, `~/...`); None for a TransformerLens model name, a `model_cfg` model, or
    activations without a model (where `model_name` is only a label)."""
    if cfg.model_cfg is not None or cfg.activation_source is not None:
        return None
    path = Path(cfg.model_name).expanduser()
    if path.exists() or cfg.model_name.startswith(("/", "./", "../", "~")):
        return path.resolve()
    return None


def checkpoint_tokenizer_dir(folder: Path, tokenizer_path: str | None) -> Path:
    """Where a checkpoint's tokenizer is: `tokenizer_path`, else the checkpoint folder itself."""
    return Path(tokenizer_path).expanduser().resolve() if tokenizer_path else folder


def checkpoint_fingerprint(folder: Path, tokenizer_dir: Path) -> str:
    """A cheap identity of a checkpoint's files: each file's name, size and modification time
    (not the contents: hashing a large model's weights would take minutes). Rewriting or copying
    a file changes it."""
    files = []
    for where in dict.fromkeys([folder, tokenizer_dir]):
        for path in sorted(where.iterdir()) if where.is_dir() else []:
            if path.is_file():
                stat = path.stat()
                files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stable_hash(files, 16)


def check_checkpoint(folder: Path, tokenizer_path: str | None) -> None:
    """Check that a checkpoint folder can be loaded: it exists, holds the config.json of a
    supported architecture, and a tokenizer is there or at `tokenizer_path`."""
    if not folder.is_dir():
        raise ConfigError(
            f"model_name {folder} is not an existing folder; give the folder that save_pretrained wrote "
            f"(config.json, weights and tokenizer) or a TransformerLens model name"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint; save the model there "
            f"with model.save_pretrained(folder)"
        )
    config = read_json(folder / "config.json")
    architecture = (config.get("architectures") or [config.get("model_type", "unknown architecture")])[0]
    if architecture not in CHECKPOINT_ARCHITECTURES:
        raise ConfigError(
            f"checkpoint {folder} is a {architecture}, which TransformerLens cannot load from a local folder; "
            f"supported architectures: {', '.join(CHECKPOINT_ARCHITECTURES)}"
        )
    tokenizer_dir = checkpoint_tokenizer_dir(folder, tokenizer_path)
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        where = f"tokenizer_path {tokenizer_dir}" if tokenizer_path else f"checkpoint {folder}"
        raise ConfigError(
            f"{where} holds no tokenizer; save the model's tokenizer there with tokenizer.save_pretrained(folder), "
            f"or set tokenizer_path to the folder of one"
        )


def checkpoint_config(folder: Path, device: str, from_pretrained_kwargs: dict[str, Any]):
    """The HookedTransformerConfig of a local checkpoint, converted by TransformerLens from the
    checkpoint's own config.json (no network)."""
    from transformer_lens import loading

    config = read_json(folder / "config.json")
    if config["architectures"][0] == "GPT2LMHeadModel":
        config.setdefault("n_ctx", config["n_positions"])  # TransformerLens reads n_ctx; transformers 5 no longer writes it
    # TransformerLens 3.9 picks some architectures by the model's name ("llama" or "gemma" in it)
    # instead of reading config.json: hand it the config in a folder with a neutral name.
    with tempfile.TemporaryDirectory(prefix="saeflow-config-") as tmp:
        if any(word in tmp.lower() for word in ("llama", "gemma")):
            raise RuntimeError(f"the temporary folder {tmp} confuses TransformerLens; set TMPDIR to a folder without 'llama' or 'gemma' in its path")
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        hooked_cfg = loading.get_pretrained_model_config(tmp, device=device, **config_kwargs(from_pretrained_kwargs))
    hooked_cfg.model_name = folder.name
    hooked_cfg.tokenizer_name = None  # the tokenizer is loaded from its folder and passed in
    return hooked_cfg


def _hooked_config(model_cfg: dict[str, Any], d_vocab: int, seed: int, device: str):
    """TransformerLens's config of a `model_cfg` model with a tokenizer of `d_vocab` tokens;
    ConfigError, saying what to change, for a `model_cfg` TransformerLens would refuse.

    Its seed is set after the config is made: given to the config, TransformerLens seeds
    Python's, numpy's and torch's global generators with it, and every process would then
    draw the same "random" numbers (Prefect's temporary server's port among them: two
    commands started together took the same port). `_local_model` seeds torch itself."""
    import dataclasses
    import difflib

    from transformer_lens import HookedTransformerConfig

    fields = {f.name: f for f in dataclasses.fields(HookedTransformerConfig)}
    for key in model_cfg:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"model_cfg key '{key}' is not a TransformerLens HookedTransformerConfig field" + (f"; did you mean '{close[0]}'?" if close else ""))
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in model_cfg]
    if missing:
        raise ConfigError(f"model_cfg needs {', '.join(missing)} (HookedTransformerConfig has no default for {'it' if len(missing) == 1 else 'them'})")
    if 0 < model_cfg.get("d_vocab", d_vocab) < d_vocab:  # TransformerLens reads -1 as "from the tokenizer"
        raise ConfigError(
            f"model_cfg sets d_vocab {model_cfg['d_vocab']}, but the tokenizer has {d_vocab} tokens; leave d_vocab out "
            f"(it is the tokenizer's size) or set it to at least {d_vocab}"
        )
    try:
        hooked_cfg = HookedTransformerConfig(**{"d_vocab": d_vocab, **model_cfg, "seed": None, "device": device})
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(f"model_cfg is refused by TransformerLens's HookedTransformerConfig: {error}") from None
    hooked_cfg.seed = seed
    return hooked_cfg


def pretrained_model_names() -> dict[str, str]:
    """TransformerLens's model names and aliases, by their lowercase spelling."""
    from transformer_lens import loading

    known = {n.lower(): n for n in loading.OFFICIAL_MODEL_NAMES}
    return known | {a.lower(): a for n in loading.OFFICIAL_MODEL_NAMES for a in loading.MODEL_ALIASES.get(n, [])}


def pretrained_config(name: str, from_pretrained_kwargs: dict[str, Any]):
    """The HookedTransformerConfig of a pretrained TransformerLens model (reads the hub's config)."""
    from transformer_lens import loading

    known = pretrained_model_names()
    if name.lower() not in known:  # TransformerLens's own error lists every model it knows (~7,000 characters)
        close = [known[n] for n in difflib.get_close_matches(name.lower(), list(known), n=3, cutoff=0.6)]
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "see TransformerLens's model table for the names"
        raise ConfigError(
            f"model_name '{name}' is neither a TransformerLens model name nor an existing folder; {hint} "
            f"(a local checkpoint: give the path of its folder)"
        )
    official = loading.get_official_model_name(name)
    return loading.get_pretrained_model_config(official, **config_kwargs(from_pretrained_kwargs))


def train_word_tokenizer(texts, out_dir: Path) -> None:
    """Train a word-level tokenizer on `texts` and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path):
    """Load a local tokenizer folder so that TransformerLens does not look it up on the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), add_bos_token=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides how a tokenizer turns text into ids: a fast tokenizer's normaliser,
    pre-tokeniser, model (vocabulary, merges) and added tokens, or a slow one's vocabulary. The
    post-processor (whether BOS is added), truncation and padding are left out: TransformerLens
    and SAELens add special tokens themselves."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return stable_hash(sorted(tokenizer.get_vocab().items()), 16)
    definition = json.loads(backend.to_str())
    for key in ("post_processor", "truncation", "padding"):
        definition.pop(key, None)
    return stable_hash(definition, 16)


def _dataset_texts(dataset_path: str, seed: int, limit: int | None = TOKENIZER_TRAINING_TEXTS):
    dataset = load_text_dataset(dataset_path, streaming=True, seed=seed)
    for i, row in enumerate(dataset):
        if limit is not None and i >= limit:
            return
        if "text" not in row:
            raise ValueError(
                f"cannot train a tokenizer on {dataset_path}: it has no 'text' column; set tokenizer_path"
            )
        yield row["text"]


def _describe(kind: str, name: str, path: str | None, hooked_cfg, tokenizer, training: dict[str, Any] | None = None) -> dict[str, Any]:
    described = {
        "kind": kind,
        "name": name,
        "path": path,
        "n_layers": hooked_cfg.n_layers,
        "d_model": hooked_cfg.d_model,
        "n_ctx": hooked_cfg.n_ctx,
        "d_vocab": hooked_cfg.d_vocab,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "outputs": [path] if path else [],
    }
    if training:
        described["training"] = training
    return described


@stage("build-model", STAGE_VERSION, key_inputs=("spec", "artifacts_dir"))
def build_model(spec: dict[str, Any], artifacts_dir: str, prompts: dict[str, Any] | None = None, run_dir: str | None = None) -> dict[str, Any]:
    """Build (local) or check (checkpoint) the model and describe it. A pretrained model is
    described from its config and tokenizer alone: its weights are first loaded (and downloaded)
    where they are used, on the run's device, not here on the CPU just to read their shapes.

    `prompts` (`prompts`, `token_index`, `context_size`, `prepend_bos`: the analysis's) are
    checked against a local model's tokenizer before the model trains, so that a bad
    `analysis_token_index` costs no training."""
    if spec["kind"] == "pretrained":
        model = tokenizing_model({"kind": "pretrained", "name": spec["model_name"]}, spec["from_pretrained_kwargs"])
        return _describe("pretrained", spec["model_name"], None, model.cfg, model.tokenizer)
    if spec["kind"] == "checkpoint":
        folder = Path(spec["path"])
        check_checkpoint(folder, spec["tokenizer_path"])
        hooked_cfg = checkpoint_config(folder, "meta", spec["from_pretrained_kwargs"])
        description = _describe("checkpoint", spec["model_name"], spec["path"], hooked_cfg, load_tokenizer(spec["tokenizer_path"]))
        return {**description, "tokenizer_path": spec["tokenizer_path"], "fingerprint": spec["fingerprint"]}

    out = Path(artifacts_dir) / "models" / f"{_slug(spec['model_name'])}-{stable_hash(spec)}"
    # Runs started together (a sweep) wait here for the one building the model.
    stop_requests = StopRequests(Path(run_dir)) if run_dir else None  # `saeflow stop` of the run, while it waits
    with exclusive_lock(out.with_name(out.name + ".lock"), f"model folder {out}", wait=True, stop_requests=stop_requests):
        _build_local(spec, out, prompts)
    info = read_json(out / "model.json")
    hooked_cfg = _hooked_config(info["model_cfg"], info["d_vocab"], info["seed"], "meta")
    return _describe("local", spec["model_name"], str(out), hooked_cfg, load_tokenizer(out / "tokenizer"), info.get("training"))


def _build_local(spec: dict[str, Any], out: Path, prompts: dict[str, Any] | None) -> None:
    """Build the model folder, all or nothing: an interrupted build (or training) leaves only a
    temporary folder, and the next run starts it again."""
    if verify_manifest(out) is None:
        if out.exists():
            set_aside(out, "the model is built again")
        with atomic_dir(out) as tmp:
            if spec["tokenizer_path"]:
                tokenizer = load_tokenizer(spec["tokenizer_path"])
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            else:
                train_word_tokenizer(_dataset_texts(spec["dataset_path"], spec["seed"]), tmp / "tokenizer")
            tokenizer = load_tokenizer(tmp / "tokenizer")
            if prompts and "train" in spec:
                from tasks.analyse import check_prompts

                check_prompts(_on_meta(_hooked_config(spec["model_cfg"], len(tokenizer), spec["seed"], "meta"), tokenizer), **prompts)
            hooked_cfg = _hooked_config(spec["model_cfg"], len(tokenizer), spec["seed"], "cpu")
            model = _local_model(hooked_cfg, tokenizer)
            info = {"model_cfg": spec["model_cfg"], "d_vocab": len(tokenizer), "seed": spec["seed"]}
            if "train" in spec:
                info["training"] = train_local_model(model, spec["dataset_path"], spec["seed"], **spec["train"])
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
            write_json(tmp / "model.json", info)
            write_manifest(tmp, {"spec": spec})


def packed_contexts(model, dataset_path: str, seed: int, n_contexts: int) -> torch.Tensor:
    """Up to `n_contexts` contexts `[n, n_ctx]` of the dataset, tokenised and packed as SAELens's
    activation store packs them (BOS first, documents separated by BOS), so that the model is
    trained on what it later sees."""
    from tasks.tokens import pack_contexts

    tokenizer = model.tokenizer
    documents = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in _dataset_texts(dataset_path, seed, limit=None))
    packed = pack_contexts(documents, model.cfg.n_ctx, begin_batch_token_id=tokenizer.bos_token_id, separator_token_id=tokenizer.bos_token_id)
    contexts = list(itertools.islice(packed, n_contexts))
    if not contexts:
        raise ValueError(f"dataset {dataset_path} holds less text than one context of the model's n_ctx ({model.cfg.n_ctx}) tokens; model training needs more")
    return torch.tensor(contexts, dtype=torch.long)


@contextlib.contextmanager
def _deterministic_kernels():
    """Deterministic kernels for a while: on CPU the embedding's gradient is otherwise summed in
    an order that depends on thread timing, so two trainings would differ in the last bits."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train_local_model(model, dataset_path: str, seed: int, tokens: int, lr: float, batch_size: int) -> dict[str, Any]:
    """Train `model` in place by next-token prediction on `tokens` tokens of the dataset (Adam,
    warm-up then cosine decay, batches in a seeded order; deterministic on CPU). Logs the loss to
    the Prefect log and a progress artifact; returns the training's settings and its final loss
    (the mean over the last tenth of the steps)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    n_ctx = model.cfg.n_ctx
    steps = max(1, -(-tokens // (batch_size * n_ctx)))
    data = packed_contexts(model, dataset_path, seed, steps * batch_size)
    logger.info(f"Training the model on {steps * batch_size * n_ctx} tokens ({steps} steps; {len(data)} distinct contexts of {n_ctx} tokens)")
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(-(-steps * batch_size // len(data)))])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warm_up = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warm_up:
            return (step + 1) / warm_up
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm_up) / max(1, steps - warm_up)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    progress = create_progress_artifact(0.0, description=f"Training the model ({steps} steps)")
    started, log_every, recent = time.monotonic(), max(1, steps // 10), []
    with _deterministic_kernels():
        for step in range(steps):
            loss = model(data[order[step * batch_size : (step + 1) * batch_size]], return_type="loss")
            if not torch.isfinite(loss):
                raise RuntimeError(f"model training diverged at step {step} (loss {loss.item()}); lower model_train_lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            recent = (recent + [loss.item()])[-log_every:]
            if (step + 1) % log_every == 0 or step + 1 == steps:
                rate = (step + 1) * batch_size * n_ctx / max(time.monotonic() - started, 1e-9)
                logger.info(f"Model training step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f}, {rate:,.0f} tokens/s")
                update_progress_artifact(progress, 100 * (step + 1) / steps)
    return {
        "tokens": steps * batch_size * n_ctx,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "final_loss": sum(recent) / len(recent),
        "seconds": round(time.monotonic() - started, 1),
    }


@holding_torch_globals
def _local_model(hooked_cfg, tokenizer):
    from transformer_lens import HookedTransformer

    torch.manual_seed(hooked_cfg.seed)
    return HookedTransformer(hooked_cfg, tokenizer=tokenizer)


def select_cuda_device(device: str) -> None:
    """Make a CUDA device this thread's current one, so that what CUDA does on the current device
    (pinning memory for the copies to it, a new context) happens there and not on GPU 0 as well.
    Per thread: sweep members in threads may each use their own GPU. `cuda` is GPU 0: in a pool
    thread that ran a `cuda:1` member before, the current device would still be GPU 1."""
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(torch.device("cuda", target.index or 0))


@holding_torch_globals  # transformers' loads change process-wide state while they run (TORCH_GLOBALS)
def load_model(model_ref: dict[str, Any], device: str, from_pretrained_kwargs: dict | None = None):
    """Load the model a `build_model` result describes, with its weights exactly as trained (no
    layer norm folded, nothing centred): the model that makes the activations, and the one the
    analysis reads them from (`unembed_directions` gives `W_dec @ W_U` as the folded model would)."""
    from transformer_lens import HookedTransformer

    kwargs = dict(from_pretrained_kwargs or {})
    if model_ref["kind"] == "pretrained":
        return HookedTransformer.from_pretrained_no_processing(model_ref["name"], device=device, **kwargs)
    if model_ref["kind"] == "checkpoint":
        model, state_dict = _checkpoint_model(model_ref, device, kwargs)
        # TransformerLens fills in what converted weights lack (zero biases)
        model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
        return model.eval()
    folder = Path(model_ref["path"])
    info = read_json(folder / "model.json")
    model = _local_model(_hooked_config(info["model_cfg"], info["d_vocab"], info["seed"], device), load_tokenizer(folder / "tokenizer"))
    model.load_state_dict(load_file(folder / "model.safetensors", device=device))
    return model.eval()


def _checkpoint_model(model_ref: dict[str, Any], device: str, from_pretrained_kwargs: dict[str, Any]):
    """A HookedTransformer for a local checkpoint (weights not loaded yet) and its converted weights."""
    from transformer_lens import HookedTransformer, loading
    from transformers import AutoModelForCausalLM

    folder = Path(model_ref["path"])
    hooked_cfg = checkpoint_config(folder, device, from_pretrained_kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=hooked_cfg.dtype, local_files_only=True)
    state_dict = loading.get_pretrained_state_dict(str(folder), hooked_cfg, hf_model=hf_model, dtype=hooked_cfg.dtype)
    return HookedTransformer(hooked_cfg, tokenizer=load_tokenizer(model_ref["tokenizer_path"])), state_dict


def meta_model(cfg: RunConfig, with_tokenizer: bool = False):
    """The model's architecture on the meta device: hook names and shapes, no weights, no download
    of weights (a pretrained model's config is read from the hub or its cache). `with_tokenizer`
    attaches the model's tokenizer (a pretrained one's from the hub or its cache)."""
    folder = checkpoint_folder(cfg)
    tokenizer = None
    if cfg.tokenizer_path is not None:
        tokenizer_dir = Path(cfg.tokenizer_path).expanduser()
        if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ConfigError(
                f"tokenizer_path {tokenizer_dir} {'holds no tokenizer' if tokenizer_dir.is_dir() else 'does not exist'}; "
                f"give the folder tokenizer.save_pretrained(folder) wrote"
                + (", or leave tokenizer_path out to train a word-level tokenizer on the dataset" if cfg.model_cfg is not None else "")
            )
    if cfg.model_cfg is not None:
        tokenizer = load_tokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else None
        d_vocab = len(tokenizer) if tokenizer is not None else len(SPECIAL_TOKENS)
        hooked_cfg = _hooked_config(cfg.model_cfg, d_vocab, cfg.seed, "meta")
    elif folder is not None:
        check_checkpoint(folder, cfg.tokenizer_path)
        hooked_cfg = checkpoint_config(folder, "meta", cfg.model_from_pretrained_kwargs)
        if with_tokenizer:
            tokenizer = load_tokenizer(checkpoint_tokenizer_dir(folder, cfg.tokenizer_path))
    else:
        hooked_cfg = pretrained_config(cfg.model_name, cfg.model_from_pretrained_kwargs)
        if not with_tokenizer:
            hooked_cfg.tokenizer_name = None  # TransformerLens would load it by name
    return _on_meta(hooked_cfg, tokenizer)


def tokenizing_model(model_ref: dict[str, Any], from_pretrained_kwargs: dict[str, Any]):
    """The model a `build_model` result describes, on the meta device with its tokenizer: the
    model's own `to_tokens` without loading any weights."""
    if model_ref["kind"] == "pretrained":
        return _on_meta(pretrained_config(model_ref["name"], from_pretrained_kwargs))  # TransformerLens loads the tokenizer by name
    if model_ref["kind"] == "checkpoint":
        return _on_meta(checkpoint_config(Path(model_ref["path"]), "meta", from_pretrained_kwargs), load_tokenizer(model_ref["tokenizer_path"]))
    info = read_json(Path(model_ref["path"]) / "model.json")
    return _on_meta(_hooked_config(info["model_cfg"], info["d_vocab"], info["seed"], "meta"), load_tokenizer(Path(model_ref["path"]) / "tokenizer"))


def special_token_ids(model_ref: dict[str, Any], from_pretrained_kwargs: dict[str, Any]) -> list[int]:
    """The ids of the model's tokenizer's structural special tokens (BOS, EOS, padding, ...), which
    SAELens's evaluation leaves out (`get_special_token_ids`), sorted."""
    from sae_lens.util import get_special_token_ids

    return sorted(get_special_token_ids(tokenizing_model(model_ref, from_pretrained_kwargs).tokenizer))


def _on_meta(hooked_cfg, tokenizer=None):
    from transformer_lens import HookedTransformer

    hooked_cfg.device = "meta"
    hooked_cfg.init_weights = False  # nothing to initialise, and it would reseed torch's global RNG
    with torch.device("meta"):
        return HookedTransformer(hooked_cfg, tokenizer=tokenizer)


def token_hooks(model) -> dict[str, tuple[int, ...] | None]:
    """Every hook a forward pass of `model` (on the meta device) fills, with the shape of one
    token's activation there: None where dimension 1 is not the token position (attention
    patterns and scores, per head and query-key pair). Read from contexts of 2 and 3 tokens, so
    that a dimension that only happens to equal the length is not taken for the position."""
    shapes = []
    for length in (2, 3):
        _, cache = model.run_with_cache(torch.zeros((1, length), dtype=torch.long, device="meta"))
        shapes.append({name: tuple(t.shape) for name, t in cache.items()})
    short, long = shapes
    return {name: s[2:] if s[1] == 2 and long[name][1] == 3 and long[name][2:] == s[2:] else None for name, s in short.items()}


HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")  # the head-dimension hooks SAELens's evaluation handles


# Hooks with a head dimension that TransformerLens fills only when a config setting asks for them,
# and that SAELens's evaluation cannot splice into (hook_q/k/v_input can be: their names hold hook_q/k/v).
OPTIONAL_HEAD_HOOKS = ("attn.hook_result", "hook_attn_in")


def head_hook_problem(hook_name: str) -> str:
    """Why `hook_name`, a hook with a head dimension other than HEAD_HOOKS, cannot be trained on, and what to use instead."""
    return (
        f"{hook_name} has a head dimension, and SAELens's evaluation splices an SAE into such a hook only "
        f"for {', '.join(HEAD_HOOKS)} hooks, whole or one head (it would fail after training); train on one of "
        f"those, or on a hook without heads"
    )


def hook_width(token_shape: tuple[int, ...], hook_name: str, hook_head_index: int | None) -> int:
    """The width of one token's activation of `token_shape` (from `token_hooks`) at a hook, as
    SAELens's activation store flattens it."""
    if len(token_shape) == 2 and not any(name in hook_name for name in HEAD_HOOKS):
        raise ValueError(head_hook_problem(hook_name))
    if hook_head_index is not None:
        if len(token_shape) != 2:
            raise ValueError(f"hook_head_index is set but {hook_name} has no head dimension; remove hook_head_index")
        if not 0 <= hook_head_index < token_shape[0]:
            raise ValueError(
                f"hook_head_index {hook_head_index} is out of range: {hook_name} has {token_shape[0]} heads; use 0 to "
                f"{token_shape[0] - 1}, or leave it out for all heads"
            )
        return token_shape[1]
    width = 1
    for size in token_shape:
        width *= size
    return width


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def hook_activations(model, tokens: torch.Tensor, hook_name: str, hook_head_index: int | None) -> torch.Tensor:
    """Activations `[batch, pos, d_in]` at a hook, flattened as SAELens's activation store does."""
    return hooks_activations(model, tokens, [(hook_name, hook_head_index)])[0]


class _AllHooksRead(Exception):
    """Ends a forward pass once every requested hook has been read."""


def hooks_activations(model, tokens: torch.Tensor, hooks: list[tuple[str, int | None]]) -> list[torch.Tensor]:
    """Activations `[batch, pos, d_in]` at several `(hook_name, hook_head_index)` hooks from one
    forward pass, each flattened as SAELens's activation store does (one head, or all heads
    concatenated). The pass stops as soon as the last of the hooks has been read: for
    `blocks.L.hook_resid_pre` the blocks from L on never run, where stopping at a layer boundary
    (as SAELens does) would run block L too. The values are those of `run_with_cache`, bit for bit."""
    names = sorted({name for name, _ in hooks})
    read: dict[str, torch.Tensor] = {}

    def keep(acts: torch.Tensor, hook) -> None:
        read[hook.name] = acts
        if len(read) == len(names):
            raise _AllHooksRead

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, keep) for name in names]):
        try:
            model(tokens, return_type=None, prepend_bos=False)
        except _AllHooksRead:
            pass
    missing = sorted(set(names) - set(read))
    if missing:
        raise ValueError(f"hooks {missing} did not run in the model's forward pass; check hook_name against the model's hooks")
    out = []
    for name, head in hooks:
        acts = read[name]
        if head is not None:
            out.append(acts[:, :, head])
        else:
            out.append(acts.flatten(2) if acts.ndim > 3 else acts)
    return out


RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed", "hook_pos_embed")
# Columns of W_U turned into float32 at a time (a bf16 model's whole W_U in float32 can take GBs).
UNEMBED_CHUNK = 32768


def residual_directions(model, W_dec: torch.Tensor, hook_name: str, hook_head_index: int | None) -> torch.Tensor | None:
    """Each feature's decoder direction written into the residual stream `[d_sae, d_model]`, so
    that `unembed_directions` gives its direct effect on the logits. None for hooks that do not
    write to the residual stream through one known matrix: a sublayer's hook_z or hook_post
    where a norm follows the sublayer (Gemma 2/3's `ln*_post`, OLMo 2/3's post-norm)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    from tasks.config import hook_layer_of

    layer = hook_layer_of(hook_name)
    W_dec = W_dec.float()
    if hook_name.endswith(RESIDUAL_HOOKS):
        return W_dec
    if model.cfg.use_normalization_before_and_after or model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return None
    # In float32: in a bf16 model's, the top tokens of about a fifth of an mlp.hook_post SAE's features came in another order.
    if hook_name.endswith("mlp.hook_post"):
        return W_dec @ model.blocks[layer].mlp.W_out.float()
    if hook_name.endswith("attn.hook_z"):
        W_O = model.blocks[layer].attn.W_O.float()  # [n_heads, d_head, d_model]
        if hook_head_index is not None:
            return W_dec @ W_O[hook_head_index]
        return W_dec @ W_O.reshape(-1, W_O.shape[-1])
    return None


def unembed_directions(model, directions: torch.Tensor) -> torch.Tensor:
    """The direct effect on the logits `[n, d_vocab]` of residual-stream `directions` `[n, d_model]`,
    in float32: through the final norm's gain (a LayerNorm, with or without weights, also takes
    out the mean across d_model) and `W_U`, centred across the vocabulary. This is `directions @
    W_U` of the model loaded with its layer norms folded and its unembedding centred (the guide's
    `from_pretrained`), without changing the model whose hooks the SAE reads. (For a model built
    with weightless LayerNorms, TransformerLens leaves `W_U` uncentred across d_model.)"""
    directions = directions.float()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        directions = directions - directions.mean(-1, keepdim=True)
    if model.cfg.normalization_type in ("LN", "RMS"):
        directions = directions * model.ln_final.w.float()
    W_U = model.W_U
    logits = torch.cat([directions @ W_U[:, i : i + UNEMBED_CHUNK].float() for i in range(0, W_U.shape[1], UNEMBED_CHUNK)], dim=1)
    return logits - logits.mean(-1, keepdim=True)
