"""Bad input gets one clear message before any model is loaded; runs are never overwritten."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, tiny_config
from flows.cli import EXIT_BAD_INPUT, main
from tasks.config import ConfigError, make_config
from tasks.preflight import claim_run, default_run_name, resolve


def resolve_error(**overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve(tiny_config(**overrides))
    return str(error.value)


def test_resolve_reads_d_in_from_the_hook():
    assert resolve(tiny_config()).d_in == 32
    assert resolve(tiny_config(hook_name="blocks.1.mlp.hook_post")).d_in == 128
    assert resolve(tiny_config(hook_name="blocks.0.attn.hook_z")).d_in == 32
    assert resolve(tiny_config(hook_name="blocks.0.attn.hook_z", hook_head_index=2)).d_in == 8
    assert resolve(tiny_config()).is_dataset_tokenized is False


def test_resolving_a_config_leaves_the_global_random_generators_alone():
    """TransformerLens's config seeds Python's, numpy's and torch's generators when given a seed:
    every command drew the same numbers after it, Prefect's temporary server's port among them."""
    import random

    import numpy as np
    import torch

    before = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    resolve(tiny_config())
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all() and torch.equal(torch.random.get_rng_state(), before[2])


def test_commands_started_together_give_their_temporary_servers_different_ports():
    """Prefect draws the port from 8000-8999 with the global generator, alike in processes seeded
    alike; the kernel's choice of a free port tells them apart. With a server of one's own
    (PREFECT_API_URL) no temporary server starts."""
    import os
    import subprocess
    import sys

    code = (
        "import random; random.seed(42)\n"
        "from flows.cli import temporary_server_port\n"
        "temporary_server_port()\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "print(SubprocessASGIServer().port)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    root = Path(__file__).resolve().parent.parent
    commands = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    ports = [int(c.communicate(timeout=120)[0]) for c in commands]
    assert ports[0] != ports[1] and all(1024 <= p < 65536 for p in ports)
    own = subprocess.run([sys.executable, "-c", code], env=env | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, cwd=root, capture_output=True, text=True, timeout=120)
    assert own.stdout.strip() == "None"


def test_unknown_hook_lists_the_valid_ones():
    message = resolve_error(hook_name="blocks.0.hook_resid_postt")
    assert "unknown hook_name 'blocks.0.hook_resid_postt'" in message
    assert "N in 0..1" in message and "hook_resid_post" in message and "hook_embed" in message


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_hooks_without_one_activation_per_token_are_refused(hook):
    message = resolve_error(hook_name=hook)
    assert f"hook_name '{hook}' has no activation per token" in message
    assert "hook_z" in message and "hook_pattern" not in message.split("valid hooks")[1] and "hook_attn_scores" not in message.split("valid hooks")[1]


def test_a_hook_of_one_number_per_token_is_refused():
    """A LayerNorm's scale is [batch, pos, 1]: an SAE on it would be 1 wide."""
    message = resolve_error(hook_name="blocks.0.ln1.hook_scale")
    assert "hook_name 'blocks.0.ln1.hook_scale' holds one number per token (a norm's scale): nothing for an SAE to decompose" in message
    assert "hook_resid_post" in message.split("valid hooks")[1] and "hook_scale" not in message.split("valid hooks")[1]


def test_a_hook_the_model_does_not_compute_is_refused():
    message = resolve_error(hook_name="blocks.0.hook_mlp_in")
    assert "hook_name 'blocks.0.hook_mlp_in' is not computed by tiny-test as configured: add use_hook_mlp_in: true to model_cfg; valid hooks" in message
    assert resolve(tiny_config(hook_name="blocks.0.hook_mlp_in", model_cfg={**TINY_MODEL, "use_hook_mlp_in": True})).d_in == 32
    # a head dimension: SAELens's evaluation splices into hook_q/k/v/z only, whole or one head;
    # said first when the hook is not computed either (turning it on would not help)
    head_dimension = "blocks.0.attn.hook_result has a head dimension, and SAELens's evaluation splices an SAE into such a hook only for hook_q"
    assert head_dimension in resolve_error(hook_name="blocks.0.attn.hook_result")
    computed = {**TINY_MODEL, "use_attn_result": True}
    for head in (None, 1):
        assert head_dimension in resolve_error(hook_name="blocks.0.attn.hook_result", model_cfg=computed, hook_head_index=head)
    assert resolve(tiny_config(hook_name="blocks.0.attn.hook_z")).d_in == 32
    assert resolve(tiny_config(hook_name="blocks.0.attn.hook_z", hook_head_index=1)).d_in == 8


def test_stated_d_in_must_match_the_hook():
    assert "d_in is 64 but blocks.0.hook_resid_post of tiny-test has width 32" in resolve_error(d_in=64)


def test_head_index_out_of_range():
    assert "has 4 heads; use 0 to 3, or leave it out for all heads" in resolve_error(hook_name="blocks.0.attn.hook_z", hook_head_index=7)


def test_context_larger_than_n_ctx():
    with pytest.raises(ConfigError, match=r"context_size \(128\) is larger than the model's n_ctx \(64\)"):
        tiny_config(context_size=128, n_batches_in_buffer=64)


def test_missing_dataset_column(tmp_path: Path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"story {i}"}) for i in range(5)))
    message = resolve_error(dataset_path=str(data))
    assert "has columns ['body'], but needs a 'text' column" in message


def test_an_empty_text_file_is_a_config_error(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    message = resolve_error(dataset_path=str(tmp_path / "empty.txt"))
    assert f"cannot use dataset '{tmp_path / 'empty.txt'}': the datasets library could not read its files" in message
    assert "an empty file has no rows" in message


def test_tokenized_flag_must_match_the_data():
    assert "is_dataset_tokenized is True, but dataset demo:stories holds raw text" in resolve_error(is_dataset_tokenized=True)


def test_model_training_needs_text(tmp_path: Path):
    from tasks.model import train_word_tokenizer

    train_word_tokenizer(["Tom saw a cat ."], tmp_path / "tokenizer")
    data = tmp_path / "tokens.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": [1, 5, 6, 7, 8]}) for _ in range(5)))
    message = resolve_error(dataset_path=str(data), tokenizer_path=str(tmp_path / "tokenizer"), model_train_tokens=1000)
    assert f"model_train_tokens trains the model on text, but dataset {data} holds token ids" in message


def test_unknown_pretrained_model_offline_is_explained():
    message = resolve_error(model_cfg=None, model_name="opt-125m")  # a TransformerLens name, not in the (empty) offline cache
    assert "cannot read the architecture of model 'opt-125m'" in message and ".." not in message


def test_a_misspelt_model_name_gets_the_nearest_names():
    message = resolve_error(model_cfg=None, model_name="gpt2-smal")
    assert message.startswith("model_name 'gpt2-smal' is neither a TransformerLens model name nor an existing folder; did you mean 'gpt2-small'")
    assert len(message) < 400


def test_a_missing_tokenizer_path_is_named(tmp_path: Path):
    message = resolve_error(tokenizer_path=str(tmp_path / "nope"))
    assert message.startswith(f"tokenizer_path {tmp_path / 'nope'} does not exist") and "leave tokenizer_path out" in message
    assert f"tokenizer_path {tmp_path} holds no tokenizer" in resolve_error(tokenizer_path=str(tmp_path))



def test_a_hub_dataset_out_of_reach_is_told_how_to_get_it_and_that_no_such_local_folder_exists():
    from tasks.preflight import _unreachable_hub_hint

    hint = _unreachable_hub_hint("data/missing", ConnectionError("Couldn't reach 'data/missing' on the Hub"))
    assert "load it once where the hub is reachable" in hint and f"There is no local file or folder {Path('data/missing').resolve()} either." in hint
    assert "HF_HUB_OFFLINE=1 makes this answer come at once" in hint
    assert _unreachable_hub_hint("data/missing", ValueError("other")) == ""


def test_an_sae_too_big_for_its_device_s_memory_is_refused_before_any_work(monkeypatch):
    import tasks.preflight

    assert tasks.preflight.device_memory("cpu") > 2**30  # this machine's RAM, or its container's limit
    monkeypatch.setattr(tasks.preflight, "device_memory", lambda device: 16 * 10**9)
    message = resolve_error(expansion_factor=100_000, train_batch_size_tokens=4096)  # d_in 32: d_sae 3.2M
    assert message == (
        "the SAE (d_in 32, d_sae 3200000) needs at least 108.1 GB to train (weights, gradients and Adam's moments 3.3 GB; "
        "two [train_batch_size_tokens, d_sae] activations 104.9 GB), more than the 16.0 GB of cpu; lower d_sae or "
        "expansion_factor, or train_batch_size_tokens"
    )
    assert resolve(tiny_config(expansion_factor=1000, train_batch_size_tokens=4096)).sae_width == 32_000  # 1.1 GB: trains


def test_a_local_model_named_as_a_pretrained_one_is_refused_to_new_runs(tmp_path: Path, monkeypatch):
    from tasks.preflight import check_new_run

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    for name in ("gpt2", "GPT2-small", str(tmp_path / "ckpt"), "./anything"):
        with pytest.raises(ConfigError, match=rf"model_name '{re.escape(name)}' names a pretrained model or a checkpoint folder, but model_cfg builds"):
            check_new_run(tiny_config(model_name=name))
    with pytest.raises(ConfigError, match=r"^the default model_name 'gelu-1l' names a pretrained model .* give the local model a model_name of its own$"):
        check_new_run(tiny_config(model_name="gelu-1l"))  # a model_cfg config that names no model
    check_new_run(tiny_config(model_name="tiny-gpt2-like", prompts=["Tom saw a cat .", " "]))  # a space is a prompt (a GPT-2 token)
    with pytest.raises(ConfigError, match=r"^prompts holds an empty prompt \(\['Tom saw a cat .', ''\]\), which has nothing to analyse; remove it$"):
        check_new_run(tiny_config(model_name="tiny-gpt2-like", prompts=["Tom saw a cat .", ""]))
    monkeypatch.chdir(tmp_path)
    check_new_run(tiny_config(model_name="ckpt-notes"))
    (tmp_path / "ckpt-notes").mkdir()
    check_new_run(tiny_config(model_name="ckpt-notes"))  # a folder here that is no checkpoint: a label that happens to exist
    with pytest.raises(ConfigError, match="names a pretrained model or a checkpoint folder"):
        check_new_run(tiny_config(model_name="ckpt"))  # one that is


def test_model_from_pretrained_kwargs_a_model_would_ignore_are_refused_to_new_runs(tmp_path: Path):
    from tasks.preflight import check_new_run

    with pytest.raises(ConfigError, match=r"model_from_pretrained_kwargs \(dtype\) do nothing to a model_cfg model, .* set such fields \(dtype, n_ctx, ...\) in model_cfg"):
        check_new_run(tiny_config(model_from_pretrained_kwargs={"dtype": "bfloat16"}))
    checkpoint = tiny_config(model_cfg=None, model_name=str(tmp_path), model_from_pretrained_kwargs={"dtyp": "bfloat16", "dtype": "float32", "fold_ln": True})
    with pytest.raises(ConfigError, match=rf"model_from_pretrained_kwargs dtyp, fold_ln would do nothing to the local checkpoint {re.escape(str(tmp_path))}, which is loaded as saved, with only n_devices, dtype, "):
        check_new_run(checkpoint)
    check_new_run(checkpoint.model_copy(update={"model_from_pretrained_kwargs": {"dtype": "float32", "n_ctx": 32}}))


def test_a_tokenizer_path_that_a_pretrained_model_ignores_is_refused_to_new_runs_only(tmp_path: Path):
    from tasks.preflight import check_new_run, check_new_run_named

    cfg = tiny_config(model_cfg=None, model_name="gpt2", tokenizer_path=str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        check_new_run(cfg)
    assert str(refused.value) == (
        "tokenizer_path is for a model_cfg model or a local checkpoint saved without its tokenizer; the pretrained model "
        "'gpt2' uses its own tokenizer, and would ignore it: leave tokenizer_path out"
    )
    with pytest.raises(ConfigError, match="leave tokenizer_path out"):
        check_new_run_named(cfg, tmp_path, "started")
    (tmp_path / "runs" / "started").mkdir(parents=True)
    (tmp_path / "runs" / "started" / "config.json").write_text("{}")
    check_new_run_named(cfg, tmp_path, "started")  # started by an earlier saeflow, which accepted it: it continues


def test_sae_lens_rejections_come_before_any_work():
    message = resolve_error(architecture="matryoshka", k=4, matryoshka_widths=[64, 16])
    assert "SAELens rejects the matryoshka_batchtopk SAE settings" in message and "strictly increasing" in message


@pytest.mark.parametrize(("architecture", "extra"), [("topk", {}), ("batchtopk", {}), ("matryoshka", {"matryoshka_widths": [32]})])
def test_k_above_d_sae_is_refused(architecture, extra):
    assert resolve(tiny_config(architecture=architecture, k=128, **extra)).sae_width == 128  # d_in 32 * 4
    message = resolve_error(architecture=architecture, k=129, **extra)
    assert "k (129) is larger than the SAE's width (d_sae = 128)" in message and "lower k" in message


def test_matryoshka_width_above_d_sae_is_named():
    message = resolve_error(architecture="matryoshka", k=4, matryoshka_widths=[64, 256])
    assert "matryoshka_widths [256] exceed the SAE's width (d_sae = 128)" in message
    assert "strictly increasing" not in message


def test_device_is_checked_against_this_machine():
    import torch

    assert "device 'cdua' is not a device saeflow can use" in resolve_error(device="cdua")
    message = resolve_error(device="cuda:99")
    assert message.startswith("device is 'cuda:99', but") and ": cpu" in message  # what is available instead
    if not torch.cuda.is_available():
        assert "use device: cpu" in resolve_error(device="cuda")
    if not torch.backends.mps.is_available():
        assert "MPS (Apple GPU) is not available here" in resolve_error(device="mps")
    assert "is not a device saeflow can use" in resolve_error(activations_path=None, synthetic={"num_features": 8}, model_cfg=None, d_in=8, dataset_path="demo:stories", device="meta")
    # A sweep member that a Dask cluster runs on its own machines: only the name is checked here.
    assert resolve(tiny_config(device="cuda:99"), runs_here=False).device == "cuda:99"
    with pytest.raises(ConfigError, match="is not a device saeflow can use"):
        resolve(tiny_config(device="cdua"), runs_here=False)


def test_learning_rate_schedules_are_checked_before_any_work():
    # tiny_config: 32,768 tokens in batches of 512 = 64 steps
    message = resolve_error(lr_scheduler_name="cosineannealing", lr_end=0, lr_decay_steps=5)
    assert "SAELens rejects the learning-rate schedule: Cannot have decay_steps with lr_end=0.0" in message and "set lr_end above 0" in message
    message = resolve_error(lr_scheduler_name="cosineannealing", lr_warm_up_steps=64)
    assert "lr_warm_up_steps (64) takes all 64 training steps" in message
    message = resolve_error(lr_scheduler_name="cosineannealingwarmrestarts", lr_warm_up_steps=40, lr_decay_steps=24)
    assert "Expected positive integer T_0" in message and "must leave at least n_restart_cycles of the run's 64 steps" in message
    # schedules SAELens builds and steps through are accepted
    assert resolve(tiny_config(lr_warm_up_steps=40, lr_decay_steps=24)).lr_decay_steps == 24


def test_a_new_run_whose_warm_ups_outlast_it_is_refused_and_an_earlier_one_continues(tmp_path, monkeypatch):
    """SAELens accepts warm-ups and decays longer than the run, whose setting is then never reached
    (a warm-up given in tokens, say). New runs are refused; a run an earlier saeflow started so
    continues."""
    import tasks.preflight

    def claim_error(**overrides) -> str:
        with pytest.raises(ConfigError) as error:
            claim_run(resolve(tiny_config(**overrides)), tmp_path, None, new=False)
        return str(error.value)

    message = claim_error(lr_warm_up_steps=40, lr_decay_steps=30)
    assert "lr_warm_up_steps (40) + lr_decay_steps (30) exceed the run's 64 training steps" in message and "count steps, not tokens" in message
    assert "never reach lr;" in claim_error(lr_warm_up_steps=100_000)
    assert "l1_warm_up_steps (65) exceeds the run's 64 training steps" in claim_error(l1_warm_up_steps=65)
    assert "the L0 penalty would never reach l0_coefficient" in claim_error(architecture="jumprelu", l0_warm_up_steps=65)
    assert not list(tmp_path.glob("runs/*"))
    cfg = resolve(tiny_config(l1_warm_up_steps=65))
    with monkeypatch.context() as earlier_saeflow:
        earlier_saeflow.setattr(tasks.preflight, "check_new_run", lambda cfg: None)
        name = claim_run(cfg, tmp_path, None, new=False)
    assert claim_run(cfg, tmp_path, None, new=False) == name
    assert claim_run(resolve(tiny_config(l1_warm_up_steps=64)), tmp_path, None, new=False) != name
    assert resolve(tiny_config(lr_scheduler_name="cosineannealing", lr_warm_up_steps=40, lr_decay_steps=24)).lr_decay_steps == 24
    assert resolve(tiny_config(lr_scheduler_name="cosineannealingwarmrestarts", lr_warm_up_steps=40, lr_decay_steps=23)).lr_warm_up_steps == 40


def test_compile_sae_without_a_cpp_compiler_is_refused():
    import torch._inductor.config

    assert resolve(tiny_config(compile_sae=True)).compile_sae
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-compiler++")}):  # monkeypatch's undo deletes the setting
        message = resolve_error(compile_sae=True)
    assert resolve(tiny_config(compile_sae=True)).compile_sae
    assert "compile_sae: true on the CPU needs a C++ compiler" in message and "set compile_sae: false" in message


def test_unwritable_artifacts_dir(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"artifacts directory {blocker / 'artifacts'} cannot be a folder: {blocker} is a file; choose another with --artifacts-dir"):
        claim_run(resolve(tiny_config()), blocker / "artifacts", None, new=False)
    with pytest.raises(ConfigError, match=f"artifacts directory {blocker} cannot be a folder: {blocker} is a file"):
        claim_run(resolve(tiny_config()), blocker, None, new=False)


@pytest.mark.parametrize("shared_checkpoints", [False, True], ids=["one-artifacts-folder", "folders-sharing-checkpoint_path"])
def test_new_runs_started_at_once_get_names_of_their_own(tmp_path: Path, monkeypatch, shared_checkpoints):
    import threading

    import tasks.preflight

    where = {"checkpoint_path": str(tmp_path / "shared")} if shared_checkpoints else {}
    configs = [resolve(tiny_config(lr=lr, **where)) for lr in (1e-4, 2e-4, 3e-4, 4e-4)]
    folders = {c.lr: tmp_path / (f"artifacts-{i}" if shared_checkpoints else "artifacts") for i, c in enumerate(configs)}
    base = default_run_name(configs[0])
    ready = threading.Barrier(len(configs))
    real_check = tasks.preflight.check_new_run

    def check_then_wait(cfg):  # all four look for a free name at the same moment
        real_check(cfg)
        ready.wait(timeout=30)

    monkeypatch.setattr(tasks.preflight, "check_new_run", check_then_wait)
    names: dict[float, str] = {}
    threads = [threading.Thread(target=lambda c=c: names.__setitem__(c.lr, claim_run(c, folders[c.lr], base, new=True))) for c in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names.values()) == sorted([base, f"{base}-2", f"{base}-3", f"{base}-4"])
    for lr, name in names.items():
        assert json.loads((folders[lr] / "runs" / name / "config.json").read_text())["config"]["lr"] == lr


def test_an_unwritable_checkpoint_path_is_refused_and_a_failed_new_claim_leaves_no_folder(tmp_path: Path, monkeypatch):
    import tasks.preflight

    (tmp_path / "a-file").write_text("")
    cfg = resolve(tiny_config(checkpoint_path=str(tmp_path / "a-file" / "checkpoints")))
    for new in (False, True):
        with pytest.raises(ConfigError, match=r"checkpoint_path .*a-file/checkpoints cannot be a folder: .*a-file is a file; choose another"):
            claim_run(cfg, tmp_path / "artifacts", None, new=new)
    assert not (tmp_path / "artifacts" / "runs").exists() or not any((tmp_path / "artifacts" / "runs").iterdir())

    def disk_full(path, value):
        raise OSError(28, "No space left on device")

    beside = resolve(tiny_config(checkpoint_path=str(tmp_path / "artifacts" / "runs")))  # checkpoints in the run folders
    assert claim_run(beside, tmp_path / "artifacts", "beside", new=True) == "beside"
    assert claim_run(beside, tmp_path / "artifacts", "beside", new=True) == "beside-2"
    shutil.rmtree(tmp_path / "artifacts" / "runs")

    cfg = resolve(tiny_config(checkpoint_path=str(tmp_path / "shared")))
    monkeypatch.setattr(tasks.preflight, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        claim_run(cfg, tmp_path / "artifacts", None, new=True)
    assert not list((tmp_path / "artifacts" / "runs").iterdir()) and not list((tmp_path / "shared").iterdir())  # the name is free again


def test_run_names_are_stable_and_new_never_overwrites(tmp_path: Path):
    cfg = resolve(tiny_config())
    name = claim_run(cfg, tmp_path, None, new=False)
    assert name == default_run_name(cfg) == claim_run(resolve(tiny_config()), tmp_path, None, new=False)
    assert name != default_run_name(resolve(tiny_config(lr=1e-3)))
    stored = tmp_path / "runs" / name / "config.json"
    before = stored.read_text()
    assert claim_run(cfg, tmp_path, None, new=True) == f"{name}-2"
    assert claim_run(cfg, tmp_path, None, new=True) == f"{name}-3"
    assert stored.read_text() == before


def test_continuing_a_run_with_a_result_changing_config_is_refused(tmp_path: Path):
    claim_run(resolve(tiny_config()), tmp_path, "mine", new=False)
    with pytest.raises(ConfigError) as error:
        claim_run(resolve(tiny_config(lr=1e-3, seed=7)), tmp_path, "mine", new=False)
    message = str(error.value)
    assert "lr: 0.0003 -> 0.001" in message and "seed: 42 -> 7" in message and "--new" in message
    # logging and checkpoint settings may change
    claim_run(resolve(tiny_config(n_checkpoints=2, prompts=["other"])), tmp_path, "mine", new=False)


def test_moving_checkpoint_path_away_from_an_unfinished_run_s_checkpoints_is_refused(tmp_path: Path, monkeypatch):
    from tasks.artifacts import write_manifest

    monkeypatch.chdir(tmp_path)
    cfg = resolve(tiny_config())
    run = tmp_path / "runs" / claim_run(cfg, tmp_path, "exp", new=False)
    (run / "checkpoints" / "step-000000013").mkdir(parents=True)
    (run / "last_checkpoint.json").write_text(json.dumps({"path": str(run / "checkpoints" / "step-000000013"), "step": 13}))
    moved = resolve(tiny_config(checkpoint_path="scratch"))
    assert moved.checkpoint_path == str(tmp_path / "scratch")  # not wherever a later run starts
    with pytest.raises(ConfigError) as error:
        claim_run(moved, tmp_path, "exp", new=False)
    assert str(error.value) == (
        f"checkpoint_path changed from None to '{tmp_path / 'scratch'}', but run 'exp' has its checkpoints in "
        f"{run / 'checkpoints'}, which training would not find (it would start again from step 0). Move them "
        f"into {tmp_path / 'scratch' / 'exp'}, or set checkpoint_path back to None"
    )
    (tmp_path / "scratch" / "exp-2").mkdir(parents=True)
    assert claim_run(moved, tmp_path, "exp", new=True) == "exp-3"  # a name free in both folders
    (run / "trained").mkdir()
    (run / "trained" / "sae_weights.safetensors").write_bytes(b"weights")
    write_manifest(run / "trained", {})
    assert claim_run(moved, tmp_path, "exp", new=False) == "exp"  # a finished run needs no checkpoint
    (run / "trained" / "sae_weights.safetensors").write_bytes(bytes(7))  # zeroed by a crash: training would run again
    for stored in (True, False):  # also once its config.json is deleted (as a garbled one's message says)
        with pytest.raises(ConfigError, match=rf"run 'exp' has its checkpoints in {run / 'checkpoints'}, but training would look for them in {tmp_path / 'scratch' / 'exp'} \(and start again from step 0\): leave checkpoint_path out \(its default is where they are\), or move them"):
            if not stored:
                (run / "config.json").unlink()
            claim_run(moved, tmp_path, "exp", new=False)


def test_a_run_continues_on_another_gpu_of_the_same_kind(tmp_path: Path, monkeypatch):
    """A job requeued from cuda:3 onto a machine whose GPU is cuda:0 continues its run, by its
    default name too; moving it to the CPU changes the result and is refused."""
    cfg = resolve(tiny_config())
    names = {device: default_run_name(cfg.model_copy(update={"device": device})) for device in ("cuda:3", "cuda:0", "cuda", "cpu")}
    assert names["cuda:3"] == names["cuda:0"] == names["cuda"] != names["cpu"] == default_run_name(cfg)
    # A run that an earlier saeflow named after its GPU's number keeps its name in its artifacts folder.
    import tasks.preflight

    on_gpu_3 = cfg.model_copy(update={"device": "cuda:3"})
    with monkeypatch.context() as earlier:
        earlier.setattr(tasks.preflight, "device_kind", lambda device: device)
        numbered = default_run_name(on_gpu_3)
    assert numbered != names["cuda:3"]
    claim_run(on_gpu_3, tmp_path / "earlier", numbered, new=False)
    assert default_run_name(on_gpu_3, tmp_path / "earlier") == claim_run(on_gpu_3, tmp_path / "earlier", None, new=False) == numbered
    assert default_run_name(on_gpu_3, tmp_path) == names["cuda:3"]  # not in another artifacts folder
    on_gpu_0 = cfg.model_copy(update={"device": "cuda:0"})
    assert claim_run(on_gpu_0, tmp_path / "earlier", None, new=False) == names["cuda:0"]  # requeued elsewhere: a run of the new name
    assert default_run_name(on_gpu_3, tmp_path / "earlier") == numbered  # still its own on its GPU
    claim_run(cfg.model_copy(update={"device": "cuda:3"}), tmp_path, "gpu", new=False)
    assert claim_run(cfg.model_copy(update={"device": "cuda:0"}), tmp_path, "gpu", new=False) == "gpu"
    assert claim_run(cfg.model_copy(update={"device": "cuda"}), tmp_path, "gpu", new=False) == "gpu"
    with pytest.raises(ConfigError, match="device: 'cuda' -> 'cpu'"):
        claim_run(cfg, tmp_path, "gpu", new=False)


def test_a_run_started_before_a_field_existed_continues_under_the_same_name(tmp_path: Path):
    import json

    cfg = resolve(tiny_config())
    name = claim_run(cfg, tmp_path, None, new=False)
    stored = tmp_path / "runs" / name / "config.json"
    record = json.loads(stored.read_text())
    for field in ("activation_mode", "model_train_tokens"):  # what an older saeflow did not write
        del record["result_fields"][field]
    stored.write_text(json.dumps(record))
    assert claim_run(cfg, tmp_path, None, new=False) == name
    assert name != default_run_name(resolve(tiny_config(activation_mode="streaming")))
    with pytest.raises(ConfigError, match="activation_mode: 'cached' -> 'streaming'"):
        claim_run(resolve(tiny_config(activation_mode="streaming")), tmp_path, name, new=False)


def tiny_run_yaml(folder: Path) -> Path:
    """`tiny_config()` as a YAML config file in `folder`, for runs through the command line."""
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny_config().model_dump(exclude_unset=True), "model_cfg": TINY_MODEL}))
    return config


def test_cli_reports_bad_input_with_exit_2_before_loading_anything(tmp_path: Path, capsys):
    config = tiny_run_yaml(tmp_path)
    artifacts = tmp_path / "artifacts"
    code = main(["run", str(config), "--artifacts-dir", str(artifacts), "--set", "hook_name=blocks.5.hook_resid_post"])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "saeflow: config error: unknown hook_name 'blocks.5.hook_resid_post'" in err
    assert "Traceback" not in err
    assert not (artifacts / "models").exists() and not (artifacts / "runs").exists()
    assert main(["run", str(config), "--set", "l1_coeficient=2"]) == EXIT_BAD_INPUT
    assert "did you mean 'l1_coefficient'?" in capsys.readouterr().err
    assert main(["run", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"config file {tmp_path} is a directory" in capsys.readouterr().err
    # continuing a run by its name, in the wrong artifacts folder: refused, not given the demo config
    claim_run(resolve(tiny_config()), artifacts, "mine", new=False)
    assert main(["run", "--run-name", "mine", "--artifacts-dir", str(tmp_path / "elsewhere")]) == EXIT_BAD_INPUT
    assert f"no run 'mine' with a stored config in {tmp_path / 'elsewhere' / 'runs'} (runs there: none); give its --artifacts-dir" in capsys.readouterr().err
    assert main(["run", "--run-name", "nosuch", "--artifacts-dir", str(artifacts)]) == EXIT_BAD_INPUT
    assert "(runs there: mine)" in capsys.readouterr().err


def test_a_variant_of_a_stored_run_derives_what_preflight_fills_in_again(tmp_path: Path):
    """`saeflow run --run-name X --new --set hook_name=...`: the stored d_in and hook_layer were
    filled in by preflight for X's hook, and are derived again for the new one."""
    from argparse import Namespace

    from flows.cli import _run_config

    claim_run(resolve(tiny_config()), tmp_path, "mine", new=False)
    args = Namespace(config=None, run_name="mine", artifacts_dir=str(tmp_path), overrides=["hook_name=blocks.1.hook_resid_post"])
    variant = resolve(_run_config(args))
    assert (variant.hook_name, variant.hook_layer, variant.d_in, variant.lr) == ("blocks.1.hook_resid_post", 1, 32, tiny_config().lr)


def test_cli_prints_the_config_reference(capsys):
    assert main(["config-reference"]) == 0
    assert "| `expansion_factor` |" in capsys.readouterr().out


def test_output_to_a_reader_that_went_away_ends_quietly():
    """`saeflow report RUN | head`: the reader closes the pipe; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first write
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "config-reference"], cwd=root, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_cli_turns_a_failed_run_into_a_short_message_and_exit_1(tmp_path: Path, capsys, monkeypatch):
    import flows.pipeline
    from flows.cli import EXIT_FAILED

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(flows.pipeline, "run_pipeline", fail)
    config = tiny_run_yaml(tmp_path)
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "a"), "--run-name", "x"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "saeflow: run 'x' failed: RuntimeError: disk full" in err and "run the same command again" in err
    assert "Traceback" not in err

    # A run started with --new continues by its name: the same command would start another.
    from tasks.stopping import Preempted

    def stop(*args, **kwargs):
        raise Preempted("stopped by SIGTERM after step 3; checkpoint c written")

    monkeypatch.setattr(flows.pipeline, "run_pipeline", stop)
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "a"), "--run-name", "x", "--new"]) == 75
    err = capsys.readouterr().err
    assert f"saeflow: run 'x-2' stopped by SIGTERM after step 3; checkpoint c written. Run `saeflow run --run-name x-2 --artifacts-dir {tmp_path / 'a'}` to continue it." in err

    # A sweep too (Prefect's temporary server gone mid-sweep printed a traceback).
    import flows.sweep

    def server_gone(*args, **kwargs):
        raise ConnectionError("All connection attempts failed")

    monkeypatch.setattr(flows.sweep, "run_sweep", server_gone)
    assert main(["sweep", str(config), "--artifacts-dir", str(tmp_path / "a")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "saeflow: sweep failed: ConnectionError: All connection attempts failed\nFix the cause and run the same command again" in err
    assert "Traceback" not in err


def test_serve_refuses_a_bad_schedule_before_anything_starts(capsys):
    assert main(["serve", "--cron", "0 2 * *"]) == EXIT_BAD_INPUT
    assert "--cron '0 2 * *' is not a cron expression; give five fields" in capsys.readouterr().err
    assert main(["serve", "--interval", "0"]) == EXIT_BAD_INPUT
    assert "--interval is 0; give a number of seconds above 0" in capsys.readouterr().err


def test_serve_refuses_warm_ups_that_outlast_a_new_run_before_anything_starts(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny_config().model_dump(exclude_unset=True), "model_cfg": TINY_MODEL, "lr_warm_up_steps": 65}))
    for new_each_run in ([], ["--new-each-run"]):
        assert main(["serve", str(config), "--interval", "60", "--artifacts-dir", str(tmp_path / "a"), *new_each_run]) == EXIT_BAD_INPUT
        assert "lr_warm_up_steps (65) + lr_decay_steps (0) exceed the run's 64 training steps" in capsys.readouterr().err


def test_serve_names_a_config_s_continued_and_fresh_deployments_apart(tmp_path, monkeypatch):
    """Serving one config nightly (continued) and weekly (--new-each-run) must not make the second
    deployment replace the first."""
    import flows.cli
    import flows.pipeline

    served = []

    class Served:
        def serve(self, **kwargs):
            served.append(kwargs)

    monkeypatch.setattr(flows.pipeline, "pipeline_for", lambda artifacts_dir: Served())
    monkeypatch.setattr(flows.cli, "check_prefect_api", lambda: None)
    values = {**tiny_config().model_dump(exclude_unset=True), "model_cfg": TINY_MODEL}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    for extra in ([], ["--new-each-run"], ["--name", "nightly", "--new-each-run"]):
        assert main(["serve", str(config), "--cron", "0 2 * * *", "--artifacts-dir", str(tmp_path / "a"), *extra]) == 0
    name = default_run_name(resolve(make_config(values)))
    assert [s["name"] for s in served] == [name, f"{name}-new-each-run", "nightly"]
    assert [s["parameters"]["new_each_run"] for s in served] == [False, True, True]
    earlier = f"{name}/x"  # a run an earlier saeflow named with a / (from an external hook name): continued by name
    (tmp_path / "a" / "runs" / earlier).mkdir(parents=True)
    (tmp_path / "a" / "runs" / earlier / "config.json").write_text(json.dumps({"config": values, "result_fields": {}}))
    assert main(["serve", str(config), "--cron", "0 2 * * *", "--artifacts-dir", str(tmp_path / "a"), "--run-name", earlier]) == 0
    assert served[-1]["name"] == f"{name}-x" and served[-1]["parameters"]["run_name"] == earlier  # Prefect's names hold no /
    assert main(["serve", str(config), "--cron", "0 2 * * *", "--artifacts-dir", str(tmp_path / "a"), "--run-name", earlier, "--new-each-run"]) == EXIT_BAD_INPUT


def test_a_run_cancelled_in_prefect_and_stopped_by_a_signal_exits_75_saying_so(tmp_path, monkeypatch, capsys):
    """A `saeflow run` cancelled in the UI has no runner to stop it; a signal then stops it at a
    safe point, and its flow run ends Cancelled (`CancelledRun` here)."""
    from prefect.exceptions import CancelledRun

    import flows.pipeline
    from tasks.stopping import PREEMPTIONS

    def cancelled(*args, **kwargs):
        PREEMPTIONS.append("stopped by SIGTERM after step 3; checkpoint .../step-000000003 written")
        raise CancelledRun("Cancelled: stopped by SIGTERM after step 3")

    monkeypatch.setattr(flows.pipeline, "run_pipeline", cancelled)
    config = tiny_run_yaml(tmp_path)
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "a"), "--run-name", "ui"]) == 75
    err = capsys.readouterr().err
    assert "saeflow: run 'ui' was cancelled in Prefect and stopped by SIGTERM after step 3; checkpoint .../step-000000003 written. Run the same command again" in err


def test_a_run_that_filled_the_disk_is_told_so(tmp_path, monkeypatch, capsys):
    """A write that filled the disk (a log row, a manifest, a safetensors file) named no file."""
    import errno

    import flows.pipeline

    def disk_full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(flows.pipeline, "run_pipeline", disk_full)
    config = tiny_run_yaml(tmp_path)
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "a"), "--run-name", "full"]) == 1
    err = capsys.readouterr().err
    assert f"A disk is full (or your quota on it used up): the artifacts folder's, {tmp_path / 'a'} (" in err and " GB free there now), or that of checkpoint_path" in err
    assert "Free some space. Fix the cause and run the same command again to continue it: finished stages and checkpoints are kept." in err
    def disk_failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(flows.pipeline, "run_pipeline", disk_failing)
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "a"), "--run-name", "full"]) == 1
    assert "A disk is full" not in capsys.readouterr().err

    def over_quota(*args, **kwargs):  # a cluster's quota: the same for the user
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(flows.pipeline, "run_pipeline", over_quota)
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "a"), "--run-name", "full"]) == 1
    assert "A disk is full (or your quota on it used up)" in capsys.readouterr().err


@pytest.fixture
def hub_dataset_cache(tmp_path: Path, monkeypatch) -> list[str]:
    """The datasets cache of an offline compute node that shares it with a machine which once
    loaded the hub dataset `someone/stories` (parquet files, not streamed): `datasets` writes it as
    `someone___stories/default/<version>/<hash>/` holding `stories-train.arrow`. Built here from a
    local parquet file, the same builder, moved to the hub name. Returns its texts."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.data import generate_stories

    texts = generate_stories(400, seed=3)
    pq.write_table(pa.table({"text": texts}), tmp_path / "train.parquet")
    datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train", cache_dir=str(tmp_path / "build"))
    (built,) = [p for p in (tmp_path / "build" / "parquet").glob("*/*/*") if p.is_dir()]
    cached = tmp_path / "cache" / "someone___stories" / "default" / built.parent.name / built.name
    cached.parent.mkdir(parents=True)
    built.rename(cached)
    (cached / "parquet-train.arrow").rename(cached / "stories-train.arrow")
    info = json.loads((cached / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": "stories"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return texts


@pytest.mark.parametrize("streaming", [True, False])
def test_a_hub_dataset_in_the_datasets_cache_is_read_offline(hub_dataset_cache, streaming):
    from tasks.data import load_text_dataset

    cfg = resolve(tiny_config(dataset_path="someone/stories", streaming=streaming))
    assert cfg.d_in == TINY_MODEL["d_model"]
    assert [row["text"] for row in load_text_dataset("someone/stories", streaming=streaming)] == hub_dataset_cache


def test_a_local_dataset_that_is_not_there_is_not_looked_up_on_the_hub(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for written in ("./data", "data/stories.txt", "~/no-such-folder/stories.jsonl"):
        message = resolve_error(dataset_path=written)
        assert message.startswith(f"cannot use dataset '{written}': no such file or folder: "), message
        assert "Hub" not in message and "Repo id" not in message


def test_a_hub_dataset_missing_from_the_cache_offline_says_how_to_get_it():
    message = resolve_error(dataset_path="someone/not-downloaded")
    assert message.startswith("cannot use dataset 'someone/not-downloaded': Couldn't reach 'someone/not-downloaded' on the Hub")
    assert "load_dataset('someone/not-downloaded', split='train')" in message and "save_to_disk" in message


def test_a_run_on_a_cached_hub_dataset_completes_offline(hub_dataset_cache, prefect_server, tmp_path: Path):
    """Every stage that reads the data (preflight, the tokenizer trained for the local model,
    pretokenising, filling) reads the hub dataset from the datasets cache."""
    from datasets import Dataset

    from conftest import start
    from tasks.model import load_tokenizer

    summary = start(tiny_config(dataset_path="someone/stories", training_tokens=8192, eval_tokens=4096, n_checkpoints=0), tmp_path / "artifacts")
    assert summary["training"]["n_training_tokens"] == 8192
    tokenizer = load_tokenizer(Path(summary["model"]["path"]) / "tokenizer")  # trained on the hub dataset
    contexts = Dataset.from_file(str(Path(summary["tokens"]["path"]) / "tokens.arrow"))["tokens"]
    first_story = tokenizer(hub_dataset_cache[0], add_special_tokens=False)["input_ids"]
    assert contexts[0][0] == tokenizer.bos_token_id and contexts[0][1:] == first_story[: len(contexts[0]) - 1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layer": 2}, "model_cfg key 'n_layer' is not a TransformerLens HookedTransformerConfig field; did you mean 'n_layers'?"),
        ({"d_head": None}, "model_cfg needs d_head (HookedTransformerConfig has no default for it)"),
        ({"normalization_type": "LNX"}, "model_cfg is refused by TransformerLens: Invalid normalization_type passed in: LNX"),
    ],
)
def test_a_model_cfg_that_transformer_lens_refuses_is_a_config_error_naming_the_key(change, message):
    model_cfg = {k: v for k, v in {**TINY_MODEL, **change}.items() if v is not None}
    assert message in resolve_error(model_cfg=model_cfg)


def test_a_model_cfg_vocabulary_smaller_than_the_tokenizer_is_refused(prefect_server, tmp_path):
    """With tokenizer_path before any work; with the word-level tokenizer trained on the dataset,
    as soon as it is trained (it was an IndexError in the model's training)."""
    from conftest import start
    from tasks.model import train_word_tokenizer

    train_word_tokenizer(["Tom saw a cat near the big red house ."], tmp_path / "tokenizer")
    message = resolve_error(model_cfg={**TINY_MODEL, "d_vocab": 5}, tokenizer_path=str(tmp_path / "tokenizer"))
    assert "model_cfg sets d_vocab 5, but the tokenizer has 14 tokens; leave d_vocab out" in message
    assert resolve(tiny_config(model_cfg={**TINY_MODEL, "d_vocab": -1}, tokenizer_path=str(tmp_path / "tokenizer"))).d_in == 32  # TransformerLens's "from the tokenizer"
    with pytest.raises(ConfigError, match=r"model_cfg sets d_vocab 20, but the tokenizer has \d+ tokens"):
        start(tiny_config(model_cfg={**TINY_MODEL, "d_vocab": 20}), tmp_path / "artifacts")


def test_a_deployment_run_with_a_bad_config_fails_in_prefect_with_the_reason(prefect_server, tmp_path):
    """A deployment's custom run (parameters from the UI) is not checked by the command line: its
    config failed while Prefect named the flow run, which crashed nameless with no log line."""
    from prefect import get_client

    from flows.pipeline import pipeline_for

    bad = tiny_config().model_dump(mode="json") | {"lr": -1}
    state = pipeline_for(tmp_path)(config=bad, artifacts_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert state.message == "Flow run encountered an exception: ConfigError: lr: Input should be greater than 0"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name == "invalid-config"


def test_a_run_config_record_a_crash_zeroed_is_refused_saying_what_to_do(tmp_path, capsys):
    config = tiny_run_yaml(tmp_path)
    cfg = resolve(tiny_config())
    name = claim_run(cfg, tmp_path, "zeroed", new=False)
    stored = tmp_path / "runs" / name / "config.json"
    stored.write_bytes(bytes(stored.stat().st_size))
    for command in (["run", str(config), "--run-name", "zeroed"], ["run", "--run-name", "zeroed"]):
        assert main([*command, "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"saeflow: config error: {stored} cannot be read (JSONDecodeError: " in err and f"delete it and continue the run with its config file (`saeflow run CONFIG --run-name zeroed --artifacts-dir {tmp_path}`" in err
    stored.unlink()
    assert claim_run(cfg, tmp_path, "zeroed", new=False) == "zeroed"


def test_a_flow_run_that_cannot_be_tagged_goes_on(prefect_server, monkeypatch, caplog):
    """Tags serve the UI's filters: an API error while setting them must not fail a run."""
    import logging

    from prefect import flow
    from prefect.client.orchestration import SyncPrefectClient

    from flows.pipeline import _tag_flow_run

    def unreachable(*args, **kwargs):
        raise ConnectionError("the server is gone")

    monkeypatch.setattr(SyncPrefectClient, "update_flow_run", unreachable)

    @flow
    def tagged():
        _tag_flow_run(resolve(tiny_config()))
        return 1

    with caplog.at_level(logging.WARNING):
        assert tagged() == 1
    assert "Could not tag the flow run (ConnectionError: the server is gone)" in caplog.text
