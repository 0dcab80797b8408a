"""Local Hugging Face checkpoints, pretrained names and pretokenised datasets as sources.

Checkpoints load offline into TransformerLens with the config from their own config.json and give
the transformers model's logits, as does a pretrained name read from a hub cache (whose weights
build-model never loads); a run trains on one; broken checkpoints and datasets tokenised
with another tokenizer are refused before any work.
"""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import folded, start, task_states, tiny_config, with_random_norms
from tasks.config import ConfigError
from tasks.data import generate_stories
from tasks.model import build_model, load_model, model_spec, train_word_tokenizer
from tasks.preflight import claim_run, default_run_name, resolve

PROMPT = "Lily went to the park with a red ball . The cat was happy because Tom fed it ."


@pytest.fixture
def no_network(monkeypatch):
    """Fail any name lookup other than loopback, with the Hugging Face offline switches off, so
    that code which would reach the hub is caught rather than kept offline by HF_HUB_OFFLINE."""
    import datasets.config
    import huggingface_hub.constants

    attempts, lookup = [], socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1"):
            attempts.append(host)
            raise socket.gaierror(f"test forbids network access to {host}")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_word_tokenizer(generate_stories(500, seed=0), out)
    return out


def _randomise(model) -> None:
    """Random weights everywhere (norm gains around 1), so that a wrongly converted weight shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if param.ndim == 1 and name.endswith("weight") else 0.0, 0.3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny Llama (grouped-query attention, RMSNorm, rotary) and a tiny GPT-2 checkpoint, each
    saved with save_pretrained next to its tokenizer. "llama" in the folder name is deliberate:
    TransformerLens picks architectures by such names."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **special,
        )),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, **special)),
    }
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for name, model in models.items():
        _randomise(model)
        folders[name] = root / f"tiny-{name}"
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.fixture
def hub_cache(checkpoints, tmp_path, monkeypatch) -> Path:
    """A Hugging Face hub cache holding the tiny GPT-2 checkpoint as the hub's `gpt2` (with the
    `n_ctx` the hub's config.json carries), so that a pretrained TransformerLens name loads offline
    through TransformerLens's own code."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints["gpt2"], snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_pretrained_model_is_described_without_loading_its_weights(hub_cache, tmp_path, monkeypatch):
    """build-model reads a pretrained model's config and tokenizer only; its weights load (here
    from the hub cache) where they are used, and give the transformers model's logits."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    from tasks.model import load_tokenizer, tokenizer_fingerprint

    def no_weights(*args, **kwargs):
        raise AssertionError("build-model loaded the pretrained weights")

    with monkeypatch.context() as patched:
        patched.setattr(HookedTransformer, "from_pretrained_no_processing", no_weights)
        patched.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
        model_ref = build_model.fn(model_spec(tiny_config(model_name="gpt2", model_cfg=None)), str(tmp_path / "artifacts"))
    assert model_ref == {
        "kind": "pretrained", "name": "gpt2", "path": None, "n_layers": 2, "d_model": 32, "n_ctx": 64,
        "d_vocab": len(load_tokenizer(hub_cache)), "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(hub_cache)), "outputs": [],
    }

    model = load_model(model_ref, "cpu")
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), AutoModelForCausalLM.from_pretrained(hub_cache).eval()(tokens).logits, atol=1e-4, rtol=1e-4)


def checkpoint_config(folder: Path, **overrides):
    return tiny_config(model_name=str(folder), model_cfg=None, **overrides)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_checkpoint_loads_offline_and_matches_the_transformers_logits(checkpoints, name, tmp_path, no_network):
    from transformers import AutoModelForCausalLM

    from tasks.model import unembed_directions

    folder = checkpoints[name]
    model_ref = build_model.fn(model_spec(checkpoint_config(folder)), str(tmp_path))
    assert {k: model_ref[k] for k in ("kind", "path", "n_layers", "d_model", "n_ctx")} == {
        "kind": "checkpoint", "path": str(folder), "n_layers": 2, "d_model": 32, "n_ctx": 64,
    }
    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model_ref["d_vocab"] == hf_model.config.vocab_size

    model = load_model(model_ref, "cpu")
    if name == "llama":
        assert (model.cfg.n_heads, model.cfg.n_key_value_heads, model.cfg.normalization_type) == (4, 2, "RMS")
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        logits = model(tokens)
    assert expected.abs().max() > 1  # logits of a size where a conversion error would show
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    # the analysis's W_dec @ W_U, read off this model, is that of the guide's model with its norms folded
    model = with_random_norms(model)
    reference = folded(model)
    directions = torch.randn(5, model.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens).log_softmax(-1), model(tokens).log_softmax(-1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(unembed_directions(model, directions), directions @ reference.W_U, atol=1e-4, rtol=1e-4)


def test_models_loaded_at_once_in_threads_load_and_leave_the_process_as_it_was(checkpoints, tmp_path, no_network):
    """Sweep members load their models in threads; transformers changes process-wide state while
    it loads (the default dtype, a no-op `tie_weights`): two loads at once failed ("Cannot copy
    out of meta tensor") or left the default dtype bfloat16 (8 of 10 tries in a review)."""
    import threading

    from transformers import PreTrainedModel

    folder = checkpoints["gpt2"]
    model_ref = build_model.fn(model_spec(checkpoint_config(folder)), str(tmp_path))
    assert resolve(checkpoint_config(folder, model_from_pretrained_kwargs={"dtype": "bfloat16"})).d_in == 32  # a dtype by name
    tie_weights = PreTrainedModel.tie_weights
    for _ in range(3):
        barrier, loaded = threading.Barrier(2), {}

        def load(dtype):
            barrier.wait()
            loaded[dtype] = load_model(model_ref, "cpu", from_pretrained_kwargs={"dtype": dtype})

        threads = [threading.Thread(target=load, args=(dtype,)) for dtype in ("bfloat16", "float32")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {dtype: model.W_U.dtype for dtype, model in loaded.items()} == {"bfloat16": torch.bfloat16, "float32": torch.float32}
        assert torch.get_default_dtype() == torch.float32 and PreTrainedModel.tie_weights is tie_weights


def test_checkpoint_preflight_reads_widths_and_the_files_key_the_run(checkpoints, tmp_path):
    folder = tmp_path / "copy-of-llama"
    shutil.copytree(checkpoints["llama"], folder)
    cfg = checkpoint_config(folder, hook_name="blocks.1.mlp.hook_post")
    assert resolve(cfg).d_in == 64
    assert default_run_name(cfg).startswith("copy-of-llama-L1-mlp-post-standard-")
    spec, name = model_spec(cfg), default_run_name(cfg)
    claim_run(resolve(cfg), tmp_path / "artifacts", "mine", new=False)

    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten weights
    assert model_spec(cfg)["fingerprint"] != spec["fingerprint"]
    assert default_run_name(cfg) != name
    with pytest.raises(ConfigError, match=r"checkpoint_fingerprint: the files of the model checkpoint .* changed since the run started \(rewritten, retrained or copied\).*--new"):
        claim_run(resolve(cfg), tmp_path / "artifacts", "mine", new=False)


def test_broken_checkpoints_are_refused_at_preflight(checkpoints, tokenizer_dir, tmp_path):
    def error(folder, **overrides) -> str:
        with pytest.raises(ConfigError) as caught:
            resolve(checkpoint_config(folder, **overrides))
        return str(caught.value)

    assert "is not an existing folder" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in error(tmp_path / "empty") and "save_pretrained" in error(tmp_path / "empty")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    message = error(bert)
    assert "is a BertForMaskedLM" in message and "supported architectures: GPT2LMHeadModel" in message and "LlamaForCausalLM" in message

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(checkpoints["gpt2"] / file, no_tokenizer / file)
    message = error(no_tokenizer)
    assert "holds no tokenizer" in message and "tokenizer.save_pretrained" in message and "tokenizer_path" in message
    assert resolve(checkpoint_config(no_tokenizer, tokenizer_path=str(tokenizer_dir))).d_in == 32


def _pretokenised_with(tokenizer_folder: Path, text_file: Path, out: Path) -> Path:
    """A dataset pretokenised by SAELens's PretokenizeRunner (with its sae_lens.json metadata)."""
    from sae_lens import PretokenizeRunner, PretokenizeRunnerConfig

    PretokenizeRunner(PretokenizeRunnerConfig(
        tokenizer_name=str(tokenizer_folder), dataset_path="json", data_files=[str(text_file)], split="train",
        context_size=32, num_proc=1, shuffle=False, save_path=str(out),
    )).run()
    return out


@pytest.fixture(scope="module")
def story_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.jsonl"
    path.write_text("\n".join(json.dumps({"text": story}) for story in generate_stories(400, seed=1)))
    return path


def test_a_dataset_pretokenised_with_another_tokenizer_is_refused(checkpoints, story_file, tmp_path):
    other = tmp_path / "other-tokenizer"
    train_word_tokenizer(generate_stories(500, seed=0) + ["zebra quantum violin"] * 50, other)
    data = _pretokenised_with(other, story_file, tmp_path / "pretokenised")
    with pytest.raises(ConfigError, match="was tokenised with another tokenizer .*other-tokenizer"):
        resolve(checkpoint_config(checkpoints["llama"], dataset_path=str(data)))


def test_foreign_token_ids_are_checked_against_the_vocabulary_and_bos(checkpoints, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = tokenizer.bos_token_id

    def dataset(rows) -> str:
        path = tmp_path / f"tokens-{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("\n".join(json.dumps({"input_ids": row}) for row in rows))
        return str(path)

    cfg = checkpoint_config(checkpoints["llama"])
    with pytest.raises(ConfigError, match=f"holds token id 5000, outside the model's vocabulary of {len(tokenizer)} tokens"):
        resolve(cfg.model_copy(update={"dataset_path": dataset([[bos] + [5000] * 31] * 4)}))
    without_bos = dataset([[7] * 32] * 4)
    with pytest.raises(ConfigError, match=f"begins with token id 7, not the model's BOS token \\({bos}\\).*prepend_bos: false"):
        resolve(cfg.model_copy(update={"dataset_path": without_bos}))
    assert resolve(cfg.model_copy(update={"dataset_path": without_bos, "prepend_bos": False})).is_dataset_tokenized
    with pytest.raises(ConfigError, match="row 0 holds 8 tokens, fewer than context_size"):
        resolve(cfg.model_copy(update={"dataset_path": dataset([[bos] * 8] * 4)}))


def test_hub_metadata_naming_another_tokenizer_is_refused(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import AutoTokenizer

    from tasks.tokens import check_token_dataset

    metadata = tmp_path / "sae_lens.json"
    metadata.write_text(json.dumps({"tokenizer_name": "someone/tokenizer", "tokenizer_fingerprint": "0123456789abcdef", "context_size": 32}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type: str(metadata))
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama"])
    rows = Dataset.from_dict({"tokens": [[tokenizer.bos_token_id] * 32]})
    with pytest.raises(ValueError, match="tokenised with another tokenizer \\(someone/tokenizer\\)"):
        check_token_dataset(rows, "someone/pretokenised", tokenizer, len(tokenizer), 32, True)


@pytest.fixture(scope="module")
def llama_dataset(checkpoints, story_file, tmp_path_factory) -> Path:
    return _pretokenised_with(checkpoints["llama"], story_file, tmp_path_factory.mktemp("data") / "pretokenised")


def test_a_run_on_a_checkpoint_trains_on_its_activations(prefect_server, checkpoints, llama_dataset, tmp_path, no_network):
    """A whole run on the Llama checkpoint over a dataset SAELens pretokenised with its tokenizer."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    from tasks.activations import load_store

    cfg = checkpoint_config(
        checkpoints["llama"], dataset_path=str(llama_dataset), training_tokens=4096, eval_tokens=1024,
        sparsity_tokens=4096, n_checkpoints=1, dashboard_features=4,
    )
    state = start(cfg, tmp_path, return_state=True)
    assert state.is_completed()
    summary = state.result()
    states = task_states(state)
    assert "pretokenise" not in states and set(states.values()) == {"Completed"}  # the data holds token ids already
    assert summary["model"]["kind"] == "checkpoint" and summary["tokens"] is None
    assert SAE.load_from_disk(summary["sae"]["path"]).cfg.d_in == 32
    assert summary["metrics"]["metrics"]["eval_contexts"] == 1024 // 32
    analysis = json.loads(Path(summary["analysis"]["path"]).read_text())
    assert analysis["projection_shape"] == [128, summary["model"]["d_vocab"]]  # W_dec @ W_U of the checkpoint

    # the stored activations are the checkpoint's own: transformers' hidden state after block 0
    activations, tokens = load_store(summary["activations"])
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        hidden = hf_model(tokens[:32].unsqueeze(0), output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(activations[:32], hidden, atol=1e-4, rtol=1e-4)


def test_a_run_on_a_pretrained_name_trains_and_analyses(prefect_server, hub_cache, tmp_path):
    """A whole run on a pretrained TransformerLens name (the hub cache's `gpt2`): every stage runs,
    the analysis included, which loads the model with its layer norms folded."""
    from sae_lens import SAE

    cfg = tiny_config(model_name="gpt2", model_cfg=None, training_tokens=4096, eval_tokens=1024, sparsity_tokens=4096, n_checkpoints=1, dashboard_features=4)
    state = start(cfg, tmp_path, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert set(task_states(state).values()) == {"Completed"}
    assert summary["model"]["kind"] == "pretrained" and summary["model"]["name"] == "gpt2"
    assert SAE.load_from_disk(summary["sae"]["path"]).cfg.d_in == 32
    analysis = json.loads(Path(summary["analysis"]["path"]).read_text())
    assert analysis["projection_shape"] == [128, summary["model"]["d_vocab"]]  # W_dec @ W_U
    assert len(analysis["prompts"][0]["top_features"]) == 3


def test_the_seed_keys_the_data_only_where_it_makes_the_data_and_earlier_seeded_folders_are_used(prefect_server, checkpoints, story_file, tmp_path):
    """A seed sweep over a checkpoint and a text file shares one token folder and one activation
    store (the seed changes the built-in dataset, not these); folders an earlier saeflow keyed by
    the seed as well are found and used where they are, neither filled again nor moved."""
    from tasks.activations import store_spec
    from tasks.artifacts import read_json, write_json
    from tasks.config import stable_hash
    from tasks.tokens import tokens_spec

    cfg = resolve(checkpoint_config(
        checkpoints["gpt2"], dataset_path=str(story_file), training_tokens=4096, eval_tokens=1024, sparsity_tokens=4096,
        n_checkpoints=1, dashboard_features=4, seed=1,
    ))
    model_ref = build_model(model_spec(cfg), str(tmp_path))
    other_seed = cfg.model_copy(update={"seed": 2})
    assert store_spec(cfg, model_ref) == store_spec(other_seed, model_ref) and tokens_spec(cfg, model_ref) == tokens_spec(other_seed, model_ref)
    demo = cfg.model_copy(update={"dataset_path": "demo:stories"})
    assert store_spec(demo, model_ref)["seed"] == 1 and tokens_spec(demo.model_copy(update={"seed": 2}), model_ref)["seed"] == 2

    first = start(cfg, tmp_path, return_state=True).result()
    # As an earlier saeflow left them: keyed by the seed too, and the seed in their spec.
    legacy = {}
    for kind, spec in (("activations", store_spec(cfg, model_ref)), ("tokens", tokens_spec(cfg, model_ref))):
        folder = Path(first[kind]["path"])
        manifest = read_json(folder / "manifest.json")
        write_json(folder / "manifest.json", {**manifest, "spec": {**manifest["spec"], "seed": 1}})
        legacy[kind] = folder.rename(folder.with_name(stable_hash({**spec, "seed": 1}, 16)))
    def written() -> dict:  # shards, held-out tokens and manifest (not the lock file, which names its holder)
        return {p: p.stat().st_mtime_ns for p in legacy["activations"].iterdir() if not p.name.startswith(".")}

    before = written()

    second = start(other_seed, tmp_path, return_state=True)
    assert second.is_completed()
    for kind in ("activations", "tokens"):
        assert Path(second.result()[kind]["path"]) == legacy[kind]
        assert [p for p in (tmp_path / kind).iterdir() if p.is_dir()] == [legacy[kind]]
    assert written() == before and len(before) == 3
    assert second.result()["sae"]["path"] != first["sae"]["path"]


def test_of_several_earlier_seeded_folders_a_complete_one_is_used_and_no_write_s_leftover(tmp_path):
    """A seed sweep of an earlier saeflow left a store per seed, one half filled, and a killed
    write may have left a temporary folder: the complete store is used."""
    from tasks.artifacts import keyed_folder, write_json
    from tasks.config import stable_hash

    spec = {"dataset_path": "data.jsonl", "n_tokens": 4096}

    def earlier(name: str, seed: int, **manifest) -> Path:
        write_json(tmp_path / name / "manifest.json", {"spec": {**spec, "seed": seed}, **manifest})
        return tmp_path / name

    earlier(".tmp-0000-0123abcd", 1)
    half = earlier("1111", 1, complete=False)
    assert keyed_folder(tmp_path, spec) == half
    whole = earlier("2222", 2, complete=True)
    earlier("3333", 3, complete=True)
    assert keyed_folder(tmp_path, spec) == whole
    assert keyed_folder(tmp_path, {**spec, "n_tokens": 8192}).parent == tmp_path and not keyed_folder(tmp_path, {**spec, "n_tokens": 8192}).exists()
    # the built-in dataset keeps its seed: only a folder of that seed counts
    assert keyed_folder(tmp_path, {**spec, "seed": 2}) == whole
    assert keyed_folder(tmp_path, {**spec, "seed": 4}) == tmp_path / stable_hash({**spec, "seed": 4}, 16)


def test_a_store_is_found_from_every_gpu_of_its_kind_also_under_an_earlier_key_with_the_index(tmp_path):
    """A job requeued from cuda:3 onto cuda:0, or sweep members on several GPUs, use one store; an
    earlier saeflow keyed it by the device string, and that folder is found where it is."""
    from tasks.artifacts import keyed_folder, same_contents, write_json
    from tasks.config import stable_hash

    spec = {"dataset_path": "data.jsonl", "n_tokens": 4096, "device": "cuda:3"}
    on = {device: {**spec, "device": device} for device in ("cuda", "cuda:0", "cpu")}
    assert keyed_folder(tmp_path, spec) == keyed_folder(tmp_path, on["cuda:0"]) == keyed_folder(tmp_path, on["cuda"])
    assert keyed_folder(tmp_path, on["cpu"]) != keyed_folder(tmp_path, spec)
    assert same_contents(spec, on["cuda:0"]) and not same_contents(spec, on["cpu"])
    earlier = tmp_path / stable_hash(spec, 16)
    write_json(earlier / "manifest.json", {"spec": spec, "complete": False})
    assert keyed_folder(tmp_path, on["cuda:0"]) == keyed_folder(tmp_path, spec) == earlier
    assert keyed_folder(tmp_path, on["cpu"]) == tmp_path / stable_hash(on["cpu"], 16)


def test_a_store_of_a_local_model_is_found_after_its_artifacts_folder_moved(tmp_path):
    """A local model lies in the artifacts folder, whose path was in the store's key: a copied or
    moved artifacts folder filled its store again (a whole model pass) beside the one it held."""
    from tasks.artifacts import keyed_folder, write_json
    from tasks.config import stable_hash

    def spec(artifacts: str, kind: str = "local") -> dict:
        return {"model": {"kind": kind, "name": "tiny", "path": f"{artifacts}/models/tiny-0123abcd"}, "n_tokens": 4096, "device": "cpu"}

    assert keyed_folder(tmp_path, spec("/a/art")) == keyed_folder(tmp_path, spec("/b/copy"))
    assert keyed_folder(tmp_path, spec("/a/art", "checkpoint")) != keyed_folder(tmp_path, spec("/b/copy", "checkpoint"))  # the user's own folder
    earlier = tmp_path / stable_hash(spec("/a/art"), 16)  # as an earlier saeflow keyed it, path and all
    write_json(earlier / "manifest.json", {"spec": spec("/a/art"), "complete": True})
    assert keyed_folder(tmp_path, spec("/b/copy")) == earlier


def test_a_json_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    import errno

    import tasks.artifacts
    from tasks.artifacts import read_json, write_json

    path = tmp_path / "manifest.json"
    write_json(path, {"shards": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tasks.artifacts.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        write_json(path, {"shards": 2})
    assert read_json(path) == {"shards": 1} and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_an_unreadable_last_checkpoint_note_is_no_traceback(tmp_path):
    """The note a crash of the machine zeroed, beside checkpoints the next run set aside as broken."""
    from tasks.checkpoint import LAST_CHECKPOINT_FILE, missing_checkpoints

    run = tmp_path / "runs" / "r"
    (run / "checkpoints" / "broken-step-000000010-1a2b3c4d").mkdir(parents=True)
    (run / LAST_CHECKPOINT_FILE).write_bytes(bytes(32))
    assert missing_checkpoints(None, run) is None  # its folder is there: training starts again, with a warning
    message = missing_checkpoints(str(tmp_path / "elsewhere"), run)
    assert message.startswith(f"run 'r' wrote checkpoints (the last: unknown, {run / LAST_CHECKPOINT_FILE} is unreadable), but its checkpoint folder {tmp_path / 'elsewhere' / 'r'} does not exist now")
