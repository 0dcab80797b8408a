"""Activations without a model: folders of .safetensors / .npy shards, a SAELens
CacheActivationsRunner dataset, the iterator API and synthetic ground truth. They are imported into
an activation store and get the same training, resume, save and evaluation; bad input is refused
before training, naming the file (and row)."""

import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL, start, task_states
from tasks.activations import load_eval_activations, load_store
from tasks.config import ConfigError, load_config, make_config
from tasks.preflight import claim_run, default_run_name, resolve

ROOT = Path(__file__).resolve().parent.parent
LOGGER = logging.getLogger("test-sources")
D_IN = 16


def source_config(path, **overrides):
    """A small run on the activations at `path`: 16 steps of 512 rows, 1024 held out."""
    values = {
        "activations_path": str(path),
        "hook_name": "blocks.3.hook_resid_post",
        "expansion_factor": 4,
        "train_batch_size_tokens": 512,
        "training_tokens": 8192,
        "eval_tokens": 1024,
        "n_checkpoints": 2,
        "log_every": 4,
        "lr": 3e-3,
    }
    return make_config({**values, **overrides})


def sparse_rows(n: int, seed: int) -> torch.Tensor:
    """Rows made of a few of 64 directions, like real SAE inputs."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(64, D_IN, generator=generator)
    codes = torch.relu(torch.randn(n, 64, generator=generator) - 1.5)
    return codes @ directions


def import_store(cfg, artifacts: Path) -> dict:
    """Run the import stage's body without Prefect (the stage adds only the lock and the cache)."""
    from tasks.activations import store_dir
    from tasks.sources import _import, import_spec

    spec = import_spec(resolve(cfg))
    return _import(spec, store_dir(artifacts, spec), LOGGER)


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Three .safetensors shards named so that file-name order differs from string order."""
    folder = tmp_path_factory.mktemp("shards")
    acts, tokens = sparse_rows(9216, seed=0), torch.arange(9216) % 100
    for name, (lo, hi) in {"acts-1": (0, 4000), "acts-2": (4000, 8000), "acts-10": (8000, 9216)}.items():
        save_file({"activations": acts[lo:hi], "tokens": tokens[lo:hi]}, folder / f"{name}.safetensors")
    (folder / "README.txt").write_text("other files are ignored")
    return folder, acts, tokens


@pytest.fixture(scope="module")
def shard_run(prefect_server, shard_folder, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("artifacts")
    state = start(source_config(shard_folder[0]), artifacts, return_state=True)
    assert state.is_completed()
    return artifacts, state, state.result()


def test_a_folder_of_safetensors_shards_trains_and_evaluates_without_a_model(shard_folder, shard_run):
    from sae_lens import SAE

    folder, acts, tokens = shard_folder
    artifacts, state, summary = shard_run
    assert task_states(state) == {s: "Completed" for s in ("import-activations", "train-sae", "save-sae", "load-sae", "evaluate", "report")}
    assert summary["run_name"].startswith("shards")  # the folder's name labels the run
    assert "no model" in summary["model"]["skipped"] and "No model" in summary["analysis"]["skipped"]
    assert summary["training"]["n_training_steps"] == 16

    # rows in file-name order (acts-1, acts-2, acts-10); the last eval_tokens held out, never trained on
    stored, stored_tokens = load_store(summary["activations"])
    assert torch.equal(stored, acts[:8192]) and torch.equal(stored_tokens, tokens[:8192])
    held_out = load_eval_activations(summary["activations"])
    assert torch.equal(held_out, acts[8192:])

    # metrics on the held-out rows, recomputed independently with the saved SAE
    metrics = json.loads(Path(summary["metrics"]["path"]).read_text())["metrics"]
    sae = SAE.load_from_disk(summary["sae"]["path"])
    assert sae.cfg.metadata.dataset_path == str(folder)
    with torch.no_grad():
        features = sae.encode(held_out)
        reconstruction = sae.decode(features)
    assert metrics["eval_rows"] == metrics["total_tokens_eval_reconstruction"] == metrics["total_tokens_eval_sparsity_variance"] == 1024
    assert metrics["l0"] == pytest.approx((features != 0).sum(-1).float().mean().item(), rel=1e-5)
    assert metrics["mse"] == pytest.approx((held_out - reconstruction).pow(2).sum(-1).mean().item(), rel=1e-4)
    assert metrics["dead_features"] == int(((features != 0).sum(0) == 0).sum())
    assert 0 < metrics["explained_variance"] <= 1
    assert "ce_loss_score" not in metrics and "kl_div_score" not in metrics

    report = Path(summary["report"]["path"]).read_text()
    assert "1024 held-out activation rows" in report and "No model" in report
    assert "- dashboard:" not in report and "- analysis:" not in report


def test_analyze_refuses_a_run_without_a_model(shard_run, capsys):
    from flows.cli import EXIT_BAD_INPUT, main

    artifacts, _, summary = shard_run
    assert main(["analyze", summary["run_name"], "--prompt", "hello", "--artifacts-dir", str(artifacts)]) == EXIT_BAD_INPUT
    assert f"run '{summary['run_name']}' has no model to run prompts through (no model: the activations come from" in capsys.readouterr().err
    # Nor, unfinished, is it told to finish first.
    unfinished = artifacts / "runs" / "unfinished"
    unfinished.mkdir()
    shutil.copy(Path(summary["run_dir"]) / "config.json", unfinished / "config.json")
    assert main(["analyze", "unfinished", "--prompt", "hello", "--artifacts-dir", str(artifacts)]) == EXIT_BAD_INPUT
    assert "run 'unfinished' has no model to run prompts through (no model: the activations come from" in capsys.readouterr().err


def test_a_sweep_over_imported_activations_shares_one_store(shard_folder, shard_run):
    from flows.sweep import run_sweep

    artifacts, _, first = shard_run
    sweep = artifacts.parent / "sweep.yaml"
    base = source_config(shard_folder[0]).model_dump(exclude_unset=True)
    sweep.write_text(yaml.safe_dump({"name": "acts", "base": base, "grid": {"l1_coefficient": [1.0, 2.0]}}))
    rows = run_sweep(str(sweep), str(artifacts))
    assert [r["state"] for r in rows] == ["Completed", "Completed"]
    assert rows[0]["run"] == first["run_name"]  # the earlier run is a member, already finished
    assert len(list((artifacts / "activations").iterdir())) == 1
    assert rows[1]["ce_loss_score"] is None and rows[1]["explained_variance"] > 0
    assert (artifacts / "sweeps" / "acts" / "frontier.png").is_file()


def test_npy_shards_import_in_file_name_order_as_the_store_dtype(tmp_path):
    acts = sparse_rows(9216, seed=1).double()
    for name, (lo, hi) in {"part-2": (0, 5000), "part-10": (5000, 9216)}.items():
        np.save(tmp_path / f"{name}.npy", acts[lo:hi].numpy())
    ref = import_store(source_config(tmp_path), tmp_path / "artifacts")
    stored, tokens = load_store(ref)
    assert stored.dtype == torch.float32 and tokens is None
    assert torch.equal(stored, acts[:8192].float())
    assert torch.equal(load_eval_activations(ref), acts[8192:].float())


def test_a_cache_activations_runner_dataset_imports_the_models_activations(tmp_path, monkeypatch):
    """Made by SAELens's own CacheActivationsRunner; it always loads its model from the hub, so
    the test hands it a local model through its `load_model`."""
    import sae_lens.cache_activations_runner as runner_module
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from transformer_lens import HookedTransformerConfig

    from tasks.data import generate_stories
    from tasks.model import _local_model, hook_activations, load_tokenizer, train_word_tokenizer

    train_word_tokenizer(generate_stories(200, seed=0), tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    model = _local_model(HookedTransformerConfig(**TINY_MODEL, d_vocab=len(tokenizer), seed=0, device="cpu"), tokenizer)
    monkeypatch.setattr(runner_module, "load_model", lambda **kwargs: model)
    contexts = torch.randint(4, len(tokenizer), (64, 16), generator=torch.Generator().manual_seed(0))
    cached = tmp_path / "cached"
    runner_cfg = CacheActivationsRunnerConfig(
        dataset_path="local", model_name="tiny", model_batch_size=4, hook_name="blocks.0.hook_resid_post", d_in=32,
        training_tokens=1024, context_size=16, new_cached_activations_path=str(cached), shuffle=False, device="cpu",
        buffer_size_gb=256 * 32 * 4 / 1e9, prepend_bos=False,
    )
    CacheActivationsRunner(runner_cfg, override_dataset=Dataset.from_dict({"tokens": contexts.tolist()})).run()

    cfg = source_config(cached, hook_name="blocks.0.hook_resid_post", train_batch_size_tokens=128, training_tokens=512, eval_tokens=256)
    assert resolve(cfg).d_in == 32
    ref = import_store(cfg, tmp_path / "artifacts")
    stored, tokens = load_store(ref)
    with torch.no_grad():
        expected = hook_activations(model, contexts, "blocks.0.hook_resid_post", None).reshape(-1, 32)
    assert torch.equal(tokens, contexts.reshape(-1)[:768])
    assert torch.allclose(stored, expected[:768], atol=1e-5)
    assert torch.allclose(load_eval_activations(ref), expected[768:], atol=1e-5)
    with pytest.raises(ConfigError, match=r"no activation column 'blocks.0.hook_mlp_out' \(its activation columns: \['blocks.0.hook_resid_post'\]\); set hook_name"):
        resolve(source_config(cached, hook_name="blocks.0.hook_mlp_out"))

    # Using the dataset with `datasets` writes cache files beside its own: still the same source.
    from datasets import load_from_disk

    from tasks.preflight import run_identity

    before = run_identity(resolve(cfg))
    load_from_disk(str(cached)).filter(lambda row: row["token_ids"][0] % 2 == 0)
    assert any(p.name.startswith("cache-") for p in cached.iterdir())
    assert run_identity(resolve(cfg)) == before
    # A run whose record holds the fingerprint saeflow took until 2026-11-30 (every .arrow and
    # .json, cache files included) continues by its name.
    from tasks.config import stable_hash

    (cached / "notes.txt").write_text("made with CacheActivationsRunner")
    claim_run(resolve(cfg), tmp_path / "artifacts", "earlier", new=False)
    stored = tmp_path / "artifacts" / "runs" / "earlier" / "config.json"
    record = json.loads(stored.read_text())
    files = sorted(p for p in cached.iterdir() if p.suffix in (".arrow", ".json"))
    record["result_fields"]["activations_fingerprint"] = stable_hash([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    assert record["result_fields"]["activations_fingerprint"] != before["activations_fingerprint"]
    stored.write_text(json.dumps(record))
    assert claim_run(resolve(cfg), tmp_path / "artifacts", "earlier", new=False) == "earlier"


def test_write_activations_takes_any_iterator_of_batches(tmp_path, monkeypatch):
    import tasks.sources
    from tasks.sources import write_activations

    monkeypatch.setattr(tasks.sources, "SHARD_BYTES", 1000 * D_IN * 4)  # about 1000 rows per file
    batches = [sparse_rows(300, seed=i) for i in range(10)]
    written = write_activations((b.numpy() if i % 2 else b for i, b in enumerate(batches)), tmp_path / "acts")
    assert (written["rows"], written["d_in"], len(written["files"])) == (3000, D_IN, 3)
    assert torch.equal(torch.cat([load_file(f)["activations"] for f in written["files"]]), torch.cat(batches))
    with pytest.raises(FileExistsError, match="acts exists; write the activations to a new folder"):
        write_activations(batches, tmp_path / "acts")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileExistsError, match="a-file exists and is not a folder"):
        write_activations(batches, tmp_path / "a-file")
    (tmp_path / "was-empty").mkdir(mode=0o2770)  # a lab's shared folder: group-writable, setgid
    os.chmod(tmp_path / "was-empty", 0o2770)  # past the umask
    assert write_activations(batches[:1], tmp_path / "was-empty")["rows"] == 300
    assert stat.S_IMODE((tmp_path / "was-empty").stat().st_mode) == 0o2770

    # Links are written through: one made before its target (acts -> /scratch/acts), one to an empty folder.
    (tmp_path / "linked").symlink_to(tmp_path / "scratch" / "acts")
    (tmp_path / "linked-empty").symlink_to(tmp_path / "was-empty-too")
    (tmp_path / "was-empty-too").mkdir()
    for link, target in (("linked", "scratch/acts"), ("linked-empty", "was-empty-too")):
        written = write_activations(batches[:2], tmp_path / link)
        assert written["path"] == str(tmp_path / target) and (tmp_path / link).is_symlink()
        assert torch.equal(torch.cat([load_file(f)["activations"] for f in (tmp_path / link).glob("*.safetensors")]), torch.cat(batches[:2]))

    def failing_after_five():
        yield from batches[:5]
        raise RuntimeError("the model ran out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        write_activations(failing_after_five(), tmp_path / "cut-short")
    assert not (tmp_path / "cut-short").exists()  # no folder of part of the activations for a run to take
    (tmp_path / "made-by-me").mkdir()
    with pytest.raises(RuntimeError, match="out of memory"):
        write_activations(failing_after_five(), tmp_path / "made-by-me")
    assert (tmp_path / "made-by-me").is_dir() and not any((tmp_path / "made-by-me").iterdir())  # put back as it was
    assert not list(tmp_path.glob(".tmp-made-by-me-*"))
    assert not list(tmp_path.glob(".tmp-cut-short-*"))
    with pytest.raises(ValueError, match=r"batch 1 holds torch.int64; activations must be floating point"):
        write_activations([torch.zeros(4, D_IN), torch.zeros(4, D_IN, dtype=torch.int64)], tmp_path / "ints")
    with pytest.raises(ValueError, match=r"batch 1 has shape \(4, 8\); expected \[batch, 16\]"):
        write_activations([torch.zeros(4, D_IN), torch.zeros(4, 8)], tmp_path / "bad")
    with pytest.raises(ValueError, match=r"batch 0 has shape \(2, 4, 16\); expected \[batch, d_in\] \(flatten"):
        write_activations([torch.zeros(2, 4, D_IN)], tmp_path / "bad3d")
    with pytest.raises(ValueError, match="the iterable was empty"):
        write_activations(iter(()), tmp_path / "empty")


@pytest.mark.parametrize("source", ["files", "synthetic"])
def test_an_interrupted_import_continues_at_the_first_missing_shard(tmp_path, shard_folder, monkeypatch, source):
    """Files, and synthetic rows (generated in seeded blocks, so the rows made after the
    interruption are those an uninterrupted import makes)."""
    import tasks.activations
    import tasks.sources

    monkeypatch.setattr(tasks.activations, "SHARD_BYTES", 1000 * D_IN * 4)
    if source == "files":
        cfg = source_config(shard_folder[0])
    else:
        cfg = make_config({"synthetic": {"num_features": 32, "hidden_dim": D_IN}, "training_tokens": 8192, "eval_tokens": 1024, "train_batch_size_tokens": 512})
    reference = import_store(cfg, tmp_path / "a")
    assert reference["n_shards"] == 9

    written, real_save = [], tasks.sources._save_shard

    def crash_after_three(path, acts, tokens):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path.name)
        return real_save(path, acts, tokens)

    monkeypatch.setattr(tasks.sources, "_save_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        import_store(cfg, tmp_path / "b")
    monkeypatch.setattr(tasks.sources, "_save_shard", lambda path, *a: written.append(path.name) or real_save(path, *a))
    resumed = import_store(cfg, tmp_path / "b")
    assert written == [f"shard-{i:05d}.safetensors" for i in range(9)] + ["eval_activations.safetensors"]
    assert torch.equal(load_store(resumed)[0], load_store(reference)[0])
    assert torch.equal(load_eval_activations(resumed), load_eval_activations(reference))
    (Path(resumed["path"]) / "shard-00003.safetensors").unlink()  # a shard of a complete store gone
    written.clear()
    again = import_store(cfg, tmp_path / "b")
    assert written == [f"shard-{i:05d}.safetensors" for i in range(3, 9)]  # the held-out rows' file verifies: kept
    assert torch.equal(load_store(again)[0], load_store(reference)[0])  # complete again


def test_saeflow_stop_reaches_a_run_s_import_and_the_run_continues(prefect_server, tmp_path, monkeypatch):
    import tasks.activations
    import tasks.sources
    from flows.cli import main
    from tasks.stopping import Preempted

    monkeypatch.setattr(tasks.activations, "SHARD_BYTES", 1024 * D_IN * 4)  # 8 shards
    cfg = make_config({"synthetic": {"num_features": 32, "hidden_dim": D_IN}, "training_tokens": 8192, "eval_tokens": 1024, "train_batch_size_tokens": 512})
    save, written = tasks.sources._save_shard, []

    def stop_after_two(path, acts, tokens):
        written.append(path.name)
        if len(written) == 2:
            assert main(["stop", "importing", "--artifacts-dir", str(tmp_path)]) == 0
            time.sleep(1.1)  # a run's request is looked for at most once a second
        return save(path, acts, tokens)

    monkeypatch.setattr(tasks.sources, "_save_shard", stop_after_two)
    with pytest.raises(Preempted, match=r"while importing activation store \w+, at row 2048 of 8192"):
        start(cfg, tmp_path, "importing")
    monkeypatch.setattr(tasks.sources, "_save_shard", save)
    summary = start(cfg, tmp_path, "importing")
    assert summary["activations"]["n_shards"] == 8 and Path(summary["sae"]["path"]).is_dir()


@pytest.mark.parametrize(
    "files, overrides, message",
    [
        ({"a.safetensors": torch.zeros(10_000, 8)}, {"d_in": 16}, r"d_in is 16 but the activations in .* have width 8; set d_in: 8 or leave it out"),
        ({"a.npy": np.zeros((6000, 16), np.float32), "b.npy": np.zeros((6000, 12), np.float32)}, {}, r"b.npy has rows of width 12 but .*a.npy has width 16; every shard must have the same width"),
        ({"a.safetensors": torch.zeros(10_000, 16), "b.safetensors": torch.zeros(0, 16)}, {}, r"b.safetensors is empty \(0 rows\); remove it"),
        ({"a.npy": np.zeros((10, 100, 16), np.float32)}, {}, r"a.npy has shape \(10, 100, 16\); activations must be \[n, d_in\] \(flatten"),
        ({"a.npy": np.zeros((10_000, 16), np.int64)}, {}, r"a.npy does not hold floating-point numbers"),
        ({"a.safetensors": {"x": torch.zeros(10_000, 16), "y": torch.zeros(10_000, 16)}}, {}, r"holds the tensors \['x', 'y'\]; name the activations 'activations'"),
        ({"a.safetensors": b"not a safetensors file"}, {}, r"a.safetensors is not a readable safetensors file"),
        ({"notes.txt": b"no shards here"}, {}, r"holds no .safetensors or .npy files and is not a dataset written by CacheActivationsRunner"),
        ({"dataset_dict.json": b'{"splits": ["train"]}'}, {}, r"holds a dataset's splits \['train'\]; set activations_path to one split's folder, such as .*/train"),
        ({"a.npy": np.zeros((5000, 16), np.float32)}, {"eval_tokens": 65536}, r"holds 5000 rows; holding out the last eval_tokens = 65536 .* leaves 0 to train on.*lower eval_tokens to at most 4488, or give more rows"),
        ({"a.npy": np.zeros((500, 16), np.float32)}, {"eval_tokens": 50}, r"leaves 450 to train on.*; lower train_batch_size_tokens below 500, and eval_tokens with it, or give more rows"),
        ({"a.npy": np.zeros((10_000, 16), np.longdouble)}, {}, r"a.npy holds float128 numbers, which torch cannot read; save them as float32 or float64"),
    ],
    ids=["width-vs-d_in", "widths-differ", "empty", "3d", "integers", "two-tensors", "not-safetensors", "no-shards", "dataset-splits", "too-few-rows", "fewer-than-a-batch", "long-double"],
)
def test_bad_shards_are_refused_before_anything_runs(tmp_path, files, overrides, message):
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, np.ndarray):
            np.save(path, content)
        else:
            save_file(content if isinstance(content, dict) else {"activations": content}, path)
    with pytest.raises(ConfigError, match=message):
        resolve(source_config(tmp_path, **overrides))
    with pytest.raises(ConfigError, match=r"activations_path .*missing does not exist"):
        resolve(source_config(tmp_path / "missing"))
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"")  # one file of a saved dataset
    with pytest.raises(ConfigError, match=r"data-00000-of-00001.arrow is not a .safetensors or .npy file; for a dataset written by CacheActivationsRunner, point activations_path at its folder"):
        resolve(source_config(tmp_path / "data-00000-of-00001.arrow"))


def test_an_import_that_would_fill_the_disk_is_refused_before_any_row_is_copied(tmp_path, shard_folder, monkeypatch):
    import shutil

    import tasks.sources
    from tasks.activations import NotEnoughDisk

    folder, acts, _ = shard_folder
    real_disk_usage, saved = shutil.disk_usage, []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=100_000))
    monkeypatch.setattr(tasks.sources, "_save_shard", lambda *a: saved.append(a))
    with pytest.raises(NotEnoughDisk, match=r"needs 0.7 MB more, but only 0.1 MB are free there; free some space, or import elsewhere"):
        import_store(source_config(folder), tmp_path / "artifacts")
    assert not saved and acts.shape == (9216, 16)  # 9216 rows of 16 float32 and a token id: 663,552 bytes


def test_a_hook_name_with_a_slash_names_a_plain_run_folder_and_a_run_named_before_with_it_continues(tmp_path, shard_folder, capsys, monkeypatch):
    from flows.cli import EXIT_BAD_INPUT, main
    from tasks.preflight import run_identity

    cfg = resolve(source_config(shard_folder[0], hook_name="encoder.layer/6"))
    name = default_run_name(cfg, tmp_path)
    assert "-encoder-layer-6-standard-" in name and claim_run(cfg, tmp_path, None, new=False) == name
    earlier = name.replace("encoder-layer-6", "encoder-layer/6")  # as saeflow named it until 2026-12-01
    (tmp_path / "runs" / earlier).mkdir(parents=True)
    (tmp_path / "runs" / earlier / "config.json").write_text(json.dumps({"config": {}, "result_fields": run_identity(cfg)}))
    assert default_run_name(cfg, tmp_path) == earlier and claim_run(cfg, tmp_path, None, new=False) == earlier
    (tmp_path / "runs" / f"{earlier}-2").mkdir(parents=True)  # a --new run of then
    (tmp_path / "runs" / f"{earlier}-2" / "config.json").write_text(json.dumps({"config": {}, "result_fields": run_identity(cfg)}))
    assert claim_run(cfg, tmp_path, f"{earlier}-2", new=False) == f"{earlier}-2"  # continued by its name
    for variant in (f"{earlier}-2/", f"{earlier}-2/.", f"./{earlier}-2", earlier.replace("/", "//")):  # not names of it
        with pytest.raises(ConfigError, match="must be a plain folder name"):
            claim_run(cfg, tmp_path, variant, new=False)
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        claim_run(cfg, tmp_path, earlier, new=True)  # a fresh run from it would nest in its folder
    assert claim_run(cfg, tmp_path, None, new=True) == f"{name}-2"  # a fresh run: named as runs are named now
    import datetime

    import prefect.runtime.flow_run

    from flows.pipeline import effective_run_name

    monkeypatch.setitem(prefect.runtime.flow_run.FIELDS, "scheduled_start_time", lambda: datetime.datetime(2026, 12, 1, 2, 0))
    assert effective_run_name(cfg.model_dump(mode="json"), None, True, str(tmp_path)) == f"{name}-20261201-020000"  # serve --new-each-run
    assert main(["report", earlier, "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"run '{earlier}' has not finished" in capsys.readouterr().err  # its name is not refused


def test_a_new_run_on_a_folder_of_both_formats_is_refused_and_one_started_before_continues(tmp_path, shard_folder, monkeypatch):
    import shutil

    import tasks.preflight
    from tasks.preflight import claim_run

    folder = tmp_path / "acts"
    shutil.copytree(shard_folder[0], folder)
    np.save(folder / "pca.npy", np.zeros((16, 16), np.float32))  # as wide as the rows: it would be imported
    cfg = resolve(source_config(folder))
    with pytest.raises(ConfigError, match=r"holds both .safetensors and .npy files \(acts-10.safetensors, pca.npy\); every file .* Keep the shards of one format"):
        claim_run(cfg, tmp_path / "artifacts", None, new=False)
    with monkeypatch.context() as earlier_saeflow:
        earlier_saeflow.setattr(tasks.preflight, "check_new_run", lambda cfg: None)
        name = claim_run(cfg, tmp_path / "artifacts", None, new=False)
    assert claim_run(cfg, tmp_path / "artifacts", None, new=False) == name


def test_nan_rows_stop_the_import_naming_file_and_row(tmp_path):
    from tasks.sources import BadActivations

    acts = sparse_rows(9216, seed=2)
    acts[5000 + 17, 3] = float("nan")
    acts[5000 + 40, 0] = float("inf")
    save_file({"activations": acts[:5000]}, tmp_path / "a.safetensors")
    save_file({"activations": acts[5000:]}, tmp_path / "b.safetensors")
    with pytest.raises(BadActivations, match=r"b.safetensors, row 17 holds NaN or inf, or a value beyond float32's range \(one of 2 such rows"):
        import_store(source_config(tmp_path), tmp_path / "artifacts")
    store = next((tmp_path / "artifacts" / "activations").iterdir())
    assert list(store.iterdir()) == []  # the shards imported before the bad row are removed
    wide = sparse_rows(9216, seed=2).double()
    wide[100, 1] = 1e300  # finite in the float64 file, inf in a float32 store
    (tmp_path / "f64").mkdir()
    save_file({"activations": wide}, tmp_path / "f64" / "a.safetensors")
    with pytest.raises(BadActivations, match=r"a.safetensors, row 100 holds NaN or inf, or a value beyond float32's range \(one of 1 such rows"):
        import_store(source_config(tmp_path / "f64"), tmp_path / "artifacts-f64")


def test_tensor_files_need_the_hook_they_came_from(tmp_path):
    """The SAE's cfg.json tells SAELens where to attach it: no default hook is written for
    activations whose files cannot say which hook made them."""
    save_file({"activations": sparse_rows(2048, seed=1)}, tmp_path / "a.safetensors")
    values = source_config(tmp_path).model_dump(exclude_unset=True)
    del values["hook_name"]
    with pytest.raises(ConfigError, match=r"hook_name is not set: saeflow cannot tell which hook made the activations in .*; set hook_name"):
        resolve(make_config(values))
    assert resolve(source_config(tmp_path)).hook_name == "blocks.3.hook_resid_post"


def test_config_refuses_a_model_with_external_activations(tmp_path):
    with pytest.raises(ConfigError, match="model_cfg is set, but with activations_path no model is run"):
        source_config(tmp_path, model_cfg=TINY_MODEL)
    with pytest.raises(ConfigError, match="activations_path and synthetic are two sources"):
        source_config(tmp_path, synthetic={"num_features": 4})
    with pytest.raises(ConfigError, match=r"synthetic: unknown fields \['num_feature'\]"):
        resolve(make_config({"synthetic": {"num_feature": 4}, "d_in": 8}))
    with pytest.raises(ConfigError, match=r"synthetic.hidden_dim is 8 but d_in is 16"):
        resolve(make_config({"synthetic": {"num_features": 4, "hidden_dim": 8}, "d_in": 16}))
    with pytest.raises(ConfigError, match=r"synthetic: Unknown name: 'zipf'"):
        resolve(make_config({"synthetic": {"num_features": 4, "firing_probability": {"generator_name": "zipf"}}, "d_in": 8}))


def test_killed_training_on_an_imported_store_resumes_exactly(prefect_server, tmp_path):
    """Activations written with the iterator API; a run SIGKILLed mid-training and run again
    ends bitwise equal to an uninterrupted run (both on the same imported store)."""
    import subprocess

    from tasks.sources import write_activations

    write_activations((sparse_rows(1024, seed=i) for i in range(9)), tmp_path / "acts")
    cfg = source_config(tmp_path / "acts", training_tokens=16384, n_checkpoints=4)
    artifacts = tmp_path / "artifacts"
    reference = start(cfg, artifacts, run_name="straight")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))

    def cli(*driver):
        command = [sys.executable, str(ROOT / "tests" / "kill_driver.py"), *driver] if driver else [sys.executable, "-m", "flows.cli", "run"]
        return subprocess.run([*command, str(config), "--artifacts-dir", str(artifacts), "--run-name", "acts-killed"], cwd=ROOT, capture_output=True, text=True, timeout=600)

    killed = cli("train-step", "24")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert list((artifacts / "runs" / "acts-killed" / "checkpoints").glob("step-*"))

    # a source file changed since: another run, not a continuation of this one
    shard = tmp_path / "acts" / "shard-00000.safetensors"
    times = shard.stat().st_atime_ns, shard.stat().st_mtime_ns
    name = default_run_name(cfg)
    os.utime(shard, ns=(times[0], times[1] + 10**9))
    assert default_run_name(cfg) != name
    with pytest.raises(ConfigError) as refused:
        claim_run(resolve(cfg), artifacts, "acts-killed", new=False)
    assert (
        f"run 'acts-killed' was started with a different config (activations_fingerprint: the files of activations_path "
        f"{cfg.activations_path} changed since the run started (a file added, removed, rewritten or touched))" in str(refused.value)
    )
    os.utime(shard, ns=times)
    assert default_run_name(cfg) == name

    resumed = cli()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming training from step-" in resumed.stdout + resumed.stderr
    summary = json.loads((artifacts / "runs" / "acts-killed" / "summary.json").read_text())
    assert summary["training"]["resumed_from_step"] > 0
    assert summary["activations"] == reference["activations"]
    a = load_file(Path(summary["training"]["path"]) / "sae_weights.safetensors")
    b = load_file(Path(reference["training"]["path"]) / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cosine_similarity_leaves_out_all_zero_rows():
    """Synthetic rows where no feature fires are all zero: their cosine similarity is undefined
    and must not turn the mean into NaN; a zero reconstruction of a nonzero row counts as 0."""
    from tasks.evaluate import mean_cosine_similarity

    rows = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert mean_cosine_similarity(lambda x: 3 * x, rows) == pytest.approx(1.0)
    assert mean_cosine_similarity(lambda x: torch.stack([x[:, 0], torch.zeros(len(x))], 1), rows) == pytest.approx(0.5)
    assert math.isnan(mean_cosine_similarity(lambda x: x, torch.zeros(3, 2)))


def test_a_run_given_other_activations_is_told_so_not_that_its_files_changed(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "part-1.npy", sparse_rows(6000, seed=0).numpy())
    claim_run(resolve(source_config(tmp_path / "a")), tmp_path / "artifacts", "x", new=False)
    with pytest.raises(ConfigError) as refused:
        claim_run(resolve(source_config(tmp_path / "b")), tmp_path / "artifacts", "x", new=False)
    assert f"(activations_path: '{tmp_path / 'a'}' -> '{tmp_path / 'b'}';" in str(refused.value) and "the files of" not in str(refused.value)


def test_synthetic_rows_are_drawn_with_the_generator_s_seed():
    """A seed sweep with synthetic.seed pinned shares one store; unpinned, it defaults to the seed."""
    from tasks.sources import import_spec

    def spec(run_seed, synthetic_seed=None):
        pinned = {} if synthetic_seed is None else {"seed": synthetic_seed}
        return import_spec(resolve(make_config({"synthetic": {"num_features": 32, "hidden_dim": D_IN, **pinned}, "seed": run_seed})))

    assert spec(1, 7) == spec(2, 7) != spec(1, 8)
    assert spec(1) != spec(2) and spec(1)["seed"] == 1 and spec(3, 7)["seed"] == 7


def test_a_bf16_sae_trains_with_a_warning_and_is_measured_against_the_synthetic_truth_in_float32(prefect_server, tmp_path, caplog):
    """dtype bfloat16 trains (warning that bf16 weights lose small Adam steps); SAELens multiplies
    the SAE's decoder with the float32 true features, where the bf16 SAE's evaluation failed
    after training. Its float32 copy (the same weights) is measured."""
    import copy

    from sae_lens import SAE

    from tasks.evaluate import synthetic_metrics

    cfg = make_config({"synthetic": {"num_features": 32, "hidden_dim": D_IN}, "training_tokens": 8192, "eval_tokens": 1024,
                       "train_batch_size_tokens": 512, "dtype": "bfloat16"})
    summary = start(resolve(cfg), tmp_path)
    assert "dtype bfloat16: the SAE's weights and Adam's state are bfloat16" in caplog.text and "dtype: float32 with autocast: true" in caplog.text
    metrics = json.loads(Path(summary["metrics"]["path"]).read_text())["metrics"]
    sae = SAE.load_from_disk(summary["sae"]["path"])
    assert sae.W_dec.dtype == torch.bfloat16 and load_store(summary["activations"])[0].dtype == torch.bfloat16
    measured = synthetic_metrics(copy.deepcopy(sae).to(torch.float32), summary["activations"], cfg.eval_tokens, "cpu")
    assert {k: metrics[k] for k in measured} == measured and 0 < metrics["synthetic_mcc"] <= 1


def test_a_bf16_store_trains_a_float32_sae_as_on_those_rows_in_float32(prefect_server, shard_folder, tmp_path):
    """store_dtype bfloat16 halves the store; the float32 SAE trains on its rows taken to float32:
    bit for bit the run on a float32 store of the same (bf16-rounded) rows."""
    from sae_lens import SAE

    _, acts, _ = shard_folder
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    save_file({"activations": acts.bfloat16().float()}, rounded / "acts.safetensors")
    (tmp_path / "acts").mkdir()
    save_file({"activations": acts}, tmp_path / "acts" / "acts.safetensors")
    in_bf16 = start(resolve(source_config(tmp_path / "acts", store_dtype="bfloat16")), tmp_path / "a")
    in_float32 = start(resolve(source_config(rounded)), tmp_path / "b")
    assert load_store(in_bf16["activations"])[0].dtype == torch.bfloat16
    assert in_bf16["activations"]["dtype"] == "bfloat16" and in_float32["activations"]["dtype"] == "float32"
    # store_dtype equal to dtype is the default, not another run
    assert default_run_name(source_config(rounded, store_dtype="float32")) == default_run_name(source_config(rounded)) == in_float32["run_name"]
    shard_bytes = [sum(p.stat().st_size for p in Path(run["activations"]["path"]).glob("shard-*")) for run in (in_bf16, in_float32)]
    assert shard_bytes[0] < 0.51 * shard_bytes[1]
    trained = [load_file(Path(run["training"]["path"]) / "sae_weights.safetensors") for run in (in_bf16, in_float32)]
    assert all(w.dtype == torch.float32 for w in trained[0].values())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[1])
    assert SAE.load_from_disk(in_bf16["sae"]["path"]).W_dec.dtype == torch.float32
    metrics = [json.loads(Path(run["metrics"]["path"]).read_text())["metrics"] for run in (in_bf16, in_float32)]
    assert metrics[0]["mse"] == metrics[1]["mse"] and metrics[0]["l0"] == metrics[1]["l0"]


def test_synthetic_features_are_recovered_with_the_default_training_settings(prefect_server, tmp_path):
    """configs/synthetic.yaml as documented: standard SAE, saeflow's default training settings."""
    from sae_lens.synthetic import SyntheticModel

    cfg = load_config(ROOT / "configs" / "synthetic.yaml")
    summary = start(cfg, tmp_path)
    metrics = json.loads(Path(summary["metrics"]["path"]).read_text())["metrics"]
    assert metrics["synthetic_mcc"] >= 0.9
    assert metrics["synthetic_samples"] == cfg.eval_tokens and metrics["eval_rows"] == cfg.eval_tokens
    assert 0 < metrics["synthetic_precision"] <= 1 and 0 < metrics["synthetic_recall"] <= 1
    assert 0.5 < metrics["cossim"] <= 1  # over the rows where some feature fires (the others are all zero)
    truth = SyntheticModel.load_from_disk(summary["activations"]["ground_truth"])
    assert truth.feature_dict.feature_vectors.shape == (32, 16)
    assert load_store(summary["activations"])[0].shape == (cfg.training_tokens, 16)
    report = Path(summary["report"]["path"]).read_text()
    assert f"| synthetic: MCC | {metrics['synthetic_mcc']:.6g} |" in report


def test_files_beside_the_shards_are_not_part_of_the_source_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    from tasks.preflight import run_identity
    from tasks.sources import import_spec

    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "part-1.npy", sparse_rows(6000, seed=0).numpy())
    cfg = resolve(source_config("~/acts"))
    before = (run_identity(cfg), import_spec(cfg))
    (folder / "README.txt").write_text("made with nnsight, layer 6")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "notes.txt").write_text("x")
    assert (run_identity(cfg), import_spec(cfg)) == before
    assert import_spec(cfg)["path"] == str(folder)
    np.save(folder / "part-2.npy", sparse_rows(10, seed=1).numpy())  # another shard is read: another source
    assert run_identity(cfg) != before[0] and import_spec(cfg) != before[1]


def test_big_endian_npy_rows_are_read_as_they_are(tmp_path):
    from tasks.sources import open_source

    rows = sparse_rows(100, seed=0).numpy()
    np.save(tmp_path / "a.npy", rows.astype(">f4"))
    read, _ = open_source(tmp_path, "blocks.3.hook_resid_post")[0].read(10, 60)
    assert torch.equal(read, torch.from_numpy(rows[10:60]))


def test_a_run_recorded_with_every_file_of_its_folder_continues(tmp_path):
    """saeflow before 2026-11-30 fingerprinted every file of the folder; such a run continues by
    its name, and its record then holds the fingerprint of the files read."""
    from tasks.config import stable_hash

    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "part-1.npy", sparse_rows(6000, seed=0).numpy())
    (folder / "notes.txt").write_text("layer 6")
    cfg = resolve(source_config(folder))
    claim_run(cfg, tmp_path / "artifacts", "old", new=False)
    stored = tmp_path / "artifacts" / "runs" / "old" / "config.json"
    record = json.loads(stored.read_text())
    new_style = record["result_fields"]["activations_fingerprint"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())  # the formula of saeflow before 2026-11-30
    every_file = stable_hash([[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    record["result_fields"]["activations_fingerprint"] = every_file
    assert every_file != new_style
    stored.write_text(json.dumps(record))
    assert claim_run(cfg, tmp_path / "artifacts", "old", new=False) == "old"
    assert json.loads(stored.read_text())["result_fields"]["activations_fingerprint"] == new_style
    np.save(folder / "part-1.npy", sparse_rows(6000, seed=1).numpy())  # a shard rewritten: refused as before
    os.utime(folder / "part-1.npy", ns=(1, 1))
    with pytest.raises(ConfigError, match="activations_fingerprint"):
        claim_run(resolve(source_config(folder)), tmp_path / "artifacts", "old", new=False)


def test_metrics_that_are_not_numbers_are_written_as_null(prefect_server, tmp_path, capsys):
    """All-zero activations: explained variance is 0/0 in training and in the evaluation, cosine
    similarity has no nonzero row. metrics.json, summary.json and train_log.jsonl stay standard
    JSON (JavaScript's JSON.parse refuses NaN and -Infinity)."""
    save_file({"activations": torch.zeros(9216, D_IN)}, tmp_path / "zeros.safetensors")
    summary = start(source_config(tmp_path), tmp_path / "artifacts")
    assert math.isnan(summary["metrics"]["metrics"]["cossim"])  # the run's own result keeps the number

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a file that should be standard JSON"))

    run = Path(summary["run_dir"])
    metrics = strict((run / "metrics.json").read_text())["metrics"]
    assert metrics["cossim"] is None and metrics["l0"] == 0
    assert strict((run / "summary.json").read_text())["metrics"]["metrics"]["cossim"] is None
    rows = [strict(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert rows and all(row["explained_variance"] is None for row in rows)
    # the report command reads summary.json's nulls
    from flows.cli import main

    assert main(["report", summary["run_name"], "--artifacts-dir", str(tmp_path / "artifacts")]) == 0
    assert re.search(r"^  cosine similarity +n/a$", capsys.readouterr().out, re.M)
    assert "| cosine similarity | n/a |" in (run / "report.md").read_text()


@pytest.mark.parametrize("kind", ["npy float16", "safetensors with one tensor of another name"])
def test_a_single_file_is_a_source(tmp_path, kind):
    acts = sparse_rows(9216, seed=2)
    if kind == "npy float16":
        path = tmp_path / "acts.npy"
        np.save(path, acts.half().numpy())
        expected = acts.half().float()
    else:
        path = tmp_path / "acts.safetensors"
        save_file({"resid": acts}, path)
        expected = acts
    ref = import_store(source_config(path), tmp_path / "artifacts")
    stored, _ = load_store(ref)
    assert torch.equal(stored, expected[:8192]) and torch.equal(load_eval_activations(ref), expected[8192:])
