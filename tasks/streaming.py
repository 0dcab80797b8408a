"""Streaming activation mode: for runs whose activations are too big to keep on disk.

In streaming mode the activation store holds only the token ids of the training contexts (8
bytes a token instead of `d_in` floats) and training makes the activations on the fly, a chunk
of contexts at a time, through the model. The order is fixed by the seed:

- every epoch visits the contexts in a seeded random order, cut into chunks of
  `n_batches_in_buffer * store_batch_size_prompts` contexts (SAELens would call it a mixing
  buffer, but nothing is mixed across chunks);
- the rows (tokens) of a chunk are shuffled with a seed of their own and served in order.

So batch `b` is a pure function of `(seed, b)`, like the cached mode's `ShuffledBatches`: a resumed
run regenerates just the chunk it stopped in (one chunk of model passes) and continues
at the exact row, whatever its progress. Nothing about the chunk has to be checkpointed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MODE_FILE = "activation_mode.json"
FREE_DISK_SHARE = 0.5  # `auto` caches at most this share of the free disk by default


def store_gigabytes(cfg) -> float:
    """Disk size of the cached activations of a run: tokens x d_in x bytes per value."""
    n_tokens = -(-cfg.training_tokens // cfg.context_size) * cfg.context_size
    return n_tokens * cfg.d_in * getattr(torch, cfg.activation_dtype).itemsize / 1e9


def choose_activation_mode(cfg, artifacts_dir: str | Path, run_dir: str | Path, cached_store: str | Path | None = None) -> tuple[str, str]:
    """The run's activation mode and why. `auto` is decided once per run and kept in
    `<run>/activation_mode.json`, so a resumed run never changes mode (and data order); it takes
    the `cached_store` folder (this run's cached store) when another run has filled it already."""
    from tasks.artifacts import read_json, write_json

    recorded = Path(run_dir) / MODE_FILE
    if recorded.exists():
        previous = read_json(recorded)
        if cfg.activation_mode in ("auto", previous["mode"]):
            return previous["mode"], previous["reason"] + " (decided when the run started)"
    size = store_gigabytes(cfg)
    filled = cached_store is not None and (Path(cached_store) / "manifest.json").is_file() and read_json(Path(cached_store) / "manifest.json").get("complete")
    if cfg.activation_mode != "auto":
        mode, reason = cfg.activation_mode, f"set by activation_mode; cached activations would take {size:.2f} GB"
    elif filled:  # it takes no more disk, and the run shares its data order with the runs before
        mode, reason = "cached", f"activation_mode auto: the cached activations ({size:.2f} GB) are on disk already ({cached_store})"
    else:
        if cfg.max_cache_gb is not None:
            limit, source = cfg.max_cache_gb, "max_cache_gb"
        else:
            Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
            limit, source = FREE_DISK_SHARE * shutil.disk_usage(artifacts_dir).free / 1e9, "half the free disk"
        mode = "streaming" if size > limit else "cached"
        relation = "more" if mode == "streaming" else "no more"
        reason = f"activation_mode auto: the cached activations would take {size:.2f} GB, {relation} than {limit:.2f} GB ({source})"
    write_json(recorded, {"mode": mode, "reason": reason})
    return mode, reason


class StreamedBatches:
    """Training batches made on the fly from stored token contexts, in the seeded order above."""

    def __init__(self, model, contexts: torch.Tensor, spec: dict[str, Any], batch_size: int, seed: int, chunk_contexts: int, start_batch: int = 0, dtype: torch.dtype | None = None):
        self.model, self.contexts, self.spec, self.dtype = model, contexts, spec, dtype
        self.batch_size, self.seed, self.chunk_contexts = batch_size, seed, chunk_contexts
        self.next_batch = start_batch
        self.rows_per_epoch = contexts.numel()
        self._key, self._chunk = None, None
        self._epoch, self._order = None, None

    def _generator(self, *key: int) -> torch.Generator:
        seed = self.seed
        for part in key:
            seed = seed * 1_000_003 + part
        return torch.Generator().manual_seed(seed % 2**63)

    def _chunk_rows(self, epoch: int, chunk: int) -> torch.Tensor:
        """The shuffled activation rows of one chunk, made by the model."""
        if self._key != (epoch, chunk):
            if self._epoch != epoch:  # one context order per epoch, not one per chunk
                self._epoch, self._order = epoch, torch.randperm(len(self.contexts), generator=self._generator(epoch))
            picked = self._order[chunk * self.chunk_contexts : (chunk + 1) * self.chunk_contexts]
            self._key, self._chunk = None, None  # free the previous chunk before making the next
            perm = torch.randperm(len(picked) * self.contexts.shape[1], generator=self._generator(epoch, chunk))
            # Row `perm[i]` of the activations is served `i`-th: each model batch is written
            # straight to its shuffled places, so the chunk is held once, not also unshuffled.
            self._chunk = activations_for(self.model, self.contexts[picked], self.spec, positions=torch.argsort(perm))
            self._key = (epoch, chunk)
        return self._chunk

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        rows_per_chunk = self.chunk_contexts * self.contexts.shape[1]
        start, need, parts = self.next_batch * self.batch_size, self.batch_size, []
        while need:
            epoch, in_epoch = divmod(start, self.rows_per_epoch)
            chunk, offset = divmod(in_epoch, rows_per_chunk)
            rows = self._chunk_rows(epoch, chunk)
            take = min(need, len(rows) - offset)
            parts.append(rows[offset : offset + take])
            start, need = start + take, need - take
        self.next_batch += 1
        batch = torch.cat(parts) if len(parts) > 1 else parts[0]
        return batch.to(self.dtype or batch.dtype)  # the chunk is held in the store's dtype


@torch.no_grad()
def activations_for(model, contexts: torch.Tensor, spec: dict[str, Any], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Hook activations `[n_contexts * context_size, d_in]` of token contexts, computed in model
    batches of `store_batch_size_prompts` contexts, as the cached mode's fill does. With
    `positions`, activation row `i` is put at row `positions[i]` instead."""
    device = torch.device(spec["device"])
    out = torch.empty((contexts.numel(), spec["d_in"]), dtype=getattr(torch, spec["dtype"]), device=device)
    positions = None if positions is None else positions.to(device)
    first = 0
    for acts in activation_batches(model, contexts, spec):
        if positions is None:
            out[first : first + len(acts)] = acts
        else:
            out.index_copy_(0, positions[first : first + len(acts)], acts)
        first += len(acts)
    return out


@torch.no_grad()
def activation_batches(model, contexts: torch.Tensor, spec: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The rows of `activations_for(model, contexts, spec)`, one model batch of
    `store_batch_size_prompts` contexts `[batch * context_size, d_in]` at a time."""
    from tasks.model import hooks_activations

    device = torch.device(spec["device"])
    for start in range(0, len(contexts), spec["store_batch_size_prompts"]):
        batch = contexts[start : start + spec["store_batch_size_prompts"]].to(device, torch.long)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec["autocast_lm"]):
            acts = hooks_activations(model, batch, [(spec["hook_name"], spec["hook_head_index"])])[0]
        yield acts.reshape(-1, spec["d_in"]).to(getattr(torch, spec["dtype"]))
