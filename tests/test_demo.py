"""The built-in demo: a model trained on the generated stories, whose SAE features a person
recognises; and the model training behind it (deterministic, keyed by its settings, all or
nothing)."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import start, task_states, tiny_config
from tasks.config import load_config
from tasks.data import WORD_CLASSES
from test_pipeline import STAGES

CLASS_OF = {word: cls for cls, words in WORD_CLASSES.items() for word in words}


def build(spec, artifacts):
    """Run the build-model stage's function inside a flow (it logs and reports progress)."""
    from prefect import flow

    from tasks.model import build_model

    @flow(name="build-model-test")
    def build_flow():
        return build_model.fn(spec, str(artifacts))

    return build_flow()


def test_model_training_is_deterministic_and_keyed_by_its_settings(prefect_server, tmp_path):
    from tasks.model import load_model, model_spec

    cfg = tiny_config(model_train_tokens=100_000, model_train_lr=1e-2)
    assert "train" not in model_spec(tiny_config())  # an untrained model keeps its folder and key
    assert model_spec(cfg) != model_spec(tiny_config(model_train_tokens=50_000, model_train_lr=1e-3))
    first, second = build(model_spec(cfg), tmp_path / "a"), build(model_spec(cfg), tmp_path / "b")
    assert first["training"] == {**second["training"], "seconds": first["training"]["seconds"]}
    assert first["training"]["steps"] == math.ceil(100_000 / (32 * 64))
    weights = [load_file(Path(ref["path"]) / "model.safetensors") for ref in (first, second)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((Path(first["path"]) / "model.json").read_text())["training"] == first["training"]

    untrained = build(model_spec(tiny_config()), tmp_path / "a")
    assert untrained["path"] != first["path"] and "training" not in untrained
    tokens = load_model(first, "cpu").to_tokens(["Lily went to the park with a red ball . Tom saw a blue fox near the lake ."])
    with torch.no_grad():
        trained_loss = load_model(first, "cpu")(tokens, return_type="loss").item()
        untrained_loss = load_model(untrained, "cpu")(tokens, return_type="loss").item()
    assert untrained_loss > math.log(first["d_vocab"]) - 0.5  # random weights: about uniform guessing
    assert trained_loss < untrained_loss - 1.5
    assert first["training"]["final_loss"] < untrained_loss - 1.5


def test_diverging_model_training_says_so_and_leaves_no_model_folder(prefect_server, tmp_path):
    from tasks.model import model_spec

    with pytest.raises(RuntimeError, match="model training diverged at step .*; lower model_train_lr"):
        build(model_spec(tiny_config(model_train_tokens=50_000, model_train_lr=float("inf"))), tmp_path)
    left = [p.name for p in (tmp_path / "models").iterdir() if p.suffix != ".lock"]
    assert left == [], "a failed build left files behind"


@pytest.fixture(scope="module")
def demo(prefect_server, tmp_path_factory):
    """The real demo (`saeflow run` with no config), run once."""
    artifacts = tmp_path_factory.mktemp("demo")
    state = start(load_config(None), artifacts, return_state=True)
    assert state.is_completed()
    return {"artifacts": artifacts, "summary": state.result()}


def test_demo_model_is_trained_close_to_the_grammar(demo):
    cfg, summary = load_config(None), demo["summary"]
    training = summary["model"]["training"]
    assert training["tokens"] >= cfg.model_train_tokens
    # The generator's stories carry about 1.23 nats of choice per token (template and word
    # choices); uniform guessing over the vocabulary costs ln(d_vocab), about 4.6.
    assert training["final_loss"] < 1.45
    # the evaluation tokens, held out from the SAE (the model trained on the whole corpus, once)
    assert summary["metrics"]["metrics"]["ce_loss_without_sae"] < 1.45


def test_demo_analysis_finds_features_of_the_generators_word_classes(demo):
    """An analysed feature promotes one word class (at least 8 of its top 10 tokens), and in the
    prompt analysis a feature fires on a word of that class: one of the top features at a prompt
    token of the class whose max-activating held-out contexts peak on that class's words."""
    analysis = json.loads(Path(demo["summary"]["analysis"]["path"]).read_text())
    promoting = {}
    for effect in analysis["logit_effects"]:
        assert len(effect["promoted"]) == 10
        cls, count = Counter(CLASS_OF.get(t["token"]) for t in effect["promoted"]).most_common(1)[0]
        if cls is not None and count >= 8:
            promoting.setdefault(cls, []).append(effect["feature"])
    contexts = {entry["feature"]: entry["contexts"] for entry in analysis["dashboard"]}
    firing = {}
    for prompt in analysis["prompts"]:
        cls = CLASS_OF.get(prompt["token"])
        for top in prompt["top_features"]:
            peaks = [CLASS_OF.get(c["tokens"][c["peak"]]) for c in contexts[top["feature"]]]
            if cls is not None and top["activation"] > 0 and len(peaks) == 5 and peaks.count(cls) >= 4:
                firing.setdefault(cls, []).append(top["feature"])
    assert set(promoting) & set(firing), f"features promoting a class: {promoting}; firing on a class: {firing}"


def test_second_demo_run_reuses_the_trained_model(demo):
    model_file = Path(demo["summary"]["model"]["path"]) / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    state = start(load_config(None), demo["artifacts"], return_state=True)
    states = task_states(state, n_tasks=len(STAGES))  # every stage, from build-model to report
    assert states == {stage: "Cached" for stage in STAGES}
    assert model_file.stat().st_mtime_ns == before
    assert state.result()["model"] == demo["summary"]["model"]
