"""The activation store: an interrupted fill continues where it stopped and ends identical to an
uninterrupted one; the training batches are a pure function of (seed, batch number)."""

from pathlib import Path

import pytest
import torch
from prefect import flow

import tasks.activations as activations
from conftest import tiny_config
from tasks.activations import ShuffledBatches, StoreRows, fill_activation_stores, fill_activations, load_store, store_spec
from tasks.model import build_model, model_spec
from tasks.preflight import resolve


@flow
def fill_store(cfg_json: dict, artifacts_dir: str) -> dict:
    from tasks.config import RunConfig

    cfg = RunConfig(**cfg_json)
    model_ref = build_model(model_spec(cfg), artifacts_dir)
    return fill_activations.with_options(refresh_cache=True)(store_spec(cfg, model_ref), model_ref, artifacts_dir)


@flow
def fill_together(cfgs_json: list[dict], artifacts_dir: str) -> list[dict]:
    from tasks.config import RunConfig

    cfgs = [RunConfig(**c) for c in cfgs_json]
    model_ref = build_model(model_spec(cfgs[0]), artifacts_dir)
    return fill_activation_stores([store_spec(c, model_ref) for c in cfgs], model_ref, artifacts_dir)


class Crash(Exception):
    pass


def test_interrupted_fill_resumes_at_the_first_missing_shard(prefect_server, tmp_path: Path, monkeypatch):
    cfg = resolve(tiny_config(training_tokens=8192))
    monkeypatch.setattr(activations, "SHARD_BYTES", 1)  # one model batch per shard: 16 shards
    reference = fill_store(cfg.model_dump(mode="json"), str(tmp_path / "a"))
    assert reference["n_shards"] == 16

    written, real_save = [], activations._save_shard

    def crash_after_five(path, acts, tokens):
        if len(written) == 5:
            path.with_name(f".{path.name}.tmp").write_bytes(b"half a shard")  # killed mid-write
            raise Crash()
        written.append(path)
        return real_save(path, acts, tokens)

    monkeypatch.setattr(activations, "_save_shard", crash_after_five)
    with pytest.raises(Crash):
        fill_store(cfg.model_dump(mode="json"), str(tmp_path / "b"))
    monkeypatch.setattr(activations, "_save_shard", real_save)
    calls = []
    monkeypatch.setattr(activations, "_save_shard", lambda *a: calls.append(a[0].name) or real_save(*a))
    resumed = fill_store(cfg.model_dump(mode="json"), str(tmp_path / "b"))

    assert calls == [f"shard-{i:05d}.safetensors" for i in range(5, 16)] + ["eval_tokens.safetensors"]
    ref_acts, ref_tokens = load_store(reference)
    acts, tokens = load_store(resumed)
    assert torch.equal(acts, ref_acts) and torch.equal(tokens, ref_tokens)
    assert len(acts) == 8192


def test_shuffled_batches_cover_each_row_once_per_epoch_and_seek_directly():
    data = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    batches = ShuffledBatches(data, batch_size=4, seed=3)
    rows = torch.cat([next(batches) for _ in range(5)]).squeeze(1)  # 20 rows = 2 epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:])  # each epoch has its own order
    assert torch.equal(next(ShuffledBatches(data, 4, seed=3, start_batch=3)).squeeze(1), rows[12:16])
    assert not torch.equal(next(ShuffledBatches(data, 4, seed=4)).squeeze(1), rows[:4])


def test_stores_at_several_hooks_fill_from_one_model_pass_and_equal_stores_filled_alone(prefect_server, tmp_path: Path, monkeypatch):
    from transformer_lens import HookedTransformer

    hooks = [
        {"hook_name": "blocks.0.hook_resid_post"},
        {"hook_name": "blocks.1.hook_mlp_out"},
        {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 2},
        {"hook_name": "blocks.0.attn.hook_z"},  # all heads, concatenated
    ]
    cfgs = [resolve(tiny_config(training_tokens=8192, **hook)) for hook in hooks]
    monkeypatch.setattr(activations, "SHARD_BYTES", 1)  # one model batch per shard: 16 shards per store
    alone = [fill_store(c.model_dump(mode="json"), str(tmp_path / "alone")) for c in cfgs]

    passes = []
    real_forward = HookedTransformer.forward
    monkeypatch.setattr(HookedTransformer, "forward", lambda self, *a, **k: passes.append(k.get("stop_at_layer")) or real_forward(self, *a, **k))
    shared = str(tmp_path / "shared")
    first = fill_store(cfgs[0].model_dump(mode="json"), shared)  # one store already full
    n_batches = len(passes)
    first_mtime = (Path(first["path"]) / "shard-00000.safetensors").stat().st_mtime_ns
    passes.clear()
    together = fill_together([c.model_dump(mode="json") for c in cfgs], shared)

    assert n_batches == 8192 // (16 * 32) and passes == [2] * n_batches  # one pass per batch, to layer 1
    assert (Path(first["path"]) / "shard-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert [r["d_in"] for r in together] == [32, 32, 8, 32]
    for ref, got in zip(alone, together):
        ref_acts, ref_tokens = load_store(ref)
        acts, tokens = load_store(got)
        assert torch.equal(acts, ref_acts) and torch.equal(tokens, ref_tokens)
        assert (Path(ref["path"]) / "eval_tokens.safetensors").read_bytes() == (Path(got["path"]) / "eval_tokens.safetensors").read_bytes()
        rows = torch.randperm(len(acts))[:1000]
        assert torch.equal(StoreRows(got)[rows], acts[rows])  # memory-mapped rows, across shards


def test_a_dataset_that_changed_under_a_half_filled_store_is_refused(prefect_server, tmp_path: Path, monkeypatch):
    from tasks.data import generate_stories

    text = tmp_path / "stories.txt"
    text.write_text("\n".join(generate_stories(600, seed=1)))
    cfg = resolve(tiny_config(dataset_path=str(text), training_tokens=8192))
    monkeypatch.setattr(activations, "SHARD_BYTES", 1)
    real_save, saved = activations._save_shard, []

    def crash_after_three(*args):
        if len(saved) == 3:
            raise Crash()
        saved.append(args[0])
        return real_save(*args)

    monkeypatch.setattr(activations, "_save_shard", crash_after_three)
    with pytest.raises(Crash):
        fill_store(cfg.model_dump(mode="json"), str(tmp_path / "a"))
    monkeypatch.setattr(activations, "_save_shard", real_save)
    text.write_text("\n".join(generate_stories(600, seed=2)))  # the data changes before the resume
    with pytest.raises(RuntimeError, match="changed since activation store .* was started: the tokens at row 0 differ"):
        fill_store(cfg.model_dump(mode="json"), str(tmp_path / "a"))
