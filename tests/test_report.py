"""Evaluation, dashboard, plots, Prefect artifacts and the report/analyze commands."""

import ast
import html
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import start, tiny_config
from flows.cli import EXIT_BAD_INPUT, main
from tasks.config import ConfigError
from tasks.report import artifact_key, render_markdown


@pytest.fixture(scope="session")
def metrics(finished_run) -> dict:
    return json.loads(Path(finished_run["summary"]["metrics"]["path"]).read_text())["metrics"]


def test_metrics_are_in_range_and_consistent(metrics, finished_run):
    d_sae = finished_run["summary"]["sae"]["d_sae"]
    assert metrics["explained_variance"] <= 1 and metrics["cossim"] <= 1
    assert metrics["mse"] >= 0 and metrics["l1"] >= 0 and 0 < metrics["l0"] <= d_sae
    ce = metrics
    assert ce["ce_loss_score"] == pytest.approx(
        (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"]) / (ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"]), rel=1e-5
    )
    assert ce["kl_div_score"] == pytest.approx((ce["kl_div_with_ablation"] - ce["kl_div_with_sae"]) / ce["kl_div_with_ablation"], rel=1e-5)
    density = torch.tensor(json.loads(Path(finished_run["summary"]["metrics"]["path"]).read_text())["feature_density"])
    assert metrics["dead_features"] == int((density == 0).sum()) and metrics["dense_features"] == int((density > 0.1).sum())


def independent_l0(summary: dict, n_contexts: int) -> float:
    """The saved SAE's mean L0 over the first `n_contexts` held-out contexts, special tokens left out."""
    from sae_lens import SAE

    from tasks.activations import load_eval_tokens
    from tasks.model import load_model

    model = load_model(summary["model"], "cpu")
    sae = SAE.load_from_disk(summary["sae"]["path"])
    tokens = load_eval_tokens(summary["activations"])[:n_contexts]
    special = torch.tensor(list(model.tokenizer.all_special_ids))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.metadata.hook_name])
        active = (sae.encode(cache[sae.cfg.metadata.hook_name]) != 0).sum(-1).float()
    return active[~torch.isin(tokens, special)].mean().item()


def test_l0_matches_an_independent_count_on_the_held_out_tokens(metrics, finished_run):
    assert metrics["l0"] == pytest.approx(independent_l0(finished_run["summary"], metrics["eval_contexts"]), rel=1e-4)


def test_losses_match_an_independent_splice_of_the_sae_at_its_hook(metrics, finished_run):
    """The CE losses recomputed by hand on the held-out contexts: the SAE's reconstruction spliced
    in at its hook (at tokens other than the special ones, whose positions the loss leaves out),
    and the hook zeroed. (On the tiny random model, zeroing the hook costs less than the SAE's error.)"""
    from sae_lens import SAE

    from tasks.activations import load_eval_tokens
    from tasks.model import load_model

    summary = finished_run["summary"]
    model = load_model(summary["model"], "cpu")
    sae = SAE.load_from_disk(summary["sae"]["path"])
    tokens = load_eval_tokens(summary["activations"])[: metrics["eval_contexts"]]
    special = torch.isin(tokens, torch.tensor(list(model.tokenizer.all_special_ids)))
    hooks = {
        "ce_loss_without_sae": [],
        "ce_loss_with_sae": [(sae.cfg.metadata.hook_name, lambda acts, hook: torch.where(special[..., None], acts, sae.decode(sae.encode(acts))))],
        "ce_loss_with_ablation": [(sae.cfg.metadata.hook_name, lambda acts, hook: torch.zeros_like(acts))],
    }
    with torch.no_grad():
        for name, fwd_hooks in hooks.items():
            loss = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=fwd_hooks)
            assert metrics[name] == pytest.approx(loss[~special[:, :-1]].mean().item(), rel=1e-4), name
    assert len({metrics[name] for name in hooks}) == 3


def test_every_metric_covers_the_same_held_out_contexts_when_batches_do_not_divide_them(finished_run, tmp_path):
    """With held-out contexts left over after the last whole batch, the loss pass and the
    sparsity pass (L0, density) both read the first whole batches, as `eval_contexts` says."""
    from tasks.activations import load_eval_tokens
    from tasks.evaluate import evaluate

    summary = finished_run["summary"]
    n_contexts = len(load_eval_tokens(summary["activations"]))
    batch = 3 if n_contexts % 3 else 5
    assert n_contexts % batch and n_contexts // batch >= 2
    result = evaluate.fn(summary["loaded"], summary["model"], summary["activations"], str(tmp_path), batch, "cpu", {})
    metrics = result["metrics"]
    assert metrics["eval_contexts"] == n_contexts // batch * batch
    assert metrics["l0"] == pytest.approx(independent_l0(summary, metrics["eval_contexts"]), rel=1e-5)


def test_evaluation_uses_tokens_not_used_for_training(finished_run):
    from tasks.activations import load_eval_tokens, load_store

    summary = finished_run["summary"]
    _, training_tokens = load_store(summary["activations"])
    held_out = load_eval_tokens(summary["activations"])
    ctx = held_out.shape[1]
    training_contexts = {tuple(c) for c in training_tokens.reshape(-1, ctx).tolist()}
    assert not training_contexts & {tuple(c) for c in held_out.tolist()}


def test_report_artifacts_in_the_prefect_api_match_metrics_json(metrics, finished_run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    name = finished_run["name"]
    flow_run_id = finished_run["state"].state_details.flow_run_id
    of_the_run = ArtifactFilterFlowRunId(any_=[flow_run_id])
    with get_client(sync_client=True) as client:
        report, = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(name, "report")]), flow_run_id=of_the_run))
        table, = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(name, "metrics")]), flow_run_id=of_the_run))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        tags = client.read_flow_run(flow_run_id).tags
    assert sorted(tags) == ["architecture:standard", "d_sae:128", "hook:blocks.0.hook_resid_post", "model:tiny-test"]  # to filter runs by in the UI
    assert report.type == "markdown" and table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {row["key"]: row["value"] for row in rows} == {row["key"]: metrics[row["key"]] for row in rows}
    assert len(rows) == 16
    assert f"| explained variance | {metrics['explained_variance']:.6g} |" in report.data
    assert f"| CE-loss score | {metrics['ce_loss_score']:.6g} |" in report.data
    assert (Path(finished_run["summary"]["run_dir"]) / "report.md").read_text() == report.data
    progress_values = sorted(float(a.data) for a in progress if a.type == "progress")
    assert progress_values == [100.0, 100.0]  # filling and training both reached 100%
    assert any(a.description.startswith("Filling activations at blocks.0.hook_resid_post (store(s) ") for a in progress if a.type == "progress")


def test_dashboard_shows_each_features_contexts_and_tokens(finished_run):
    summary = finished_run["summary"]
    analysis = json.loads(Path(summary["analysis"]["path"]).read_text())
    page = Path(summary["analysis"]["dashboard"]).read_text()
    assert len(analysis["dashboard"]) == 16
    prompt_features = [e["feature"] for e in analysis["logit_effects"]]
    assert [e["feature"] for e in analysis["dashboard"]][: len(prompt_features)] == prompt_features
    shown = 0
    for entry in analysis["dashboard"]:
        assert f'id="feature-{entry["feature"]}"' in page
        for context in entry["contexts"]:
            assert context["activations"][context["peak"]] == pytest.approx(context["max"])
            assert "".join(html.escape(t) for t in context["tokens"][context["peak"] : context["peak"] + 1]) in page
            shown += 1
        for token in entry["promoted"]:
            assert f"<code>{html.escape(token['token'])}</code>" in page
    assert shown >= 16
    sparsity = load_file(Path(summary["sae"]["path"]) / "sparsity.safetensors")["sparsity"]
    assert [e["frequency"] for e in analysis["dashboard"]] == pytest.approx([10 ** sparsity[e["feature"]].item() for e in analysis["dashboard"]])
    assert f"of the {summary['sae']['sparsity_tokens']:,} training tokens its sparsity was measured on</p>" in page


def test_features_that_never_fired_read_frequency_zero():
    from tasks.save import LOG_EPS, firing_frequencies

    log_sparsity = torch.log10(torch.tensor([0.0, 1e-6, 0.5]) + LOG_EPS)
    assert firing_frequencies(log_sparsity).tolist() == pytest.approx([0.0, 1e-6, 0.5], rel=1e-3)
    assert firing_frequencies(log_sparsity)[0].item() == 0.0


def test_plots_and_training_log(finished_run):
    run = Path(finished_run["summary"]["run_dir"])
    for png in finished_run["summary"]["report"]["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 64]  # every log_every steps, and the last
    assert rows[-1]["tokens"] == finished_run["cfg"].training_tokens
    assert all(0 <= r["l0"] <= 128 and r["explained_variance"] <= 1 for r in rows)


def test_report_and_analyze_commands(finished_run, metrics, capsys):
    args = ["--artifacts-dir", str(finished_run["artifacts"])]
    assert main(["report", finished_run["name"], *args]) == 0
    out = capsys.readouterr().out
    assert f"{metrics['explained_variance']:.6g}" in out and "dashboard.html" in out
    long_prompt = " ".join(["Lily saw a cat ."] * 20)  # 101 tokens: more than context_size 32
    assert main(["analyze", finished_run["name"], *args, "--prompt", "Tom fed the dog .", "--prompt", long_prompt]) == 0
    captured = capsys.readouterr()
    assert "'Tom fed the dog .' at token '.':" in captured.out and captured.out.count("  feature ") == 6
    listed = re.findall(r"promotes (\[.*\])  inhibits (\[.*\])$", captured.out, re.M)
    assert listed and all(len(ast.literal_eval(tokens)) == finished_run["cfg"].top_k_tokens for pair in listed for tokens in pair)
    assert "longer than context_size 32; truncated" in captured.err
    assert main(["analyze", finished_run["name"], *args, "--prompt", "Tom fed the dog .", "--token-index", "0"]) == 0
    captured = capsys.readouterr()
    assert "'Tom fed the dog .' at token '<bos>' (the BOS token prepend_bos adds):" in captured.out
    assert "saeflow: Token 0 of 'Tom fed the dog .' is the BOS token that prepend_bos adds" in captured.err
    # "red," is one word to the demo's word-level tokenizer, which never saw it
    assert main(["analyze", finished_run["name"], *args, "--prompt", "Tom saw a red,"]) == 0
    captured = capsys.readouterr()
    assert "'Tom saw a red,' at token '<unk>'" in captured.out
    assert "saeflow: Token -1 of 'Tom saw a red,' is the tokenizer's unknown token '<unk>': the tokenizer does not know that text" in captured.err
    assert main(["analyze", finished_run["name"], *args, "--prompt", "Tom saw a red ball ."]) == 0
    assert "unknown token" not in capsys.readouterr().err


def test_analyze_runs_a_gpu_run_on_the_cpu_with_device(finished_run, tmp_path, capsys):
    """A run trained on a GPU, analysed on a machine without one: `--device cpu`."""
    import shutil

    run = tmp_path / "runs" / finished_run["name"]
    shutil.copytree(finished_run["artifacts"] / "runs" / finished_run["name"], run)
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["device"] = "cuda"
    (run / "config.json").write_text(json.dumps(stored))
    args = ["analyze", finished_run["name"], "--artifacts-dir", str(tmp_path), "--prompt", "Tom fed the dog ."]
    assert main([*args, "--device", "cpu"]) == 0
    assert "'Tom fed the dog .' at token '.':" in capsys.readouterr().out
    assert main([*args[:-2], "--prompt", "", "--device", "cpu"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "saeflow: --prompt is empty: it has nothing to analyse; give the text to analyse\n"
    assert main([*args, "--device", "gpu"]) == EXIT_BAD_INPUT  # was torch's RuntimeError, with a traceback
    assert capsys.readouterr().err.startswith("saeflow: device 'gpu' is not a device saeflow can use; use cpu, cuda, cuda:N or mps (available here: cpu")
    if not torch.cuda.is_available():
        assert main(args) == EXIT_BAD_INPUT
        from tasks.preflight import missing_device

        assert capsys.readouterr().err == f"saeflow: run '{finished_run['name']}' was trained on cuda, but {missing_device('cuda')}; add --device cpu\n"


def test_an_index_outside_a_prompt_names_the_prompt_and_the_setting(finished_run, capsys):
    from tasks.analyse import check_token_index

    model_ref = finished_run["summary"]["model"]
    with pytest.raises(ConfigError, match=r"^analysis_token_index is -7, but prompt 'Tom fed the dog \.' has 6 tokens \(the BOS token included\); use an index from -6 to 5"):
        check_token_index(model_ref, {}, ["Lily saw a big cat near the lake .", "Tom fed the dog ."], -7, 32, True)
    with pytest.raises(ConfigError, match=r"has 32 tokens \(the BOS token included, cut to context_size\)"):
        check_token_index(model_ref, {}, [" ".join(["Lily saw a cat ."] * 20)], 40, 32, True)
    check_token_index(model_ref, {}, ["Tom fed the dog ."], -6, 32, True)
    args = ["--artifacts-dir", str(finished_run["artifacts"]), "--prompt", "Tom fed the dog ."]
    assert main(["analyze", finished_run["name"], *args, "--token-index", "12"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err == "saeflow: --token-index is 12, but prompt 'Tom fed the dog .' has 6 tokens (the BOS token included); use an index from -6 to 5 (negative ones count from the end: -1 is the last token)\n"
    assert captured.out == ""


def test_a_run_whose_index_is_outside_a_prompt_stops_before_training_with_status_2(finished_run, tmp_path, capsys):
    """The prompts' tokens need the model's tokenizer, which a local model's build makes: the run
    stops right after that, as a bad config (exit status 2), not as a failed run."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(analysis_token_index=99).model_dump(mode="json")))
    assert main(["run", str(config), "--artifacts-dir", str(finished_run["artifacts"]), "--run-name", "bad-index"]) == EXIT_BAD_INPUT
    assert "saeflow: config error: analysis_token_index is 99, but prompt 'Lily went to the park with a red ball .' has " in capsys.readouterr().err
    assert not (finished_run["artifacts"] / "runs" / "bad-index" / "checkpoints").exists()


def test_a_bad_index_stops_a_run_before_its_local_model_trains(prefect_server, tmp_path, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(analysis_token_index=-99, model_train_tokens=4096).model_dump(mode="json")))
    assert main(["run", str(config), "--artifacts-dir", str(tmp_path / "art")]) == EXIT_BAD_INPUT
    assert "saeflow: config error: analysis_token_index is -99, but prompt 'Lily went to the park with a red ball .' has " in capsys.readouterr().err
    assert not list((tmp_path / "art").glob("models/*/model.json"))


def test_top_features_leave_out_features_that_do_not_fire(finished_run):
    from tasks.analyse import top_features_for_prompt
    from tasks.load import open_sae
    from tasks.model import hook_activations, load_model

    summary = finished_run["summary"]
    model = load_model(summary["model"], "cpu")
    sae, _ = open_sae({"path": summary["sae"]["path"]}, "cpu")
    tokens = model.to_tokens("Tom fed the dog .")
    with torch.no_grad():
        acts = sae.encode(hook_activations(model, tokens, sae.cfg.metadata.hook_name, None))[0]
    for index in (0, -1):
        result = top_features_for_prompt(model, sae, "Tom fed the dog .", index, sae.cfg.d_sae, 32, True)
        firing = acts[index] > 0
        assert 0 < int(firing.sum()) < sae.cfg.d_sae
        assert sorted(f["feature"] for f in result["top_features"]) == firing.nonzero().flatten().tolist()
        assert result["is_bos"] == (index == 0)


def _rendered_tables(markdown: str) -> list[list[list[str]]]:
    """The table rows of `markdown` as a GFM renderer reads them: each row's cells, as HTML."""
    from markdown_it import MarkdownIt

    page = MarkdownIt("commonmark").enable("table").render(markdown)
    return [[re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)] for table in re.findall(r"<table>(.*?)</table>", page, re.S)]


def _codes(cell: str) -> list[str]:
    return [html.unescape(code) for code in re.findall(r"<code>(.*?)</code>", cell)]


def test_report_renders_any_token_and_prompt_intact():
    from markdown_it import MarkdownIt

    tokens = ["\n", " |", "`x`", "", " word", "\\|", "a``b", "\t<b>"]
    analysis = {
        "prompts": [
            {"prompt": "Tom | said\n`hi`", "token": "\n", "is_bos": False, "top_features": []},
            {"prompt": "Tom fed the dog .", "token": "<bos>", "is_bos": True, "top_features": [{"feature": 3, "activation": 1.5}]},
        ],
        "logit_effects": [{"feature": 3, "promoted": [{"token": t, "logit": 1.0} for t in tokens], "inhibited": [{"token": t, "logit": -1.0} for t in tokens[::-1]]}],
    }
    markdown = render_markdown("run", {"architecture": "standard"}, {"mse": 0.25}, analysis, {})
    metrics_table, effects_table = _rendered_tables(markdown)
    assert metrics_table == [["metric", "value"], ["MSE", "0.25"]]
    assert [len(row) for row in effects_table] == [3, 3]
    feature, promoted, inhibited = effects_table[1]
    assert feature == "3" and _codes(promoted) == [repr(t) for t in tokens] and _codes(inhibited) == [repr(t) for t in tokens[::-1]]

    items = re.findall(r"<li>(.*?)</li>", MarkdownIt("commonmark").render(markdown.split("## Top features")[1].split("## Tokens")[0]), re.S)
    assert [html.unescape(i) for i in items] == [
        "<code>'Tom | said\\n`hi`'</code> at <code>'\\n'</code>: no feature fires",
        "<code>'Tom fed the dog .'</code> at <code>'<bos>'</code> (the BOS token <code>prepend_bos</code> adds, not a word of the prompt): 3 (1.500)",
    ]


@pytest.mark.parametrize("architecture, shown", [("standard", ["l1_coefficient", "l1_warm_up_steps"]), ("topk", ["k"]), ("jumprelu", ["l0_coefficient", "l0_warm_up_steps"]), ("matryoshka_batchtopk", ["k", "matryoshka_widths"])])
def test_report_config_names_the_settings_that_tell_runs_apart(architecture, shown):
    config = tiny_config(architecture=architecture, hook_name="blocks.0.attn.hook_z", hook_head_index=2, normalize_activations="expected_average_only_in")
    config = config.model_dump(mode="json") | {"activations": "cached (set by activation_mode; cached activations would take 0.01 GB)"}
    markdown = render_markdown("run", config, {}, {"prompts": [], "logit_effects": []}, {})
    settings = dict(re.findall(r"^- \*\*(\w+)\*\*: `(.*)`$", markdown, re.M))
    assert settings["hook_head_index"] == "2" and settings["normalize_activations"] == "expected_average_only_in"
    assert settings["architecture"] == architecture
    assert {"l1_coefficient", "l1_warm_up_steps", "k", "l0_coefficient", "l0_warm_up_steps", "matryoshka_widths"} & set(settings) == set(shown)
    assert settings["activations"] == config["activations"]


def written_checkpoint(folder: Path) -> None:
    from tasks.artifacts import write_manifest

    folder.mkdir(parents=True)
    write_manifest(folder, {"n_training_steps": int(folder.name.removeprefix("step-"))})


def test_report_on_an_unfinished_run_says_what_exists(tmp_path, capsys):
    run = tmp_path / "runs" / "half"
    written_checkpoint(run / "checkpoints" / "step-000000013")
    assert main(["report", "half", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "run 'half' has not finished: it has checkpoints up to step-000000013" in err and "saeflow run" in err
    (run / "checkpoints" / "step-000000020").mkdir()  # a write a crash of the machine cut short
    assert main(["report", "half", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "it has checkpoints up to step-000000013 (step-000000020 is incomplete or corrupted: set aside when it continues)" in capsys.readouterr().err
    assert main(["analyze", "other", "--prompt", "x", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "no run 'other' in " in (err := capsys.readouterr().err) and "runs there: half" in err
    assert main(["report", "half", "--artifacts-dir", str(tmp_path / "elsewhere")]) == EXIT_BAD_INPUT
    assert "there are no runs there: give the --artifacts-dir the run was started with (default: ./artifacts)" in capsys.readouterr().err
    # checkpoints kept outside the run's folder (the guide's checkpoint_path)
    outside = tmp_path / "sae_training_checkpoints"
    written_checkpoint(outside / "elsewhere" / "step-000000026")
    (tmp_path / "runs" / "elsewhere").mkdir()
    (tmp_path / "runs" / "elsewhere" / "config.json").write_text(json.dumps({"config": {"checkpoint_path": str(outside)}}))
    assert main(["report", "elsewhere", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "run 'elsewhere' has not finished: it has checkpoints up to step-000000026" in capsys.readouterr().err


def test_analyze_of_a_run_whose_model_moved_says_so_without_a_traceback(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "runs" / finished_run["name"]
    shutil.copytree(finished_run["artifacts"] / "runs" / finished_run["name"], run)
    summary = json.loads((run / "summary.json").read_text())
    summary["model"]["path"] = str(tmp_path / "moved")
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["analyze", finished_run["name"], "--artifacts-dir", str(tmp_path), "--prompt", "Tom fed the dog ."]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"saeflow: run '{finished_run['name']}' cannot be analysed: ") and "Traceback" not in err
    assert f"It reads its model ({tmp_path / 'moved'}) and its SAE" in err
    assert f"`saeflow run --run-name {finished_run['name']} --artifacts-dir {tmp_path}`" in err


def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(finished_run, tmp_path, capsys):
    run_folder = finished_run["artifacts"] / "runs" / finished_run["name"]
    assert main(["report", str(run_folder)]) == EXIT_BAD_INPUT  # the run's path for its name
    assert capsys.readouterr().err == (
        f"saeflow: run name {str(run_folder)!r} must be a plain folder name (it names <artifacts>/runs/<name>/); for the run in "
        f"{run_folder}, give its name and artifacts folder: {finished_run['name']} --artifacts-dir {finished_run['artifacts']}\n"
    )
    for command in (["run", "--run-name", "../../escaped"], ["stop", "exp/one"], ["analyze", ".hidden", "--prompt", "x"]):
        assert main([*command, "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
        assert "must be a plain folder name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) and not (tmp_path.parent / "escaped").exists()
    from tasks.preflight import claim_run

    with pytest.raises(ConfigError, match="must be a plain folder name"):  # the Python API's way in
        claim_run(finished_run["cfg"], tmp_path, "a/b", new=False)


def test_report_on_a_run_in_training_says_how_far_it_is_and_how_to_stop_it(tmp_path, capsys):
    from tasks.artifacts import exclusive_lock

    run = tmp_path / "runs" / "long"
    written_checkpoint(run / "checkpoints" / "step-000000030")
    (run / "config.json").write_text(json.dumps({"config": {"training_tokens": 80_000}}))
    row = {"step": 40, "tokens": 40_960, "loss": 0.51234, "l0": 12.34, "tokens_per_s": 12345.6}
    earlier = "".join(json.dumps(row | {"step": step}) + "\n" for step in range(2000))  # over the 64 KiB read from the end
    (run / "train_log.jsonl").write_text(earlier + json.dumps(row) + "\n" + json.dumps(row | {"step": 41})[:30])  # the last cut by a kill
    with exclusive_lock(run / ".lock", "run 'long'", wait=False):
        assert main(["report", "long", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
    assert f"run 'long' is running (process {os.getpid()} on " in err
    assert "): training, step 40 (51.2% of 80,000 tokens), 12,346 tokens/s, loss 0.5123, L0 12.3, logged " in err
    assert f"`saeflow stop long --artifacts-dir {tmp_path}` stops it (in training at a checkpoint" in err and "saeflow run" not in err
    (run / "trained").mkdir()
    (run / "trained" / "manifest.json").write_text("{}")
    with exclusive_lock(run / ".lock", "run 'long'", wait=False):
        assert main(["report", "long", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
    assert "): its training has finished; it is saving, evaluating and analysing the SAE" in err and "saeflow stop" not in err
    (run / "trained" / "manifest.json").unlink()
    (run / "trained").rmdir()
    assert main(["report", "long", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT  # stopped, or killed
    err = capsys.readouterr().err
    assert "has not finished: it has checkpoints up to step-000000030 (training logged step 40 (51.2% of 80,000 tokens)" in err
    assert "saeflow run --run-name long" in err
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 60, "tok')  # a row cut short by the kill: the one before it is the last
    assert main(["report", "long", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "(training logged step 40 (51.2% of 80,000 tokens)" in capsys.readouterr().err
    (run / "train_log.jsonl").write_text('{"step": 60, "tok')
    assert main(["report", "long", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "has not finished: it has checkpoints up to step-000000030. Run `saeflow run" in capsys.readouterr().err
    (run / "last_checkpoint.json").write_text(json.dumps({"path": str(run / "checkpoints" / "step-000000030"), "step": 30}))
    (run / "checkpoints").rename(tmp_path / "moved")
    assert main(["report", "long", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"run 'long' wrote checkpoints (the last: {run / 'checkpoints' / 'step-000000030'}), but its checkpoint folder {run / 'checkpoints'} does not exist now" in capsys.readouterr().err


def test_wandb_without_a_login_is_refused_before_any_work(tmp_path, monkeypatch):
    import wandb

    from tasks.preflight import resolve

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb.teardown()  # W&B reads its environment once per process
    try:
        with pytest.raises(ConfigError, match="log_to_wandb is true but Weights & Biases cannot log in here .*run `wandb login`"):
            resolve(tiny_config(log_to_wandb=True))
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert resolve(tiny_config(log_to_wandb=True)).log_to_wandb
    finally:
        wandb.teardown()


def test_wandb_logging_works_offline(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    summary = start(tiny_config(training_tokens=8192, log_to_wandb=True, wandb_log_frequency=4), tmp_path / "artifacts")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert summary["training"]["n_training_tokens"] == 8192
    # wandb.init and finish alone write a non-empty .wandb file; the training's metrics must be in it
    records = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"losses/overall_loss" in records and b"metrics/explained_variance" in records


def test_dashboard_contexts_never_peak_at_a_special_token(finished_run):
    """Features whose strongest held-out activation is at a BOS token get their peaks at real
    tokens instead, with the BOS shown as 0, as the metrics leave special tokens out."""
    from tasks.activations import load_eval_tokens
    from tasks.analyse import max_activating_contexts
    from tasks.load import open_sae
    from tasks.model import hook_activations, load_model

    summary = finished_run["summary"]
    model = load_model(summary["model"], "cpu")
    sae, _ = open_sae({"path": summary["sae"]["path"]}, "cpu")
    tokens = load_eval_tokens(summary["activations"])[:64]
    bos = tokens == model.tokenizer.bos_token_id
    with torch.no_grad():
        acts = sae.encode(hook_activations(model, tokens, sae.cfg.metadata.hook_name, None))  # [n, ctx, d_sae]
    peaks_at_bos = [f for f in range(sae.cfg.d_sae) if bos.flatten()[acts[..., f].flatten().argmax()] and acts[..., f].max() > 0]
    assert peaks_at_bos  # the tiny model has such features
    contexts = max_activating_contexts(model, sae, tokens, peaks_at_bos, n_contexts=3)
    expected = acts.masked_fill(bos[..., None], 0.0)
    for feature in peaks_at_bos:
        for context in contexts[feature]:
            assert context["tokens"][context["peak"]] != model.tokenizer.bos_token
        assert contexts[feature][0]["max"] == pytest.approx(float(expected[..., feature].max()))


def test_metrics_and_summaries_hold_standard_json_when_a_metric_is_not_finite(tmp_path):
    """A degenerate evaluation (one held-out token: explained_variance_legacy is -inf; all-zero rows:
    cossim is NaN) must still write files that strict JSON readers (JavaScript's JSON.parse) accept."""
    from tasks.artifacts import write_json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in standard JSON"))

    value = {"metrics": {"explained_variance_legacy": float("-inf"), "cossim": float("nan"), "l0": 3.5}, "feature_density": [0.0, float("inf")]}
    write_json(tmp_path / "metrics.json", value, nonfinite_as_null=True)
    assert strict((tmp_path / "metrics.json").read_text()) == {"metrics": {"explained_variance_legacy": None, "cossim": None, "l0": 3.5}, "feature_density": [0.0, None]}
    write_json(tmp_path / "state.json", value)  # what saeflow reads back keeps its numbers
    assert json.loads((tmp_path / "state.json").read_text())["metrics"]["explained_variance_legacy"] == float("-inf")


def test_report_on_an_unfinished_run_with_a_garbled_config_record_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "runs" / "garbled"
    run.mkdir(parents=True)
    (run / "config.json").write_bytes(bytes(64))  # zeroed by a crash of the machine
    assert main(["report", "garbled", "--artifacts-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"run 'garbled' has not finished, and its {run / 'config.json'} cannot be read (JSONDecodeError: " in err
    assert f"or delete it and continue the run with its config file (`saeflow run CONFIG --run-name garbled --artifacts-dir {tmp_path}`)" in err
