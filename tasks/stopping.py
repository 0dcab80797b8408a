"""Stopping on SIGTERM/SIGINT at a safe point, so that a preempted job loses nothing.

While `stop_signals()` is active (during training in a single run; for the whole of a sweep,
whose members run in threads, and only the main thread can handle signals; for good in a Dask
worker that runs sweep members, `note_stops_in_dask_worker`), the first SIGTERM or SIGINT is
only noted in `STOP_REQUESTS`. The stages that can stop cleanly look at
`stop_requested()`: training writes a checkpoint at the end of its step, filling an activation
store stops with its shards written, a sweep member not yet started does not start. Each raises
`Preempted`, and running the same command again continues. A second SIGINT exits at once.

`saeflow stop RUN` asks for the same stop of a run's training from any process that sees the
run's folder (another shell, another machine sharing the artifacts folder), where a signal
cannot reach: the members of a sweep on Dask run in the workers' processes. `request_stop`
writes `stop-request.json` into the run's folder, naming the process that holds the run's lock;
training looks for it at step boundaries (`StopRequests`) and stops as on SIGTERM.
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


class Preempted(RuntimeError):
    """Stopped on SIGTERM/SIGINT at a safe point; running the same command again continues."""


def _note_stop(signum, frame) -> None:
    name = signal.Signals(signum).name
    if STOP_REQUESTS and signum == signal.SIGINT:
        sys.stderr.write("saeflow: second SIGINT, exiting now without a checkpoint\n")
        os._exit(EXIT_SIGINT)
    # Only note it (and say so): logging here could re-enter a log handler the signal interrupted.
    if not STOP_REQUESTS:
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
    previous = {s: signal.signal(s, _note_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def note_stops_in_dask_worker() -> None:
    """In a Dask worker's process, note SIGTERM/SIGINT from now on as `stop_signals` does, so that
    a signal sent to the whole job (as Slurm sends it) stops the sweep members running there at a
    safe point instead of killing them. The worker's main thread, which runs its event loop and
    alone can set signal handlers, installs it, where SIGTERM has its default action (the worker
    processes a nanny starts): a worker that is `dask worker --no-nanny`'s own process keeps
    the handler with which Dask closes it. Outside a Dask worker it does nothing."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask worker
        return

    def install() -> None:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, _note_stop)

    worker.loop.add_callback(install)


def stop_requested() -> str | None:
    """The name of the signal that asked this process to stop, while `stop_signals()` is active."""
    if STOP_REQUESTS and signal.getsignal(signal.SIGTERM) is _note_stop:
        return STOP_REQUESTS[0]
    return None



STOP_REQUEST_FILE = "stop-request.json"


def lock_holder(lock: Path) -> str | None:
    """Who holds the `exclusive_lock` at `lock` (what its holder wrote there), or None if nobody does."""
    if not lock.is_file():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def request_stop(run_folder: Path, reason: str = "saeflow stop") -> str | None:
    """Ask the process running the run in `run_folder` to stop its training as on SIGTERM (a
    checkpoint at the end of the current step), for `reason`; returns that process, or None if
    the run is not running. The request names the process, so a later run of the name ignores it."""
    holder = lock_holder(run_folder / ".lock")
    if holder is not None:
        by = f"process {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        write_json(run_folder / STOP_REQUEST_FILE, {"holder": holder, "by": by, "reason": reason})
    return holder


class StopRequests:
    """`request_stop` requests for the run in `run_folder`, looked for at most once a second (a
    file's status on a shared filesystem can take a round trip). A request made for another
    process of the run (an earlier one) is removed."""

    def __init__(self, run_folder: Path):
        self.request, self.lock = Path(run_folder) / STOP_REQUEST_FILE, Path(run_folder) / ".lock"
        self.next_look = 0.0

    def requested(self) -> str | None:
        """What asked this run to stop, or None."""
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + 1.0
        if not self.request.is_file():
            return None
        request = read_json(self.request)
        if not self.lock.is_file() or request.get("holder") != self.lock.read_text().strip():
            self.request.unlink(missing_ok=True)
            return None
        return f"{request.get('reason', 'saeflow stop')} (from {request['by']})"

    def done(self) -> None:
        """The request is carried out: the next run of this name goes on."""
        self.request.unlink(missing_ok=True)
