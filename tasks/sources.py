"""Stage 3 without a model, import activations: activations made elsewhere (a folder of
`.safetensors` or `.npy` shards, a dataset written by SAELens's `CacheActivationsRunner`) or
generated with known features (`sae_lens.synthetic`) become an activation store in the layout
`fill_activations` writes, so that training, resuming, saving and evaluation work on them unchanged.

The rows are copied into the store, not referenced in place: the store is then one format for
every source, immutable and checksummed, and training and evaluation read only it. The cost is
one more copy on disk. The source is still looked at when a run starts or continues: its files'
names, sizes and times are the store's key and part of the run's identity.

Layout of `<artifacts>/activations/<key>/`: `shard-NNNNN.safetensors` (`activations` `[rows, d_in]`,
plus `tokens` `[rows]` when the source has them), `eval_activations.safetensors` (the held-out
rows: the source's last `eval_tokens` rows, or `eval_tokens` further generated ones), for a
synthetic store `ground_truth/` (SAELens's `SyntheticModel.save`: the feature dictionary and the
firing probabilities), and `manifest.json` with each shard's row range and sha256. The key covers
the source (its path and every file's name, size and modification time; or the synthetic
settings and seed), the held-out count and the dtype. A killed import continues at the first
shard not in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from tasks.activations import EVAL_ACTIVATIONS, SHARD_BYTES, _save_shard, _verified_shards, check_free_disk, shard_bytes, store_dir
from tasks.artifacts import atomic_dir, exclusive_lock, file_sha256, read_json, stage, verify_manifest, write_json, write_manifest
from tasks.config import TORCH_GLOBALS, ConfigError, RunConfig, stable_hash
from tasks.stopping import STOPS_AFTER_FILL, StopRequests, preempted, stop_asked, stop_requested, stop_signals

STAGE_VERSION = 1
SHARD_SUFFIXES = (".safetensors", ".npy")
GROUND_TRUTH = "ground_truth"
SYNTHETIC_BLOCK = 65_536  # generated rows per seeded block: any block can be made again alone


class BadActivations(ValueError):
    """Activations that cannot be trained on; the message names the file (and row) and the fix."""


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _check_shape(where: str, shape: tuple[int, ...], floating: bool) -> tuple[int, int]:
    if len(shape) != 2:
        raise BadActivations(f"{where} has shape {tuple(shape)}; activations must be [n, d_in] (flatten with .reshape(-1, d_in))")
    if not floating:
        raise BadActivations(f"{where} does not hold floating-point numbers; store the activations as float16/bfloat16/float32/float64")
    if shape[0] == 0:
        raise BadActivations(f"{where} is empty (0 rows); remove it from the folder")
    if shape[1] == 0:
        raise BadActivations(f"{where} has rows of width 0; activations must be [n, d_in] with d_in > 0")
    return shape[0], shape[1]


class _SafetensorsFile:
    """A `.safetensors` shard: the tensor `activations` (or the file's only tensor besides
    `tokens`) `[n, d_in]`, and optionally `tokens` `[n]`."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(path, "pt") as f:
                info = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as error:
            raise BadActivations(f"{path} is not a readable safetensors file ({error})") from None
        candidates = [k for k in info if k != "tokens"]
        if "activations" in info:
            self.key = "activations"
        elif len(candidates) == 1:
            self.key = candidates[0]
        else:
            raise BadActivations(f"{path} holds the tensors {sorted(info) or 'none'}; name the activations 'activations' or keep one tensor per file")
        shape, dtype = info[self.key]
        self.rows, self.width = _check_shape(str(path), shape, dtype in ("F16", "BF16", "F32", "F64"))
        self.has_tokens = "tokens" in info
        if self.has_tokens and info["tokens"][0] != (self.rows,):
            raise BadActivations(f"{path}: 'tokens' has shape {info['tokens'][0]}, expected ({self.rows},), one token per activation row")

    def where(self, row: int) -> str:
        return f"{self.path}, row {row}"

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from safetensors import safe_open

        with safe_open(self.path, "pt") as f:
            acts = f.get_slice(self.key)[start:stop]
            tokens = f.get_slice("tokens")[start:stop] if self.has_tokens else None
        return acts, tokens


class _NpyFile:
    """A `.npy` shard `[n, d_in]` (memory-mapped, so only the rows read are loaded)."""

    def __init__(self, path: Path):
        import numpy as np

        self.path = path
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise BadActivations(f"{path} is not a readable .npy array ({error})") from None
        if array.dtype.kind == "f" and array.dtype.itemsize > 8:
            raise BadActivations(f"{path} holds {array.dtype} numbers, which torch cannot read; save them as float32 or float64")
        self.rows, self.width = _check_shape(str(path), array.shape, array.dtype.kind == "f")
        self.has_tokens = False

    def where(self, row: int) -> str:
        return f"{self.path}, row {row}"

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, None]:
        import numpy as np

        rows = np.load(self.path, mmap_mode="r")[start:stop]
        return torch.from_numpy(np.array(rows, dtype=rows.dtype.newbyteorder("="))), None  # torch reads native byte order only


class _CachedActivations:
    """A dataset folder written by SAELens's `CacheActivationsRunner`: Arrow rows of
    `[context, d_in]` activations in the column named after the hook, with `token_ids`."""

    def __init__(self, folder: Path, hook_name: str):
        from datasets import Array2D, load_from_disk

        self.path = folder
        try:
            dataset = load_from_disk(str(folder))
        except (OSError, ValueError) as error:
            raise BadActivations(f"{folder} is not a dataset written by CacheActivationsRunner ({error})") from None
        columns = [name for name, feature in dataset.features.items() if isinstance(feature, Array2D)]
        if not isinstance(dataset.features.get(hook_name), Array2D):
            raise BadActivations(f"{folder} has no activation column '{hook_name}' (its activation columns: {columns or 'none'}); set hook_name to one of them")
        self.column = hook_name
        self.context, width = dataset.features[hook_name].shape
        self.rows, self.width = _check_shape(f"{folder} ({hook_name})", (len(dataset) * self.context, width), "float" in dataset.features[hook_name].dtype)
        self.has_tokens = "token_ids" in dataset.features
        self.dataset = dataset.with_format("torch")

    def where(self, row: int) -> str:
        return f"{self.path}, sequence {row // self.context}, position {row % self.context}"

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        first, last = start // self.context, -(-stop // self.context)
        batch = self.dataset[first:last]
        skip, count = start - first * self.context, stop - start
        acts = batch[self.column].reshape(-1, self.width)[skip : skip + count]
        tokens = batch["token_ids"].reshape(-1)[skip : skip + count] if self.has_tokens else None
        return acts, tokens


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a dataset folder saved by `datasets` (as SAELens's CacheActivationsRunner writes)."""
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def open_source(path: str | Path, hook_name: str) -> list:
    """The readers of an `activations_path`, in order; raises BadActivations for a missing or
    empty source, an unreadable or empty file, or files of different widths."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BadActivations(f"activations_path {path} does not exist")
    if is_saved_dataset(path):
        return [_CachedActivations(path, hook_name)]
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise BadActivations(f"{path} holds a dataset's splits {splits}; set activations_path to one split's folder, such as {path / splits[0] if splits else path}")
    files = source_files(path)
    if path.is_file() and path.suffix not in SHARD_SUFFIXES:
        raise BadActivations(
            f"{path} is not a .safetensors or .npy file; for a dataset written by CacheActivationsRunner, point "
            f"activations_path at its folder"
        )
    if not files or files[0].suffix not in SHARD_SUFFIXES:
        raise BadActivations(
            f"{path} holds no .safetensors or .npy files and is not a dataset written by CacheActivationsRunner; "
            f"point activations_path at a folder of [n, d_in] shards"
        )
    readers = [_SafetensorsFile(p) if p.suffix == ".safetensors" else _NpyFile(p) for p in files]
    for reader in readers[1:]:
        if reader.width != readers[0].width:
            raise BadActivations(
                f"{reader.path} has rows of width {reader.width} but {readers[0].path} has width {readers[0].width}; "
                f"every shard must have the same width (d_in)"
            )
    return readers


def check_one_format(path: Path) -> None:
    """Raise ConfigError for a folder of both .safetensors and .npy files: a stray `.npy` (a PCA
    basis, norms) beside the shards would be imported as rows. For new runs only: a run started
    on such a folder continues as it began."""
    formats = {p.suffix: p for p in source_files(path)} if path.is_dir() and not is_saved_dataset(path) else {}
    if len(formats) > 1:
        raise ConfigError(
            f"{path} holds both .safetensors and .npy files ({formats['.safetensors'].name}, {formats['.npy'].name}); "
            f"every file of those suffixes would be read as activations. Keep the shards of one format in the folder "
            f"and move the other files out"
        )


def source_files(path: Path) -> list[Path]:
    """The files of an `activations_path` that are read, in reading order: the file itself, a
    folder's shards (numbers in names compared as numbers), or a saved dataset's files."""
    if path.is_file():
        return [path]
    if is_saved_dataset(path):
        # Its data files, as its state.json lists them: not the cache files that `datasets`
        # writes beside them (`.filter`, `.map` on the loaded dataset), which are not read here.
        listed = json.loads((path / "state.json").read_text()).get("_data_files", [])
        return sorted([*(path / entry["filename"] for entry in listed), path / "dataset_info.json", path / "state.json"])
    return sorted((p for p in path.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file()), key=_natural_key)


def source_fingerprint(path: Path) -> list[list]:
    """Each file of the source that is read (`source_files`) with its size and modification time
    (not the contents: hashing them would read everything): changing one makes a new store and a
    new run; other files in the folder (notes, a README) do not count."""
    files = sorted(source_files(path))  # in name order, as before the other files were left out
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def synthetic_model_config(values: dict[str, Any], d_in: int | None, seed: int):
    """SAELens's `SyntheticModelConfig` from the `synthetic` settings (SAELens's defaults for the
    fields left out; `hidden_dim` defaults to `d_in`, `seed` to the run's seed). Raises
    ConfigError with the valid fields."""
    from sae_lens.synthetic import SyntheticModelConfig

    defaults = SyntheticModelConfig(num_features=1, hidden_dim=1).to_dict()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"synthetic: unknown fields {unknown}; SAELens's SyntheticModelConfig has {', '.join(defaults)}")
    if "num_features" not in values:
        raise ConfigError("synthetic: set num_features, the number of ground-truth features")
    hidden_dim = values.get("hidden_dim", d_in)
    if hidden_dim is None:
        raise ConfigError("synthetic: set d_in (or synthetic.hidden_dim), the width of the generated activations")
    if d_in is not None and hidden_dim != d_in:
        raise ConfigError(f"synthetic.hidden_dim is {hidden_dim} but d_in is {d_in}; give one of them")
    try:
        return SyntheticModelConfig.from_dict({**defaults, "seed": seed, **values, "hidden_dim": hidden_dim})
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"synthetic: {error}") from None


def import_spec(cfg: RunConfig) -> dict[str, Any]:
    """What determines the imported store: the stage's inputs and cache key."""
    spec = {"source": cfg.activation_source, "d_in": cfg.d_in, "eval_rows": cfg.eval_tokens, "dtype": cfg.activation_dtype}
    if cfg.activation_source == "synthetic":
        synthetic = synthetic_model_config(cfg.synthetic, cfg.d_in, cfg.seed).to_dict()
        # The rows are the generator's (synthetic.seed, by default the run's seed): a seed sweep
        # with it pinned trains every member on the same data, from one store.
        spec.update(synthetic=synthetic, n_tokens=cfg.training_tokens, seed=synthetic["seed"])
    else:
        path = Path(cfg.activations_path).expanduser().resolve()
        spec.update(path=str(path), hook_name=cfg.hook_name, fingerprint=source_fingerprint(path))
    return json.loads(json.dumps(spec))  # as the manifest will hold it


class _SourceRows:
    """The rows of an activations_path as one sequence: read across files, in the store's dtype,
    checked finite (after the conversion, which turns values beyond the dtype's range into inf)."""

    def __init__(self, readers: list, dtype: torch.dtype):
        self.readers, self.dtype = readers, dtype
        self.offsets = [0]
        for reader in readers:
            self.offsets.append(self.offsets[-1] + reader.rows)
        self.rows = self.offsets[-1]

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        acts, tokens = [], []
        for reader, offset in zip(self.readers, self.offsets):
            lo, hi = max(start, offset), min(stop, offset + reader.rows)
            if lo >= hi:
                continue
            part, part_tokens = reader.read(lo - offset, hi - offset)
            part = part.to(self.dtype)
            bad = (~torch.isfinite(part)).any(dim=1).nonzero()
            if len(bad):
                raise BadActivations(
                    f"{reader.where(lo - offset + int(bad[0]))} holds NaN or inf, or a value beyond {str(self.dtype).removeprefix('torch.')}'s "
                    f"range (one of {len(bad)} such rows in rows "
                    f"{lo - offset}..{hi - offset - 1} of that file); remove or fix those rows and run again"
                )
            acts.append(part)
            tokens.append(part_tokens)
        return torch.cat(acts), (torch.cat(tokens) if all(t is not None for t in tokens) else None)


class _SyntheticRows:
    """Rows generated by a SAELens `SyntheticModel`, in seeded blocks: a pure function of
    (seed, row), so a killed import continues at its first missing shard with the same rows."""

    def __init__(self, model, seed: int):
        self.model, self.seed, self.cached = model, seed, (None, None)

    def _block(self, index: int) -> torch.Tensor:
        if self.cached[0] != index:
            with TORCH_GLOBALS, torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(stable_hash({"seed": self.seed, "block": index}), 16))
                self.cached = (index, self.model.sample(SYNTHETIC_BLOCK))
        return self.cached[1]

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, None]:
        blocks = range(start // SYNTHETIC_BLOCK, -(-stop // SYNTHETIC_BLOCK))
        rows = torch.cat([self._block(b) for b in blocks])
        skip = start - blocks[0] * SYNTHETIC_BLOCK
        return rows[skip : skip + stop - start], None


def eval_seed(store_ref: dict[str, Any]) -> int:
    """Seed of the fresh samples the synthetic evaluation draws (a stream apart from the stored rows)."""
    return int(stable_hash({"seed": store_ref["seed"], "evaluation": True}), 16)


@stage("import-activations", STAGE_VERSION, key_inputs=("spec", "artifacts_dir"))
def import_activations(spec: dict[str, Any], artifacts_dir: str, run_dir: str | None = None) -> dict[str, Any]:
    """Copy (or generate) the activations into a store, checking every row; hold out the last
    `eval_rows` for evaluation. SIGTERM/SIGINT, and `saeflow stop` of the run in `run_dir`, stop
    it after the shard in hand, as they stop a fill."""
    from prefect import get_run_logger

    out = store_dir(artifacts_dir, spec)
    stop_requests = StopRequests(Path(run_dir)) if run_dir else None
    # Runs that share this store (a sweep) wait here for the one importing it, then find it complete.
    with stop_signals(), exclusive_lock(out / ".lock", f"activation store {out}", wait=True, stop_requests=stop_requests):
        ref = _import(spec, out, get_run_logger(), stop_requests)
        if stop := stop_requested():  # after the last shard's check: training would no longer see it
            STOPS_AFTER_FILL[ref["path"]] = stop
        return ref


def _source(spec: dict[str, Any], out: Path):
    """The rows to import (training rows first, then the held-out ones) and their counts."""
    if spec["source"] == "synthetic":
        from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

        with TORCH_GLOBALS:
            model = SyntheticModel(SyntheticModelConfig.from_dict(spec["synthetic"]))
        truth = out / GROUND_TRUTH
        if verify_manifest(truth) is None:
            if truth.exists():
                raise RuntimeError(f"{truth} exists but fails its checksums; move {out} away and run again")
            with atomic_dir(truth) as tmp:
                model.save(tmp)
                write_manifest(tmp, {"seed": spec["seed"]})
        return _SyntheticRows(model, spec["seed"]), spec["n_tokens"], spec["eval_rows"]
    rows = _SourceRows(open_source(spec["path"], spec["hook_name"]), getattr(torch, spec["dtype"]))
    if rows.rows <= spec["eval_rows"]:
        raise BadActivations(f"{spec['path']} holds {rows.rows} rows, no more than the {spec['eval_rows']} held out (eval_tokens); lower eval_tokens")
    return rows, rows.rows - spec["eval_rows"], spec["eval_rows"]


def _import(spec: dict[str, Any], out: Path, logger, stop_requests: StopRequests | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _copy_rows(spec, out, logger, stop_requests)
    except BadActivations:
        for path in out.iterdir():  # fixing the source changes the store's key: these rows would never be used
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != ".lock":
                path.unlink()
        raise


def _copy_rows(spec: dict[str, Any], out: Path, logger, stop_requests: StopRequests | None) -> dict[str, Any]:
    manifest_path = out / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {"spec": spec, "shards": []}
    if manifest["spec"] != spec:
        raise RuntimeError(f"{manifest_path} belongs to another store spec; move {out} away and run again")
    shards = _verified_shards(out, manifest)
    source, n_rows, n_eval = _source(spec, out)
    dtype = getattr(torch, spec["dtype"])
    row_bytes = spec["d_in"] * dtype.itemsize
    rows_per_shard = max(1, shard_bytes(n_rows * row_bytes) // row_bytes)
    done = shards[-1]["stop"] if shards else 0
    entry = manifest.get("eval")
    eval_done = bool(entry and (out / entry["file"]).is_file() and file_sha256(out / entry["file"]) == entry["sha256"])
    stored_row_bytes = row_bytes + (8 if any(getattr(r, "has_tokens", False) for r in getattr(source, "readers", [])) else 0)
    check_free_disk({out: (n_rows - done + (0 if eval_done else n_eval)) * stored_row_bytes}, "free some space, or import elsewhere (--artifacts-dir on a bigger disk)")
    if done:
        logger.info(f"Activation store {out.name}: resuming the import at row {done} of {n_rows}")
    for start in range(done, n_rows, rows_per_shard):
        if stop := stop_asked(stop_requests):  # the shards written so far are kept
            raise preempted(f"stopped by {stop} while importing activation store {out.name}, at row {start} of {n_rows} (the shards written are kept)")
        stop = min(start + rows_per_shard, n_rows)
        acts, tokens = source.read(start, stop)
        name = f"shard-{len(shards):05d}.safetensors"
        shards.append({"file": name, "start": start, "stop": stop, "sha256": _save_shard(out / name, acts.to(dtype), tokens)})
        write_json(manifest_path, {**manifest, "spec": spec, "shards": shards, "complete": False})
        logger.info(f"Activation store {out.name}: {stop}/{n_rows} rows imported ({100 * stop / n_rows:.0f}%)")
    if not eval_done:
        acts, tokens = source.read(n_rows, n_rows + n_eval)
        entry = {"file": EVAL_ACTIVATIONS, "rows": n_eval, "sha256": _save_shard(out / EVAL_ACTIVATIONS, acts.to(dtype), tokens)}
    finished = {**manifest, "spec": spec, "shards": shards, "eval": entry, "complete": True}
    if not manifest_path.exists() or read_json(manifest_path) != finished:  # also when only a shard that had gone was written again
        write_json(manifest_path, finished)
    result = {
        "path": str(out),
        "source": spec["source"],
        "n_tokens": n_rows,
        "eval_rows": n_eval,
        "d_in": spec["d_in"],
        "dtype": spec["dtype"],
        "n_shards": len(shards),
        "outputs": [str(out / s["file"]) for s in shards] + [str(out / EVAL_ACTIVATIONS), str(manifest_path)],
    }
    if spec["source"] == "synthetic":
        result.update(ground_truth=str(out / GROUND_TRUTH), seed=spec["seed"])
        result["outputs"].append(result["ground_truth"])
    return result


def write_activations(batches: Iterable, folder: str | Path) -> dict[str, Any]:
    """Write an iterable of `[batch, d_in]` activations (torch tensors or numpy arrays, e.g. made
    with nnsight) as `.safetensors` shards of about 32 MB in `folder`, which `activations_path`
    then reads. `folder` must be new or empty: nothing is overwritten. The shards are written
    beside it and `folder` appears only once the iterable is exhausted, so one that fails part-way
    leaves no folder that a run could take for all of the activations. Returns the folder, the
    row count, the width and the files."""
    # A symbolic link (acts -> /scratch/acts, made before its target) is written through: the
    # shards go beside its target, whose name the finished folder takes (renaming them onto the
    # link failed once every batch had been written, and lost them).
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists{'' if folder.is_dir() else ' and is not a folder'}; write the activations to a new folder")
    given = folder.stat() if folder.exists() else None
    if given is not None:
        folder.rmdir()  # made again when the shards are complete, with its permissions and group
    names, rows, width = [], 0, None
    try:
        with atomic_dir(folder) as tmp:
            pending, pending_bytes = [], 0

            def flush() -> None:
                nonlocal pending, pending_bytes
                names.append(f"shard-{len(names):05d}.safetensors")
                _save_shard(tmp / names[-1], torch.cat(pending), None)
                pending, pending_bytes = [], 0

            for index, batch in enumerate(batches):
                batch = torch.as_tensor(batch).detach().to("cpu")
                if batch.ndim != 2 or (width is not None and batch.shape[1] != width):
                    expected = f"[batch, {width}]" if width is not None else "[batch, d_in]"
                    raise ValueError(f"batch {index} has shape {tuple(batch.shape)}; expected {expected} (flatten with .reshape(-1, d_in))")
                if not batch.is_floating_point():
                    raise ValueError(f"batch {index} holds {batch.dtype}; activations must be floating point (float32, bfloat16, float64)")
                width = batch.shape[1]
                if not len(batch):
                    continue
                pending.append(batch)
                pending_bytes += batch.numel() * batch.element_size()
                rows += len(batch)
                if pending_bytes >= SHARD_BYTES:
                    flush()
            if pending:
                flush()
            if not rows:
                raise ValueError("no activations were given: the iterable was empty")
    except BaseException:
        if given is not None:
            folder.mkdir(exist_ok=True)  # the user's empty folder is put back
            _take_permissions(folder, given)
        raise
    if given is not None:
        _take_permissions(folder, given)
    return {"path": str(folder), "rows": rows, "d_in": width, "files": [str(folder / name) for name in names]}


def _take_permissions(folder: Path, given: os.stat_result) -> None:
    """Give `folder` the mode (setgid included) and group of the folder it replaces."""
    os.chmod(folder, stat.S_IMODE(given.st_mode))
    with contextlib.suppress(PermissionError):  # a group this user is not in
        os.chown(folder, -1, given.st_gid)
