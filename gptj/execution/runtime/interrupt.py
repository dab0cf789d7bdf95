"""Ctrl-C (SIGINT) and SIGTERM as a request to stop at the next safe point.

The first signal only sets a flag: the training loop finishes its step, saves a checkpoint and
stops. A second Ctrl-C raises `Aborted` at once, for a user who does not want to wait. Under
torchrun one Ctrl-C reaches a worker twice (from the terminal, then forwarded by the agent), so
a SIGINT within `DUPLICATE_S` of the first one counts as the same press.
"""

from __future__ import annotations

import signal
import threading
import time

DUPLICATE_S = 1.0
EXIT_CODE = {signal.SIGINT: 130, signal.SIGTERM: 0}  # a stop after Ctrl-C still says "interrupted"
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C: stop now, without waiting for the step or a checkpoint."""


class StopRequest:
    """Context manager: `signum` is the first stop signal received (0 while none), main thread only."""

    def __init__(self, announce=None):
        self.signum = 0
        self._first_at = 0.0
        self._previous = {}
        self._announce = announce  # called once with the signal's name when the first one comes

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            if self._announce is not None:
                self._announce(NAMES[signum])
        elif signum == signal.SIGINT and now - self._first_at > DUPLICATE_S:
            raise Aborted("a second Ctrl-C")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
