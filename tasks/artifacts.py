"""Where outputs live, how they are written, and how each stage's result is cached.

Every stage is a Prefect task whose small JSON result (paths, hashes, counts, metrics) is
persisted under `<artifacts>/prefect-results/`, keyed by the inputs that matter plus an explicit
stage version, so editing a comment does not invalidate a ten-hour training. Prefect's cache does
not know that a result points at files: a cached result whose files are gone is dropped before
Prefect reads it, and the stage runs again, as does one whose files listed with their sha256 were
rewritten since (by a run with other settings), or whose safetensors files are no longer whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.context import TaskRunContext

from tasks.config import device_kind, stable_hash

if TYPE_CHECKING:
    from tasks.stopping import StopRequests

RESULTS_DIRNAME = "prefect-results"


def run_dir(artifacts_dir: str | Path, run_name: str) -> Path:
    """The folder of one run: checkpoints, the final SAE, the analysis."""
    return Path(artifacts_dir) / "runs" / run_name


def write_json(path: Path, value: Any, *, nonfinite_as_null: bool = False) -> None:
    """Write JSON atomically (temporary file, fsync, rename). Files for other tools (metrics,
    summaries) pass `nonfinite_as_null`: NaN and infinities become null, as standard JSON has no
    such numbers; files that saeflow reads back keep them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            if nonfinite_as_null:
                json.dump(finite_or_null(value), f, indent=2, sort_keys=True, allow_nan=False)
            else:
                json.dump(value, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    """The JSON value in the file at `path`."""
    with open(path) as f:
        return json.load(f)


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The process's umask. safetensors (0.8) writes files readable by their owner alone (0600) whatever
# the umask; saeflow gives every file it writes the mode the umask gives other new files, so that
# an artifacts folder shared with a lab (or a Dask cluster's other users) can be read.
def _umask() -> int:
    try:  # read without setting it, which would race with threads creating files
        return int(re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_UMASK = _umask()


def usual_mode(path: Path) -> None:
    """Give the file at `path` the permissions the umask gives a new file."""
    os.chmod(path, 0o666 & ~_UMASK)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success, fsync it and rename it to `final`.

    A crash leaves only a `.tmp-*` folder, never a half-written `final`, and the next write of
    `final` removes it (callers hold a lock on `final`). `final` must not exist:
    nothing already written is overwritten, unless `replace` (for folders derived from others):
    then the old `final` is renamed aside and deleted once the new one is in its place (put back
    if the new one's rename fails). A crash between the two renames leaves no `final` (it is made
    again), never a mix of both.
    """
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    # What a killed write of `final` left (its callers hold a lock on `final`, so none is running).
    for leftover in [*final.parent.glob(f".tmp-{final.name}-*"), *final.parent.glob(f".old-{final.name}-*")]:
        if len(leftover.name) == len(f".tmp-{final.name}-") + 8:  # not another folder's whose name starts alike
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in [*tmp.rglob("*"), tmp]:  # the folders' entries too, or a power cut could lose a file
            if path.is_file():
                usual_mode(path)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            elif path.is_dir():
                _fsync_dir(path)
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old.exists():  # the new one could not take its place: the old one stays
                os.rename(old, final)
            raise
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Record the sha256 of every file in `folder` in `folder/manifest.json`, plus `extra`."""
    files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {**extra, "files": files}
    write_json(folder / "manifest.json", manifest)
    return manifest


def set_aside(folder: Path, then: str) -> Path:
    """Rename a folder that fails its checksums (cut short or garbled by a crash of the machine)
    to `broken-<name>-<id>` beside it, kept for inspection, with a warning saying what `then`
    happens; the stage then makes it again."""
    aside = folder.with_name(f"broken-{folder.name}-{uuid.uuid4().hex[:8]}")
    folder.rename(aside)
    run_logger().warning(f"{folder} is incomplete or corrupted (it fails its checksums); set aside as {aside.name}; {then}")
    return aside


def verify_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if every file it lists exists with its recorded checksum, else None.
    An error reading a file that exists (EIO, EACCES, a stale NFS handle) is raised, not taken for
    a corrupt folder: it may pass, and a checkpoint taken for corrupt would be set aside."""
    try:
        manifest = read_json(folder / "manifest.json")
        for name, digest in manifest["files"].items():
            if file_sha256(folder / name) != digest:
                return None
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):  # not written, or cut short
        return None
    return manifest


def keyed_folder(parent: Path, spec: dict[str, Any]) -> Path:
    """The folder under `parent` of what `spec` determines (a token folder, an activation store):
    `<hash of spec>` (with its device by kind, `folder_key`), or else one that an earlier saeflow
    made for the same contents under another key: one that also held the run's seed (for every
    dataset; it now counts only for the built-in one), or the device's index. Of those, a complete
    one first (a seed sweep left one per seed), then one a killed fill left half done. Such a
    folder is used where it is: moving it could pull it from under a run reading it."""
    out = parent / stable_hash(folder_key(spec), 16)
    if (out / "manifest.json").exists():
        return out
    earlier = []
    for path in sorted(parent.glob("*/manifest.json")):
        if path.parent.name.startswith("."):  # a write's temporary folder (`atomic_dir`)
            continue
        manifest = read_json(path)
        stored = manifest.get("spec")
        if isinstance(stored, dict) and same_contents(stored, spec):
            earlier.append((not manifest.get("complete", True), path.parent))  # token folders are complete once listed
    return min(earlier)[1] if earlier else out


def folder_key(spec: dict[str, Any]) -> dict[str, Any]:
    """What the key of `spec`'s folder hashes: the spec, with a device by its kind only (GPUs of
    one kind make the same activations, so a job requeued from cuda:3 onto cuda:0, or sweep
    members on several GPUs, share a store), and a local model by its folder's name (it lies in
    the same artifacts folder as the store, which may be moved or copied with both in it)."""
    key = {**spec, "device": device_kind(spec["device"])} if "device" in spec else spec
    model = spec.get("model")
    if isinstance(model, dict) and model.get("kind") == "local" and model.get("path"):
        key = {**key, "model": {**model, "path": Path(model["path"]).name}}
    return key


def same_contents(stored_spec: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether a folder made for `stored_spec` holds what `spec` asks for: the same spec but for the
    device's index, or one that only adds the seed an earlier saeflow put into every key (see
    `keyed_folder`)."""
    stored_spec, spec = folder_key(stored_spec), folder_key(spec)
    return stored_spec == spec or ("seed" not in spec and {k: v for k, v in stored_spec.items() if k != "seed"} == spec)


class Busy(RuntimeError):
    """Another process holds the lock of a run or an activation store."""


# How long a lock taken without waiting is tried: `lock_holder` (`saeflow stop`) probes a run's
# lock by holding it shared for an instant, which must not make the run's start look busy.
LOCK_PATIENCE_SECONDS = 0.2
# How often a waiting lock is tried again, and a stop of this process looked for meanwhile.
LOCK_POLL_SECONDS = 0.5
# What a command refused a busy run is told (a sweep tells its members otherwise).
BUSY_HINT = "wait for it to finish, or start a new run with --new"
# The locks this process holds, by their file's (device, inode), whatever path (symlinks) they are
# reached by, with the thread holding each: that thread may take one again (the command line
# claims a run, then its flow run takes the run's lock).
_HELD_LOCKS: dict[tuple[int, int], int] = {}


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str, wait: bool, hint: str = BUSY_HINT, stop_requests: StopRequests | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (flock, released if the process dies). With `wait`, wait
    for the holder to finish, unless this process, or through `stop_requests` its run (`saeflow
    stop`, a cancel in Prefect), is asked to stop meanwhile (`stop_asked`: raises `Preempted`);
    without, raise Busy naming the holder, and `hint`. The thread that holds it may take it again."""
    from tasks.stopping import preempted, stop_asked

    if _HELD_LOCKS.get(_file_key(path)) == threading.get_ident():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if not _try_lock(f, LOCK_PATIENCE_SECONDS):
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise Busy(f"{what} is in use by {holder}; {hint}") from None
            run_logger().info(f"Waiting for {what}, in use by {holder}")  # a wait of hours must not look like a hang
            while not _try_lock(f, 0):
                if stop := stop_asked(stop_requests):  # waiting for a store another process fills: hours, for a large one
                    raise preempted(f"stopped by {stop} while waiting for {what}, in use by {holder}")
                time.sleep(LOCK_POLL_SECONDS)  # one lock request per poll: on NFS each goes to the server
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        opened = os.fstat(f.fileno())
        key = opened.st_dev, opened.st_ino
        try:
            _HELD_LOCKS[key] = threading.get_ident()
            yield
        finally:
            _HELD_LOCKS.pop(key, None)
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f, seconds: float) -> bool:
    """Take the exclusive flock of the open file `f`, trying for up to `seconds`."""
    give_up = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= give_up:
                return False
            time.sleep(0.01)


def run_logger():
    """The Prefect run's logger inside a flow or task run, else Python's `saeflow` logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("saeflow")


class ProgressArtifact:
    """A Prefect progress artifact (the bar on a run's page), updated at most every
    `MIN_SECONDS`: each update is a call to the Prefect API that the caller waits for (a helper
    measured about 30 ms to a local server), which a GPU's steps of a few ms would wait for at
    every log row."""

    MIN_SECONDS = 10.0

    def __init__(self, percent: float, description: str):
        from prefect.artifacts import create_progress_artifact

        self.id = create_progress_artifact(percent, description=description)
        self.updated = time.monotonic()

    def update(self, percent: float, final: bool = False) -> None:
        """Show `percent` now if it is `final` or the last update is `MIN_SECONDS` old."""
        from prefect.artifacts import update_progress_artifact

        if final or time.monotonic() - self.updated >= self.MIN_SECONDS:
            update_progress_artifact(self.id, percent)
            self.updated = time.monotonic()


def output_hashes(*files: Path) -> dict[str, str]:
    """`{path: sha256}` of files a stage's result depends on, for its `output_sha256`."""
    return {str(f): file_sha256(f) for f in files}


def whole_safetensors(path: Path) -> bool:
    """Whether `path` opens as a safetensors file, which checks its size against its header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            return True
    except (OSError, SafetensorError):  # missing, cut short or garbled
        return False


def _outputs_unchanged(result: dict[str, Any]) -> bool:
    outputs = [Path(p) for p in result.get("outputs", [])]
    if not all(p.exists() for p in outputs):
        return False
    # Safetensors files (listed, or in a listed folder) cut short or zeroed by a crash of the
    # machine: checked by their size against their header, cheaply, without hashing them.
    tensors = [f for p in outputs for f in ([p] if p.suffix == ".safetensors" else p.glob("*.safetensors") if p.is_dir() else [])]
    if not all(whole_safetensors(f) for f in tensors):
        return False
    return all(Path(p).is_file() and file_sha256(Path(p)) == digest for p, digest in result.get("output_sha256", {}).items())


def _drop_stale_record(ctx: TaskRunContext, key: str) -> None:
    store = ctx.result_store
    if store is None or not store.exists(key):
        return
    result = store.read(key).result
    if not isinstance(result, dict) or _outputs_unchanged(result):
        return
    record = Path(store.result_storage.basepath) / key
    record.unlink(missing_ok=True)


def stage(name: str, version: int, key_inputs: tuple[str, ...], **task_options: Any) -> Callable:
    """Make a pipeline stage: a Prefect task with a persisted JSON result.

    Its cache key is the stage name, `version` and a hash of the parameters named in
    `key_inputs`. Bump `version` when a change to the stage changes what it produces. The result
    must be a dict whose `outputs` list names the files or folders it stands for; its optional
    `output_sha256` (`output_hashes(...)`) names files whose contents it stands for, for files
    that a run with other settings rewrites in place.
    """

    def cache_key(ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
        key = f"{name}-v{version}-{stable_hash({k: parameters[k] for k in key_inputs}, 24)}"
        _drop_stale_record(ctx, key)
        return key

    return task(
        name=name,
        cache_key_fn=cache_key,
        persist_result=True,
        result_serializer="json",
        **task_options,
    )
