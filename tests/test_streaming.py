"""Streaming activation mode: only tokens are stored, training makes the activations on the fly,
and a run killed at any moment still ends bitwise equal to an uninterrupted one."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from tasks.preflight import resolve
from tasks.streaming import choose_activation_mode
from test_resume import FAULTS, assert_bitwise_equal, cli, config_file, finish, flow_run_states, start, weights


@pytest.fixture(scope="module")
def streaming_cfg(tmp_path_factory):
    return config_file(tmp_path_factory, "streaming", activation_mode="streaming", **FAULTS)


@pytest.fixture(scope="module")
def streaming_reference(prefect_server, tmp_path_factory, streaming_cfg):
    artifacts = tmp_path_factory.mktemp("streaming")
    summary = start(streaming_cfg[0], artifacts, "straight")
    return summary, weights(summary)


def test_a_streaming_store_keeps_only_tokens_and_the_report_says_so(streaming_reference):
    summary, _ = streaming_reference
    store = Path(summary["activations"]["path"])
    assert summary["activations"]["mode"] == "streaming"
    shards = list(store.glob("shard-*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert list(f.keys()) == ["tokens"]
    assert summary["training"]["n_training_steps"] == FAULTS["training_tokens"] // 512
    assert 0 < summary["metrics"]["metrics"]["explained_variance"] <= 1
    report = Path(summary["report"]["path"]).read_text()
    assert "- **activations**: `streaming (set by activation_mode; cached activations would take " in report


def test_streamed_batches_are_the_models_activations_of_the_stored_contexts_in_a_seekable_order(streaming_reference):
    """Every row of a streamed batch is the model's activation (recomputed here with TransformerLens's
    `run_with_cache`) at one position of one stored context; batch b
    depends only on (seed, b), so a resumed run seeks straight to it."""
    from tasks.activations import _streaming_source, training_batches

    summary, _ = streaming_reference
    streamed = training_batches(summary["activations"], 512, seed=42, chunk_contexts=64)
    first = next(streamed)
    streamed.next_batch = 5
    fifth = next(streamed)
    again = training_batches(summary["activations"], 512, seed=42, chunk_contexts=64)
    again.next_batch = 5
    assert torch.equal(next(again), fifth)
    assert first.shape == (512, 32) and not torch.equal(first, fifth)

    model, contexts, spec = _streaming_source(summary["activations"], "cpu")
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=spec["hook_name"])
    every_row = cache[spec["hook_name"]].reshape(-1, spec["d_in"])
    distance = torch.cdist(first, every_row, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert distance.max() < 1e-4 * every_row.norm(dim=1).mean()


def test_a_streaming_store_made_on_another_gpu_makes_activations_on_the_device_it_is_given(streaming_reference, tmp_path):
    """A job requeued from cuda:3 onto cuda:0 finds its store (keyed by the device's kind), whose
    spec names cuda:3: training and the sparsity count make the activations where they run."""
    import shutil

    from tasks.activations import sample_activation_batches, training_batches
    from tasks.artifacts import read_json, write_json

    summary, _ = streaming_reference
    store = summary["activations"]
    moved = {**store, "path": str(tmp_path / "store")}
    shutil.copytree(store["path"], moved["path"])
    manifest = read_json(tmp_path / "store" / "manifest.json")
    assert manifest["spec"]["device"] == "cpu"
    write_json(tmp_path / "store" / "manifest.json", {**manifest, "spec": {**manifest["spec"], "device": "cuda:3"}})
    batches = [training_batches(s, 512, seed=42, chunk_contexts=64, device="cpu") for s in (store, moved)]
    assert torch.equal(next(batches[0]), next(batches[1]))
    samples = [next(sample_activation_batches(s, 3000, 42, 1000, device="cpu")) for s in (store, moved)]
    assert samples[0].shape == (1000, 32) and torch.equal(samples[0], samples[1])


def test_streaming_sparsity_is_counted_a_model_batch_at_a_time_as_over_all_contexts_at_once(streaming_reference):
    from sae_lens import SAE
    from safetensors.torch import load_file

    from tasks.activations import _streaming_source, sample_activation_batches
    from tasks.model import special_token_ids
    from tasks.save import ENCODE_BATCH, LOG_EPS, firing_frequency
    from tasks.streaming import activations_for
    from test_pipeline import unchunked_frequency

    summary, _ = streaming_reference
    store, sae = summary["activations"], SAE.load_from_disk(summary["sae"]["path"])
    model, contexts, spec = _streaming_source(store, "cpu")
    skip = special_token_ids(summary["model"], {})
    for n, batch in [(1_000_000, ENCODE_BATCH), (3000, 1000)]:  # all contexts; 94 contexts in batches across model batches
        picked = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(42))[: -(-n // spec["context_size"])].sort().values
        kept = ~torch.isin(contexts[picked].flatten(), torch.tensor(skip))  # special tokens left out
        assert 0 < int(kept.sum()) < kept.numel()
        expected = unchunked_frequency(sae, activations_for(model, contexts[picked], spec)[kept], batch)
        sizes = []
        frequency, n_rows = firing_frequency(sae, (sizes.append(len(b)) or b for b in sample_activation_batches(store, n, 42, batch, skip_tokens=skip)))
        assert torch.equal(frequency, expected) and n_rows == int(kept.sum())
        assert max(sizes) == batch and len(sizes) == -(-n_rows // batch)
        if n == 1_000_000:  # the run's sparsity_tokens: the saved sparsity is the one counted over all contexts at once
            assert torch.equal(load_file(Path(summary["sae"]["path"]) / "sparsity.safetensors")["sparsity"], torch.log10(expected + LOG_EPS))


def test_streaming_run_killed_several_times_ends_bitwise_equal(streaming_cfg, streaming_reference, tmp_path):
    _, config = streaming_cfg
    artifacts = tmp_path / "artifacts"
    for point, n in [("stream-step", 20), ("checkpoint-write", 1), ("stream-step", 25)]:
        code, output = finish(cli(driver=(point, n), artifacts=artifacts, config=config, run_name="stream-killed"))
        assert code == -signal.SIGKILL, output
    code, output = finish(cli(artifacts=artifacts, config=config, run_name="stream-killed"))
    assert code == 0, output
    assert "Resuming training from step-" in output
    summary = json.loads((artifacts / "runs" / "stream-killed" / "summary.json").read_text())
    assert summary["training"]["resumed_from_step"] == 26  # the third process wrote it before its kill
    assert_bitwise_equal(weights(summary), streaming_reference[1])
    assert flow_run_states("stream-killed") == ["Crashed", "Crashed", "Crashed", "Completed"]


def test_auto_streams_when_the_cache_would_exceed_the_limit_and_keeps_its_choice(tmp_path):
    cfg = resolve(tiny_config(activation_mode="auto", max_cache_gb=0.001))  # 32768 tokens x 32 x 4 B = 0.0042 GB
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    mode, why = choose_activation_mode(cfg, tmp_path, run)
    assert mode == "streaming"
    assert why == "activation_mode auto: the cached activations would take 0.00 GB, more than 0.00 GB (max_cache_gb)"
    relaxed = cfg.model_copy(update={"max_cache_gb": 100.0})
    assert choose_activation_mode(relaxed, tmp_path, run)[0] == "streaming"  # decided when the run started
    assert choose_activation_mode(relaxed, tmp_path, tmp_path / "runs" / "other")[0] == "cached"
    default = choose_activation_mode(cfg.model_copy(update={"max_cache_gb": None}), tmp_path, tmp_path / "runs" / "third")
    assert default[0] == "cached" and "(half the free disk)" in default[1]
    # A cached store of these activations already filled by another run costs no more disk.
    store = tmp_path / "activations" / "filled"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text(json.dumps({"complete": False}))
    assert choose_activation_mode(cfg, tmp_path, tmp_path / "runs" / "fourth", store)[0] == "streaming"  # still being filled
    (store / "manifest.json").write_text(json.dumps({"complete": True}))
    mode, why = choose_activation_mode(cfg, tmp_path, tmp_path / "runs" / "fifth", store)
    assert mode == "cached" and why == f"activation_mode auto: the cached activations (0.00 GB) are on disk already ({store})"
