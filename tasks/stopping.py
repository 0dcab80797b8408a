"""Stopping on SIGTERM/SIGINT at a safe point, so that a preempted job loses nothing.

While `stop_signals()` is active (during training in a single run; for the whole of a sweep,
whose members run in threads, and only the main thread can handle signals), the first SIGTERM
or SIGINT is only noted in `STOP_REQUESTS`. The stages that can stop cleanly look at
`stop_requested()`: training writes a checkpoint at the end of its step, filling an activation
store stops with its shards written, a sweep member not yet started does not start. Each raises
`Preempted`, and running the same command again continues. A second SIGINT exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

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


def stop_requested() -> str | None:
    """The name of the signal that asked this process to stop, while `stop_signals()` is active."""
    if STOP_REQUESTS and signal.getsignal(signal.SIGTERM) is _note_stop:
        return STOP_REQUESTS[0]
    return None

