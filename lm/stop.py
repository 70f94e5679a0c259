"""Stop requests: SIGTERM and SIGHUP ask a training process to stop, save and exit 0, from the first line of
`attnlab train` on.

A cluster sends SIGTERM before a time limit or a preemption, and a closed ssh session sends SIGHUP; either can
arrive while the run is still starting (imports, joining the other processes, restoring, compiling), when the
training loop's own handler is not installed yet, and Python's default would end the process with 143 or 129.
`early()` holds such a signal until the loop takes it (`take`): the run then stops before its first step.
A SIGHUP that the process was started to ignore (nohup) stays ignored.

The module imports nothing heavy, so that the CLI installs it before jax is imported.
"""
from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_pending: int | None = None


def _hold(signum, frame):
    global _pending
    _pending = signum


def pending() -> int | None:
    """The stop signal that arrived and has not been taken, if any."""
    return _pending


def take() -> int | None:
    """The pending stop signal, cleared."""
    global _pending
    signum, _pending = _pending, None
    return signum


def handled(signals=SIGNALS) -> list[signal.Signals]:
    """The `signals` a stop handler should catch here: SIGHUP only when the process was not told to ignore it."""
    return [s for s in signals if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)]


@contextlib.contextmanager
def early(restore: bool = True):
    """Hold SIGTERM and SIGHUP for the block (the whole `attnlab train` command); the previous handlers come back
    after it unless `restore` is False: the process is about to exit, and a signal during its shutdown (a job's
    time-limit warning just after the run finished) must not turn a finished run's exit status into 143."""
    previous = {}
    try:
        for s in handled():
            previous[s] = signal.signal(s, _hold)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield
    finally:
        for s, h in previous.items() if restore else ():
            signal.signal(s, h)
        take()


__all__ = ["SIGNALS", "pending", "take", "handled", "early"]
