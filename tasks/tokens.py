"""Stage 2, pretokenise: turn a text dataset into the token contexts the activation store reads,
once, so that every run over the same data and tokenizer reuses them; and the checks that a
dataset which already holds token ids was made with the model's tokenizer.

Layout of `<artifacts>/tokens/<key>/`: `tokens.arrow` (a `tokens` column of `context_size` ids
per row), `sae_lens.json` (SAELens's pretokenised-dataset metadata plus the tokenizer's
fingerprint) and `manifest.json` (checksums). The key covers the dataset, the tokenizer's
fingerprint, the context size, BOS handling and the number of contexts: the training contexts
and then the held-out ones, each rounded up to whole store batches, and no more (a streamed hub
dataset is read only that far, and at most two tokenizer calls' texts beyond: the next call
tokenises on a background thread while the last one's ids are packed). A dataset that holds fewer
is written whole, each context once: the fill then holds its last contexts out for evaluation and
goes round the others for training, so that the held-out tokens are never trained on.

The packing is SAELens's `concat_and_batch_sequences` with the settings its `ActivationsStore`
uses on text (BOS at the start of each context with `prepend_bos`, BOS between documents), done
on lists (`pack_contexts`), fed by the ids TransformerLens's `to_tokens` gives each text (the
tokenizer is called on many texts at once), so the contexts are the ones the store would make
from the text; tests/test_tokens.py compares the file with SAELens's own packing byte for byte.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from tasks.artifacts import atomic_dir, exclusive_lock, keyed_folder, stage, set_aside, verify_manifest, write_json, write_manifest
from tasks.config import RunConfig
from tasks.stopping import StopRequests

STAGE_VERSION = 1
TOKENS_FILE = "tokens.arrow"
METADATA_FILE = "sae_lens.json"  # where SAELens's PretokenizeRunner puts its metadata
CHECK_ROWS = 64
TEXTS_PER_CALL = 256  # texts per tokenizer call


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tokens_spec(cfg: RunConfig, model_ref: dict[str, Any]) -> dict[str, Any] | None:
    """What determines the pretokenised contexts: the stage's inputs and cache key. None when the
    dataset already holds token ids."""
    from tasks.data import dataset_seed

    if cfg.is_dataset_tokenized:
        return None
    batch = cfg.store_batch_size_prompts
    train_batches = _ceil_div(_ceil_div(cfg.training_tokens, cfg.context_size), batch)
    eval_batches = _ceil_div(_ceil_div(cfg.eval_tokens, cfg.context_size), batch)
    return {
        "dataset_path": cfg.dataset_path,
        "streaming": cfg.streaming,
        **dataset_seed(cfg.dataset_path, cfg.seed),
        "tokenizer": model_ref["tokenizer_fingerprint"],
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "n_contexts": (train_batches + eval_batches) * batch,
    }


@stage("pretokenise", STAGE_VERSION, key_inputs=("spec", "artifacts_dir"))
def pretokenise(spec: dict[str, Any], model_ref: dict[str, Any], from_pretrained_kwargs: dict[str, Any], artifacts_dir: str, run_dir: str | None = None) -> dict[str, Any]:
    """Tokenise and pack `spec['n_contexts']` contexts of the dataset and keep them on disk."""
    from prefect import get_run_logger

    out = keyed_folder(Path(artifacts_dir) / "tokens", spec)
    # Runs started together (a sweep) wait here for the one tokenising.
    stop_requests = StopRequests(Path(run_dir)) if run_dir else None  # `saeflow stop` of the run, while it waits
    with exclusive_lock(out.with_name(out.name + ".lock"), f"token folder {out}", wait=True, stop_requests=stop_requests):
        if verify_manifest(out) is None:
            if out.exists():
                set_aside(out, "the contexts are tokenised again")
            with atomic_dir(out) as tmp:
                _write_contexts(spec, model_ref, from_pretrained_kwargs, tmp, get_run_logger())
                write_manifest(tmp, {"spec": spec})
    return {"path": str(out), "n_contexts": len(open_tokens({"path": str(out)})), "context_size": spec["context_size"], "outputs": [str(out)]}


def _write_contexts(spec: dict[str, Any], model_ref: dict[str, Any], from_pretrained_kwargs: dict[str, Any], out: Path, logger) -> None:
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter
    from sae_lens.pretokenize_runner import PretokenizeRunnerConfig, metadata_from_config

    from tasks.data import load_text_dataset
    from tasks.model import tokenizing_model

    model = tokenizing_model(model_ref, from_pretrained_kwargs)
    bos = model.tokenizer.bos_token_id
    dataset = load_text_dataset(spec["dataset_path"], streaming=spec["streaming"], seed=spec.get("seed", 0))

    def one_epoch():
        return pack_contexts(_documents(model, dataset), spec["context_size"], begin_batch_token_id=bos if spec["prepend_bos"] else None, separator_token_id=bos)

    n_contexts, written = spec["n_contexts"], 0
    features = Features({"tokens": Sequence(Value("int32"))})
    with ArrowWriter(features=features, path=str(out / TOKENS_FILE)) as writer:
        for context in itertools.islice(one_epoch(), n_contexts):
            writer.write({"tokens": context})
            written += 1
        if written == 0:
            raise ValueError(f"dataset {spec['dataset_path']} holds less text than one context of {spec['context_size']} tokens; give more text, or a smaller context_size")
        if written < n_contexts:
            # Each context once: the fill holds the last ones out for evaluation and goes round the others.
            logger.warning(f"Dataset {spec['dataset_path']} ran out after {written} contexts of the {n_contexts} needed")
        writer.finalize()
    runner_cfg = PretokenizeRunnerConfig(
        tokenizer_name=model.tokenizer.name_or_path,
        dataset_path=spec["dataset_path"],
        context_size=spec["context_size"],
        shuffle=False,
        begin_batch_token="bos" if spec["prepend_bos"] else None,
        sequence_separator_token="bos",
    )
    write_json(out / METADATA_FILE, {**metadata_from_config(runner_cfg).__dict__, "tokenizer_fingerprint": spec["tokenizer"]})


def _documents(model, dataset):
    """Each text's token ids (a list), exactly as `model.to_tokens(text, prepend_bos=False,
    truncate=False)` gives them, but tokenising many texts per tokenizer call (one `to_tokens` call
    per text cost more than the tokenising itself), the next call on a background thread (the
    tokenizer lets go of the GIL) while these ids are packed."""
    import torch
    from transformer_lens.utilities.tokenize_utils import get_tokens_with_bos_removed

    from tasks.activations import ReadAhead

    tokenizer = model.tokenizer
    # `to_tokens` drops the BOS the tokenizer prepends with TransformerLens's function, which for
    # one unpadded row is `[1:]` when the tokenizer pads on the right.
    drop_bos = model.cfg.tokenizer_prepends_bos and tokenizer.bos_token_id is not None
    calls = (tokenizer(batch["text"], truncation=False)["input_ids"] for batch in dataset.iter(batch_size=TEXTS_PER_CALL))
    with ReadAhead(calls) as tokenised:  # the next call tokenises (without the GIL) while these ids are packed
        for ids_of_texts in tokenised:
            for ids in ids_of_texts:
                if drop_bos and tokenizer.padding_side == "right":
                    ids = ids[1:]
                elif drop_bos:
                    ids = get_tokens_with_bos_removed(tokenizer, torch.tensor([ids], dtype=torch.long))[0].tolist()
                yield ids


def pack_contexts(documents, context_size: int, begin_batch_token_id: int | None, separator_token_id: int | None):
    """Contexts of `context_size` ids packed from `documents` (lists of ids) as SAELens's
    `concat_and_batch_sequences` packs them with these two settings (no begin-sequence token,
    documents concatenated): each context starts with `begin_batch_token_id` unless its first id
    already is that token, documents are joined by `separator_token_id` unless one starts with it,
    and the last, partial context is dropped. SAELens does it with tensor operations per document,
    which took most of pretokenising's time; on lists it is the same contexts."""
    context: list[int] | None = None
    for ids in documents:
        offset = 0
        while offset < len(ids):
            if context is None:
                prefix = [begin_batch_token_id] if begin_batch_token_id is not None and ids[offset] != begin_batch_token_id else []
                take = context_size - len(prefix)
                context = prefix + ids[offset : offset + take]
            else:
                prefix = [separator_token_id] if separator_token_id is not None and ids[offset] != separator_token_id else []
                take = max(context_size - len(context) - len(prefix), 0)
                context += prefix + ids[offset : offset + take]
            offset += take
            if len(context) == context_size:
                yield context
                context = None


def open_tokens(tokens_ref: dict[str, Any]):
    """The pretokenised contexts as a (memory-mapped) Hugging Face dataset with a `tokens` column."""
    from datasets import Dataset

    return Dataset.from_file(str(Path(tokens_ref["path"]) / TOKENS_FILE))


def dataset_metadata(dataset_path: str) -> dict[str, Any] | None:
    """SAELens's pretokenised-dataset metadata (`sae_lens.json`) of a dataset: in a local dataset's
    folder, or in a hub dataset's repository (from the cache when offline); None when it has none."""
    import json

    path = Path(dataset_path).expanduser()
    if path.exists():
        candidate = (path if path.is_dir() else path.parent) / METADATA_FILE
        return json.loads(candidate.read_text()) if candidate.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(dataset_path, METADATA_FILE, repo_type="dataset")).read_text())
    except (OSError, ValueError):
        return None


def _named_tokenizer_fingerprint(name: str | None) -> str | None:
    """The fingerprint of a tokenizer named in metadata, if it can be loaded here (a local folder, or
    the Hugging Face cache when offline)."""
    from transformers import AutoTokenizer

    from tasks.model import tokenizer_fingerprint

    if not name:
        return None
    try:
        return tokenizer_fingerprint(AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError):
        return None


def check_token_dataset(dataset, dataset_path: str, tokenizer, d_vocab: int, context_size: int, prepend_bos: bool) -> None:
    """Refuse a dataset of token ids that does not fit the model, with a message saying why.

    With SAELens metadata (`sae_lens.json`, written by SAELens's PretokenizeRunner and by the
    pretokenise stage) the tokenizer it names or fingerprints must be the model's (same
    fingerprint) and its contexts at least `context_size` long. Always, on the first rows: each
    row holds at least `context_size` ids, every id is below the model's `d_vocab`, and with
    `prepend_bos` each row begins with the model's BOS token (SAELens uses token ids as they are).
    """
    from tasks.data import TOKEN_COLUMNS
    from tasks.model import tokenizer_fingerprint

    metadata = dataset_metadata(dataset_path) or {}
    made_with = metadata.get("tokenizer_fingerprint") or _named_tokenizer_fingerprint(metadata.get("tokenizer_name"))
    if made_with is not None and made_with != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"it was tokenised with another tokenizer ({metadata.get('tokenizer_name') or made_with}) than the model's "
            f"({tokenizer.name_or_path}); use a dataset tokenised with the model's tokenizer, or the text itself "
            f"(saeflow then tokenises it)"
        )
    if metadata.get("context_size", context_size) < context_size:
        raise ValueError(f"its contexts have {metadata['context_size']} tokens, fewer than context_size ({context_size}); lower context_size")

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for i, row in enumerate(itertools.islice(dataset, CHECK_ROWS)):
        column = next(c for c in TOKEN_COLUMNS if c in row)
        ids = [int(t) for t in row[column]]
        if len(ids) < context_size:
            raise ValueError(f"row {i} holds {len(ids)} tokens, fewer than context_size ({context_size}); lower context_size")
        ids = ids[:context_size]
        if max(ids) >= d_vocab or min(ids) < 0:
            raise ValueError(
                f"row {i} holds token id {max(ids) if max(ids) >= d_vocab else min(ids)}, outside the model's vocabulary "
                f"of {d_vocab} tokens, so it was tokenised with another tokenizer; use a dataset tokenised with the "
                f"model's tokenizer, or the text itself (saeflow then tokenises it)"
            )
        if prepend_bos and ids[0] != bos:
            raise ValueError(
                f"row {i} begins with token id {ids[0]}, not the model's BOS token ({bos}), but prepend_bos is true "
                f"and SAELens uses token ids as they are; set prepend_bos: false if the data was tokenised without BOS, "
                f"or tokenise it with the model's tokenizer and BOS"
            )
