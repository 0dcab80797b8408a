"""Datasets: hub names, local files, and the built-in generated story corpus.

The story corpus needs no network: a small seeded grammar with word classes (names, animals,
places, verbs, colours, ...) so that the demo's features have something recognisable to find.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset, load_from_disk

DEMO_PREFIX = "demo:"
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TOKEN_COLUMNS = ("tokens", "input_ids")
TEXT_COLUMNS = ("text",)
METADATA_FILES = {"sae_lens.json"}  # SAELens's pretokenised-dataset metadata, not data

WORD_CLASSES = {
    "name": ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Emma", "Sam", "Zoe", "Jack"],
    "animal": ["cat", "dog", "bird", "fox", "rabbit", "horse", "mouse", "duck", "frog", "bear", "owl", "fish"],
    "place": ["park", "forest", "garden", "river", "beach", "school", "house", "farm", "hill", "lake", "town", "cave"],
    "verb": ["saw", "found", "liked", "chased", "helped", "followed", "painted", "fed", "hugged", "called"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "black"],
    "object": ["ball", "box", "hat", "kite", "cake", "book", "boat", "cup", "flower", "stone", "apple", "drum"],
    "feeling": ["happy", "sad", "sleepy", "brave", "angry", "excited", "scared", "proud"],
}

_TEMPLATES = [
    "{name} went to the {place} with a {colour} {object} .",
    "{name} {verb} a {colour} {animal} near the {place} .",
    "The {animal} was {feeling} because {name} {verb} it .",
    "One day {name} and {name2} {verb} the {animal} in the {place} .",
    "{name} had a {colour} {object} and the {animal} liked it .",
    "At the {place} , the {colour} {animal} {verb} {name} .",
    "{name} felt {feeling} when the {animal} took the {object} .",
    "The {colour} {object} was in the {place} , so {name} {verb} it .",
]


def generate_stories(n_stories: int, seed: int) -> list[str]:
    """Generate `n_stories` short stories from the word-class grammar, reproducibly."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n_stories):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = {cls: rng.choice(options) for cls, options in WORD_CLASSES.items()}
            words["name2"] = rng.choice(WORD_CLASSES["name"])
            sentences.append(rng.choice(_TEMPLATES).format(**words))
        stories.append(" ".join(sentences))
    return stories


@functools.lru_cache(maxsize=2)
def _demo_stories(seed: int) -> tuple[str, ...]:
    """The built-in corpus, generated once per process and seed: preflight, the model stage and the
    pretokenise stage each open it, and generating it takes ~0.3 s."""
    return tuple(generate_stories(20_000, seed))


def dataset_seed(dataset_path: str, seed: int) -> dict[str, int]:
    """The seed as part of what determines a dataset's contents: `{"seed": seed}` for the built-in
    dataset, which is generated from it, `{}` for any other, which it does not change (so the runs
    of a seed sweep share one token folder and one activation store)."""
    return {"seed": seed} if dataset_path.startswith(DEMO_PREFIX) else {}


def load_text_dataset(dataset_path: str, streaming: bool = True, seed: int = 0) -> Dataset | IterableDataset:
    """Open a dataset by name: `demo:stories`, a local file or folder (of data files, or written
    by `Dataset.save_to_disk` as SAELens's PretokenizeRunner does, or by `DatasetDict.save_to_disk`:
    its train split), or a Hugging Face hub name (its train split)."""
    if dataset_path.startswith(DEMO_PREFIX):
        kind = dataset_path[len(DEMO_PREFIX) :]
        if kind != "stories":
            raise ValueError(f"unknown built-in dataset '{dataset_path}'; the built-in one is 'demo:stories'")
        return Dataset.from_dict({"text": list(_demo_stories(seed))})
    path = Path(dataset_path).expanduser()
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    if (path / "dataset_dict.json").is_file():  # `DatasetDict.save_to_disk`: its train split, as from the hub
        splits = load_from_disk(str(path))
        if "train" not in splits:
            raise ValueError(f"{path} holds the splits {sorted(splits)} and no 'train'; give the folder of the split to use ({path}/<split>)")
        return splits["train"]
    if path.exists():
        files = sorted(
            p for p in ([path] if path.is_file() else path.rglob("*")) if p.suffix in LOCAL_FORMATS and p.name not in METADATA_FILES
        )
        if not files:
            raise ValueError(
                f"{path} holds no data file; expected {', '.join(sorted(LOCAL_FORMATS))} files"
            )
        formats = {LOCAL_FORMATS[p.suffix] for p in files}
        if len(formats) > 1:
            raise ValueError(f"{path} mixes data formats ({', '.join(sorted(formats))}); keep one format per dataset")
        return load_dataset(formats.pop(), data_files=[str(p) for p in files], split="train")
    if dataset_path.startswith(("/", "./", "../", "~")) or path.suffix in LOCAL_FORMATS:
        raise ValueError(f"no such file or folder: {path.resolve()} (a hub dataset is named owner/name)")
    return load_dataset(dataset_path, split="train", streaming=streaming)


def dataset_columns(dataset: Dataset | IterableDataset) -> list[str]:
    """Column names of a dataset, read from its first row when the schema is not known."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def check_dataset_columns(columns: list[str], is_dataset_tokenized: bool | None, dataset_path: str) -> bool:
    """Check that the data has a usable column; returns whether it is tokenised."""
    tokenized = any(c in columns for c in TOKEN_COLUMNS)
    has_text = any(c in columns for c in TEXT_COLUMNS)
    if not tokenized and not has_text:
        raise ValueError(
            f"dataset {dataset_path} has columns {columns}, but needs a 'text' column (raw text) or a "
            f"'tokens'/'input_ids' column (token ids); rename the column that holds the data"
        )
    if is_dataset_tokenized is not None and is_dataset_tokenized != tokenized:
        state = "token ids" if tokenized else "raw text"
        raise ValueError(
            f"is_dataset_tokenized is {is_dataset_tokenized}, but dataset {dataset_path} holds {state} "
            f"(columns {columns}); set is_dataset_tokenized: {str(tokenized).lower()} or leave it out"
        )
    return tokenized
