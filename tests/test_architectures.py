"""Every supported architecture trains through the flow and saves an SAE that plain SAELens loads;
local data files work as datasets."""

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from flows.pipeline import run_pipeline
from tasks.data import generate_stories
from tasks.preflight import claim_run, resolve

FAST = {"training_tokens": 8192, "eval_tokens": 2048, "n_checkpoints": 1}


@pytest.mark.parametrize(
    ("overrides", "saved_as"),
    [
        ({"architecture": "topk", "k": 8}, "topk"),
        ({"architecture": "batchtopk", "k": 8}, "jumprelu"),
        ({"architecture": "jumprelu", "l0_coefficient": 0.5}, "jumprelu"),
        ({"architecture": "gated", "l1_coefficient": 0.5}, "gated"),
        ({"architecture": "matryoshka", "k": 8, "matryoshka_widths": [32, 64, 128]}, "jumprelu"),
        ({"normalize_activations": "expected_average_only_in"}, "standard"),
    ],
)
def test_architecture_trains_saves_and_loads(prefect_server, tmp_path: Path, overrides, saved_as):
    from sae_lens import SAE

    cfg = resolve(tiny_config(**FAST, **overrides))
    summary = run_pipeline(cfg, claim_run(cfg, tmp_path, None, new=False), tmp_path)
    assert summary["training"]["n_training_tokens"] >= cfg.training_tokens
    sae = SAE.load_from_disk(summary["sae"]["path"])
    assert sae.cfg.architecture() == saved_as == summary["loaded"]["architecture"]
    assert sae.cfg.d_sae == 128
    assert Path(summary["analysis"]["path"]).is_file()


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".parquet"])
def test_local_text_files_are_datasets(prefect_server, tmp_path: Path, suffix):
    from datasets import Dataset

    from tasks.data import load_text_dataset

    stories = generate_stories(300, seed=1)
    data = tmp_path / f"stories{suffix}"
    if suffix == ".jsonl":
        data.write_text("\n".join(json.dumps({"text": s}) for s in stories))
    elif suffix == ".txt":
        data.write_text("\n".join(stories))
    else:
        Dataset.from_dict({"text": stories}).to_parquet(str(data))
    dataset = load_text_dataset(str(data))
    assert dataset.num_rows == 300 and dataset[0]["text"] == stories[0] and dataset[299]["text"] == stories[299]  # a story a row
    cfg = resolve(tiny_config(**FAST, dataset_path=str(data)))
    summary = run_pipeline(cfg, claim_run(cfg, tmp_path, None, new=False), tmp_path)
    assert summary["activations"]["n_tokens"] == 8192
