"""Stage 3, fill the activation store: run the model over the dataset once and keep the hook's
activations on disk, so that training (and every later run with other SAE hyper-parameters)
reads them instead of running the model again.

Layout of `<artifacts>/activations/<key>/`: `shard-NNNNN.safetensors` files, each holding
`activations` `[rows, d_in]` and the `tokens` they came from `[rows]`; `eval_tokens.safetensors`,
held-out contexts that come after the training tokens in the data, or the data's last ones when
there are too few for both (for evaluation and analysis; never trained on);
and `manifest.json` listing each shard's row range and checksum. Shards are written atomically and the manifest is
updated after each one, so a killed fill continues at the first missing shard. The key depends
only on what determines the activations, never on SAE or training settings.

The model reads the contexts of the pretokenise stage (`tasks/tokens.py`), in slices of their
Arrow file, or a dataset that already holds token ids, through SAELens's `ActivationsStore`; the
forward stops once `tasks.model.hooks_activations` has read the hook(s).
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks.artifacts import ProgressArtifact, exclusive_lock, file_sha256, keyed_folder, read_json, same_contents, stage, usual_mode, whole_safetensors, write_json
from tasks.config import RunConfig, stable_hash
from tasks.stopping import STOPS_AFTER_FILL, StopRequests, preempted, stop_asked, stop_requested, stop_signals

# SAELens copies each pretokenised row with torch.tensor(row), which warns for tensor rows.
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)

STAGE_VERSION = 1
# Two shards are in memory while filling (one filled, one written): 32 MB ones kept the
# benchmark's fill (2L) below SAELens's peak memory, 64 MB ones did not, at the same speed.
# Stores of more than MAX_SHARDS x 32 MB get bigger shards (up to MAX_SHARD_BYTES): reading a
# training batch costs a call per shard its rows lie in (28 ms per 4096-row batch from 2,000
# shards, 3.5 ms from 32).
SHARD_BYTES = 32 * 2**20
MAX_SHARDS = 128
MAX_SHARD_BYTES = 512 * 2**20
EVAL_TOKENS = "eval_tokens.safetensors"
EVAL_ACTIVATIONS = "eval_activations.safetensors"  # held-out rows of a store made without a model


def store_spec(cfg: RunConfig, model_ref: dict[str, Any], mode: str = "cached") -> dict[str, Any]:
    """What determines the stored activations: the stage's inputs and cache key. In streaming
    mode the store keeps only the tokens (`tokens_only`)."""
    from tasks.data import dataset_seed

    n_contexts = -(-cfg.training_tokens // cfg.context_size)
    spec = {
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
        "dtype": cfg.activation_dtype,
        "device": cfg.device,
        "autocast_lm": cfg.autocast_lm,
        **dataset_seed(cfg.dataset_path, cfg.seed),
    }
    if mode == "streaming":
        spec["tokens_only"] = True
    return spec


def store_dir(artifacts_dir: str | Path, spec: dict[str, Any]) -> Path:
    """The folder of the activation store that `spec` describes, under `<artifacts>/activations/`."""
    return keyed_folder(Path(artifacts_dir) / "activations", spec)


def _token_dataset(spec: dict[str, Any], tokens_ref: dict[str, Any] | None):
    """What the store reads: the pretokenised contexts, or (`tokens_ref` None) the dataset itself,
    which then holds token ids."""
    from tasks.data import load_text_dataset
    from tasks.tokens import open_tokens

    if tokens_ref is not None:
        return open_tokens(tokens_ref)
    return load_text_dataset(spec["dataset_path"], streaming=spec["streaming"], seed=spec.get("seed", 0))


class ContextBatches:
    """Batches `[batch_prompts, context_size]` of the pretokenised contexts, read in slices of the
    memory-mapped Arrow file: the batches SAELens's `ActivationsStore.get_batch_tokens` makes from
    it row by row (which took a fifth of a fill's time), down to its end of data (or to context
    `end`), where an incomplete batch is dropped and the data starts again."""

    def __init__(self, dataset, batch_prompts: int, end: int | None = None):
        self.contexts = dataset.with_format("numpy")
        self.batch_prompts = batch_prompts
        self.end = len(self.contexts) if end is None else end
        self.next_context = 0

    def next_batch(self, raise_at_epoch_end: bool = False) -> torch.Tensor:
        start = self.next_context
        if start + self.batch_prompts > self.end:
            self.next_context = 0
            if raise_at_epoch_end:
                raise StopIteration(f"ran out of contexts after {start}; beginning the next epoch")
            return self.next_batch()
        self.next_context = start + self.batch_prompts
        return torch.from_numpy(self.contexts[start : self.next_context]["tokens"]).long()


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


def _save_shard(path: Path, activations: torch.Tensor | None, tokens: torch.Tensor | None) -> str:
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"tokens": tokens.contiguous()} if tokens is not None else {}
    if activations is not None:
        tensors["activations"] = activations.contiguous()
    save_file(tensors, tmp)
    usual_mode(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return file_sha256(path)


def _verified_shards(out: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shards, up to the first one that is missing or not whole (its size is not
    what its safetensors header says), or up to the last if that one fails its checksum.

    Only the last is hashed: a shard is listed after it was written, fsynced and renamed into
    place, so a crash can leave a listed shard missing or cut short (its folder entry or pages
    not yet on disk), which the size shows, and hashing every shard would read the whole store
    (minutes per TB) on each resumed fill and for each sweep member sharing the store."""
    good = []
    for shard in manifest.get("shards", []):
        if not whole_safetensors(out / shard["file"]):
            return good
        good.append(shard)
    if good and file_sha256(out / good[-1]["file"]) != good[-1]["sha256"]:
        good.pop()
    return good


@stage("fill-activations", STAGE_VERSION, key_inputs=("spec", "artifacts_dir"))
def fill_activations(spec: dict[str, Any], model_ref: dict[str, Any], tokens_ref: dict[str, Any] | None, artifacts_dir: str, run_dir: str | None = None) -> dict[str, Any]:
    """Run the model over the pretokenised contexts (`tokens_ref`; None when the dataset holds
    token ids) and persist `spec['n_tokens']` hook activations in shards. The spec determines the
    contexts, so `tokens_ref` is not part of the cache key. `saeflow stop` of the run in `run_dir`
    stops the fill as a signal does."""
    return fill_stores([spec], model_ref, tokens_ref, artifacts_dir, StopRequests(Path(run_dir)) if run_dir else None)[0]


@stage("fill-activation-stores", STAGE_VERSION, key_inputs=("specs", "artifacts_dir"))
def fill_activation_stores(specs: list[dict[str, Any]], model_ref: dict[str, Any], tokens_ref: dict[str, Any] | None, artifacts_dir: str) -> list[dict[str, Any]]:
    """Fill several stores that differ only in their hook from one model pass over the data (a
    sweep over hooks); each store ends exactly as if filled alone."""
    return fill_stores(specs, model_ref, tokens_ref, artifacts_dir)


HOOK_FIELDS = ("hook_name", "hook_head_index", "d_in")


def shared_pass_key(spec: dict[str, Any]) -> str:
    """Stores with the same key read the same tokens through the same model: one pass fills all."""
    return stable_hash({k: v for k, v in spec.items() if k not in HOOK_FIELDS})


def fill_stores(specs: list[dict[str, Any]], model_ref: dict[str, Any], tokens_ref: dict[str, Any] | None, artifacts_dir: str, stop_requests: StopRequests | None = None) -> list[dict[str, Any]]:
    """Fill the stores of `specs` (same `shared_pass_key`) together, holding each store's lock:
    runs that share a store wait for the one filling it, then find it complete. SIGTERM/SIGINT
    (and `stop_requests`, a run's `saeflow stop`) stop the fill after the model batch in hand,
    with the shards written so far kept."""
    from prefect import get_run_logger

    if len({shared_pass_key(spec) for spec in specs}) != 1:
        raise ValueError("stores filled in one model pass must differ only in " + ", ".join(HOOK_FIELDS))
    outs = [store_dir(artifacts_dir, spec) for spec in specs]
    with stop_signals(), contextlib.ExitStack() as locks:
        for out in sorted(set(outs)):  # one order for every process: no deadlock
            locks.enter_context(exclusive_lock(out / ".lock", f"activation store {out}", wait=True, stop_requests=stop_requests))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as background:
            refs = _fill(specs, model_ref, tokens_ref, outs, background, get_run_logger(), stop_requests)
        if stop := stop_requested():  # after the last batch's check: training would no longer see it
            STOPS_AFTER_FILL.update({ref["path"]: stop for ref in refs})
        return refs


def shard_bytes(store_bytes: int) -> int:
    """Bytes per shard of a store of `store_bytes`: SHARD_BYTES up to stores of MAX_SHARDS of them,
    then bigger, up to MAX_SHARD_BYTES."""
    return max(SHARD_BYTES, min(store_bytes // MAX_SHARDS, MAX_SHARD_BYTES))


def _shard_rows(spec: dict[str, Any]) -> int:
    bytes_per_row = spec["d_in"] * getattr(torch, spec["dtype"]).itemsize
    rows_per_batch = spec["store_batch_size_prompts"] * spec["context_size"]
    return max(1, shard_bytes(spec["n_tokens"] * bytes_per_row) // (bytes_per_row * rows_per_batch)) * rows_per_batch


class _StoreWriter:
    """One store's manifest and the rows waiting to become its next shard. Full shards are written
    (and the manifest updated) on the `background` thread while the model runs on, one at a time
    per store and in order, so a killed fill still leaves a manifest listing only whole shards."""

    def __init__(self, spec: dict[str, Any], out: Path, background: ThreadPoolExecutor):
        self.spec, self.out, self.background = spec, out, background
        self.manifest_path = out / "manifest.json"
        self.manifest = read_json(self.manifest_path) if self.manifest_path.exists() else {"spec": spec, "shards": []}
        if not same_contents(self.manifest["spec"], spec):
            raise RuntimeError(f"{self.manifest_path} belongs to another store spec; move {out} away and run again")
        self.shards = _verified_shards(out, self.manifest)
        self.done_rows = self.shards[-1]["stop"] if self.shards else 0  # rows written or being written
        self.eval_done = _verified_eval_tokens(out, self.manifest) is not None
        self.rows_per_shard = _shard_rows(spec)
        self.pending_acts: torch.Tensor | None = None  # the next shard's rows, filled in place
        self.pending_tokens: list[torch.Tensor] = []
        self.pending_rows = 0
        self.writing: Future | None = None

    @property
    def complete(self) -> bool:
        return self.done_rows >= self.spec["n_tokens"] and self.eval_done

    def add(self, acts: torch.Tensor | None, tokens: torch.Tensor, row: int) -> bool:
        """Queue rows ending at `row`; start writing a shard when enough are queued. True if so."""
        if acts is not None:
            if self.pending_acts is None:
                rows = min(self.rows_per_shard, self.spec["n_tokens"] - self.done_rows)
                self.pending_acts = torch.empty((rows, acts.shape[1]), dtype=acts.dtype)
            self.pending_acts[self.pending_rows : self.pending_rows + len(acts)] = acts
        self.pending_tokens.append(tokens)
        self.pending_rows += len(tokens)
        if row - self.done_rows < self.rows_per_shard and row != self.spec["n_tokens"]:
            return False
        self.wait()
        acts = None if self.pending_acts is None else self.pending_acts[: self.pending_rows]
        self.writing = self.background.submit(self._write_shard, acts, torch.cat(self.pending_tokens), self.done_rows, row)
        self.done_rows, self.pending_acts, self.pending_tokens, self.pending_rows = row, None, [], 0
        return True

    def _write_shard(self, acts: torch.Tensor | None, tokens: torch.Tensor, start: int, stop: int) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        sha = _save_shard(self.out / name, acts, tokens)
        self.shards.append({"file": name, "start": start, "stop": stop, "sha256": sha})
        write_json(self.manifest_path, {**self.manifest, "shards": self.shards, "complete": False})

    def wait(self) -> None:
        """Wait for the shard being written; raise what writing it raised."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def finish(self, eval_tokens: torch.Tensor, repeats_training: bool = False) -> None:
        self.wait()
        sha = _save_shard(self.out / EVAL_TOKENS, None, eval_tokens)
        entry = {"file": EVAL_TOKENS, "contexts": len(eval_tokens), "sha256": sha} | ({"eval_repeats_training": True} if repeats_training else {})
        self.manifest = {**self.manifest, "shards": self.shards, "eval": entry}
        write_json(self.manifest_path, {**self.manifest, "complete": True})
        self.eval_done = True

    def result(self) -> dict[str, Any]:
        return {
            "path": str(self.out),
            "mode": "streaming" if self.spec.get("tokens_only") else "cached",
            "n_tokens": self.spec["n_tokens"],
            "d_in": self.spec["d_in"],
            "dtype": self.spec["dtype"],
            "n_shards": len(self.shards),
            "eval_contexts": -(-self.spec["eval_tokens"] // self.spec["context_size"]),
            "outputs": [str(self.out / s["file"]) for s in self.shards] + [str(self.out / EVAL_TOKENS), str(self.manifest_path)],
        } | {k: v for k, v in self.manifest.get("eval", {}).items() if k == "eval_repeats_training"}


def _held_out_from(n_contexts: int, n_tokens: int, n_eval: int, spec: dict[str, Any], logger) -> int | None:
    """Where the held-out contexts begin when the pretokenised contexts are fewer than training
    and evaluation need (the dataset ran out): the last `n_eval` of them, never trained on, while
    training goes round the others. None when there are enough: they follow the training ones."""
    batch = spec["store_batch_size_prompts"]
    # Enough when the whole batches the fill reads, for training and then for the held-out contexts, are there.
    if n_contexts >= (-(-n_tokens // (batch * spec["context_size"])) + -(-n_eval // batch)) * batch:
        return None
    if n_contexts - n_eval < batch:
        raise ValueError(
            f"dataset {spec['dataset_path']} holds {n_contexts} contexts of {spec['context_size']} tokens: fewer than the "
            f"{n_eval} held out for evaluation (eval_tokens {spec['eval_tokens']}) plus one model batch of {batch} to train on; "
            f"use more data, or lower eval_tokens or store_batch_size_prompts"
        )
    passes = n_tokens / ((n_contexts - n_eval) * spec["context_size"])
    training = f"goes over the other {n_contexts - n_eval} about {passes:.1f} times (use more data for fewer repeats)" if passes > 1 else f"reads from the other {n_contexts - n_eval}"
    logger.warning(
        f"Dataset {spec['dataset_path']} holds {n_contexts} contexts, fewer than training and evaluation need: the last "
        f"{n_eval} are held out for evaluation and never trained on, and training {training}"
    )
    return n_contexts - n_eval


class _StoredTokens:
    """The tokens of the rows already on disk, to compare with the data when a fill resumes."""

    def __init__(self, writers: list[_StoreWriter]):
        writer = max(writers, key=lambda w: w.done_rows)
        self.out, self.shards, self.loaded = writer.out, list(writer.shards), (None, None)

    def check(self, row: int, tokens: torch.Tensor, dataset_path: str) -> None:
        from safetensors import safe_open

        for shard in self.shards:
            if shard["start"] <= row < shard["stop"]:
                if self.loaded[0] != shard["file"]:
                    with safe_open(self.out / shard["file"], "pt") as f:
                        self.loaded = (shard["file"], f.get_tensor("tokens"))
                stored = self.loaded[1][row - shard["start"] : row - shard["start"] + len(tokens)]
                if not torch.equal(stored, tokens[: len(stored)]):
                    raise RuntimeError(
                        f"dataset {dataset_path} changed since activation store {self.out} was started: the tokens at "
                        f"row {row} differ from the stored ones. Pin the dataset (a local copy, or a hub revision), or "
                        f"move {self.out} away to fill it again from the new data"
                    )
                return


class NotEnoughDisk(RuntimeError):
    """A store would not fit on its disk: refused before any row is made."""


def check_free_disk(needs: dict[Path, int], fixes: str) -> None:
    """Raise NotEnoughDisk, with `fixes`, if the bytes still to be written into each folder of
    `needs` (made or not) are more than its file system has free (folders on one file system add up)."""
    import shutil

    by_device: dict[int, tuple[int, list[Path], Path]] = {}
    for folder, need in needs.items():
        existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # os.path: False, not an error, under a folder it may not search
        total, folders, _ = by_device.get(existing.stat().st_dev, (0, [], existing))
        by_device[existing.stat().st_dev] = (total + need, [*folders, folder], existing)
    for need, folders, existing in by_device.values():
        usage = shutil.disk_usage(existing)
        if usage.total == 0:  # a file system that does not say (some FUSE mounts of object stores)
            continue
        free = usage.free
        if need > free:
            raise NotEnoughDisk(
                f"{', '.join(str(f) for f in folders)} need{'s' if len(folders) == 1 else ''} {_size(need)} more, "
                f"but only {_size(free)} are free there; {fixes}"
            )


def _size(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _check_room(stores: list[tuple[dict[str, Any], Path, int, bool]]) -> None:
    """Refuse to fill stores, each `(spec, folder, rows done, held-out contexts done)`, that would
    fill the disk: hours into a multi-TB fill is too late to find out."""
    needs = {}
    for spec, out, done_rows, eval_done in stores:
        row_bytes = 8 + (0 if spec.get("tokens_only") else spec["d_in"] * getattr(torch, spec["dtype"]).itemsize)
        eval_bytes = 0 if eval_done else -(-spec["eval_tokens"] // spec["context_size"]) * spec["context_size"] * 8
        needs[out] = (spec["n_tokens"] - done_rows) * row_bytes + eval_bytes
    smaller = []
    if any(not spec.get("tokens_only") and spec["dtype"] == "float32" for spec, *_ in stores):
        smaller.append("store_dtype: bfloat16 halves it")
    if any(not spec.get("tokens_only") for spec, *_ in stores):
        smaller.append("activation_mode: streaming stores the token ids alone (8 bytes a token) and runs the model again as training reads")
    check_free_disk(
        needs,
        "free some space, or fill the store elsewhere (--artifacts-dir on a bigger disk)"
        + (f", or make it smaller (a new run): {', and '.join(smaller)}" if smaller else ""),
    )


def check_room_for_stores(specs: list[dict[str, Any]], artifacts_dir: str) -> None:
    """The fill's disk check, before the data is tokenised (which may take hours for a large
    dataset): from the stores' manifests as they stand, without checksums."""
    stores = {}
    for spec in specs:
        out = store_dir(artifacts_dir, spec)  # members sharing a store: counted once
        manifest = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else {}
        if not manifest.get("complete"):
            stores[out] = (spec, out, manifest["shards"][-1]["stop"] if manifest.get("shards") else 0, "eval" in manifest)
    _check_room(list(stores.values()))


def _fill(specs: list[dict[str, Any]], model_ref: dict[str, Any], tokens_ref: dict[str, Any] | None, outs: list[Path], background: ThreadPoolExecutor, logger, stop_requests: StopRequests | None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from tasks.model import hooks_activations, load_model, select_cuda_device

    select_cuda_device(specs[0]["device"])  # a sweep's shared fill runs in a thread of its own
    writers = {out: _StoreWriter(spec, out, background) for spec, out in zip(specs, outs)}
    todo = [w for w in writers.values() if not w.complete]
    if todo:
        spec = todo[0].spec
        n_tokens, ctx = spec["n_tokens"], spec["context_size"]
        rows_per_batch = spec["store_batch_size_prompts"] * ctx
        names = ", ".join(w.out.name for w in todo)
        start_row = min(w.done_rows for w in todo)
        if start_row:
            logger.info(f"Activation store(s) {names}: resuming at row {start_row} of {n_tokens}")
        if len(todo) > 1:
            logger.info(f"Filling {len(todo)} activation stores from one model pass: " + ", ".join(w.spec["hook_name"] for w in todo))
        if stop := stop_asked(stop_requests):  # before loading the model: a sweep's member that waited for this lock
            raise preempted(f"stopped by {stop} before filling activation store(s) {names} began")
        _check_room([(w.spec, w.out, w.done_rows, w.eval_done) for w in todo])
        n_eval = -(-spec["eval_tokens"] // ctx)
        held_out_from = None  # the first held-out context, where the pretokenised contexts ran out
        if tokens_ref is not None:
            contexts = _token_dataset(spec, tokens_ref)
            held_out_from = _held_out_from(len(contexts), n_tokens, n_eval, spec, logger)
            batches = ContextBatches(contexts, spec["store_batch_size_prompts"], end=held_out_from)
            batch_tokens = batches.next_batch
        model = load_model(model_ref, spec["device"], from_pretrained_kwargs=spec["from_pretrained_kwargs"])
        if tokens_ref is None:
            batch_tokens = _activations_store(model, _token_dataset(spec, None), spec).get_batch_tokens
        dtype = getattr(torch, spec["dtype"])
        device = torch.device(spec["device"])
        # Not when asked to stop: a signal to the whole job also ended Prefect's temporary server,
        # which its client would retry for minutes before the stop is seen.
        progress = None if stop_requested() else ProgressArtifact(100 * start_row / n_tokens, f"Filling activations at {', '.join(w.spec['hook_name'] for w in todo)} (store(s) {names})")
        bar = tqdm(total=n_tokens, initial=start_row, desc="Filling activation store", unit="tok")
        started, row, wrapped = time.monotonic(), 0, False

        def next_tokens():
            nonlocal wrapped
            try:
                try:
                    tokens = batch_tokens(raise_at_epoch_end=True)
                except StopIteration:
                    if not wrapped and held_out_from is None:
                        logger.warning(f"Dataset {spec['dataset_path']} ran out after {row} tokens; starting it again")
                    wrapped = True
                    tokens = batch_tokens()
            except RuntimeError:  # SAELens stacks the rows of token ids: one shorter than the others fails there
                if tokens_ref is None:
                    _check_row_lengths(spec)
                raise
            if tokens.shape[1] != ctx:  # every row of the batch equally short
                _check_row_lengths(spec)
            if int(tokens.max()) >= model.cfg.d_vocab:
                raise ValueError(
                    f"dataset {spec['dataset_path']} holds token id {int(tokens.max())}, outside the model's vocabulary "
                    f"of {model.cfg.d_vocab} tokens: it was tokenised with another tokenizer"
                )
            return tokens

        stored_tokens = _StoredTokens(todo)
        while row < n_tokens:
            if stop := stop_asked(stop_requests):  # the shards written so far are kept
                bar.close()
                raise preempted(f"stopped by {stop} while filling activation store(s) {names}, at row {row} of {n_tokens} (the shards written are kept)")
            tokens = next_tokens()
            take = min(rows_per_batch, n_tokens - row)
            flat_tokens = tokens.reshape(-1)[:take].to("cpu")
            # Stores that already hold these rows only needed the tokens, to keep the data order;
            # the tokens must be the ones stored, or the data changed since the fill started.
            stored_tokens.check(row, flat_tokens, spec["dataset_path"])
            need = [w for w in todo if row + take > w.done_rows]
            row += take
            if not need:
                continue
            hooked = [w for w in need if not w.spec.get("tokens_only")]
            batch = []
            if hooked:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec["autocast_lm"]):
                    batch = hooks_activations(model, tokens, [(w.spec["hook_name"], w.spec["hook_head_index"]) for w in hooked])
            acts_of = {}
            for writer, acts in zip(hooked, batch):
                rows = acts.reshape(-1, writer.spec["d_in"])[:take].to(dtype)
                _check_finite(rows, row - take, writer.spec)  # on the model's device: 5 ms a 4096 x 768 batch on one CPU core
                acts_of[id(writer)] = rows.to("cpu")
            wrote = False
            for writer in need:
                wrote |= writer.add(acts_of.get(id(writer)), flat_tokens, row)
            bar.update(take)
            if wrote:
                rate = (row - start_row) / max(time.monotonic() - started, 1e-9)
                logger.info(f"Activation store(s) {names}: {row}/{n_tokens} tokens ({100 * row / n_tokens:.0f}%), {rate:,.0f} tokens/s")
                if progress is not None and not stop_requested():
                    progress.update(100 * row / n_tokens, final=row == n_tokens)
        bar.close()

        # Held-out contexts for evaluation and analysis: the ones after the training tokens, or
        # the last ones of pretokenised contexts that ran out (training went round the others).
        if held_out_from is not None:
            eval_tokens = torch.from_numpy(batches.contexts[held_out_from : held_out_from + n_eval]["tokens"]).long()
        else:
            parts = []
            while sum(len(c) for c in parts) < n_eval:
                parts.append(next_tokens().to("cpu"))
            if wrapped:
                logger.warning("The dataset was used up: the held-out evaluation tokens repeat training data (the report says so); use more data")
            eval_tokens = torch.cat(parts)[:n_eval]
        for writer in todo:
            writer.finish(eval_tokens, repeats_training=wrapped and held_out_from is None)
    # A streaming store's training makes activations with the model: its result says which.
    return [writers[out].result() | ({"model": model_ref} if writers[out].spec.get("tokens_only") else {}) for out in outs]


def _check_finite(acts: torch.Tensor, first_row: int, spec: dict[str, Any]) -> None:
    """Refuse activations the model made NaN or infinite (a float16 model's residual stream can
    overflow): stored, they would stop training with a non-finite loss whenever their row is
    drawn, perhaps days in."""
    finite = torch.isfinite(acts).all(-1)
    if bool(finite.all()):
        return
    row = first_row + int((~finite).nonzero()[0])
    ctx = spec["context_size"]
    raise ValueError(
        f"the model made a NaN or infinite activation at {spec['hook_name']} for store row {row} (context {row // ctx}, "
        f"position {row % ctx} of the pretokenised data); the store would stop training whenever that row is drawn. "
        f"A float16 model can overflow: load it in float32 or bfloat16 (model_from_pretrained_kwargs, now "
        f"{spec['from_pretrained_kwargs'] or {}}), or check the model's weights. The shards written before it are kept"
    )


def _check_row_lengths(spec: dict[str, Any]) -> None:
    """Name the first row of a dataset of token ids shorter than `context_size`, if there is one
    (preflight checks only the first rows)."""
    from tasks.data import TOKEN_COLUMNS, dataset_columns

    dataset = _token_dataset(spec, None)
    column = next(c for c in TOKEN_COLUMNS if c in dataset_columns(dataset))
    for i, row in enumerate(dataset.select_columns([column])):
        if len(row[column]) < spec["context_size"]:
            raise ValueError(
                f"dataset {spec['dataset_path']}: row {i} holds {len(row[column])} token ids, fewer than context_size "
                f"({spec['context_size']}); every row of a dataset of token ids must hold at least context_size ids. "
                f"Give the dataset as text (saeflow then tokenises and packs it), or pack it into rows of context_size "
                f"ids with SAELens's PretokenizeRunner"
            )


def store_contents(store_ref: dict[str, Any]) -> str:
    """A hash of what a store holds (its manifest's sha256 of every shard and of the held-out
    data): the same for a store filled again bit for bit, wherever it lies."""
    manifest = read_json(Path(store_ref["path"]) / "manifest.json")
    return stable_hash([shard["sha256"] for shard in manifest["shards"]] + [manifest["eval"]["sha256"]], 16)


def _verified_eval_tokens(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    entry = manifest.get("eval")
    if entry and (out / entry["file"]).is_file() and file_sha256(out / entry["file"]) == entry["sha256"]:
        return entry
    return None


def load_eval_tokens(store_ref: dict[str, Any]) -> torch.Tensor:
    """The held-out contexts `[n, context_size]` stored after the training tokens."""
    return load_file(Path(store_ref["path"]) / EVAL_TOKENS)["tokens"]


def load_eval_activations(store_ref: dict[str, Any]) -> torch.Tensor:
    """The held-out activation rows `[n, d_in]` of a store made without a model."""
    return load_file(Path(store_ref["path"]) / EVAL_ACTIVATIONS)["activations"]


def load_store(store_ref: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """All activations `[n_tokens, d_in]` (None for a streaming store) and their tokens
    `[n_tokens]` (None for activations made elsewhere without tokens) of a filled store, checked
    against the manifest's row ranges (no row missing or repeated)."""
    shards = list(_store_shards(store_ref))
    acts = [data["activations"] for data in shards if "activations" in data]
    tokens = [data["tokens"] for data in shards if "tokens" in data]
    return (torch.cat(acts) if acts else None), (torch.cat(tokens) if len(tokens) == len(shards) else None)


def store_contexts(store_ref: dict[str, Any], context_size: int) -> torch.Tensor:
    """A streaming store's token contexts `[n_tokens / context_size, context_size]` in int32 (half
    the stored int64; ids fit), copied in shard by shard: 8 GB for 2B tokens, where the stored
    tokens joined at once held 16 GB twice over."""
    contexts = torch.empty(store_ref["n_tokens"], dtype=torch.int32)
    start = 0
    for data in _store_shards(store_ref):
        if start + len(data["tokens"]) > len(contexts):
            raise RuntimeError(f"activation store {store_ref['path']} holds more than the {len(contexts)} rows expected")
        contexts[start : start + len(data["tokens"])] = data["tokens"]
        start += len(data["tokens"])
    return contexts.reshape(-1, context_size)


def _store_shards(store_ref: dict[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of a filled store's shards, one shard at a time, each checked against the
    manifest's row ranges (no row missing or repeated)."""
    folder = Path(store_ref["path"])
    manifest = read_json(folder / "manifest.json")
    if not manifest.get("complete"):
        raise RuntimeError(f"activation store {folder} is not complete; run the pipeline again to finish filling it")
    expected = 0
    for shard in manifest["shards"]:
        if shard["start"] != expected:
            raise RuntimeError(f"activation store {folder}: rows {expected}..{shard['start']} are missing")
        data = load_file(folder / shard["file"])
        if len(data.get("tokens", data.get("activations"))) != shard["stop"] - shard["start"]:
            raise RuntimeError(f"activation store {folder}: {shard['file']} does not hold rows {shard['start']}..{shard['stop']}")
        expected = shard["stop"]
        yield data
    if expected != store_ref["n_tokens"]:
        raise RuntimeError(f"activation store {folder} holds {expected} rows, expected {store_ref['n_tokens']}")


def _allow_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files up to its hard limit when `needed` more files
    may be open than it leaves room for (each memory-mapped shard keeps a descriptor open;
    common soft limits are 1,024 while a 460 GB store has 862 shards)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed + 256 > soft and soft != hard:
        wanted = needed + 256 if hard == resource.RLIM_INFINITY else hard  # macOS refuses an infinite soft limit
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # opening the shards then fails with the message that names the limit needed


class StoreRows:
    """The activations of a filled cached store as one `[n_tokens, d_in]` table of rows, read
    through memory maps of the shards: indexing copies only the rows asked for, never the store.

    The mapped pages are let go (`madvise(MADV_DONTNEED)`; they stay in the page cache) after
    every `RELEASE_ROWS` rows read, so the store's share of the process's resident memory stays
    near `RELEASE_ROWS` x the kernel's 64 KB fault-around window whatever the store's size.
    Left mapped, a run's random reads made the whole store resident: batch schedulers that
    count a job's RSS (Slurm's `OverMemoryKill`) would kill a run on a store larger than its
    memory request. The price is mapping the pages again (from the page cache) and one
    `madvise` per shard read: per 4096-row batch of 256-byte rows, 1.35 ms instead of 0.45 ms
    from 5 shards (3% of the 2L benchmark's SAE step on 2 CPU cores), 27 ms instead of 16 ms
    from 2,000 shards, where a batch's rows lie in as many shards as rows.
    """

    RELEASE_ROWS = 256

    def __init__(self, store_ref: dict[str, Any]):
        import json
        import mmap
        import struct

        folder = Path(store_ref["path"])
        manifest = read_json(folder / "manifest.json")
        if not manifest.get("complete"):
            raise RuntimeError(f"activation store {folder} is not complete; run the pipeline again to finish filling it")
        _allow_open_files(2 * len(manifest["shards"]))  # a worker process holds its parent's maps and its own
        self.maps, self.parts, stops, expected = [], [], [], 0
        for shard in manifest["shards"]:
            if shard["start"] != expected:
                raise RuntimeError(f"activation store {folder}: rows {expected}..{shard['start']} are missing")
            path = folder / shard["file"]
            try:
                with open(path, "rb") as f:  # safetensors: 8-byte header length, JSON header, raw data
                    header_len = struct.unpack("<Q", f.read(8))[0]
                    entry = json.loads(f.read(header_len))["activations"]
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as error:
                if error.errno != errno.EMFILE:
                    raise
                raise RuntimeError(
                    f"activation store {folder} has {len(manifest['shards'])} shards, each kept open while training reads "
                    f"it, and this process may not open more files: raise the open-files limit (`ulimit -n`, or "
                    f"LimitNOFILE / your scheduler's setting) to at least {2 * len(manifest['shards']) + 256}"
                ) from None
            rows, width = entry["shape"]
            if rows != shard["stop"] - shard["start"]:
                raise RuntimeError(f"activation store {folder}: {shard['file']} does not hold rows {shard['start']}..{shard['stop']}")
            begin, end = entry["data_offsets"]
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=8 + header_len + begin)
            self.maps.append(mapped)
            self.parts.append(raw.view(rows, (end - begin) // rows).view(getattr(torch, store_ref["dtype"])))
            stops.append(shard["stop"])
            expected = shard["stop"]
        if expected != store_ref["n_tokens"]:
            raise RuntimeError(f"activation store {folder} holds {expected} rows, expected {store_ref['n_tokens']}")
        self.bounds = torch.tensor([0, *stops])
        self.width = width
        self.store_ref = store_ref

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows at the given indices, in that order. They are read in ascending order (about
        1.5x faster than in the order asked), one `index_select` per shard's run of them, and the
        shards read are let go after each `RELEASE_ROWS` rows; then put in the order asked."""
        import mmap

        order = rows.argsort()
        ascending = rows[order]
        gathered = torch.empty((len(rows), self.width), dtype=self.parts[0].dtype)
        shard_of = torch.searchsorted(self.bounds, ascending, right=True) - 1
        in_shard = ascending - self.bounds[shard_of]
        shard_starts = (torch.nonzero(shard_of[1:] != shard_of[:-1]).flatten() + 1).tolist()
        n = len(rows)
        cuts = sorted({*shard_starts, *range(0, n, self.RELEASE_ROWS), n})
        shard_of, read = shard_of.tolist(), set()
        for begin, end in zip(cuts, cuts[1:]):  # each piece lies in one shard
            shard = shard_of[begin]
            torch.index_select(self.parts[shard], 0, in_shard[begin:end], out=gathered[begin:end])
            read.add(shard)
            if end % self.RELEASE_ROWS == 0 or end == n:
                for shard in read:
                    self.maps[shard].madvise(mmap.MADV_DONTNEED)
                read.clear()
        return torch.empty_like(gathered).index_copy_(0, order, gathered)


def _streaming_source(store_ref: dict[str, Any], device: str):
    """The model on `device`, the token contexts and the spec of a streaming (tokens-only) store,
    with `device` as its device (the store may have been made on another GPU of the kind)."""
    from tasks.model import load_model

    spec = {**read_json(Path(store_ref["path"]) / "manifest.json")["spec"], "device": device}
    contexts = store_contexts(store_ref, spec["context_size"])
    model = load_model(store_ref["model"], spec["device"], from_pretrained_kwargs=spec["from_pretrained_kwargs"])
    return model, contexts, spec


def training_batches(store_ref: dict[str, Any], batch_size: int, seed: int, chunk_contexts: int, device: str = "cpu", dtype: torch.dtype | None = None):
    """The seeded training batches of a store on `device`, in `dtype` (default: the store's):
    `ShuffledBatches` over cached activations, or `StreamedBatches` made by the model from a
    streaming store's tokens (`chunk_contexts` per chunk). Set `.next_batch` to start elsewhere
    than at batch 0."""
    if store_ref.get("mode") == "streaming":
        from tasks.streaming import StreamedBatches

        model, contexts, spec = _streaming_source(store_ref, device)
        return StreamedBatches(model, contexts, spec, batch_size, seed, chunk_contexts, dtype=dtype)
    return ShuffledBatches(StoreRows(store_ref), batch_size, seed, device=device, dtype=dtype)


def sample_activation_batches(store_ref: dict[str, Any], n: int, seed: int, batch_rows: int, device: str = "cpu", skip_tokens: list[int] = ()) -> Iterator[torch.Tensor]:
    """About `n` activation rows drawn at random (seeded), less those at a token of `skip_tokens`,
    in batches of `batch_rows` (the last may be shorter): single rows from a cached store, in
    ascending order, read a batch at a time; whole contexts from a streaming one, made by the
    model on `device` `store_batch_size_prompts` at a time. Only a batch or two is held at once,
    never all `n` rows."""
    generator = torch.Generator().manual_seed(seed)
    skip = torch.tensor(list(skip_tokens), dtype=torch.long)
    if store_ref.get("mode") == "streaming":
        from tasks.streaming import activation_batches

        model, contexts, spec = _streaming_source(store_ref, device)
        picked = contexts[torch.randperm(len(contexts), generator=generator)[: -(-n // spec["context_size"])].sort().values]
        kept = (~torch.isin(part.flatten(), skip) for part in picked.split(spec["store_batch_size_prompts"]))
        yield from rebatch((acts[keep.to(acts.device)] for acts, keep in zip(activation_batches(model, picked, spec), kept)), batch_rows)
        return
    activations = StoreRows(store_ref)
    rows = randperm(len(activations), generator)[: min(n, len(activations))].sort().values.long()
    if len(skip):
        rows = rows[~torch.isin(store_tokens_at(store_ref, rows), skip)]
    for start in range(0, len(rows), batch_rows):
        yield activations[rows[start : start + batch_rows]]


def store_tokens_at(store_ref: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """The token each of the ascending `rows` of a cached store came from, read a shard at a time."""
    from safetensors import safe_open

    folder = Path(store_ref["path"])
    tokens = torch.empty(len(rows), dtype=torch.long)
    for shard in read_json(folder / "manifest.json")["shards"]:
        first, stop = torch.searchsorted(rows, torch.tensor([shard["start"], shard["stop"]])).tolist()
        if first < stop:
            with safe_open(folder / shard["file"], "pt") as f:
                tokens[first:stop] = f.get_tensor("tokens")[rows[first:stop] - shard["start"]]
    return tokens


def rebatch(pieces: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The rows of `pieces`, in order, in batches of `size` rows (the last may be shorter)."""
    held, n_held = [], 0
    for piece in pieces:
        held.append(piece)
        n_held += len(piece)
        if n_held >= size:
            rows = torch.cat(held)
            for start in range(0, len(rows) - size + 1, size):
                yield rows[start : start + size]
            rest = rows[len(rows) - len(rows) % size :]
            held, n_held = [rest], len(rest)
    if n_held:
        yield torch.cat(held)


def randperm(n: int, generator: torch.Generator) -> torch.Tensor:
    """`torch.randperm(n)` in int32 where its values fit: the same permutation (the draws do not
    depend on the dtype) in half the memory, 2.4 instead of 4.8 GB for a store of 600M rows."""
    return torch.randperm(n, generator=generator, dtype=torch.int32 if n <= 2**31 else torch.int64)


class ShuffledBatches:
    """Training batches drawn from the stored activations in a seeded random order.

    The row stream is the concatenation of one permutation of the store per epoch, so batch `b`
    is a pure function of `(seed, b)`: starting at any batch costs one permutation, not a replay.
    On a GPU each batch is copied from pinned memory without waiting, so the next one is gathered
    while the step runs.
    """

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int, start_batch: int = 0, device: str = "cpu", dtype: torch.dtype | None = None):
        self.activations = activations
        self.batch_size = batch_size
        self.seed = seed
        self.next_batch = start_batch
        self.device = torch.device(device)
        self.dtype = dtype  # the SAE's, where the store's differs (store_dtype); None keeps the store's
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, randperm(len(self.activations), generator)
        return self._perm

    def __iter__(self):
        return self

    def rows_of(self, batch: int) -> torch.Tensor:
        """The store rows of batch `batch`, in the order training sees them."""
        n = len(self.activations)
        start, parts, need = batch * self.batch_size, [], self.batch_size
        while need:
            epoch, offset = divmod(start, n)
            take = min(need, n - offset)
            parts.append(self._permutation(epoch)[offset : offset + take])
            start, need = start + take, need - take
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).long()

    def __next__(self) -> torch.Tensor:
        rows = self.activations[self.rows_of(self.next_batch)]
        self.next_batch += 1
        if self.device.type == "cuda":  # the store's bytes cross over, then take the SAE's dtype there
            return rows.pin_memory().to(self.device, non_blocking=True).to(self.dtype or rows.dtype)
        return rows.to(self.device, self.dtype or rows.dtype)


def reads_ahead(device: str) -> bool:
    """Whether training on `device` reads its batches ahead: on an accelerator, where reading a
    batch took longer than the launch-bound SAE step (H200) and the host has cores to spare; not
    on the CPU, where the reading thread competed with the step for the same cores (no gain
    measured on 2 cores)."""
    return torch.device(device).type != "cpu"


def read_ahead(batches, device: str, workers: int | None = None, logger=None, limit: int | None = None):
    """The batches to train on `device` from, as a context manager that stops their readers;
    with `limit`, no batch past the `limit`-th is read ahead (training needs no more).

    A cached store's batches are read ahead by `workers` processes (`WorkerReads`), or in the
    training loop with 0. By default: `READ_WORKERS`, at most the CPUs this process may use,
    where training reads ahead (`reads_ahead`), and 0 on the CPU. Other batches (a streaming
    store's, made by the model on this process's device) are made one ahead on a thread
    (`ReadAhead`) where training reads ahead.

    The workers hand their batches over through shared memory (/dev/shm). Where it has less
    than twice what they hold at once (Docker's default is 64 MB), the batches are read in the
    training loop instead (on the H200 a reading thread made training slower than that), with a
    warning on `logger` saying how to give the container more."""
    if not (isinstance(batches, ShuffledBatches) and isinstance(batches.activations, StoreRows)):
        return ReadAhead(batches, limit) if reads_ahead(device) else contextlib.nullcontext(batches)
    if workers is None:
        from flows import usable_cpus  # its affinity, capped by its container's CPU quota

        workers = min(READ_WORKERS, usable_cpus()) if reads_ahead(device) else 0
    if workers == 0:
        return contextlib.nullcontext(batches)
    if multiprocessing.current_process().daemon:
        # A Dask worker (its nanny starts it as a daemon process) or a multiprocessing pool's:
        # a daemon process may not start processes of its own.
        if logger is not None:
            logger.warning(
                f"this process is a daemon process (a Dask worker's, or a multiprocessing pool's), which may not start "
                f"the {workers} processes that read training batches ahead: reading them in the training loop instead. "
                "Start Dask workers as plain processes (the Dask setting distributed.worker.daemon: false) to read ahead, "
                "or set read_workers: 0 to silence this."
            )
        return contextlib.nullcontext(batches)
    store = batches.activations
    held = WorkerReads.BATCHES_PER_WORKER * workers * batches.batch_size * store.width * store.parts[0].dtype.itemsize
    free = shared_memory_free()
    if free is not None and free < 2 * held:
        if logger is not None:
            logger.warning(
                f"/dev/shm has {free / 2**20:.0f} MiB free and the {workers} processes that read training batches ahead "
                f"need about {2 * held / 2**20:.0f} MiB there: reading them in the training loop instead, which keeps the "
                "SAE step waiting for data. Give the container more shared memory (docker run --shm-size=1g; on "
                "Kubernetes, an emptyDir volume with medium: Memory mounted at /dev/shm), or set read_workers to fewer "
                "processes."
            )
        return contextlib.nullcontext(batches)
    if logger is not None:
        logger.info(f"{workers} worker processes read the training batches ahead (read_workers)")
    return WorkerReads(batches, workers, limit)


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Bytes free in the shared memory that DataLoader workers hand tensors over in (None where
    there is no such folder, as on macOS)."""
    import shutil

    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# Worker processes reading a cached store's batches ahead on an accelerator. On the H200's host,
# one thread read a 4096-row batch of 1 KB rows in 7.6 ms from 64 shards and 9.5 ms from 128 (as
# many as stores of up to 64 GB have), against 3.1 ms for the launch-bound SAE step; four
# workers reading side by side should keep ahead of the step (not yet measured there).
READ_WORKERS = 4


class _StoreReads(torch.utils.data.Dataset):
    """The rows of a cached store, for a DataLoader worker: `[rows]` reads them, through the
    worker's own maps of the store (opened on first use, so that only the store's reference
    goes to the worker)."""

    def __init__(self, store_ref: dict[str, Any]):
        self.store_ref = store_ref
        self._rows = None

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            self._rows = StoreRows(self.store_ref)
        return self._rows[rows]


def _leave_signals_to_training(worker_id: int) -> None:
    """A reading worker ignores SIGTERM and SIGINT, which schedulers (Slurm) and Ctrl-C send to
    every process of a job: training answers them with a checkpoint at the step boundary and
    stops its workers itself. Left to torch's handler, the worker died of it, and training
    failed at once on the worker's death. A worker whose training process dies exits by itself
    (DataLoader's watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerReads:
    """The batches of `batches` (a `ShuffledBatches` over a cached store), from its `next_batch`
    on, read ahead by `workers` processes: a torch DataLoader, which hands out each batch's rows
    (drawn here, from the one permutation) to its workers in turn and returns the batches in
    order, in pinned memory on CUDA; each is copied to the device without waiting.

    Processes, not threads: on the H200, with the reading on threads of the training process,
    the launch-bound SAE step took 2.3x as long as with the reading in the loop (median 8.5
    against 3.7 ms); a thread shares Python's GIL, and the kernel's page-table work, with the
    thread that launches the step's kernels, a worker process neither (not yet measured on a
    GPU). The same batches in the same order as `batches` itself; an error reading a batch is
    raised when that batch is asked for. Use it as a context manager, which stops the workers."""

    BATCHES_PER_WORKER = 2  # read ahead by each worker (DataLoader's prefetch_factor)

    def __init__(self, batches: ShuffledBatches, workers: int, limit: int | None = None):
        import itertools
        import sys

        from torch.utils.data import DataLoader

        self._device, self._dtype = batches.device, batches.dtype
        start = batches.next_batch
        numbers = itertools.count(start) if limit is None else range(start, start + limit)
        # A clone: a slice of the permutation would share its whole storage with the worker.
        rows = (batches.rows_of(batch).clone() for batch in numbers)
        loader = DataLoader(
            _StoreReads(batches.activations.store_ref),
            batch_size=None,
            sampler=rows,
            num_workers=workers,
            prefetch_factor=self.BATCHES_PER_WORKER,
            pin_memory=self._device.type == "cuda",
            worker_init_fn=_leave_signals_to_training,
            generator=torch.Generator(),  # the workers' base seed, not drawn from the global generator (TORCH_GLOBALS)
            multiprocessing_context="fork" if sys.platform == "linux" else None,  # fork is unsafe on macOS
        )
        self._batches = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._batches).to(self._device, non_blocking=True)
        return batch.to(self._dtype or batch.dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._batches._shutdown_workers()  # what the DataLoader's iterator does when it is deleted; it has no public close
        self._batches = None


class ReadAhead:
    """Iterates `batches` one batch ahead on a background thread: the next batch is read (from
    the store, or made by the model in streaming mode) while the caller trains on this one. The
    same batches in the same order, at most `limit` of them (none is made past the last the
    caller needs: in streaming mode that could be a whole chunk of model passes); an error making
    a batch is raised when that batch is asked for. Use it as a context manager, which stops the
    thread."""

    def __init__(self, batches, limit: int | None = None):
        self._batches, self._left = batches, limit
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saeflow-read-ahead")
        self._next = self._read_next()

    def _read_next(self) -> Future | None:
        if self._left is not None:
            if self._left == 0:
                return None
            self._left -= 1
        return self._reader.submit(next, self._batches)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._next is None:
            raise StopIteration
        batch = self._next.result()
        self._next = self._read_next()
        return batch

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
