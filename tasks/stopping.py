"""Stopping on SIGTERM/SIGINT at a safe point, so that a preempted job loses nothing.

While `stop_signals()` is active (during filling and training in a single run; for the whole
of a sweep, whose members run in threads, and only the main thread can handle signals; in a Dask
worker while sweep members run there, `member_in_dask_worker`), the first SIGTERM or SIGINT is
only noted in `STOP_REQUESTS`. The stages that can stop cleanly look at `stop_requested()`:
training writes a checkpoint at the end of its step, filling an activation store stops with its
shards written, a sweep member not yet started does not start. Each raises `Preempted`, and
running the same command again continues. A second SIGINT exits at once. Elsewhere in a run
(`sigterm_interrupts`), SIGTERM ends it as Ctrl-C does, so that Prefect's temporary server ends
with it.

A Cancel in the Prefect UI of a run that `saeflow run` started (which has no runner to send
it SIGTERM) is seen by `watching_for_cancel` and stops it in the same way.

`saeflow stop RUN` asks for the same stop of a run's training from any process that sees the
run's folder (another shell, another machine sharing the artifacts folder), where a signal
cannot reach. `request_stop` writes `stop-request.json` into the run's folder, naming the
process that holds the run's lock; training looks for it at step boundaries (`StopRequests`)
and stops as on SIGTERM. A sweep on Dask, whose members run in the workers' processes, passes a
stop on to them through a marker file in its folder, and its members note signals sent to
their workers (`member_in_dask_worker`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from tasks.artifacts import read_json, write_json

EXIT_SIGINT = 130

# The signals received while `stop_signals()` was last active, as their names; kept after it
# ends, for the command line to read.
STOP_REQUESTS: list[str] = []

# The preemptions of this process, as their messages. A signal sent to a whole job (as Slurm
# sends it) also stops Prefect's temporary server, a child of this process: the command line
# then gets the lost connection, not `Preempted`, and reads here what was stopped.
PREEMPTIONS: list[str] = []
# The checkpoints training wrote because it was asked to stop, for the command line to count.
STOP_CHECKPOINTS: list[Path] = []
# Stops noted after a fill's last batch, by store folder: the fill completes (its result is
# cached, its store not read again), and the run stops right after it (`stop_after_fill`).
STOPS_AFTER_FILL: dict[str, str] = {}


class Preempted(RuntimeError):
    """Stopped on SIGTERM/SIGINT at a safe point; running the same command again continues."""


def preempted(message: str) -> Preempted:
    """A `Preempted` for `message`, recorded in PREEMPTIONS for the command line."""
    PREEMPTIONS.append(message)
    return Preempted(message)


def stop_after_fill(store_ref: dict) -> None:
    """Raise `Preempted` if a stop was noted after the last batch of the fill of `store_ref`'s
    store (`STOPS_AFTER_FILL`), which let the fill complete."""
    if stop := STOPS_AFTER_FILL.pop(store_ref["path"], None):
        raise preempted(f"stopped by {stop} after filling activation store {Path(store_ref['path']).name} (complete), before training")


def cancelled_in_prefect(flow_run_id=None) -> bool:
    """Whether this flow run (by default the current one) is being cancelled in Prefect (the UI's
    Cancel, `prefect flow-run cancel`): its state there is Cancelling. The runner of a served
    deployment then sends SIGTERM; a run that `saeflow run` started has no runner, and its own
    `watching_for_cancel` sees it."""
    from prefect import get_client, runtime

    flow_run_id = flow_run_id or runtime.flow_run.id
    if flow_run_id is None:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 - the server is gone too (a signal to the whole job)
        return False
    return state is not None and state.is_cancelling()


CANCEL_POLL_SECONDS = 10.0
CANCELLED_IN_PREFECT = "its cancel in Prefect"
# The run folders whose flow run was seen Cancelling by `watching_for_cancel`.
CANCELLED_RUNS: set[str] = set()
_CANCEL_LOCK = threading.Lock()


@contextlib.contextmanager
def watching_for_cancel(run_folder: Path | None = None):
    """While the block runs, look every `CANCEL_POLL_SECONDS` on a thread whether the current flow
    run is being cancelled in Prefect; once it is, the run's `StopRequests` (of `run_folder`) say
    so, or, for a sweep (no `run_folder`), `stop_requested()` does, as after SIGTERM: filling and
    training stop at their next safe point. A flow run that `saeflow run` or `saeflow sweep`
    started has no runner to stop it: without this, a Cancel in the UI left it Cancelling for
    good, and the run, which went on, could not be marked finished."""
    from prefect import runtime

    flow_run_id, key = runtime.flow_run.id, run_folder and str(Path(run_folder).resolve())
    ended = threading.Event()

    def watch() -> None:
        while not ended.wait(CANCEL_POLL_SECONDS):
            if cancelled_in_prefect(flow_run_id):
                with _CANCEL_LOCK:  # not once the block has ended: it would stop a later run of the folder
                    if ended.is_set():
                        return
                    if key:
                        CANCELLED_RUNS.add(key)
                    else:
                        STOP_REQUESTS.append(CANCELLED_IN_PREFECT)
                return

    # Not joined at the end: a look may be waiting on a server that a signal to the job ended.
    threading.Thread(target=watch, name="saeflow-cancel-watch", daemon=True).start()
    try:
        yield
    finally:
        with _CANCEL_LOCK:
            ended.set()
            if key:
                CANCELLED_RUNS.discard(key)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the stages that stop at a safe point (`sigterm_interrupts`)."""


OUTSIDE_SAFE_POINTS = "outside the stages that stop at a safe point (filling, training)"


def _terminate(signum, frame) -> None:
    PREEMPTIONS.append(f"stopped by {signal.Signals(signum).name} {OUTSIDE_SAFE_POINTS}")
    raise Terminated(PREEMPTIONS[-1])


@contextlib.contextmanager
def no_retries_once_the_temporary_server_ends():
    """A signal sent to the whole process group (Ctrl-C in a terminal, a job-wide SIGTERM) also
    ends Prefect's temporary server, a child of this process that Prefect does not start again.
    Its client would then retry each report of the run's states and logs with growing
    back-offs: a run stopped by Ctrl-C in training took 220 s to exit. Until the block ends, a
    thread looks 10 times a second: once the temporary server's process has ended, it sets the
    client's retries to 0 (Prefect reads the setting at each try), so the reports fail at once
    (9.5 s to exit). It stays so for the rest of the command, whose last log flush at exit
    would retry too: for the command line only, whose process then ends. With a server of its
    own (PREFECT_API_URL) nothing changes."""
    from prefect.settings import get_current_settings

    def server_ended() -> bool:
        # None before Prefect imports its server module (or while it does): no temporary server yet
        server_class = getattr(sys.modules.get("prefect.server.api.server"), "SubprocessASGIServer", None)
        if server_class is None:
            return False
        processes = [getattr(s, "server_process", None) for s in list(server_class._instances.values())]
        return any(p is not None and p.poll() is not None for p in processes)

    # The settings this thread sees, and those a thread without a Prefect context sees (Prefect's
    # global ones, which its event-loop thread, where the sync client's requests run, reads).
    this_thread = get_current_settings()

    def no_retries_if_ended() -> bool:
        if server_ended():
            for settings in (this_thread, get_current_settings()):
                settings.client.max_retries = 0
            return True
        return False

    with polling(0.1, no_retries_if_ended, "saeflow-temporary-server-watch"):
        yield


@contextlib.contextmanager
def polling(every: float, check, name: str):
    """Until the block ends, a daemon thread named `name` calls `check` every `every` seconds,
    until it returns True."""
    ended = threading.Event()

    def loop() -> None:
        while not ended.wait(every):
            if check():
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        thread.join()


def raised_while(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The exception of `kind` among those `error` was raised from or while handling, if any: a
    signal sent to the whole job (or Ctrl-C in a terminal) also ends Prefect's temporary server,
    and telling the server of the crash then fails with the lost connection instead."""
    todo, seen = [error], set()
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, kind):
            return error
        todo += [error.__cause__, error.__context__]
    return None


def terminated_by(error: BaseException) -> str | None:
    """The name of the signal, if `error` came while Prefect's engine handled a termination
    signal (its `TerminationSignal`)."""
    from prefect.exceptions import TerminationSignal

    found = raised_while(error, TerminationSignal)
    return signal.Signals(found.signal).name if found is not None else None


@contextlib.contextmanager
def sigterm_interrupts():
    """Until the block ends, SIGTERM in the main thread raises `Terminated` (a KeyboardInterrupt,
    as SIGINT raises) where `stop_signals` is not active, instead of ending the process on the
    spot: the run then ends as on Ctrl-C, and what it started (Prefect's temporary server, a
    child process) is stopped with it instead of being left running."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _note_stop(signum, frame) -> None:
    name = signal.Signals(signum).name
    signalled = [r for r in STOP_REQUESTS if r != CANCELLED_IN_PREFECT]  # a sweep's cancel is no first Ctrl-C
    if signalled and signum == signal.SIGINT:
        sys.stderr.write("saeflow: second SIGINT, exiting now without a checkpoint\n")
        os._exit(EXIT_SIGINT)
    # Only note it (and say so): logging here could re-enter a log handler the signal interrupted.
    if not signalled:
        os.write(2, f"saeflow: {name} received: stopping at the next safe point (training writes a checkpoint first); a second Ctrl-C exits at once\n".encode())
    STOP_REQUESTS.append(name)


@contextlib.contextmanager
def stop_signals():
    """Note SIGTERM/SIGINT in `STOP_REQUESTS` instead of dying, until the block ends. Outside the
    main thread, or inside an active `stop_signals()`, it leaves the handlers as they are."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _note_stop:
        yield
        return
    STOP_REQUESTS.clear()
    STOPS_AFTER_FILL.clear()
    previous = {s: signal.signal(s, _note_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# A Dask worker's process: how many sweep members run in it, and the signal handlers that
# `member_in_dask_worker` replaced while they run.
_WORKER = {"members": 0, "replaced": {}}
_WORKER_LOCK = threading.Lock()
# Each sweep member running in this process (a Dask worker), by its run folder: its sweep's
# marker file, which the sweep's process writes when it is asked to stop (see `StopRequests`).
SWEEP_STOPPED_MARKERS: dict[str, Path] = {}


@contextlib.contextmanager
def member_in_dask_worker(run_folder: Path, stopped_marker: Path):
    """Run the sweep member whose run is `run_folder` in this Dask worker's process. Meanwhile
    SIGTERM/SIGINT are noted as `stop_signals` notes them, so that a signal sent to the whole job
    (as Slurm sends it) stops the member at a safe point instead of killing it; the worker's main
    thread, which runs its event loop and alone can set handlers, installs this where SIGTERM
    has its default action (a nanny's worker process; `dask worker --no-nanny`'s own process
    keeps Dask's handler). When the last member ends, the handlers are put back and the noted
    signal is forgotten: the worker lives on (killing it then would lose the members' results,
    which Dask keeps in the worker until the sweep fetches them, and run them again), and a
    signal after that acts as before. Training also stops once the sweep's process writes
    `stopped_marker`. Outside a Dask worker, only the marker counts."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask worker
        worker = None
    key = str(Path(run_folder).resolve())
    SWEEP_STOPPED_MARKERS[key] = stopped_marker
    with _WORKER_LOCK:
        _WORKER["members"] += 1
        first = _WORKER["members"] == 1
    if worker is not None and first:
        worker.loop.add_callback(_note_signals_in_worker)
    try:
        yield
    finally:
        SWEEP_STOPPED_MARKERS.pop(key, None)
        with _WORKER_LOCK:
            _WORKER["members"] -= 1
            last = _WORKER["members"] == 0
        if worker is not None and last:
            worker.loop.add_callback(_restore_signals_in_worker)


def sweep_stopped_by(marker: Path) -> str | None:
    """What stopped the sweep whose marker file is `marker` (its text), or None if it was not."""
    return (marker.read_text() or "a stop of the sweep") if marker.is_file() else None


def _note_signals_in_worker() -> None:
    if threading.current_thread() is threading.main_thread() and not _WORKER["replaced"] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        STOP_REQUESTS.clear()
        STOPS_AFTER_FILL.clear()
        _WORKER["replaced"] = {s: signal.signal(s, _note_stop) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals_in_worker() -> None:
    if _WORKER["members"] or not _WORKER["replaced"]:  # another member started meanwhile
        return
    replaced, _WORKER["replaced"] = _WORKER["replaced"], {}
    for s, handler in replaced.items():
        signal.signal(s, handler)
    STOP_REQUESTS.clear()
    STOPS_AFTER_FILL.clear()


def stop_requested() -> str | None:
    """The name of the signal that asked this process to stop, while `stop_signals()` is active."""
    if STOP_REQUESTS and signal.getsignal(signal.SIGTERM) is _note_stop:
        return STOP_REQUESTS[0]
    return None



def stop_asked(requests: StopRequests | None) -> str | None:
    """What asked this process (a signal, `stop_requested`) or, through `requests`, its run
    (`saeflow stop`) to stop, or None. A run's request is then done: it is not asked again."""
    if stop := stop_requested():
        return stop
    if requests is not None and (stop := requests.requested()):
        requests.done()
        return stop
    return None


STOP_REQUEST_FILE = "stop-request.json"


def lock_holder(lock: Path) -> str | None:
    """Who holds the `exclusive_lock` at `lock` (what its holder wrote there), or None if nobody
    does. (The probe holds a shared lock for an instant, which `exclusive_lock` outlasts.)"""
    if not lock.is_file():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            for _ in range(50):  # the holder writes its name just after taking the lock
                f.seek(0)
                if holder := f.read().strip():
                    return holder
                time.sleep(0.01)
            return "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def request_stop(run_folder: Path) -> str | None:
    """Ask the process running the run in `run_folder` to stop as on SIGTERM (in training, a
    checkpoint at the end of the current step; in the fill, after its model batch); returns that
    process, or None if the run is not running. The request names the process, so a later run
    of the name ignores it."""
    holder = lock_holder(run_folder / ".lock")
    if holder is not None:
        by = f"process {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        write_json(run_folder / STOP_REQUEST_FILE, {"holder": holder, "by": by, "reason": "saeflow stop"})
    return holder


class StopRequests:
    """`request_stop` requests for the run in `run_folder`, and the stop of the sweep it is a
    member of on Dask (`SWEEP_STOPPED_MARKERS`), looked for at most once a second (a file's
    status on a shared filesystem can take a round trip). A request made for another process of
    the run (an earlier one), or that cannot be read, is removed."""

    def __init__(self, run_folder: Path):
        self.request, self.lock = Path(run_folder) / STOP_REQUEST_FILE, Path(run_folder) / ".lock"
        self.key = str(Path(run_folder).resolve())
        self.marker = SWEEP_STOPPED_MARKERS.get(self.key)
        self.next_look = 0.0

    def requested(self) -> str | None:
        """What asked this run to stop, or None."""
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + 1.0
        if self.key in CANCELLED_RUNS:
            return CANCELLED_IN_PREFECT
        if self.marker is not None and (stop := sweep_stopped_by(self.marker)):
            return stop
        if not self.request.is_file():
            return None
        try:
            request = read_json(self.request)
            mine = self.lock.is_file() and request["holder"] == self.lock.read_text().strip()
        except (OSError, ValueError, KeyError, TypeError):  # written by hand, or cut short
            mine = False
        if not mine:
            self.request.unlink(missing_ok=True)
            return None
        return f"{request.get('reason', 'saeflow stop')} (from {request.get('by', 'another process')})"

    def done(self) -> None:
        """The request is carried out: the next run of this name goes on."""
        self.request.unlink(missing_ok=True)
