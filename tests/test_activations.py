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
from tasks.tokens import pretokenise, tokens_spec


@flow
def fill_store(cfg_json: dict, artifacts_dir: str) -> dict:
    from tasks.config import RunConfig

    cfg = RunConfig(**cfg_json)
    model_ref = build_model(model_spec(cfg), artifacts_dir)
    tokens_ref = pretokenise(tokens_spec(cfg, model_ref), model_ref, cfg.model_from_pretrained_kwargs, artifacts_dir)
    return fill_activations.with_options(refresh_cache=True)(store_spec(cfg, model_ref), model_ref, tokens_ref, artifacts_dir)


@flow
def fill_together(cfgs_json: list[dict], artifacts_dir: str) -> list[dict]:
    from tasks.config import RunConfig

    cfgs = [RunConfig(**c) for c in cfgs_json]
    model_ref = build_model(model_spec(cfgs[0]), artifacts_dir)
    tokens_ref = pretokenise(tokens_spec(cfgs[0], model_ref), model_ref, cfgs[0].model_from_pretrained_kwargs, artifacts_dir)
    return fill_activation_stores([store_spec(c, model_ref) for c in cfgs], model_ref, tokens_ref, artifacts_dir)


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


def test_a_resumed_fill_keeps_the_listed_shards_that_are_whole_hashing_only_the_last(tmp_path: Path, monkeypatch):
    shards = []
    for i in range(4):
        name = f"shard-{i:05d}.safetensors"
        sha = activations._save_shard(tmp_path / name, torch.randn(100, 8), torch.arange(100))
        shards.append({"file": name, "start": 100 * i, "stop": 100 * (i + 1), "sha256": sha})
    manifest = {"shards": shards}
    hashed, real_sha256 = [], activations.file_sha256
    monkeypatch.setattr(activations, "file_sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    assert activations._verified_shards(tmp_path, manifest) == shards
    assert hashed == ["shard-00003.safetensors"]  # not the whole store, on every resume and sweep member

    last = tmp_path / "shard-00003.safetensors"
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # same size, other contents
    last.write_bytes(bytes(data))
    assert activations._verified_shards(tmp_path, manifest) == shards[:3]
    middle = tmp_path / "shard-00001.safetensors"
    middle.write_bytes(middle.read_bytes()[:-4])  # cut short: its pages never reached the disk
    assert activations._verified_shards(tmp_path, manifest) == shards[:1]
    (tmp_path / "shard-00000.safetensors").unlink()
    assert activations._verified_shards(tmp_path, manifest) == []
    for garbled in (b"\xff" * 8, (2**40).to_bytes(8, "little"), b"\x05\x00\x00\x00\x00\x00\x00\x00[1]xx"):
        (tmp_path / "garbled.safetensors").write_bytes(garbled + b"{}")
        assert not activations.whole_safetensors(tmp_path / "garbled.safetensors")


def test_a_fill_that_would_fill_the_disk_is_refused_before_the_model_loads(prefect_server, tmp_path: Path, monkeypatch):
    import shutil

    import tasks.model

    cfg = resolve(tiny_config(training_tokens=8192))  # 8192 rows of 32 float32 and a token id, and 65536 held-out ids
    real_disk_usage, loads = shutil.disk_usage, []

    def small_disk(path):
        usage = real_disk_usage(path)
        return usage._replace(free=1_000_000) if str(path).startswith(str(tmp_path)) else usage

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    monkeypatch.setattr(tasks.model, "load_model", lambda *a, **k: loads.append(1))
    with pytest.raises(activations.NotEnoughDisk) as refused:
        fill_store(cfg.model_dump(mode="json"), str(tmp_path))
    assert "needs 1.6 MB more, but only 1.0 MB are free there; free some space" in str(refused.value) and not loads
    assert "or make it smaller (a new run): store_dtype: bfloat16 halves it, and activation_mode: streaming" in str(refused.value)
    from conftest import start

    with pytest.raises(activations.NotEnoughDisk, match="needs 1.6 MB more"):  # a run: refused before its data is tokenised
        start(tiny_config(training_tokens=8192, activation_mode="cached"), tmp_path / "run")
    assert (tmp_path / "run" / "models").is_dir() and not (tmp_path / "run" / "tokens").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(total=0, free=0))
    activations.check_free_disk({tmp_path: 10**15}, "")  # a file system that does not say what is free: not refused
    needs = {}
    monkeypatch.setattr(activations, "check_free_disk", lambda found, fixes: needs.update(found))
    with pytest.raises(AttributeError):  # past the check, at the model the test left out
        fill_store(cfg.model_dump(mode="json"), str(tmp_path))
    assert cfg.d_in == 32 and list(needs.values()) == [8192 * (32 * 4 + 8) + -(-cfg.eval_tokens // cfg.context_size) * cfg.context_size * 8]


def test_a_streaming_store_s_contexts_are_its_tokens_in_int32_and_a_gap_is_refused(tmp_path: Path):
    from tasks.artifacts import write_json

    tokens = torch.randint(0, 50_000, (12, 8))
    shards = []
    for i, (start, stop) in enumerate([(0, 40), (40, 96)]):
        sha = activations._save_shard(tmp_path / f"shard-{i:05d}.safetensors", None, tokens.reshape(-1)[start:stop])
        shards.append({"file": f"shard-{i:05d}.safetensors", "start": start, "stop": stop, "sha256": sha})
    write_json(tmp_path / "manifest.json", {"shards": shards, "complete": True})
    store_ref = {"path": str(tmp_path), "n_tokens": 96}
    contexts = activations.store_contexts(store_ref, 8)
    assert contexts.dtype == torch.int32 and torch.equal(contexts.long(), tokens)
    assert torch.equal(load_store(store_ref)[1], tokens.reshape(-1)) and load_store(store_ref)[0] is None
    with pytest.raises(RuntimeError, match=r"holds more than the 40 rows expected"):
        activations.store_contexts({**store_ref, "n_tokens": 40}, 8)
    write_json(tmp_path / "manifest.json", {"shards": shards[1:], "complete": True})
    with pytest.raises(RuntimeError, match=r"rows 0..40 are missing"):
        activations.store_contexts(store_ref, 8)


def test_non_finite_activations_from_the_model_are_refused_naming_the_row(prefect_server, tmp_path: Path, monkeypatch):
    """A float16 model's overflow, stored, would stop training whenever its row is drawn."""
    cfg = resolve(tiny_config(training_tokens=8192))
    monkeypatch.setattr(activations, "SHARD_BYTES", 1)  # one model batch per shard
    import tasks.model

    calls, real_hooks_activations = [], tasks.model.hooks_activations

    def overflowing_in_the_third_batch(model, tokens, hooks):
        batch = real_hooks_activations(model, tokens, hooks)
        calls.append(1)
        if len(calls) == 3:
            batch[0][1, 5, 7] = float("inf")
        return batch

    monkeypatch.setattr(tasks.model, "hooks_activations", overflowing_in_the_third_batch)
    with pytest.raises(ValueError) as refused:
        fill_store(cfg.model_dump(mode="json"), str(tmp_path))
    row = 2 * cfg.store_batch_size_prompts * cfg.context_size + cfg.context_size + 5
    assert (
        f"the model made a NaN or infinite activation at {cfg.hook_name} for store row {row} (context "
        f"{2 * cfg.store_batch_size_prompts + 1}, position 5 of the pretokenised data)" in str(refused.value)
    )
    assert "load it in float32 or bfloat16 (model_from_pretrained_kwargs, now {})" in str(refused.value)
    (store,) = [p for p in (tmp_path / "activations").iterdir() if p.is_dir()]  # not its .lock
    assert sorted(p.name for p in store.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]


@pytest.mark.parametrize(
    ("d_in", "dtype", "n_tokens", "shards", "shard_mib"),
    [
        (64, "float32", 600_000, 5, 32),  # the benchmark's 2L store: 32 MiB shards
        (64, "float32", 250_000_000, 129, 476),  # 64 GB: about 128 shards, not 1,900 of 32 MiB
        (768, "bfloat16", 300_000_000, 862, 510),  # GPT-2 small over 300M tokens, 460 GB: shards stop at 512 MiB
    ],
)
def test_big_stores_get_bigger_shards(d_in, dtype, n_tokens, shards, shard_mib):
    spec = {"d_in": d_in, "dtype": dtype, "n_tokens": n_tokens, "store_batch_size_prompts": 32, "context_size": 64}
    rows = activations._shard_rows(spec)
    assert rows % (32 * 64) == 0  # whole model batches
    assert -(-n_tokens // rows) == shards
    assert int(rows * d_in * getattr(torch, dtype).itemsize / 2**20) == shard_mib


def test_shuffled_batches_cover_each_row_once_per_epoch_and_seek_directly():
    data = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    batches = ShuffledBatches(data, batch_size=4, seed=3)
    rows = torch.cat([next(batches) for _ in range(5)]).squeeze(1)  # 20 rows = 2 epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:])  # each epoch has its own order
    assert torch.equal(next(ShuffledBatches(data, 4, seed=3, start_batch=3)).squeeze(1), rows[12:16])
    assert not torch.equal(next(ShuffledBatches(data, 4, seed=4)).squeeze(1), rows[:4])


@pytest.mark.parametrize("n", [1, 10, 4097, 600_000])
def test_the_int32_permutation_is_the_int64_one_runs_trained_before_it_drew(n):
    """Checkpoints record a batch number, not the rows: the order must not change across versions."""
    ours = activations.randperm(n, torch.Generator().manual_seed(5))
    assert ours.dtype == torch.int32 and torch.equal(ours.long(), torch.randperm(n, generator=torch.Generator().manual_seed(5)))
    batches = ShuffledBatches(torch.zeros(n, 1), batch_size=3, seed=2)
    assert batches.rows_of(0).dtype == torch.int64


def test_stores_at_several_hooks_fill_from_one_model_pass_and_equal_stores_filled_alone(prefect_server, tmp_path: Path, monkeypatch):
    from transformer_lens import HookedTransformer
    from transformer_lens.components import Unembed

    hooks = [
        {"hook_name": "blocks.0.hook_resid_post"},
        {"hook_name": "blocks.1.hook_mlp_out"},
        {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 2},
        {"hook_name": "blocks.0.attn.hook_z"},  # all heads, concatenated
    ]
    cfgs = [resolve(tiny_config(training_tokens=8192, **hook)) for hook in hooks]
    monkeypatch.setattr(activations, "SHARD_BYTES", 1)  # one model batch per shard: 16 shards per store
    alone = [fill_store(c.model_dump(mode="json"), str(tmp_path / "alone")) for c in cfgs]

    passes, unembedded = [], []
    real_forward, real_unembed = HookedTransformer.forward, Unembed.forward
    monkeypatch.setattr(HookedTransformer, "forward", lambda self, *a, **k: passes.append(1) or real_forward(self, *a, **k))
    monkeypatch.setattr(Unembed, "forward", lambda self, *a, **k: unembedded.append(1) or real_unembed(self, *a, **k))
    shared = str(tmp_path / "shared")
    first = fill_store(cfgs[0].model_dump(mode="json"), shared)  # one store already full
    n_batches = len(passes)
    first_mtime = (Path(first["path"]) / "shard-00000.safetensors").stat().st_mtime_ns
    passes.clear()
    together = fill_together([c.model_dump(mode="json") for c in cfgs], shared)

    # One pass per batch, stopped after its last hook (blocks.1.hook_mlp_out): never to the unembedding.
    assert n_batches == 8192 // (16 * 32) and len(passes) == n_batches and not unembedded
    assert (Path(first["path"]) / "shard-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert [r["d_in"] for r in together] == [32, 32, 8, 32]
    for ref, got in zip(alone, together):
        ref_acts, ref_tokens = load_store(ref)
        acts, tokens = load_store(got)
        assert torch.equal(acts, ref_acts) and torch.equal(tokens, ref_tokens)
        assert (Path(ref["path"]) / "eval_tokens.safetensors").read_bytes() == (Path(got["path"]) / "eval_tokens.safetensors").read_bytes()
        rows = torch.randperm(len(acts))[:1000]
        assert torch.equal(StoreRows(got)[rows], acts[rows])  # memory-mapped rows, across shards


def test_data_that_changed_under_a_half_filled_store_is_refused(prefect_server, tmp_path: Path, monkeypatch):
    cfg = resolve(tiny_config(training_tokens=8192))
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
    # The data the fill reads changes before the resume (a hub dataset of token ids updated).
    real_dataset = activations._token_dataset
    monkeypatch.setattr(activations, "_token_dataset", lambda *a: real_dataset(*a).shuffle(seed=1))
    with pytest.raises(RuntimeError, match="changed since activation store .* was started: the tokens at row 0 differ"):
        fill_store(cfg.model_dump(mode="json"), str(tmp_path / "a"))


def test_stores_over_the_same_data_tokenise_it_once_as_sae_lens_would(finished_run):
    """Another hook needs its own store but reuses the pretokenised contexts, which are the ones
    SAELens's ActivationsStore makes from the text itself (so stores match the old on-the-fly ones)."""
    from conftest import task_states
    from tasks.artifacts import RESULTS_DIRNAME
    from tasks.data import load_text_dataset
    from tasks.model import load_model

    artifacts = str(finished_run["artifacts"])
    cfg = resolve(tiny_config(hook_name="blocks.1.hook_resid_post"))
    results = Path(artifacts).resolve() / RESULTS_DIRNAME  # the runs' cache
    state = fill_store.with_options(result_storage=results)(cfg.model_dump(mode="json"), artifacts, return_state=True)
    states = task_states(state)
    assert states["pretokenise"] == "Cached" and states["fill-activations"] == "Completed"
    assert len([p for p in (Path(artifacts) / "tokens").iterdir() if p.is_dir()]) == 1
    _, tokens = load_store(state.result())
    _, first_tokens = load_store(finished_run["summary"]["activations"])
    assert torch.equal(tokens, first_tokens)

    model_ref = finished_run["summary"]["model"]
    spec = store_spec(cfg, model_ref)
    store = activations._activations_store(load_model(model_ref, "cpu"), load_text_dataset(cfg.dataset_path, seed=cfg.seed), spec)
    on_the_fly = torch.cat([store.get_batch_tokens() for _ in range(spec["n_tokens"] // (cfg.context_size * cfg.store_batch_size_prompts))])
    assert torch.equal(tokens, on_the_fly.reshape(-1))


@flow
def tokenise(cfg_json: dict, artifacts_dir: str) -> dict:
    from tasks.config import RunConfig

    cfg = RunConfig(**cfg_json)
    model_ref = build_model(model_spec(cfg), artifacts_dir)
    return pretokenise(tokens_spec(cfg, model_ref), model_ref, cfg.model_from_pretrained_kwargs, artifacts_dir)


def test_a_dataset_that_runs_out_holds_out_its_last_contexts_and_one_too_small_is_refused(prefect_server, tmp_path: Path, caplog):
    """Fewer contexts than training and evaluation need: each is tokenised once, the last ones are
    held out for evaluation and never trained on, and training goes round the others."""
    from tasks.activations import load_eval_tokens
    from tasks.data import generate_stories
    from tasks.tokens import open_tokens

    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(f'{{"text": "{story}"}}' for story in generate_stories(60, seed=3)))
    cfg = resolve(tiny_config(dataset_path=str(data), training_tokens=8192, eval_tokens=512))  # 256 + 16 contexts of 32
    store = fill_store(cfg.model_dump(mode="json"), str(tmp_path / "a"))
    token_folder, = [p for p in (tmp_path / "a" / "tokens").iterdir() if p.is_dir()]  # beside its .lock file
    contexts = torch.tensor(open_tokens({"path": token_folder})["tokens"])
    n = len(contexts)
    assert 16 + cfg.store_batch_size_prompts <= n < 256 and len(contexts.unique(dim=0)) == n  # each context once
    assert f"holds {n} contexts, fewer than training and evaluation need: the last 16 are held out" in caplog.text
    held_out = load_eval_tokens(store)
    assert torch.equal(held_out, contexts[n - 16 :])
    _, tokens = load_store(store)
    trained = tokens.reshape(-1, 32)
    assert len(trained) == 256
    assert not (trained[:, None, :] == held_out[None, :, :]).all(-1).any()  # no held-out context was trained on
    batch = cfg.store_batch_size_prompts
    first_pass = (n - 16) // batch * batch  # whole model batches, then the data starts again
    assert torch.equal(trained[:first_pass], contexts[:first_pass]) and torch.equal(trained[first_pass : 2 * first_pass], contexts[:first_pass])
    assert "repeat training data" not in caplog.text

    data.write_text("\n".join(f'{{"text": "{story}"}}' for story in generate_stories(10, seed=3)))
    with pytest.raises(ValueError, match=r"holds \d+ contexts of 32 tokens: fewer than the 16 held out for evaluation \(eval_tokens 512\) plus one model batch"):
        fill_store(cfg.model_dump(mode="json"), str(tmp_path / "b"))
    data.write_text('{"text": "Tom ."}')
    with pytest.raises(ValueError, match="holds less text than one context of 32 tokens"):
        tokenise(cfg.model_dump(mode="json"), str(tmp_path / "c"))


@flow
def fill_token_ids(cfg_json: dict, artifacts_dir: str) -> dict:
    from tasks.config import RunConfig

    cfg = RunConfig(**cfg_json)
    model_ref = build_model(model_spec(cfg), artifacts_dir)
    return fill_activations(store_spec(cfg, model_ref), model_ref, None, artifacts_dir)


@pytest.mark.parametrize("short_rows", [[70], list(range(64, 80))])
def test_a_short_row_of_token_ids_past_the_checked_ones_is_named(prefect_server, tmp_path: Path, short_rows):
    import json

    from tasks.model import train_word_tokenizer

    train_word_tokenizer(["Tom saw a cat ."], tmp_path / "tokenizer")
    rows = [[1] + [5 + i % 4] * (19 if i in short_rows else 31) for i in range(80)]  # id 1 is <bos>
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"tokens": r}) for r in rows))
    cfg = resolve(tiny_config(dataset_path=str(tmp_path / "ids.jsonl"), tokenizer_path=str(tmp_path / "tokenizer"), training_tokens=2048, eval_tokens=512))
    with pytest.raises(ValueError, match=r"row 64 holds 20 token ids, fewer than context_size \(32\)" if len(short_rows) > 1 else r"row 70 holds 20 token ids") as error:
        fill_token_ids(cfg.model_dump(mode="json"), str(tmp_path / "a"))
    assert "PretokenizeRunner" in str(error.value)


def test_written_files_get_the_mode_the_umask_gives_not_safetensors_owner_only(tmp_path):
    """An artifacts folder shared with a lab must be readable by it: safetensors alone writes 0600."""
    import stat

    from safetensors.torch import save_file

    from tasks.activations import _save_shard
    from tasks.artifacts import _UMASK, atomic_dir

    _save_shard(tmp_path / "shard.safetensors", torch.zeros(2, 3), None)
    with atomic_dir(tmp_path / "checkpoint") as tmp:
        save_file({"W_dec": torch.zeros(2)}, tmp / "sae_weights.safetensors")
    for path in (tmp_path / "shard.safetensors", tmp_path / "checkpoint" / "sae_weights.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_UMASK


def test_token_ids_that_run_out_are_marked_as_not_held_out_in_the_metrics_and_the_report(prefect_server, tmp_path: Path, caplog):
    """A dataset of token ids is read as it comes (it may be streamed, of unknown length): when it
    runs out, the evaluation contexts after the training ones repeat training data, which the
    store, the metrics and the report say."""
    import json

    from tasks.model import train_word_tokenizer
    from tasks.report import render_markdown

    train_word_tokenizer(["Tom saw a cat ."], tmp_path / "tokenizer")
    rows = [[1] + [5 + (i + j) % 4 for j in range(31)] for i in range(70)]  # 70 contexts; 64 + 16 are needed
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"tokens": r}) for r in rows))
    cfg = resolve(tiny_config(dataset_path=str(tmp_path / "ids.jsonl"), tokenizer_path=str(tmp_path / "tokenizer"), training_tokens=2048, eval_tokens=512))
    store = fill_token_ids(cfg.model_dump(mode="json"), str(tmp_path / "a"))
    assert store["eval_repeats_training"] is True
    assert "the held-out evaluation tokens repeat training data" in caplog.text
    report = render_markdown("r", {}, {"l0": 1.0, "eval_repeats_training": True}, {"skipped": "-"}, {})
    assert "**Not held out:** the dataset ran out while the activations were made, so these tokens were trained on too" in report
    assert "Not held out" not in render_markdown("r", {}, {"l0": 1.0}, {"skipped": "-"}, {})


def test_held_out_contexts_are_taken_from_the_end_unless_every_batch_the_fill_reads_is_there():
    """The fill reads whole model batches, for the held-out contexts too: 2 training batches of 8
    and 4 held-out contexts read as one more batch need 24 contexts. With 20, the held-out 4 are
    the last ones (a batch read past the end would start the data again, at trained contexts)."""
    import logging

    from tasks.activations import _held_out_from

    spec = {"store_batch_size_prompts": 8, "context_size": 32, "eval_tokens": 128, "dataset_path": "d"}
    logger = logging.getLogger("test")
    assert _held_out_from(24, 2 * 8 * 32, 4, spec, logger) is None
    assert _held_out_from(20, 2 * 8 * 32, 4, spec, logger) == 16
    assert _held_out_from(12, 2 * 8 * 32, 4, spec, logger) == 8
    with pytest.raises(ValueError, match="holds 11 contexts of 32 tokens: fewer than the 4 held out for evaluation"):
        _held_out_from(11, 2 * 8 * 32, 4, spec, logger)
