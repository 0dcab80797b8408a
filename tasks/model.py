"""Stage 1, build model: a TransformerLens pretrained model, or one built locally from a config
(seeded random weights, optionally trained on the dataset by next-token prediction).

The stage returns a small description of the model (kind, name, dimensions, where its files
are), never the model itself; later stages call `load_model` with that description.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks.artifacts import atomic_dir, exclusive_lock, read_json, stage, verify_manifest, write_json, write_manifest
from tasks.config import RunConfig, stable_hash
from tasks.data import load_text_dataset

warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*", category=DeprecationWarning)

STAGE_VERSION = 1
SPECIAL_TOKENS = ["<unk>", "<bos>", "<eos>", "<pad>"]
TOKENIZER_TRAINING_TEXTS = 50_000


def model_spec(cfg: RunConfig) -> dict[str, Any]:
    """What determines the model: the stage's inputs and cache key."""
    spec: dict[str, Any] = {"model_name": cfg.model_name, "kind": "local" if cfg.model_cfg else "pretrained"}
    if cfg.model_cfg is not None:
        spec.update(model_cfg=cfg.model_cfg, tokenizer_path=cfg.tokenizer_path, seed=cfg.seed)
        if cfg.tokenizer_path is None or cfg.model_train_tokens:
            spec.update(dataset_path=cfg.dataset_path)
        if cfg.model_train_tokens:  # absent when 0, so untrained models keep their folders
            spec.update(train={"tokens": cfg.model_train_tokens, "lr": cfg.model_train_lr, "batch_size": cfg.model_train_batch_size})
    else:
        spec.update(from_pretrained_kwargs=cfg.model_from_pretrained_kwargs)
    return spec


def _hooked_config(model_cfg: dict[str, Any], d_vocab: int, seed: int, device: str):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**{"d_vocab": d_vocab, **model_cfg, "seed": seed, "device": device})


def pretrained_config(name: str, from_pretrained_kwargs: dict[str, Any]):
    """The HookedTransformerConfig of a pretrained TransformerLens model (reads the hub's config)."""
    from transformer_lens import loading

    official = loading.get_official_model_name(name)
    kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("n_devices", "dtype", "default_prepend_bos")}
    return loading.get_pretrained_model_config(official, **kwargs)


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


def _describe(kind: str, name: str, path: str | None, hooked_cfg, training: dict[str, Any] | None = None) -> dict[str, Any]:
    described = {
        "kind": kind,
        "name": name,
        "path": path,
        "n_layers": hooked_cfg.n_layers,
        "d_model": hooked_cfg.d_model,
        "n_ctx": hooked_cfg.n_ctx,
        "d_vocab": hooked_cfg.d_vocab,
        "outputs": [path] if path else [],
    }
    if training:
        described["training"] = training
    return described


@stage("build-model", STAGE_VERSION, key_inputs=("spec", "artifacts_dir"))
def build_model(spec: dict[str, Any], artifacts_dir: str) -> dict[str, Any]:
    """Build (local) or fetch (pretrained) the model and describe it."""
    if spec["kind"] == "pretrained":
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained_no_processing(
            spec["model_name"], device="cpu", **spec["from_pretrained_kwargs"]
        )
        return _describe("pretrained", spec["model_name"], None, model.cfg)

    out = Path(artifacts_dir) / "models" / f"{_slug(spec['model_name'])}-{stable_hash(spec)}"
    # Runs started together (a sweep) wait here for the one building the model.
    with exclusive_lock(out.with_name(out.name + ".lock"), f"model folder {out}", wait=True):
        _build_local(spec, out)
    info = read_json(out / "model.json")
    hooked_cfg = _hooked_config(info["model_cfg"], info["d_vocab"], info["seed"], "meta")
    return _describe("local", spec["model_name"], str(out), hooked_cfg, info.get("training"))


def _build_local(spec: dict[str, Any], out: Path) -> None:
    """Build the model folder, all or nothing: an interrupted build (or training) leaves only a
    temporary folder, and the next run starts it again."""
    if verify_manifest(out) is None:
        if out.exists():
            raise RuntimeError(f"{out} exists but fails its checksums; move it away and run again")
        with atomic_dir(out) as tmp:
            if spec["tokenizer_path"]:
                tokenizer = load_tokenizer(spec["tokenizer_path"])
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            else:
                train_word_tokenizer(_dataset_texts(spec["dataset_path"], spec["seed"]), tmp / "tokenizer")
            tokenizer = load_tokenizer(tmp / "tokenizer")
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
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    tokenizer = model.tokenizer

    def documents():
        for text in _dataset_texts(dataset_path, seed, limit=None):
            yield torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    contexts = []
    packed = concat_and_batch_sequences(
        documents(), model.cfg.n_ctx, begin_batch_token_id=tokenizer.bos_token_id, sequence_separator_token_id=tokenizer.bos_token_id
    )
    for context in packed:
        contexts.append(context)
        if len(contexts) == n_contexts:
            break
    return torch.stack(contexts)


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


def _local_model(hooked_cfg, tokenizer):
    from transformer_lens import HookedTransformer

    torch.manual_seed(hooked_cfg.seed)
    return HookedTransformer(hooked_cfg, tokenizer=tokenizer)


def load_model(model_ref: dict[str, Any], device: str, processed: bool = False, from_pretrained_kwargs: dict | None = None):
    """Load the model a `build_model` result describes.

    `processed=False` gives the weights exactly as trained (used to make activations).
    `processed=True` folds the layer norms into the following weights and centres the unembedding,
    as the guide's `W_dec @ W_U` analysis needs, but does not centre the weights that write to the
    residual stream, so hook activations stay the ones the SAE was trained on.
    """
    from transformer_lens import HookedTransformer

    kwargs = dict(from_pretrained_kwargs or {})
    if model_ref["kind"] == "pretrained":
        if processed:
            kwargs.setdefault("center_writing_weights", False)
            return HookedTransformer.from_pretrained(model_ref["name"], device=device, **kwargs)
        return HookedTransformer.from_pretrained_no_processing(model_ref["name"], device=device, **kwargs)
    folder = Path(model_ref["path"])
    info = read_json(folder / "model.json")
    tokenizer = load_tokenizer(folder / "tokenizer")
    model = _local_model(_hooked_config(info["model_cfg"], info["d_vocab"], info["seed"], device), tokenizer)
    state_dict = load_file(folder / "model.safetensors", device=device)
    if processed:
        model.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=False, center_unembed=True)
    else:
        model.load_state_dict(state_dict)
    return model.eval()


def meta_model(cfg: RunConfig):
    """The model's architecture on the meta device: hook names and shapes, no weights, no download
    of weights (a pretrained model's config is read from the hub or its cache)."""
    from transformer_lens import HookedTransformer

    if cfg.model_cfg is not None:
        hooked_cfg = _hooked_config(cfg.model_cfg, cfg.model_cfg.get("d_vocab", len(SPECIAL_TOKENS)), cfg.seed, "meta")
    else:
        hooked_cfg = pretrained_config(cfg.model_name, cfg.model_from_pretrained_kwargs)
        hooked_cfg.device = "meta"
        hooked_cfg.tokenizer_name = None  # the tokenizer is not needed for shapes
    with torch.device("meta"):
        return HookedTransformer(hooked_cfg)


def hook_width(model, hook_name: str, hook_head_index: int | None) -> int:
    """The width of one token's activation at a hook, as SAELens's activation store flattens it."""
    tokens = torch.zeros((1, 2), dtype=torch.long, device="meta")
    _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
    shape = cache[hook_name].shape
    if hook_head_index is not None:
        if len(shape) != 4:
            raise ValueError(f"hook_head_index is set but {hook_name} has no head dimension; remove hook_head_index")
        if not 0 <= hook_head_index < shape[2]:
            raise ValueError(f"hook_head_index {hook_head_index} is out of range: {hook_name} has {shape[2]} heads")
        return shape[3]
    width = 1
    for size in shape[2:]:
        width *= size
    return width


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def hook_activations(model, tokens: torch.Tensor, hook_name: str, hook_head_index: int | None) -> torch.Tensor:
    """Activations `[batch, pos, d_in]` at a hook, flattened as SAELens's activation store does."""
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    _, cache = model.run_with_cache(
        tokens, names_filter=[hook_name], stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook_name)
    )
    acts = cache[hook_name]
    if hook_head_index is not None:
        return acts[:, :, hook_head_index]
    return acts.flatten(2) if acts.ndim > 3 else acts


RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed", "hook_pos_embed")


def residual_directions(model, W_dec: torch.Tensor, hook_name: str, hook_head_index: int | None) -> torch.Tensor | None:
    """Each feature's decoder direction written into the residual stream `[d_sae, d_model]`, so
    that `@ model.W_U` gives its direct effect on the logits. None for hooks that do not write to
    the residual stream through one known matrix."""
    from tasks.config import hook_layer_of

    layer = hook_layer_of(hook_name)
    if hook_name.endswith(RESIDUAL_HOOKS):
        return W_dec
    if hook_name.endswith("mlp.hook_post"):
        return W_dec @ model.blocks[layer].mlp.W_out
    if hook_name.endswith("attn.hook_z"):
        W_O = model.blocks[layer].attn.W_O  # [n_heads, d_head, d_model]
        if hook_head_index is not None:
            return W_dec @ W_O[hook_head_index]
        return W_dec @ W_O.reshape(-1, W_O.shape[-1])
    return None
