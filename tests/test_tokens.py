"""Pretokenising: the contexts written are byte for byte the ones the per-document path wrote
(TransformerLens's `to_tokens` on each text, SAELens's packing, one Arrow row at a time)."""

import itertools
import logging
import re
from pathlib import Path

import pytest
from datasets import Dataset

import tasks.data
import tasks.model
import tasks.tokens
from tasks.data import generate_stories
from tasks.model import SPECIAL_TOKENS, _hooked_config, _on_meta, load_tokenizer

CONTEXT_SIZE = 16


def _tokenizer(folder: Path, kind: str):
    """The stories' word-level tokenizer: as saeflow loads its own (TransformerLens strips the BOS it
    prepends), the same padding on the left (TransformerLens strips BOS another way), or one with
    no BOS token at all (nothing to strip; TransformerLens uses EOS as BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(generate_stories(200, seed=0), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    bos = {} if kind == "no-bos" else {"bos_token": "<bos>"}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", **bos).save_pretrained(str(folder))
    if kind == "no-bos":
        return AutoTokenizer.from_pretrained(str(folder))
    loaded = load_tokenizer(folder)
    loaded.padding_side = "left" if kind == "bos-left" else "right"
    return loaded


def _old_write_contexts(spec, model, dataset, path: Path) -> None:
    """The per-document path the pretokenise stage used before it tokenised in batches."""
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos = model.tokenizer.bos_token_id

    def one_epoch():
        documents = (
            model.to_tokens(row["text"], truncate=False, move_to_device=False, prepend_bos=False).squeeze(0) for row in dataset
        )
        return concat_and_batch_sequences(
            documents, spec["context_size"], begin_batch_token_id=bos if spec["prepend_bos"] else None, sequence_separator_token_id=bos
        )

    n_contexts, written = spec["n_contexts"], 0
    with ArrowWriter(features=Features({"tokens": Sequence(Value("int32"))}), path=str(path)) as writer:
        while written < n_contexts:
            for context in itertools.islice(one_epoch(), n_contexts - written):
                writer.write({"tokens": context.tolist()})
                written += 1
        writer.finalize()


@pytest.mark.parametrize(
    ("kind", "prepend_bos", "streaming"),
    [("bos", True, False), ("bos", False, True), ("bos-left", True, True), ("no-bos", True, False), ("no-bos", False, True)],
)
def test_contexts_are_the_per_document_ones_byte_for_byte(tmp_path: Path, monkeypatch, caplog, kind, prepend_bos, streaming):
    tokenizer = _tokenizer(tmp_path / "tokenizer", kind)
    model = _on_meta(_hooked_config({"n_layers": 1, "d_model": 8, "n_ctx": 64, "d_head": 4, "act_fn": "relu"}, len(tokenizer), 0, "meta"), tokenizer)
    assert model.cfg.tokenizer_prepends_bos == (kind != "no-bos")
    # Empty texts, a text that begins with BOS itself, an unknown word; a dataset that runs out.
    texts = generate_stories(40, seed=5)
    texts[3:3] = ["", "<bos> Tom saw the cat .", ""]
    texts[20:20] = ["zebra", "", "Tom ."]
    dataset = Dataset.from_dict({"text": texts})
    if streaming:
        dataset = dataset.to_iterable_dataset()
    spec = {"dataset_path": "test", "streaming": streaming, "seed": 0, "tokenizer": "fingerprint", "context_size": CONTEXT_SIZE, "prepend_bos": prepend_bos, "n_contexts": 300}
    monkeypatch.setattr(tasks.model, "tokenizing_model", lambda model_ref, kwargs: model)
    monkeypatch.setattr(tasks.data, "load_text_dataset", lambda path, streaming, seed: dataset)
    monkeypatch.setattr(tasks.tokens, "TEXTS_PER_CALL", 7)  # many calls, and batches that straddle the empty texts

    (tmp_path / "new").mkdir()
    with caplog.at_level(logging.WARNING):
        tasks.tokens._write_contexts(spec, {}, {}, tmp_path / "new", logging.getLogger("test"))
    n_contexts = int(re.search(r"ran out after (\d+) contexts of the 300 needed", caplog.text)[1])
    assert 300 / 3 < n_contexts < 300 / 2  # a dataset that runs out is written once, not started again
    _old_write_contexts({**spec, "n_contexts": n_contexts}, model, dataset, tmp_path / "old.arrow")
    assert (tmp_path / "new" / tasks.tokens.TOKENS_FILE).read_bytes() == (tmp_path / "old.arrow").read_bytes()

    rows = Dataset.from_file(str(tmp_path / "new" / tasks.tokens.TOKENS_FILE))["tokens"]
    assert len(rows) == n_contexts and all(len(row) == CONTEXT_SIZE for row in rows)
    assert all(row[0] == tokenizer.bos_token_id for row in rows) == prepend_bos  # no-bos: TransformerLens's BOS is EOS


def test_a_saved_dataset_dict_gives_its_train_split(tmp_path: Path):
    from datasets import DatasetDict

    from tasks.data import load_text_dataset

    DatasetDict({"train": Dataset.from_dict({"text": ["a b", "c d"]}), "test": Dataset.from_dict({"text": ["e"]})}).save_to_disk(str(tmp_path / "both"))
    assert load_text_dataset(str(tmp_path / "both"))["text"] == ["a b", "c d"]
    DatasetDict({"validation": Dataset.from_dict({"text": ["e"]})}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(ValueError, match=r"holds the splits \['validation'\] and no 'train'; give the folder of the split to use"):
        load_text_dataset(str(tmp_path / "no-train"))


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_packing_on_lists_gives_sae_lens_s_contexts(prepend_bos):
    """`pack_contexts` against SAELens's `concat_and_batch_sequences` on documents made to hit its
    cases: empty ones, ones that begin with BOS (no separator, no extra BOS), ones longer than
    several contexts (continued in the next context, whose first id may be BOS), BOS inside."""
    import random

    import torch
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    from tasks.tokens import pack_contexts

    bos, rng = 0, random.Random(7)
    documents = []
    for _ in range(400):
        ids = [rng.choice([bos, 1, 2, 3, 4, 5]) for _ in range(rng.choice([0, 1, 2, 3, 7, 20, 45]))]
        if ids and rng.random() < 0.3:
            ids[0] = bos
        documents.append(ids)
    for context_size in (2, 3, 8, 16):
        begin = bos if prepend_bos else None
        expected = [c.tolist() for c in concat_and_batch_sequences(iter(torch.tensor(d, dtype=torch.long) for d in documents), context_size, begin_batch_token_id=begin, sequence_separator_token_id=bos)]
        assert len(expected) > 100
        assert list(pack_contexts(iter(documents), context_size, begin, bos)) == expected


def test_model_training_on_less_text_than_one_context_says_so(tmp_path: Path):
    tokenizer = _tokenizer(tmp_path / "tokenizer", "bos")
    model = _on_meta(_hooked_config({"n_layers": 1, "d_model": 8, "n_ctx": 64, "d_head": 4, "act_fn": "relu"}, len(tokenizer), 0, "meta"), tokenizer)
    (tmp_path / "short.txt").write_text("Tom saw the cat .\n")
    with pytest.raises(ValueError, match=r"short.txt holds less text than one context of the model's n_ctx \(64\) tokens"):
        tasks.model.packed_contexts(model, str(tmp_path / "short.txt"), 0, 10)
