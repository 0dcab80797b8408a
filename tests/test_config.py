"""Config validation: the guide's names, and one clear message per kind of bad input."""

from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, RunConfig, config_reference, load_config, make_config, read_yaml_mapping

GUIDE_CONFIG = {
    "model_name": "tiny-stories-1M",
    "hook_name": "blocks.0.hook_resid_pre",
    "hook_layer": 0,
    "dataset_path": "roneneldan/TinyStories",
    "is_dataset_tokenized": False,
    "context_size": 64,
    "d_in": 64,
    "expansion_factor": 4,
    "l1_coefficient": 1e-4,
    "lr": 1e-4,
    "lr_scheduler_name": "constant",
    "lr_warm_up_steps": 0,
    "l1_warm_up_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "train_batch_size_tokens": 512,
    "training_tokens": 10_000_000,
    "n_batches_in_buffer": 64,
    "store_batch_size_prompts": 32,
    "log_to_wandb": False,
    "wandb_project": "saelens_training_example",
    "wandb_entity": None,
    "wandb_log_frequency": 100,
    "checkpoint_path": "./sae_training_checkpoints",
    "n_checkpoints": 5,
    "device": "cpu",
    "seed": 42,
    "dtype": "float32",
    "normalize_activations": "none",
}


def test_guide_config_is_accepted_as_written():
    cfg = make_config(GUIDE_CONFIG)
    assert cfg.expansion_factor == 4 and cfg.hook_layer == 0 and cfg.l1_coefficient == 1e-4
    assert cfg.sae_width == 256


def test_saeflow_s_own_defaults_are_accepted():
    # no SAELens mixing buffer: a chunk of n_batches_in_buffer * context_size tokens smaller than a batch is fine
    cfg = make_config({"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post"})
    assert cfg.n_batches_in_buffer * cfg.context_size < cfg.train_batch_size_tokens
    assert make_config({}) == RunConfig()


def test_guide_config_maps_onto_sae_lens_6():
    from sae_lens import StandardTrainingSAEConfig

    from tasks.train import runner_config

    runner = runner_config(make_config(GUIDE_CONFIG))
    assert isinstance(runner.sae, StandardTrainingSAEConfig)
    assert (runner.sae.d_in, runner.sae.d_sae, runner.sae.l1_coefficient) == (64, 256, 1e-4)
    trainer = runner.to_sae_trainer_config()
    assert trainer.total_training_samples == 10_000_000 and trainer.train_batch_size_samples == 512
    assert trainer.lr_end == pytest.approx(1e-5)
    assert runner_config(make_config({**GUIDE_CONFIG, "wandb_entity": "my-team"})).logger.wandb_entity == "my-team"
    assert runner.checkpoint_path is None and runner.output_path is None  # SAELens writes nothing itself


@pytest.mark.parametrize(
    ("architecture", "extra", "config_class", "check"),
    [
        ("topk", {"k": 8}, "TopKTrainingSAEConfig", ("k", 8)),
        ("batchtopk", {"k": 8}, "BatchTopKTrainingSAEConfig", ("k", 8)),
        ("jumprelu", {"l0_coefficient": 2.0}, "JumpReLUTrainingSAEConfig", ("l0_coefficient", 2.0)),
        ("gated", {"l1_coefficient": 3.0}, "GatedTrainingSAEConfig", ("l1_coefficient", 3.0)),
        ("matryoshka", {"k": 8, "matryoshka_widths": [32, 64]}, "MatryoshkaBatchTopKTrainingSAEConfig", ("matryoshka_widths", [32, 64, 256])),
    ],
)
def test_architectures_map_to_their_training_configs(architecture, extra, config_class, check):
    from tasks.train import training_sae_config

    cfg = make_config({**GUIDE_CONFIG, "l1_coefficient": 1.0, "architecture": architecture, **extra})
    sae_cfg = training_sae_config(cfg)
    assert type(sae_cfg).__name__ == config_class
    assert getattr(sae_cfg, check[0]) == check[1]


def test_matryoshka_gets_d_sae_as_its_last_width_without_a_warning():
    """The config promises d_sae as the last width; SAELens adds it too, but with a UserWarning
    that reached the terminal of every matryoshka run."""
    import warnings

    from tasks.train import new_training_sae

    cfg = make_config({**GUIDE_CONFIG, "l1_coefficient": 1.0, "architecture": "matryoshka", "k": 8, "matryoshka_widths": [32, 64], "device": "cpu"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*matryoshka")
        sae, _ = new_training_sae(cfg)
    assert sae.cfg.matryoshka_widths == [32, 64, 256]


def test_sae_kwargs_reach_the_sae_config_and_unknown_ones_are_named():
    from tasks.train import training_sae_config

    cfg = make_config({**GUIDE_CONFIG, "sae_kwargs": {"decoder_init_norm": 0.5}})
    assert training_sae_config(cfg).decoder_init_norm == 0.5
    with pytest.raises(ValueError, match="not_a_field"):
        training_sae_config(make_config({**GUIDE_CONFIG, "sae_kwargs": {"not_a_field": 1}}))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hook_layer": 3}, "hook_layer is 3 but hook_name 'blocks.0.hook_resid_pre' is in layer 0"),
        ({"expansion_factr": 4}, "unknown config key 'expansion_factr'; did you mean 'expansion_factor'?"),
        ({"run_name": "x"}, "unknown config key 'run_name'; name the run on the command line (--run-name NAME)"),
        ({"base": "demo.yaml", "grid": {"lr": [0.001]}}, "unknown config key 'base'; it is a sweep file's key: run a sweep file with `saeflow sweep FILE`"),
        ({"use_cached_activations": True}, "set activations_path to their folder"),
        ({"apply_b_dec_to_input": False}, "it is a SAELens SAE setting: give it under sae_kwargs (sae_kwargs: {apply_b_dec_to_input: ...})"),
        ({"b_dec_init_method": "mean"}, "it is a setting of SAELens before version 6, which has none by that name"),
        ({"llm_compilation_mode": "x"}, "a setting of SAELens's runner that saeflow does not take"),
        ({"context_size": 0}, "context_size: Input should be greater than 0"),
        ({"train_batch_size_tokens": -5}, "train_batch_size_tokens: Input should be greater than 0"),
        ({"training_tokens": 100}, "training_tokens (100) is smaller than one batch"),
        ({"k": 10}, "k is used only by the topk and batchtopk and matryoshka_batchtopk"),
        ({"architecture": "topk", "l1_coefficient": 5}, "not by 'topk'; remove it (or set it to its default, 1.0) or change architecture"),
        ({"architecture": "sparse"}, "architecture: Input should be"),
        ({"architecture": "TopK"}, "architecture: Input should be 'standard', 'topk', 'batchtopk', 'jumprelu', 'gated' or 'matryoshka_batchtopk' (given 'TopK'); did you mean 'topk'?"),
        ({"lr_scheduler_name": "cosine_warmup"}, "(given 'cosine_warmup'); SAELens 6 sets warm-up and decay apart: use cosineannealing (or constant) with lr_warm_up_steps"),
        ({"d_in": 0}, "d_in must be positive"),
        ({"dtype": "float16"}, "dtype float16 cannot train an SAE: Adam's epsilon (1e-8) is 0 in float16"),
        ({"model_train_tokens": 1000}, "model_train_tokens trains a locally built model, but model_cfg is not set"),
        ({"model_train_lr": 0}, "model_train_lr: Input should be greater than 0"),
        ({"training_tokens": "2,000,000"}, "training_tokens: Input should be a valid integer, unable to parse string as an integer (given '2,000,000'; write a whole number, e.g. 1000000 or 1_000_000)"),
        ({"training_tokens": "2.5e0"}, "(given '2.5e0'; write a whole number"),
        ({"wandb_project": False}, "wandb_project: Input should be a valid string (given False; YAML reads yes/no/on/off/true/false as booleans"),
        ({"prompts": "Tom saw a cat ."}, "prompts: Input should be a valid list (given 'Tom saw a cat .'; give a list"),
    ],
)
def test_bad_values_get_one_clear_message(values, message):
    with pytest.raises(ConfigError) as error:
        make_config({**GUIDE_CONFIG, **values})
    assert message in str(error.value)


def test_overrides_are_parsed_as_yaml_values(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(GUIDE_CONFIG))
    cfg = load_config(path, ["lr=0.001", "prompts=[a, b]", "log_to_wandb=true"])
    assert cfg.lr == 0.001 and cfg.prompts == ["a", "b"] and cfg.log_to_wandb is True
    # YAML reads 1e6 (no dot) as text: a whole number in scientific notation is that number, as 1e-4 is for lr
    cfg = load_config(path, ["training_tokens=3e6", "lr=1e-4", "n_checkpoints=1E1"])
    assert (cfg.training_tokens, cfg.lr, cfg.n_checkpoints) == (3_000_000, 1e-4, 10) and type(cfg.training_tokens) is int
    assert cfg.result_fields() == load_config(path, ["training_tokens=3000000", "lr=0.0001", "n_checkpoints=10"]).result_fields()
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(path, ["lr"])


def test_missing_or_malformed_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory; give the path of a YAML file"):
        load_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("lr: 0.001\nmodel_cfg:\n  n_layers: 2\nlr: 0.01\n")  # YAML keeps the last silently
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML: key 'lr' is given twice \(lines 1 and 4; YAML would keep the second\); keep one"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "merged2.yaml").write_text("shapes:\n  small: &small {n_layers: 2, d_model: 32}\n  deeper: {<<: *small, n_layers: 4}\n")  # merges still work
    assert read_yaml_mapping(tmp_path / "merged2.yaml")["shapes"]["deeper"] == {"n_layers": 4, "d_model": 32}


def test_demo_config_is_valid():
    cfg = load_config(None)
    assert cfg.model_cfg is not None and cfg.dataset_path == "demo:stories"


def test_result_fields_leave_out_logging_and_checkpoint_count():
    a = make_config(GUIDE_CONFIG)
    b = make_config({**GUIDE_CONFIG, "n_checkpoints": 50, "wandb_project": "other", "prompts": ["x"]})
    c = make_config({**GUIDE_CONFIG, "lr": 2e-4})
    assert a.result_fields() == b.result_fields()
    assert a.result_fields() != c.result_fields()


def test_reference_and_readme_document_every_field():
    reference = config_reference()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, field in RunConfig.model_fields.items():
        assert field.description, f"{name} has no docstring"
        assert f"| `{name}` |" in reference
        assert f"| `{name}` |" in readme, f"README's config reference lacks {name}; paste `saeflow config-reference`"
