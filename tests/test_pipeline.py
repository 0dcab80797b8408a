"""The guide's four workflows as tests on a locally built model, plus caching of the whole flow."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import conftest
from conftest import folded, with_random_norms, task_states, tiny_config

STAGES = ["build-model", "pretokenise", "fill-activations", "train-sae", "save-sae", "load-sae", "evaluate", "analyse", "report"]


def start(cfg, artifacts, run_name=None, new=False):
    """Resolve and claim a run as the CLI does, then run the flow; returns (run name, final state)."""
    state = conftest.start(cfg, artifacts, run_name, new, return_state=True)
    return state.result()["run_name"], state


@pytest.fixture(scope="module")
def models(finished_run):
    from sae_lens import SAE

    from tasks.model import load_model

    summary = finished_run["summary"]
    sae = SAE.load_from_disk(summary["sae"]["path"])
    return load_model(summary["model"], "cpu"), sae


def test_full_training_cycle_writes_checkpoints_and_trains_every_token(finished_run):
    summary, cfg = finished_run["summary"], finished_run["cfg"]
    assert task_states(finished_run["state"]) == {stage: "Completed" for stage in STAGES}
    training = summary["training"]
    assert training["n_training_tokens"] >= cfg.training_tokens
    assert training["n_training_steps"] == cfg.training_tokens // cfg.train_batch_size_tokens
    assert training["resumed_from_step"] == 0
    checkpoints = sorted((Path(summary["run_dir"]) / "checkpoints").glob("step-*"))
    # n_checkpoints 4 over 64 steps: after steps 13, 26, 39, 52, and one after the last; the newest 3 are kept
    assert cfg.keep_checkpoints == 3
    assert [p.name for p in checkpoints] == ["step-000000039", "step-000000052", "step-000000064"]
    for folder in checkpoints:
        names = {p.name for p in folder.iterdir()}
        assert names == {
            "sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "trainer_state.safetensors",
            "trainer_state.json", "activation_scaler.json", "manifest.json",
        }
    # the activation store holds exactly the training tokens, once each
    manifest = json.loads((Path(summary["activations"]["path"]) / "manifest.json").read_text())
    ranges = [(s["start"], s["stop"]) for s in manifest["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == cfg.training_tokens
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_saved_sae_loads_with_plain_sae_lens_and_has_real_sparsity(finished_run, models):
    from tasks.activations import load_store
    from tasks.model import special_token_ids

    summary = finished_run["summary"]
    _, sae = models
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (32, 128)
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    log_sparsity = load_file(Path(summary["sae"]["path"]) / "sparsity.safetensors")["sparsity"]
    activations, tokens = load_store(summary["activations"])
    special = torch.isin(tokens, torch.tensor(special_token_ids(summary["model"], {})))
    assert 0 < int(special.sum()) < len(tokens)  # the BOS of each context
    with torch.no_grad():
        fires = sae.encode(activations) != 0
    recomputed = fires[~special].float().mean(0)  # special tokens left out, as the evaluation leaves them out
    assert torch.allclose(10**log_sparsity, recomputed + 1e-10, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(fires.float().mean(0), recomputed, rtol=1e-3)  # and that matters here
    assert log_sparsity.max() > -10  # features do fire: not the guide's placeholder
    assert summary["sae"]["mean_l0"] == pytest.approx(recomputed.sum().item(), rel=1e-4)
    assert summary["sae"]["sparsity_tokens"] == int((~special).sum())
    # the loaded SAE's metadata tells the same (SAELens wrote its last training window's, BOS included)
    assert sae.cfg.metadata.l0 == pytest.approx(summary["sae"]["mean_l0"], rel=1e-6)
    assert sae.cfg.metadata.num_dead_features == summary["sae"]["dead_features"]


def test_top_features_for_a_prompt_match_an_independent_computation(finished_run, models):
    model, sae = models
    analysis = json.loads(Path(finished_run["summary"]["analysis"]["path"]).read_text())
    prompt = analysis["prompts"][0]
    assert prompt["token"] == "." and len(prompt["top_features"]) == 3
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(prompt["prompt"]))
        feature_acts = sae.encode(cache[sae.cfg.metadata.hook_name])[0, -1]
    values, indices = torch.topk(feature_acts, 3)
    assert [f["feature"] for f in prompt["top_features"]] == indices.tolist()
    assert [f["activation"] for f in prompt["top_features"]] == pytest.approx(values.tolist(), rel=1e-5)
    assert all(f["activation"] > 0 for f in prompt["top_features"])


def test_logit_analysis_uses_W_dec_times_W_U(finished_run, models):
    """The analysis reads `W_dec @ W_U` of the guide's model, whose layer norms TransformerLens
    folded (the tiny model's norms are still 1 and 0; the next test gives them other values)."""
    model, sae = models
    analysis = json.loads(Path(finished_run["summary"]["analysis"]["path"]).read_text())
    assert analysis["projection_shape"] == [sae.cfg.d_sae, model.cfg.d_vocab]
    fired = {f["feature"] for p in analysis["prompts"] for f in p["top_features"] if f["activation"] > 0}
    assert {e["feature"] for e in analysis["logit_effects"]} == fired
    projection = sae.W_dec @ folded(model).W_U
    effect = analysis["logit_effects"][0]
    row = projection[effect["feature"]]
    assert [e["token"] for e in effect["promoted"]] == [model.to_string(i) for i in torch.topk(row, 5).indices]
    assert [e["token"] for e in effect["inhibited"]] == [model.to_string(i) for i in torch.topk(-row, 5).indices]
    assert effect["promoted"][0]["logit"] == pytest.approx(row.max().item(), rel=1e-5)
    from tasks.analyse import logit_effects

    (everything,), _ = logit_effects(model, sae, [effect["feature"]], 10**6)  # top_k_tokens beyond the vocabulary: all of it
    assert len(everything["promoted"]) == len(everything["inhibited"]) == model.cfg.d_vocab


def test_unembed_directions_equal_W_U_of_the_model_with_its_layer_norms_folded(models):
    from tasks.model import unembed_directions

    model, sae = models
    model = with_random_norms(model)
    reference = folded(model)
    assert model.cfg.normalization_type == "LN" and reference.cfg.normalization_type == "LNPre"
    with torch.no_grad():
        expected = sae.W_dec @ reference.W_U
        torch.testing.assert_close(unembed_directions(model, sae.W_dec), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(sae.W_dec @ model.W_U, expected, atol=1e-2)  # the gains and centring matter
    # weightless LayerNorms (LNPre) take out the mean across d_model too
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    pre = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=10, act_fn="gelu", normalization_type="LNPre"))
    directions = torch.randn(3, 8)
    logits = (directions - directions.mean(-1, keepdim=True)) @ pre.W_U
    torch.testing.assert_close(unembed_directions(pre, directions), logits - logits.mean(-1, keepdim=True))


@pytest.mark.parametrize(("hook", "head", "out"), [
    ("blocks.1.attn.hook_z", None, "blocks.1.hook_attn_out"),
    ("blocks.1.attn.hook_z", 1, "blocks.1.hook_attn_out"),
    ("blocks.1.mlp.hook_post", None, "blocks.1.hook_mlp_out"),
])
def test_residual_directions_are_what_a_decoder_row_adds_to_the_residual_stream(models, hook, head, out):
    """Adding feature f's decoder row at the SAE's hook adds `residual_directions(...)[f]` to the
    sublayer's output, at every position."""
    from tasks.model import residual_directions

    model, _ = models
    tokens = model.to_tokens("Tom saw a blue fox near the lake .")
    _, cache = model.run_with_cache(tokens, names_filter=[hook, out])
    acts = cache[hook][0, 0]
    d_in = acts[head].numel() if head is not None else acts.numel()
    W_dec = torch.randn(3, d_in, generator=torch.Generator().manual_seed(0))
    directions = residual_directions(model, W_dec, hook, head)
    for feature in range(len(W_dec)):
        def add(value, hook):
            if head is None:
                return value + W_dec[feature].reshape(value.shape[2:])
            value = value.clone()
            value[:, :, head] += W_dec[feature]
            return value

        with torch.no_grad():
            captured = {}
            model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(hook, add), (out, lambda value, hook: captured.setdefault("out", value))])
        torch.testing.assert_close(captured["out"] - cache[out], directions[feature].expand_as(cache[out]), atol=1e-4, rtol=1e-4)

    # A bf16 model's directions are computed in float32: those of its weights taken to float32.
    import copy

    in_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    in_float32 = copy.deepcopy(in_bf16).to(torch.float32)
    assert torch.equal(residual_directions(in_bf16, W_dec, hook, head), residual_directions(in_float32, W_dec, hook, head))


def test_no_direct_path_is_claimed_through_a_norm_that_follows_a_sublayer():
    """Gemma 2/3 normalise each sublayer's output before adding it to the residual stream: hook_z
    and hook_post have no fixed direction there; the residual hooks keep theirs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tasks.model import residual_directions

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=10, act_fn="gelu",
        normalization_type="RMS", use_normalization_before_and_after=True,
    )
    model = HookedTransformer(cfg)
    W_dec = torch.randn(3, 8)
    assert residual_directions(model, W_dec, "blocks.0.attn.hook_z", None) is None
    assert residual_directions(model, W_dec[:, :4], "blocks.0.attn.hook_z", 0) is None
    assert residual_directions(model, torch.randn(3, 16), "blocks.0.mlp.hook_post", None) is None
    assert residual_directions(model, W_dec, "blocks.0.hook_attn_out", None) is W_dec


def test_second_run_is_all_cache_hits(finished_run):
    trained = Path(finished_run["summary"]["training"]["path"]) / "sae_weights.safetensors"
    before = trained.stat().st_mtime_ns
    _, state = start(tiny_config(), finished_run["artifacts"])
    assert task_states(state) == {stage: "Cached" for stage in STAGES}
    assert trained.stat().st_mtime_ns == before
    assert state.result()["sae"] == finished_run["summary"]["sae"]


def test_a_stage_whose_files_are_gone_runs_again(finished_run):
    analysis = Path(finished_run["summary"]["analysis"]["path"])
    analysis.unlink()
    _, state = start(tiny_config(), finished_run["artifacts"])
    states = task_states(state)
    assert states.pop("analyse") == "Completed"
    assert set(states.values()) == {"Cached"}
    assert analysis.is_file()


def unchunked_frequency(sae, activations: torch.Tensor, batch: int) -> torch.Tensor:
    """The save stage's sparsity as it was computed before batching: every sampled row at once."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(activations), batch):
            counts += (sae.encode(activations[start : start + batch]) != 0).sum(0).to(torch.float64)
    return (counts / len(activations)).float()


def test_sparsity_counted_a_batch_at_a_time_equals_counting_all_rows_at_once(finished_run, tmp_path):
    from sae_lens import SAE
    from safetensors.torch import save_file

    from tasks.activations import StoreRows, load_store, sample_activation_batches
    from tasks.model import special_token_ids
    from tasks.save import ENCODE_BATCH, LOG_EPS, firing_frequency

    summary, cfg = finished_run["summary"], finished_run["cfg"]
    store, sae = summary["activations"], SAE.load_from_disk(summary["sae"]["path"])
    everything, (_, tokens) = StoreRows(store), load_store(store)
    skip = special_token_ids(summary["model"], {})
    for n, batch in [(cfg.sparsity_tokens, ENCODE_BATCH), (5000, 1024)]:
        generator = torch.Generator().manual_seed(cfg.seed)
        rows = torch.randperm(len(everything), generator=generator)[: min(n, len(everything))].sort().values
        rows = rows[~torch.isin(tokens[rows], torch.tensor(skip))]
        expected = unchunked_frequency(sae, everything[rows], batch)
        sizes = []
        frequency, n_rows = firing_frequency(sae, (sizes.append(len(b)) or b for b in sample_activation_batches(store, n, cfg.seed, batch, skip_tokens=skip)))
        assert torch.equal(frequency, expected) and n_rows == len(rows)
        assert max(sizes) == batch and len(sizes) == -(-len(rows) // batch)
        if n == cfg.sparsity_tokens:  # the saved sparsity is, byte for byte, the one counted over all rows at once
            save_file({"sparsity": torch.log10(expected + LOG_EPS)}, tmp_path / "sparsity.safetensors")
            assert (tmp_path / "sparsity.safetensors").read_bytes() == (Path(summary["sae"]["path"]) / "sparsity.safetensors").read_bytes()


def test_other_sae_settings_reuse_the_model_and_activations_and_eval_or_sparsity_settings_rerun_what_they_change(finished_run):
    """A run with another l1_coefficient trains on the finished run's model and store. Then, on
    that run: eval_batch_size_prompts re-runs only the evaluation and the report; sparsity_tokens
    makes a new sae/ (the trained SAE stays) and re-runs what reads it; going back restores it."""
    from tasks.activations import load_store
    from tasks.model import special_token_ids

    other = {"l1_coefficient": 3.0}
    name, state = start(tiny_config(**other), finished_run["artifacts"])
    assert name != finished_run["name"]
    states = task_states(state)
    assert states["build-model"] == states["pretokenise"] == states["fill-activations"] == "Cached"
    assert states["train-sae"] == "Completed"
    summary = state.result()
    assert summary["activations"] == finished_run["summary"]["activations"]
    sae_dir, run = Path(summary["sae"]["path"]), Path(summary["run_dir"])
    trained = Path(summary["training"]["path"]) / "sae_weights.safetensors"
    original, trained_mtime = (sae_dir / "sparsity.safetensors").read_bytes(), trained.stat().st_mtime_ns
    original_analysis = (run / "analysis.json").read_text()
    assert summary["metrics"]["metrics"]["eval_contexts"] == 2048

    _, state = start(tiny_config(**other, eval_batch_size_prompts=100), finished_run["artifacts"], name)
    states = task_states(state)
    # the training task, keyed by the whole config, runs only to find its finished result on disk
    assert {s for s, v in states.items() if v == "Completed"} == {"train-sae", "evaluate", "report"}
    assert state.result()["metrics"]["metrics"]["eval_contexts"] == 2000  # whole batches of 100 of the 2048 held-out contexts
    assert state.result()["sae"] == summary["sae"] and trained.stat().st_mtime_ns == trained_mtime

    _, state = start(tiny_config(**other, sparsity_tokens=4096, eval_batch_size_prompts=100), finished_run["artifacts"], name)
    states = task_states(state)
    after_training = ("save-sae", "load-sae", "evaluate", "analyse", "report")
    assert {s: states[s] for s in after_training} == {s: "Completed" for s in after_training}
    assert {s for s, v in states.items() if v == "Cached"} == {"build-model", "pretokenise", "fill-activations"}
    result = state.result()
    _, tokens = load_store(summary["activations"])
    drawn = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(42))[:4096]]
    assert result["sae"]["sparsity_tokens"] == int((~torch.isin(drawn, torch.tensor(special_token_ids(summary["model"], {})))).sum()) < 4096
    assert result["sae"]["manifest_sha256"] != summary["sae"]["manifest_sha256"]
    assert result["metrics"]["metrics"]["eval_contexts"] == 2000  # whole batches of 100 of the 2048 held-out contexts
    changed = load_file(sae_dir / "sparsity.safetensors")["sparsity"]
    assert not torch.equal(changed, safetensors.torch.load(original)["sparsity"])
    dashboard = json.loads((run / "analysis.json").read_text())["dashboard"]
    assert [d["frequency"] for d in dashboard] == pytest.approx([10 ** changed[d["feature"]].item() for d in dashboard])
    assert trained.stat().st_mtime_ns == trained_mtime  # the trained SAE is never remade
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]

    _, state = start(tiny_config(**other), finished_run["artifacts"], name)
    states = task_states(state)
    assert states["save-sae"] == states["analyse"] == states["report"] == "Completed"
    assert states["train-sae"] == "Cached"
    assert (sae_dir / "sparsity.safetensors").read_bytes() == original
    assert state.result()["sae"] == summary["sae"]
    assert state.result()["metrics"]["metrics"]["eval_contexts"] == 2048
    assert (run / "analysis.json").read_text() == original_analysis


def test_sae_is_remade_only_when_its_measurement_changes_and_a_crash_while_swapping_it_is_recovered(finished_run, tmp_path, monkeypatch):
    import os

    from tasks.save import save_sae

    summary = finished_run["summary"]
    trained, store = summary["training"], summary["activations"]
    first = save_sae.fn(trained, store, str(tmp_path), 4096, 42, "cpu")
    sparsity = tmp_path / "sae" / "sparsity.safetensors"
    inode = sparsity.stat().st_ino
    assert save_sae.fn(trained, store, str(tmp_path), 4096, 42, "cpu") == first and sparsity.stat().st_ino == inode

    real_rename, renames = os.rename, []

    def crash_before_the_new_one_is_in(src, dst):
        renames.append(Path(dst).name)
        if Path(dst).name == "sae":
            raise OSError("killed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_before_the_new_one_is_in)
    with pytest.raises(OSError, match="killed"):
        save_sae.fn(trained, store, str(tmp_path), 8192, 42, "cpu")
    monkeypatch.setattr(os, "rename", real_rename)
    assert renames[0].startswith(".old-sae-") and not (tmp_path / "sae").exists()  # the old one was moved aside whole

    remade = save_sae.fn(trained, store, str(tmp_path), 8192, 42, "cpu")
    assert remade["sparsity_tokens"] == 8192 and remade["manifest_sha256"] != first["manifest_sha256"]
    assert remade["mean_l0"] != first["mean_l0"]
    (tmp_path / "sae" / "cfg.json").write_text("{}")  # garbled: set aside, kept, and made again
    assert save_sae.fn(trained, store, str(tmp_path), 4096, 42, "cpu")["manifest_sha256"] == first["manifest_sha256"]
    aside, = tmp_path.glob("broken-sae-*")
    assert (aside / "cfg.json").read_text() == "{}"


def test_sae_is_remade_when_the_sae_it_was_made_from_is_trained_again(finished_run, tmp_path):
    import shutil

    from tasks.artifacts import write_manifest
    from tasks.save import save_sae

    summary = finished_run["summary"]
    retrained = tmp_path / "trained"
    shutil.copytree(summary["training"]["path"], retrained)
    trained = {**summary["training"], "path": str(retrained)}
    save_sae.fn(trained, summary["activations"], str(tmp_path), 4096, 42, "cpu")
    weights = load_file(retrained / "sae_weights.safetensors")
    safetensors.torch.save_file({**weights, "W_dec": 2 * weights["W_dec"]}, retrained / "sae_weights.safetensors")  # trained again, differently
    write_manifest(retrained, {k: v for k, v in json.loads((retrained / "manifest.json").read_text()).items() if k != "files"})
    save_sae.fn(trained, summary["activations"], str(tmp_path), 4096, 42, "cpu")
    assert torch.equal(load_file(tmp_path / "sae" / "sae_weights.safetensors")["W_dec"], 2 * weights["W_dec"])
