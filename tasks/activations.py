"""Stage 2, fill the activation store: run the model over the dataset once and keep the hook's
activations on disk, so that training (and every later run with other SAE hyper-parameters)
reads them instead of running the model again.

Layout of `<artifacts>/activations/<key>/`: `shard-NNNNN.safetensors` files, each holding
`activations` `[rows, d_in]` and the `tokens` they came from `[rows]`; `eval_tokens.safetensors`,
held-out contexts that come after the training tokens in the data (for evaluation and analysis);
and `manifest.json` listing each shard's row range and checksum. Shards are written atomically and the manifest is
updated after each one, so a killed fill continues at the first missing shard. The key depends
only on what determines the activations, never on SAE or training settings.

The model reads the contexts of the pretokenise stage (`tasks/tokens.py`), or a dataset that
already holds token ids, through SAELens's `ActivationsStore`, which also does the hook read.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks.artifacts import exclusive_lock, file_sha256, read_json, stage, write_json
from tasks.config import RunConfig, stable_hash

# SAELens copies each pretokenised row with torch.tensor(row), which warns for tensor rows.
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)

STAGE_VERSION = 1
SHARD_BYTES = 64 * 2**20
EVAL_TOKENS = "eval_tokens.safetensors"


def store_spec(cfg: RunConfig, model_ref: dict[str, Any]) -> dict[str, Any]:
    """What determines the stored activations: the stage's inputs and cache key."""
    n_contexts = -(-cfg.training_tokens // cfg.context_size)
    return {
        "model": {k: model_ref[k] for k in ("kind", "name", "path", "fingerprint") if k in model_ref},
        "from_pretrained_kwargs": cfg.model_from_pretrained_kwargs,
        "hook_name": cfg.hook_name,
        "hook_head_index": cfg.hook_head_index,
        "d_in": cfg.d_in,
        "dataset_path": cfg.dataset_path,
        "streaming": cfg.streaming,
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "n_tokens": n_contexts * cfg.context_size,
        "eval_tokens": cfg.eval_tokens,
        "store_batch_size_prompts": cfg.store_batch_size_prompts,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "autocast_lm": cfg.autocast_lm,
        "seed": cfg.seed,
    }


def store_dir(artifacts_dir: str | Path, spec: dict[str, Any]) -> Path:
    return Path(artifacts_dir) / "activations" / stable_hash(spec, 16)


def _token_dataset(spec: dict[str, Any], tokens_ref: dict[str, Any] | None):
    """What the store reads: the pretokenised contexts, or (`tokens_ref` None) the dataset itself,
    which then holds token ids."""
    from tasks.data import load_text_dataset
    from tasks.tokens import open_tokens

    if tokens_ref is not None:
        return open_tokens(tokens_ref)
    return load_text_dataset(spec["dataset_path"], streaming=spec["streaming"], seed=spec["seed"])


def _activations_store(model, dataset, spec: dict[str, Any]):
    from sae_lens.training.activations_store import ActivationsStore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(fewer samples|not tokenized).*")
        return ActivationsStore(
            model=model,
            dataset=dataset,
            streaming=spec["streaming"],
            hook_name=spec["hook_name"],
            hook_head_index=spec["hook_head_index"],
            context_size=spec["context_size"],
            d_in=spec["d_in"],
            n_batches_in_buffer=1,
            total_training_tokens=spec["n_tokens"],
            store_batch_size_prompts=spec["store_batch_size_prompts"],
            train_batch_size_tokens=spec["context_size"],
            prepend_bos=spec["prepend_bos"],
            normalize_activations="none",
            device=torch.device(spec["device"]),
            dtype=spec["dtype"],
            autocast_lm=spec["autocast_lm"],
        )


def _save_shard(path: Path, activations: torch.Tensor | None, tokens: torch.Tensor) -> str:
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"tokens": tokens.contiguous()}
    if activations is not None:
        tensors["activations"] = activations.contiguous()
    save_file(tensors, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return file_sha256(path)


def _verified_shards(out: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shards, up to the first one that is missing or fails its checksum."""
    good = []
    for shard in manifest.get("shards", []):
        path = out / shard["file"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            break
        good.append(shard)
    return good


@stage("fill-activations", STAGE_VERSION, key_inputs=("spec", "artifacts_dir"))
def fill_activations(spec: dict[str, Any], model_ref: dict[str, Any], tokens_ref: dict[str, Any] | None, artifacts_dir: str) -> dict[str, Any]:
    """Run the model over the pretokenised contexts (`tokens_ref`; None when the dataset holds
    token ids) and persist `spec['n_tokens']` hook activations in shards. The spec determines the
    contexts, so `tokens_ref` is not part of the cache key."""
    from prefect import get_run_logger

    logger = get_run_logger()
    out = store_dir(artifacts_dir, spec)
    # Runs that share this store wait here for the one filling it, then find it complete.
    with exclusive_lock(out / ".lock", f"activation store {out}", wait=True):
        return _fill(spec, model_ref, tokens_ref, out, logger)


def _fill(spec: dict[str, Any], model_ref: dict[str, Any], tokens_ref: dict[str, Any] | None, out: Path, logger) -> dict[str, Any]:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from tqdm.auto import tqdm

    from tasks.model import load_model

    manifest_path = out / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {"spec": spec, "shards": []}
    if manifest["spec"] != spec:
        raise RuntimeError(f"{manifest_path} belongs to another store spec; move {out} away and run again")
    shards = _verified_shards(out, manifest)
    n_tokens, ctx, batch_prompts = spec["n_tokens"], spec["context_size"], spec["store_batch_size_prompts"]
    bytes_per_row = spec["d_in"] * torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
    rows_per_batch = batch_prompts * ctx
    batches_per_shard = max(1, SHARD_BYTES // (bytes_per_row * rows_per_batch))
    rows_per_shard = batches_per_shard * rows_per_batch
    done_rows = shards[-1]["stop"] if shards else 0
    eval_done = _verified_eval_tokens(out, manifest) is not None

    if done_rows < n_tokens or not eval_done:
        if shards:
            logger.info(f"Activation store {out.name}: resuming at row {done_rows} of {n_tokens}")
        model = load_model(model_ref, spec["device"], from_pretrained_kwargs=spec["from_pretrained_kwargs"])
        store = _activations_store(model, _token_dataset(spec, tokens_ref), spec)
        dtype = getattr(torch, spec["dtype"])
        progress = create_progress_artifact(100 * done_rows / n_tokens, description=f"Filling activation store {out.name}")
        bar = tqdm(total=n_tokens, initial=done_rows, desc="Filling activation store", unit="tok")
        started, row, wrapped = time.monotonic(), 0, False
        pending_acts, pending_tokens = [], []

        def next_tokens():
            nonlocal wrapped
            try:
                tokens = store.get_batch_tokens(raise_at_epoch_end=True)
            except StopIteration:
                wrapped = True
                logger.warning(f"Dataset {spec['dataset_path']} ran out after {row} tokens; starting it again")
                tokens = store.get_batch_tokens()
            if int(tokens.max()) >= model.cfg.d_vocab:
                raise ValueError(
                    f"dataset {spec['dataset_path']} holds token id {int(tokens.max())}, outside the model's vocabulary "
                    f"of {model.cfg.d_vocab} tokens: it was tokenised with another tokenizer"
                )
            return tokens

        while row < n_tokens:
            tokens = next_tokens()
            take = min(rows_per_batch, n_tokens - row)
            if row + take <= done_rows:  # already on disk: only the tokens were needed, to keep the order
                row += take
                continue
            acts = store.get_activations(tokens).reshape(-1, spec["d_in"])[:take].to("cpu", dtype)
            pending_acts.append(acts)
            pending_tokens.append(tokens.reshape(-1)[:take].to("cpu"))
            row += take
            bar.update(take)
            if row - done_rows >= rows_per_shard or row == n_tokens:
                index = len(shards)
                name = f"shard-{index:05d}.safetensors"
                sha = _save_shard(out / name, torch.cat(pending_acts), torch.cat(pending_tokens))
                shards.append({"file": name, "start": done_rows, "stop": row, "sha256": sha})
                write_json(manifest_path, {**manifest, "spec": spec, "shards": shards, "complete": False})
                rate = (row - done_rows) / max(time.monotonic() - started, 1e-9)
                logger.info(f"Activation store {out.name}: {row}/{n_tokens} tokens ({100 * row / n_tokens:.0f}%), {rate:,.0f} tokens/s")
                update_progress_artifact(progress, 100 * row / n_tokens)
                done_rows, pending_acts, pending_tokens, started = row, [], [], time.monotonic()
        bar.close()

        # Held-out contexts for evaluation and analysis: the ones after the training tokens.
        n_eval = -(-spec["eval_tokens"] // ctx)
        contexts = []
        while sum(len(c) for c in contexts) < n_eval:
            contexts.append(next_tokens().to("cpu"))
        if wrapped:
            logger.warning("The dataset was used up: the held-out evaluation tokens repeat training data; use more data")
        eval_tokens = torch.cat(contexts)[:n_eval]
        sha = _save_shard(out / EVAL_TOKENS, None, eval_tokens)
        manifest = {**manifest, "spec": spec, "shards": shards, "eval": {"file": EVAL_TOKENS, "contexts": n_eval, "sha256": sha}}
        write_json(manifest_path, {**manifest, "complete": True})
    return {
        "path": str(out),
        "n_tokens": n_tokens,
        "d_in": spec["d_in"],
        "dtype": spec["dtype"],
        "n_shards": len(shards),
        "eval_contexts": -(-spec["eval_tokens"] // ctx),
        "outputs": [str(out / s["file"]) for s in shards] + [str(out / EVAL_TOKENS), str(manifest_path)],
    }


def _verified_eval_tokens(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    entry = manifest.get("eval")
    if entry and (out / entry["file"]).is_file() and file_sha256(out / entry["file"]) == entry["sha256"]:
        return entry
    return None


def load_eval_tokens(store_ref: dict[str, Any]) -> torch.Tensor:
    """The held-out contexts `[n, context_size]` stored after the training tokens."""
    return load_file(Path(store_ref["path"]) / EVAL_TOKENS)["tokens"]


def load_store(store_ref: dict[str, Any], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All activations `[n_tokens, d_in]` and their tokens `[n_tokens]` of a filled store, checked
    against the manifest's row ranges (no row missing or repeated)."""
    folder = Path(store_ref["path"])
    manifest = read_json(folder / "manifest.json")
    if not manifest.get("complete"):
        raise RuntimeError(f"activation store {folder} is not complete; run the pipeline again to finish filling it")
    acts, tokens, expected = [], [], 0
    for shard in manifest["shards"]:
        if shard["start"] != expected:
            raise RuntimeError(f"activation store {folder}: rows {expected}..{shard['start']} are missing")
        data = load_file(folder / shard["file"], device=device)
        if len(data["activations"]) != shard["stop"] - shard["start"]:
            raise RuntimeError(f"activation store {folder}: {shard['file']} does not hold rows {shard['start']}..{shard['stop']}")
        acts.append(data["activations"])
        tokens.append(data["tokens"])
        expected = shard["stop"]
    if expected != store_ref["n_tokens"]:
        raise RuntimeError(f"activation store {folder} holds {expected} rows, expected {store_ref['n_tokens']}")
    return torch.cat(acts), torch.cat(tokens)


class ShuffledBatches:
    """Training batches drawn from the stored activations in a seeded random order.

    The row stream is the concatenation of one permutation of the store per epoch, so batch `b`
    is a pure function of `(seed, b)`: starting at any batch costs one permutation, not a replay.
    """

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int, start_batch: int = 0):
        self.activations = activations
        self.batch_size = batch_size
        self.seed = seed
        self.next_batch = start_batch
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.activations), generator=generator)
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        n = len(self.activations)
        start, parts, need = self.next_batch * self.batch_size, [], self.batch_size
        while need:
            epoch, offset = divmod(start, n)
            take = min(need, n - offset)
            parts.append(self._permutation(epoch)[offset : offset + take])
            start, need = start + take, need - take
        self.next_batch += 1
        return self.activations[torch.cat(parts) if len(parts) > 1 else parts[0]]
